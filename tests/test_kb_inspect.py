"""`ingestd inspect` on knowledge bases learned by real runs, checked against counts taken from the store itself."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ingestd import KnowledgeBase
from ingestd.errors import IngestError
from ingestd.engine.rules import kb_id
from ingestd.tokenize import load_tokenizer

from .conftest import CORPUS
from .golden import run_cli

NODES = ["node0", "node1", "node2", "node3"]


def inspect(*arguments: str, expect: int = 0, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "ingestd", "inspect", *arguments], capture_output=True, text=True,
                            timeout=300, cwd=cwd)  # fmt: skip
    assert result.returncode == expect, f"exit {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    if expect:
        assert "Traceback" not in result.stderr
    return result


def inspect_json(*arguments: str, cwd: Path | None = None) -> Any:
    return json.loads(inspect(*arguments, "--json", cwd=cwd).stdout)


def sql(data: Path, query: str, *parameters: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(data / "kato.sqlite3") as connection:
        return connection.execute(query, parameters).fetchall()


@pytest.fixture(scope="module")
def learned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """tinyshakespeare learned in two runs of one run directory: 700 samples, then resumed to 1,500."""
    data = tmp_path_factory.mktemp("inspect") / "kb"
    run_dir = data / "runs" / "shakespeare"
    common = [str(CORPUS), "--data", str(data), "--metadata-levels", "2,3", "--run-dir", str(run_dir)]
    first = run_cli(*common, "--max-samples", "700")
    second = run_cli(*common, "--max-samples", "1500")
    return data, [first, second]


def test_stats_are_the_store_s_own_counts(learned: tuple[Path, list[dict[str, Any]]]) -> None:
    data, summaries = learned
    stats = inspect_json("stats", "--data", str(data))
    assert [row["node_id"] for row in stats] == NODES
    assert [row["chunk_size"] for row in stats] == [8, 8, 8, 8]
    learns = [sum(level) for level in zip(*(summary["patterns_per_level"] for summary in summaries), strict=True)]
    for row, node, applied in zip(stats, NODES, learns, strict=True):
        kb = kb_id(node)
        count, total, singletons, shortest, longest = sql(
            data, "SELECT count(*), sum(frequency), sum(frequency = 1), min(length), max(length) FROM patterns "
            "WHERE kb_id = ?", kb)[0]  # fmt: skip
        assert (row["patterns"], row["total_frequency"], row["singletons"]) == (count, total, singletons)
        assert row["total_frequency"] == applied  # every learn of both runs, once
        assert (row["length_min"], row["length_max"]) == (shortest, longest)
        assert {int(size): number for size, number in row["lengths"].items()} == dict(
            sql(data, "SELECT length, count(*) FROM patterns WHERE kb_id = ? GROUP BY length", kb))
        assert row["frequency_max"] == sql(data, "SELECT max(frequency) FROM patterns WHERE kb_id = ?", kb)[0][0]
        assert row["singleton_share"] == pytest.approx(singletons / count)
    assert stats[0]["frequency_p50"] >= 1 and stats[0]["frequency_p99"] <= stats[0]["frequency_max"]
    # The Python API answers the same.
    with KnowledgeBase(data) as kb:
        frame = kb.stats()
    assert frame["patterns"].tolist() == [row["patterns"] for row in stats]
    assert "node3" in inspect("stats", "--data", str(data)).stdout  # the table, for people


def test_top_is_ordered_by_frequency_and_decoded_by_the_tokenizer(learned: tuple[Path, list[dict[str, Any]]]) -> None:
    data, _ = learned
    tokenizer = load_tokenizer()
    top = inspect_json("top", "--data", str(data), "--level", "0", "-n", "15")
    expected = sql(data, "SELECT name, frequency, pattern_data FROM patterns WHERE kb_id = ? "
                   "ORDER BY frequency DESC, name LIMIT 15", kb_id("node0"))  # fmt: skip
    assert [(row["name"], row["frequency"]) for row in top] == [("PTRN|" + name, frequency) for name, frequency, _ in expected]
    for row, (_, _, pattern_data) in zip(top, expected, strict=True):
        tokens = [symbol for event in json.loads(pattern_data) for symbol in event]
        assert row["text"] == tokenizer.decode(tokens)
        assert "Ġ" not in row["text"] and "Ċ" not in row["text"]  # decoded, not the token strings
    assert top[0]["frequency"] > 1
    # A higher node's top patterns are unravelled to text from the corpus.
    corpus = CORPUS.read_text(encoding="utf-8")
    for row in inspect_json("top", "--data", str(data), "--level", "node2", "-n", "5"):
        assert row["text"] in corpus and len(row["text"]) > 100


def test_show_unravels_a_top_pattern_to_its_sample(learned: tuple[Path, list[dict[str, Any]]]) -> None:
    data, _ = learned
    name, metadata_json = sql(data, "SELECT name, metadata FROM patterns WHERE kb_id = ? ORDER BY name LIMIT 1",
                              kb_id("node3"))[0]  # fmt: skip
    shown = inspect_json("show", "PTRN|" + name, "--data", str(data))
    assert {"name", "node", "frequency", "metadata", "tokens", "text"} <= set(shown)
    assert (shown["name"], shown["node"], shown["level"]) == ("PTRN|" + name, "node3", 3)
    assert shown["metadata"] == json.loads(metadata_json) and shown["metadata"]["source"] == ["tinyshakespeare"]
    assert shown["missing"] == [] and len(shown["below"]) == 3
    assert len(shown["tokens"]) >= 2 * 8 * 8 * 2  # at least two node2 names of two node1 names of 8 tokens...
    assert shown["text"] == load_tokenizer().decode(shown["tokens"])
    # the sample it came from starts with that text
    paragraphs = [part for part in CORPUS.read_text(encoding="utf-8").split("\n\n") if len(part.strip()) > 10]
    index = int(shown["metadata"]["sample_index"][0])
    assert paragraphs[index].startswith(shown["text"])
    # the bare sha1 works too, and the table form prints the text
    assert shown["text"][:40] in inspect("show", name, "--data", str(data)).stdout


def test_histogram_table_and_plot(learned: tuple[Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    data, _ = learned
    plot = tmp_path / "histogram.png"
    histogram = inspect_json("histogram", "--data", str(data), "--plot", str(plot))
    for node in NODES:
        rows = [row for row in histogram if row["node_id"] == node]
        count, total = sql(data, "SELECT count(*), sum(frequency) FROM patterns WHERE kb_id = ?", kb_id(node))[0]
        assert sum(row["patterns"] for row in rows) == count
        assert sum(row["patterns"] * row["frequency"] for row in rows) == total
    image = plot.read_bytes()
    assert image.startswith(b"\x89PNG") and len(image) > 20_000
    import matplotlib.image

    pixels = matplotlib.image.imread(plot)
    assert (pixels[..., :3] < 0.5).any(axis=-1).mean() > 0.005  # drawn on, not a blank canvas
    assert pixels.shape[1] > pixels.shape[0] * 0.8  # four panels, two by two


def test_sample_is_reproducible_and_follows_frequency(learned: tuple[Path, list[dict[str, Any]]]) -> None:
    data, _ = learned
    first = inspect_json("sample", "--data", str(data), "--level", "0", "-n", "4000", "--seed", "5")
    again = inspect_json("sample", "--data", str(data), "--level", "0", "-n", "4000", "--seed", "5")
    other = inspect_json("sample", "--data", str(data), "--level", "0", "-n", "4000", "--seed", "6")
    assert first == again and first != other
    total = sql(data, "SELECT sum(frequency) FROM patterns WHERE kb_id = ?", kb_id("node0"))[0][0]
    name, frequency = sql(data, "SELECT name, frequency FROM patterns WHERE kb_id = ? ORDER BY frequency DESC LIMIT 1",
                          kb_id("node0"))[0]  # fmt: skip
    drawn = sum(row["name"] == "PTRN|" + name for row in first)
    expected = 4000 * frequency / total
    assert abs(drawn - expected) < 6 * (expected**0.5) + 1, (drawn, expected)
    assert all(row["text"] for row in first[:20])
    texts = inspect("sample", "--data", str(data), "--level", "2", "-n", "2").stdout
    assert texts.count("--- PTRN|") == 2


def test_export_writes_every_pattern(learned: tuple[Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    data, _ = learned
    out = tmp_path / "node2.parquet"
    inspect("export", "--data", str(data), "--level", "2", "--out", str(out))
    table = pq.read_table(out)
    rows = sql(data, "SELECT name, frequency, length, pattern_data, metadata FROM patterns WHERE kb_id = ? ORDER BY name",
               kb_id("node2"))  # fmt: skip
    assert table.column_names == ["name", "length", "frequency", "pattern_data", "metadata"]
    assert table.column("name").to_pylist() == ["PTRN|" + row[0] for row in rows]
    assert table.column("frequency").to_pylist() == [row[1] for row in rows]
    assert table.column("pattern_data").to_pylist() == [json.loads(row[3]) for row in rows]
    assert [dict(items) for items in table.column("metadata").to_pylist()] == [json.loads(row[4]) for row in rows]
    inspect("export", "--data", str(data), "--level", "2", "--out", str(out))  # again: replaced whole
    assert pq.read_table(out).num_rows == len(rows)
    assert not list(tmp_path.glob(".*partial"))


def test_diff_of_two_runs_that_differ_by_known_samples(tmp_path: Path) -> None:
    data = tmp_path / "kb"
    a = run_cli(str(CORPUS), "--data", str(data), "--run-id", "a", "--node-ids", "{run_id}-node{level}",
                "--max-samples", "300", "--run-dir", str(data / "runs" / "a"))  # fmt: skip
    run_cli(str(CORPUS), "--data", str(data), "--run-id", "b", "--node-ids", "{run_id}-node{level}",
            "--max-samples", "400", "--run-dir", str(data / "runs" / "b"))  # fmt: skip
    diff = inspect_json("diff", "a", str(data / "runs" / "b"), "--data", str(data))
    assert [row["node_a"] for row in diff] == [f"a-node{level}" for level in range(4)]
    for row in diff:
        left = dict(sql(data, "SELECT name, frequency FROM patterns WHERE kb_id = ?", kb_id(row["node_a"])))
        right = dict(sql(data, "SELECT name, frequency FROM patterns WHERE kb_id = ?", kb_id(row["node_b"])))
        assert row["only_a"] == len(left.keys() - right.keys()) == 0  # b learned a's 300 samples and 100 more
        assert row["only_b"] == len(right.keys() - left.keys())
        assert row["both"] == len(left.keys() & right.keys())
        assert row["frequency_changed"] == sum(left[name] != right[name] for name in left.keys() & right.keys())
        assert (row["total_frequency_a"], row["total_frequency_b"]) == (sum(left.values()), sum(right.values()))
    assert diff[0]["only_b"] > 0 and diff[0]["frequency_changed"] > 0
    assert diff[0]["total_frequency_a"] == a["patterns_per_level"][0]
    # several hierarchies in one store: inspect asks which, naming the runs
    refused = inspect("stats", "--data", str(data), expect=2)
    assert "several hierarchies" in refused.stderr and "a, b" in refused.stderr
    assert [row["node_id"] for row in inspect_json("stats", "--data", str(data), "--run-id", "b")] == [
        f"b-node{level}" for level in range(4)]
    assert len(inspect_json("stats", "--data", str(data), "--node-ids", "a-node{level}")) == 4


def test_bad_input_is_one_line_and_exit_2(learned: tuple[Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    data, _ = learned
    assert "no knowledge store" in inspect("stats", "--data", str(tmp_path / "nowhere"), expect=2).stderr
    assert "no node of" in inspect("show", "PTRN|" + "0" * 40, "--data", str(data), expect=2).stderr
    assert "has no node" in inspect("top", "--data", str(data), "--level", "9", expect=2).stderr
    assert "holds no node named" in inspect("stats", "--data", str(data), "--node-ids", "zz{level}", expect=2).stderr
    assert "holds no ingestd run" in inspect("stats", "--data", str(data), "--run-dir", str(tmp_path), expect=2).stderr
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "kato.sqlite3").write_text("not a database")
    assert "cannot read the knowledge store" in inspect("stats", "--data", str(tmp_path / "junk"), expect=2).stderr
    assert "no run 'x'" in inspect("diff", "x", "y", "--data", str(data), expect=2).stderr
    assert "a run id is letters" in inspect("stats", "--data", str(data), "--run-id", "../../etc", expect=2).stderr
    assert "holds no node 'nod0'" in inspect("stats", "--data", str(data), "--node-ids", "nod0,node1", expect=2).stderr
    refused = inspect("sample", "--data", str(data), "--seed", "-1", expect=2)
    assert "Traceback" not in refused.stderr and "--seed" in refused.stderr
    with KnowledgeBase(data) as kb:
        for bad in (lambda: kb.top(n=0), lambda: kb.sample(n=-1), lambda: kb.sample(seed=-3), lambda: kb.node(True)):
            with pytest.raises(IngestError):
                bad()


def test_inspect_reads_while_a_run_writes(tmp_path: Path) -> None:
    data = tmp_path / "kb"
    source = tmp_path / "big.txt"
    source.write_text((CORPUS.read_text(encoding="utf-8") + "\n\n") * 3, encoding="utf-8")
    run_cli(str(source), "--data", str(data), "--max-samples", "50")  # the store and its nodes exist
    writer = subprocess.Popen([sys.executable, "-m", "ingestd", "run", str(source), "--data", str(data), "--no-progress",
                               "--log-level", "warning", "--planners", "0"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        seen = []
        while writer.poll() is None and len(seen) < 6:
            seen.append(inspect_json("stats", "--data", str(data))[0]["total_frequency"])
            time.sleep(0.2)
        assert writer.wait(timeout=300) == 0, writer.stderr.read()  # type: ignore[union-attr]
    finally:
        if writer.poll() is None:
            writer.kill()
    assert seen == sorted(seen) and len(seen) >= 2
    final = inspect_json("stats", "--data", str(data))[0]["total_frequency"]
    assert final == sql(data, "SELECT sum(frequency) FROM patterns WHERE kb_id = ?", kb_id("node0"))[0][0]
    assert final >= seen[-1]


def test_prune_dry_run_then_prune_then_stats(learned: tuple[Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "kb"
    shutil.copytree(learned[0], data)
    before = {node: dict(sql(data, "SELECT name, frequency FROM patterns WHERE kb_id = ?", kb_id(node))) for node in NODES}
    dry = inspect_json("prune", "--below", "2", "--levels", "0,1", "--dry-run", "--data", str(data))
    assert [(row["node_id"], row["removed"]) for row in dry] == [
        (node, sum(frequency < 2 for frequency in before[node].values())) for node in ("node0", "node1")]
    assert dry[0]["removed"] > 0
    assert dry[0]["frequency_removed"] == sum(frequency for frequency in before["node0"].values() if frequency < 2)
    assert {node: dict(sql(data, "SELECT name, frequency FROM patterns WHERE kb_id = ?", kb_id(node))) for node in NODES} == before
    pruned = inspect_json("prune", "--below", "2", "--levels", "0,1", "--data", str(data))
    assert [row["removed"] for row in pruned] == [row["removed"] for row in dry]
    for node in NODES:
        after = dict(sql(data, "SELECT name, frequency FROM patterns WHERE kb_id = ?", kb_id(node)))
        kept = before[node] if node in ("node2", "node3") else {n: f for n, f in before[node].items() if f >= 2}
        assert after == kept
    stats = inspect_json("stats", "--data", str(data))
    assert [row["patterns"] for row in stats] == [len({n for n, f in before[node].items() if f >= 2}) if node in ("node0", "node1")
                                                  else len(before[node]) for node in NODES]  # fmt: skip
    assert stats[0]["singletons"] == 0
    # again: nothing more to remove
    assert [row["removed"] for row in inspect_json("prune", "--below", "2", "--levels", "0,1", "--data", str(data))] == [0, 0]
    # a higher pattern over pruned ones unravels with gaps, named
    name = sql(data, "SELECT name FROM patterns WHERE kb_id = ? LIMIT 1", kb_id("node2"))[0][0]
    shown = inspect_json("show", name, "--data", str(data))
    assert shown["missing"] and "⟨missing PTRN|" in shown["text"]


def test_prune_is_refused_while_the_store_is_learned_into(learned: tuple[Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    import shutil

    from ingestd.engine.store import writer_lock

    from .conftest import EngineServer

    data = tmp_path / "kb"
    shutil.copytree(learned[0], data)
    count = sql(data, "SELECT count(*) FROM patterns")[0][0]
    server = EngineServer(data).start()
    try:
        refused = inspect("prune", "--below", "5", "--data", str(data), expect=4)
        assert "being learned into" in refused.stderr and "stop the server" in refused.stderr
        assert inspect_json("prune", "--below", "5", "--dry-run", "--data", str(data))[0]["removed"] > 0  # counting is fine
    finally:
        server.stop()
    assert sql(data, "SELECT count(*) FROM patterns")[0][0] == count
    # and the other way round: while the store is held for maintenance, a run is refused, with no traceback
    with writer_lock(data, exclusive=True):
        result = subprocess.run([sys.executable, "-m", "ingestd", "run", str(CORPUS), "--data", str(data), "--max-samples",
                                 "1600", "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 2 and "being changed by ingestd (pid" in result.stderr and "Traceback" not in result.stderr
    assert sql(data, "SELECT count(*) FROM patterns")[0][0] == count
    inspect("prune", "--below", "5", "--data", str(data))
    assert sql(data, "SELECT count(*) FROM patterns")[0][0] < count


def test_html_report_renders_in_a_real_browser(learned: tuple[Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    import re

    import matplotlib.image

    from .tools import chromium

    data, _ = learned
    report = tmp_path / "report.html"
    inspect("report", "--data", str(data), "--out", str(report), "--top", "5", "--samples", "2")
    page = report.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)  # self-contained: nothing fetched
    browser, env = chromium()
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,2600",
              "--virtual-time-budget=5000"]  # fmt: skip
    dom = subprocess.run([*common, "--dump-dom", report.as_uri()], env=env, capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    tables = re.findall(r"<table>.*?</table>", dom.stdout, flags=re.S)
    # the nodes table, then per level its top patterns and its draws
    assert len(tables) == 1 + 2 * 4
    assert [len(re.findall(r"<tr>", table)) - 1 for table in tables] == [4] + [5, 2, 5, 2, 5, 2, 1, 2]
    stats = inspect_json("stats", "--data", str(data))
    for row in stats:
        assert f"<td>{row['node_id']}</td>" in tables[0] and f"{row['patterns']:,}" in tables[0]
    top = inspect_json("top", "--data", str(data), "--level", "1", "-n", "5")
    for row in top:
        assert row["name"] in tables[3]
    shot = tmp_path / "shot.png"
    taken = subprocess.run([*common, f"--screenshot={shot}", report.as_uri()], env=env, capture_output=True, text=True,
                           timeout=180)  # fmt: skip
    assert taken.returncode == 0 and shot.is_file(), taken.stderr[-2000:]
    pixels = matplotlib.image.imread(shot)[..., :3]
    # matplotlib's first colour (#1f77b4) marks the histogram's points: they are drawn only if the image decoded
    marker = (abs(pixels[..., 0] - 0x1F / 255) < 0.08) & (abs(pixels[..., 1] - 0x77 / 255) < 0.08) & (abs(pixels[..., 2] - 0xB4 / 255) < 0.08)
    assert marker.sum() > 50, marker.sum()
    dark = (pixels < 0.3).all(axis=-1).mean()
    assert dark > 0.002  # text of the tables was drawn too


def test_pattern_names_however_spelled(learned: tuple[Path, list[dict[str, Any]]]) -> None:
    data, _ = learned
    name = sql(data, "SELECT name FROM patterns WHERE kb_id = ? ORDER BY name LIMIT 1", kb_id("node1"))[0][0]
    expected = inspect_json("show", "PTRN|" + name, "--data", str(data))
    for spelled in (name, name.upper(), f"  ptrn|{name.upper()} ", "PTRN|" + name):
        assert inspect_json("show", spelled, "--data", str(data))["text"] == expected["text"]
    assert "does not hold" in inspect("show", name, "--level", "0", "--data", str(data), expect=2).stderr


def test_runs_are_found_in_their_own_store_and_never_in_another(learned: tuple[Path, list[dict[str, Any]]],
                                                                 tmp_path: Path) -> None:  # fmt: skip
    data, _ = learned
    other = tmp_path / "other"
    run_cli(str(CORPUS), "--data", str(other), "--chunk-sizes", "4,4", "--node-ids", "alt{level}", "--run-id", "alt",
            "--max-samples", "200", "--run-dir", str(other / "runs" / "alt"))  # fmt: skip
    refused = inspect("stats", "--data", str(data), "--run-dir", str(other / "runs" / "alt"), expect=2)
    assert "learned into another knowledge store" in refused.stderr
    # given alone, a run directory is read in the store its run learned into
    alone = inspect_json("stats", "--run-dir", str(other / "runs" / "alt"), cwd=tmp_path)
    assert [row["node_id"] for row in alone] == ["alt0", "alt1"] and alone[0]["patterns"] > 0
    assert [row["node_id"] for row in inspect_json("stats", "--data", str(other), "--run-id", "alt")] == ["alt0", "alt1"]
    assert "no run 'alt'" in inspect("stats", "--data", str(data), "--run-id", "alt", expect=2).stderr


def test_runs_over_http_are_found_by_their_id(tmp_path: Path) -> None:
    from .conftest import EngineServer

    server = EngineServer(tmp_path / "served").start()
    try:
        for run_id, size in (("hk", "4,4"), ("hj", "6,6")):
            result = subprocess.run([sys.executable, "-m", "ingestd", "run", str(CORPUS), "--kato-url", server.url,
                                     "--run-id", run_id, "--node-ids", "{run_id}-{level}", "--chunk-sizes", size,
                                     "--max-samples", "150", "--no-progress"], cwd=tmp_path, capture_output=True,
                                    text=True, timeout=300)  # fmt: skip
            assert result.returncode == 0, result.stderr[-2000:]
    finally:
        server.stop()
    served = str(tmp_path / "served")
    assert [row["node_id"] for row in inspect_json("stats", "--data", served, "--run-id", "hk", cwd=tmp_path)] == ["hk-0", "hk-1"]
    diff = inspect_json("diff", "hk", "hj", "--data", served, cwd=tmp_path)
    assert [(row["node_a"], row["node_b"], row["same_kb"]) for row in diff] == [("hk-0", "hj-0", False), ("hk-1", "hj-1", False)]
    several = inspect("stats", "--data", served, expect=2, cwd=tmp_path)
    assert "several hierarchies" in several.stderr and "hj, hk" in several.stderr


def test_diff_says_when_both_runs_share_their_nodes_and_keeps_every_level(tmp_path: Path) -> None:
    data = tmp_path / "kb"
    run_cli(str(CORPUS), "--data", str(data), "--chunk-sizes", "4,4,4", "--max-samples", "100", "--run-dir",
            str(data / "runs" / "three"))  # fmt: skip
    run_cli(str(CORPUS), "--data", str(data), "--chunk-sizes", "4,4,4,4", "--max-samples", "200", "--run-dir",
            str(data / "runs" / "four"))  # fmt: skip
    result = inspect("diff", "three", "four", "--data", str(data), "--json")
    rows = json.loads(result.stdout)
    assert [row["same_kb"] for row in rows] == [True, True, True, False]
    assert rows[3]["node_a"] is None and rows[3]["node_b"] == "node3" and rows[3]["only_b"] == rows[3]["patterns_b"]
    assert "same knowledge base" in inspect("diff", "three", "four", "--data", str(data)).stderr


def test_prune_names_each_node_once(learned: tuple[Path, list[dict[str, Any]]]) -> None:
    data, _ = learned
    rows = inspect_json("prune", "--below", "2", "--levels", "0,node0,1", "--dry-run", "--data", str(data))
    assert [row["node_id"] for row in rows] == ["node0", "node1"]
