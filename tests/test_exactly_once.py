"""Exactly-once in ordinary use: the second run, two at once, resumes with other options, late resumes,
other spellings, shared nodes. Each test is one finding of issue 11, with real processes and real files.

The reference is always an uninterrupted run on an empty data directory; "twice" means every frequency
doubled and metadata united (here: equal, since both runs give every pattern the same sample indexes).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from ingestd.tokenize import load_tokenizer

from .conftest import CORPUS, EngineServer, paragraphs
from .faultproxy import FaultProxy
from .golden import SequentialClient, kb_dump, samples_done, wait_for_samples
from .test_daemon import TOKEN, Daemon, wait_for

LEVELS = ["--chunk-sizes", "4,4,4", "--metadata-levels", "1,2"]
NODES = ["node0", "node1", "node2"]


def ingestd(*arguments: str, cwd: Path | None = None, timeout: float = 300) -> tuple[subprocess.CompletedProcess[str], dict[str, Any] | None]:
    """``ingestd run ARGUMENTS`` as a real process; its result and its JSON summary (None if it wrote none)."""
    with tempfile.TemporaryDirectory() as scratch:
        summary = Path(scratch) / "summary.json"
        result = subprocess.run([sys.executable, "-m", "ingestd", "run", *arguments, "--no-progress", "--log-format",
                                 "json", "--summary-json", str(summary)], capture_output=True, text=True, cwd=cwd,
                                timeout=timeout, check=False)  # fmt: skip
        return result, json.loads(summary.read_text()) if summary.exists() else None


def ok(*arguments: str, cwd: Path | None = None, expect: int = 0) -> dict[str, Any]:
    """A run that exits with ``expect`` (0, or 7 when samples failed); its summary."""
    result, summary = ingestd(*arguments, cwd=cwd)
    assert result.returncode == expect, result.stderr[-3000:]
    assert summary is not None
    return summary


def start(*arguments: str, cwd: Path | None = None) -> subprocess.Popen[str]:
    """``ingestd run`` in the background; its log goes nowhere (an unread pipe would block it once full)."""
    return subprocess.Popen([sys.executable, "-m", "ingestd", "run", *arguments, "--no-progress", "--log-format", "json"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True, cwd=cwd)  # fmt: skip


def kill_after(process: subprocess.Popen[str], run_dir: Path, samples: int) -> int:
    """kill -9 once ``samples`` are recorded done; returns how many were."""
    wait_for_samples(process, run_dir, samples)
    process.kill()
    process.wait()
    return samples_done(run_dir)


def doubled(kb: list[dict[str, dict[str, Any]]]) -> list[dict[str, dict[str, Any]]]:
    return [{name: {**pattern, "frequency": 2 * pattern["frequency"]} for name, pattern in level.items()} for level in kb]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """900 paragraphs of tinyshakespeare: long enough to stop a run in the middle."""
    return paragraphs(tmp_path_factory.mktemp("corpus") / "shakespeare.txt", 900)


@pytest.fixture(scope="module")
def clean(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    data = tmp_path_factory.mktemp("clean")
    summary = ok(str(corpus), *LEVELS, "--data", str(data))
    kb = kb_dump(data / "kato.sqlite3", NODES)
    assert all(kb) and summary["samples"]["learned"] > 800
    return kb, summary


def test_the_readme_command_twice_leaves_one_clean_run(corpus: Path, clean: Any, tmp_path: Path) -> None:
    """--fresh twice (the README's own command, typed twice, in the same directory): the KB of one clean run."""
    clean_kb, clean_summary = clean
    summaries = []
    for _ in range(2):
        summaries.append(ok(str(corpus), *LEVELS, "--fresh", cwd=tmp_path))
        assert kb_dump(tmp_path / "kato-data" / "kato.sqlite3", NODES) == clean_kb
    for summary in summaries:
        assert summary["patterns_per_level"] == clean_summary["patterns_per_level"]
        assert summary["replayed_per_level"] == [0, 0, 0]


def test_fresh_twice_over_http(corpus: Path, clean: Any, fresh_server: EngineServer, tmp_path: Path) -> None:
    clean_kb, _ = clean
    for _ in range(2):
        ok(str(corpus), *LEVELS, "--fresh", "--kato", fresh_server.url, cwd=tmp_path)
    assert kb_dump(fresh_server.data_dir / "kato.sqlite3", NODES) == clean_kb


def test_a_second_run_under_another_run_id_doubles_every_frequency(corpus: Path, clean: Any, tmp_path: Path) -> None:
    clean_kb, clean_summary = clean
    data = str(tmp_path / "kb")
    ok(str(corpus), *LEVELS, "--data", data, "--run-id", "first")
    second = ok(str(corpus), *LEVELS, "--data", data, "--run-id", "second")
    assert second["samples"]["learned"] == clean_summary["samples"]["learned"]  # a new run learns everything again
    assert second["patterns_per_level"] == clean_summary["patterns_per_level"]
    assert kb_dump(tmp_path / "kb" / "kato.sqlite3", NODES) == doubled(clean_kb)
    again = ok(str(corpus), *LEVELS, "--data", data, "--run-id", "second")  # the same run again: a resume, done
    assert again["samples"]["learned"] == 0 and again["patterns_per_level"] == [0, 0, 0]
    assert kb_dump(tmp_path / "kb" / "kato.sqlite3", NODES) == doubled(clean_kb)


@pytest.mark.parametrize("backend", ["in-process", "http"])
def test_two_processes_at_once_add_up_and_cannot_share_a_run_directory(corpus: Path, clean: Any, tmp_path: Path,
                                                                        fresh_server: EngineServer, backend: str) -> None:  # fmt: skip
    clean_kb, _ = clean
    where = ["--data", str(tmp_path / "kb")] if backend == "in-process" else ["--kato", fresh_server.url]
    store = tmp_path / "kb" / "kato.sqlite3" if backend == "in-process" else fresh_server.data_dir / "kato.sqlite3"
    run_a, run_b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    first = start(str(corpus), *LEVELS, *where, "--run-dir", str(run_a))
    second = start(str(corpus), *LEVELS, *where, "--run-dir", str(run_b))
    deadline = time.monotonic() + 60
    while samples_done(run_a) < 10:  # "a" is running: a third process on its run directory is refused
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.002)
    first.send_signal(signal.SIGSTOP)  # held mid-run (in-process it would finish before a third process starts)
    try:
        intruder, _ = ingestd(str(corpus), *LEVELS, *where, "--run-dir", str(run_a))
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stderr.read() if first.stderr else ""
    assert second.wait(timeout=300) == 0, second.stderr.read() if second.stderr else ""
    assert intruder.returncode == 2 and "in use by another ingestd" in intruder.stderr and "--run-id" in intruder.stderr
    assert "Traceback" not in intruder.stderr
    assert kb_dump(store, NODES) == doubled(clean_kb)


def test_two_identical_daemon_jobs_at_once_learn_twice(corpus: Path, clean: Any, tmp_path: Path) -> None:
    clean_kb, clean_summary = clean
    daemon = Daemon(tmp_path / "state", INGESTD_MAX_JOBS="2").start()
    try:
        spec = {"source": str(corpus), "chunk_sizes": [4, 4, 4], "metadata_levels": [1, 2]}
        with daemon.client() as client:
            jobs = [client.post("/jobs", json=spec).json()["id"] for _ in range(2)]
            wait_for(client, jobs[1], {"running", "succeeded"})
            ended = [wait_for(client, job, {"succeeded", "failed"}, timeout=300) for job in jobs]
            assert [job["state"] for job in ended] == ["succeeded", "succeeded"], ended
            for job in ended:
                assert job["progress"]["patterns_per_level"] == clean_summary["patterns_per_level"]
            # The same job a third time, later: it learns everything once more.
            third = wait_for(client, client.post("/jobs", json=spec).json()["id"], {"succeeded", "failed"}, timeout=300)
            assert third["state"] == "succeeded" and third["progress"]["samples"]["learned"] == clean_summary["samples"]["learned"]
    finally:
        daemon.stop()
    tripled = [{name: {**pattern, "frequency": 3 * pattern["frequency"]} for name, pattern in level.items()}
               for level in clean_kb]  # fmt: skip
    assert kb_dump(tmp_path / "state" / "kato-data" / "kato.sqlite3", NODES) == tripled


def test_a_killed_run_resumes_exactly_with_other_batch_sizes_workers_and_without_batching(
    corpus: Path, clean: Any, tmp_path: Path
) -> None:  # fmt: skip
    clean_kb, clean_summary = clean
    base = [str(corpus), *LEVELS, "--data", str(tmp_path / "kb"), "--run-dir", str(tmp_path / "run")]
    kill_after(start(*base), tmp_path / "run", 200)
    kill_after(start(*base, "--batch-chunks", "3", "--workers", "3"), tmp_path / "run", 450)
    kill_after(start(*base, "--no-batching", "--workers", "16"), tmp_path / "run", 650)
    resumed = ok(*base, "--batch-chunks", "1000")
    assert resumed["recovery"]["possible_duplicates"] == 0
    assert kb_dump(tmp_path / "kb" / "kato.sqlite3", NODES) == clean_kb
    learned_once = [a + b for a, b in zip(resumed["patterns_per_level"], resumed["replayed_per_level"], strict=True)]
    assert all(count <= total for count, total in zip(learned_once, clean_summary["patterns_per_level"], strict=True))


def test_a_resume_after_the_key_lifetime_is_still_exact(corpus: Path, clean: Any, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The engine server forgets Idempotency-Keys after INGESTD_SERVER__IDEMPOTENCY_TTL (here 0.2 s, swept
    every 0.1 s); a run's ledger is not a key and does not expire."""
    clean_kb, _ = clean
    monkeypatch.setenv("INGESTD_SERVER__IDEMPOTENCY_TTL", "0.2")
    monkeypatch.setenv("INGESTD_SERVER__SWEEP_INTERVAL", "0.1")
    server = EngineServer(tmp_path / "kb").start()
    try:
        base = [str(corpus), *LEVELS, "--kato", server.url, "--run-dir", str(tmp_path / "run")]
        kill_after(start(*base), tmp_path / "run", 300)
        time.sleep(1.5)  # many times the key lifetime, and many sweeps
        resumed = ok(*base)
        assert resumed["recovery"]["possible_duplicates"] == 0
    finally:
        server.stop()
    assert kb_dump(tmp_path / "kb" / "kato.sqlite3", NODES) == clean_kb


def test_three_spellings_of_one_file_are_one_run(corpus: Path, clean: Any, tmp_path: Path) -> None:
    clean_kb, clean_summary = clean
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "shakespeare.txt").symlink_to(corpus)
    data = ["--data", str(tmp_path / "kb")]
    first = ok("shakespeare.txt", *LEVELS, *data, "--max-samples", "150", cwd=tmp_path / "work")
    second = ok("./shakespeare.txt", *LEVELS, *data, "--max-samples", "500", cwd=tmp_path / "work")
    third = ok(str(corpus), *LEVELS, *data)
    fourth = ok("../work/./shakespeare.txt", *LEVELS, *data, cwd=tmp_path / "work")
    assert [first["samples"]["learned"], second["samples"]["skipped"], second["samples"]["learned"]] == [150, 150, 350]
    assert third["samples"]["skipped"] == 500 and fourth["samples"]["learned"] == 0
    assert third["samples"]["learned"] + 500 == clean_summary["samples"]["learned"]
    assert len(list((tmp_path / "kb" / "runs").iterdir())) == 1
    assert kb_dump(tmp_path / "kb" / "kato.sqlite3", NODES) == clean_kb


def test_node_ids_that_are_one_kato_kb_are_refused(corpus: Path, tmp_path: Path) -> None:
    hierarchy = tmp_path / "hierarchy.toml"
    hierarchy.write_text('[[levels]]\nchunk_size = 4\nnode_id = "corpus-a"\n[[levels]]\nchunk_size = 4\nnode_id = "corpus_a"\n')
    result, _ = ingestd(str(corpus), "--hierarchy", str(hierarchy), "--data", str(tmp_path / "kb"))
    assert result.returncode == 2 and "'corpus-a' (level 0) and 'corpus_a' (level 1)" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "kb").exists()
    template = ok(str(corpus), "--chunk-sizes", "4,4", "--node-ids", "corpus.{level}", "--max-samples", "5",
                  "--data", str(tmp_path / "kb"))  # fmt: skip
    assert template["samples"]["learned"] == 5


def test_min_chars_0_learns_every_sample_as_a_plain_client_does(fresh_server: EngineServer, tmp_path: Path) -> None:
    texts = ["", " ", "\n\n", "a", "ab", "Hi!", "\t  x ", "A b c", "To be", "or not to be, that is the question",
             "   padded   ", "'s", "é", "Sit."] * 3  # fmt: skip
    source = tmp_path / "tiny.jsonl"
    source.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    sizes, metadata_levels = [2, 2, 2], [False, True, False]
    summary = ok(str(source), "--chunk-sizes", "2,2,2", "--metadata-levels", "1", "--min-chars", "0",
                 "--data", str(tmp_path / "kb"))  # fmt: skip
    assert summary["samples"] == {"read": len(texts), "learned": len(texts), "filtered": 0, "failed": 0, "skipped": 0,
                                  "unfinished": 0}  # fmt: skip
    tokenizer = load_tokenizer("gpt2")
    with httpx.Client(base_url=fresh_server.url, timeout=30) as client:
        reference = SequentialClient(client, NODES, sizes, metadata_levels, "tiny")
        for index, text in enumerate(texts):
            reference.learn_sample(index, tokenizer.tokenize_batch([text])[0])
        reference.close()
    expected = kb_dump(fresh_server.data_dir / "kato.sqlite3", NODES)
    assert kb_dump(tmp_path / "kb" / "kato.sqlite3", NODES) == expected and all(expected[:2])
    default = ok(str(source), "--chunk-sizes", "2,2,2", "--metadata-levels", "1", "--data", str(tmp_path / "other"))
    assert default["samples"]["filtered"] == 3 * sum(len(text.strip()) < 11 for text in texts[:14])


def test_min_chars_is_one_option_in_every_interface(tmp_path: Path) -> None:
    """--min-chars, the hierarchy file's [run] min_chars (a flag wins), the Python API's min_chars; and the
    daemon's (test_the_daemon_takes_the_same_options). It is part of the run's identity."""
    from ingestd import Hierarchy
    from ingestd import run as run_in_python

    source = tmp_path / "lines.txt"
    source.write_text("short\n\na much longer line of text\n\nx\n")
    hierarchy = tmp_path / "h.toml"
    hierarchy.write_text("[run]\nmin_chars = 0\n[[levels]]\nchunk_size = 2\n")
    data = ["--data", str(tmp_path / "kb")]
    from_file = ok(str(source), "--hierarchy", str(hierarchy), *data, "--run-id", "file")
    assert from_file["samples"]["filtered"] == 0 and from_file["config"]["source"]["min_chars"] == 0
    flag_wins = ok(str(source), "--hierarchy", str(hierarchy), "--min-chars", "6", *data, "--run-id", "flag")
    assert flag_wins["samples"]["filtered"] == 2
    default = ok(str(source), "--chunk-sizes", "2", *data, "--run-id", "default")
    assert default["samples"]["filtered"] == 2 and default["config"]["source"]["min_chars"] == 11
    python = run_in_python(str(source), Hierarchy().add_layer(chunk_size=2), min_chars=0, data_dir=tmp_path / "kb",
                           run_id="python")  # fmt: skip
    assert python.as_dict()["samples"]["filtered"] == 0
    hierarchy.write_text("[run]\nmin_chars = 0\nfresh = true\n[[levels]]\nchunk_size = 2\n")
    unknown, _ = ingestd(str(source), "--hierarchy", str(hierarchy), *data)
    assert unknown.returncode == 2 and "fresh" in unknown.stderr and "Traceback" not in unknown.stderr
    # The same run directory with another --min-chars is another configuration: refused, as for the source.
    changed, _ = ingestd(str(source), "--chunk-sizes", "2", *data, "--run-id", "default", "--min-chars", "0")
    assert changed.returncode == 4 and "min_chars" in changed.stderr


def test_a_node_fed_by_another_chunk_size_is_refused_before_learning(corpus: Path, tmp_path: Path) -> None:
    data = ["--data", str(tmp_path / "kb")]
    ok(str(corpus), "--chunk-sizes", "8,8,8,8", *data, "--run-id", "eights", "--max-samples", "50")
    before = kb_dump(tmp_path / "kb" / "kato.sqlite3", NODES)
    refused, _ = ingestd(str(corpus), "--chunk-sizes", "4,4", *data, "--run-id", "fours")
    assert refused.returncode == 4 and "Traceback" not in refused.stderr
    assert "node node0" in refused.stderr and "chunk size 8" in refused.stderr and "chunk size 4" in refused.stderr
    assert "--allow-mixed-kb" in refused.stderr and "--fresh" in refused.stderr
    assert kb_dump(tmp_path / "kb" / "kato.sqlite3", NODES) == before
    elsewhere, _ = ingestd(str(corpus), "--chunk-sizes", "8,8,8,8", *data, "--node-ids", "x{level}", "--max-samples", "5")
    assert elsewhere.returncode == 0  # other nodes: nothing to mix
    shifted, _ = ingestd(str(corpus), "--hierarchy", str(_levels(tmp_path, ["x1", "x2"], 8)), *data)
    assert shifted.returncode == 4 and "node x1" in shifted.stderr and "level 1" in shifted.stderr
    mixed = ok(str(corpus), "--chunk-sizes", "4,4", *data, "--run-id", "fours", "--allow-mixed-kb", "--max-samples", "50")
    assert mixed["samples"]["learned"] == 50
    assert ok(str(corpus), "--chunk-sizes", "4,4", *data, "--run-id", "fresh-fours", "--fresh",
              "--max-samples", "5")["samples"]["learned"] == 5  # fmt: skip


def _levels(tmp_path: Path, node_ids: list[str], chunk_size: int) -> Path:
    path = tmp_path / "levels.toml"
    path.write_text("".join(f'[[levels]]\nchunk_size = {chunk_size}\nnode_id = "{node_id}"\n' for node_id in node_ids))
    return path


def test_a_kato_servers_nodes_are_claimed_in_ingestds_own_record(corpus: Path, fresh_server: EngineServer,
                                                                   tmp_path: Path) -> None:  # fmt: skip
    """Against a server that cannot record what fed its nodes (KATO), ingestd's registry refuses the same way."""
    with FaultProxy(fresh_server.port, plain_kato=True) as kato:
        common = [str(corpus), "--kato", kato.url, "--max-samples", "20"]
        ok(*common, "--chunk-sizes", "8,8", "--run-id", "eights", cwd=tmp_path)
        refused, _ = ingestd(*common, "--chunk-sizes", "4,4", "--run-id", "fours", cwd=tmp_path)
        assert refused.returncode == 4 and "node node0" in refused.stderr and "chunk size 8" in refused.stderr
        assert (tmp_path / "ingestd-runs" / "kato-nodes.sqlite3").exists()
        ok(*common, "--chunk-sizes", "4,4", "--run-id", "fours", "--fresh", cwd=tmp_path)  # cleared: fed anew


def test_retry_failed_with_fresh_is_refused(corpus: Path, tmp_path: Path) -> None:
    data = ["--data", str(tmp_path / "kb"), "--max-samples", "30"]
    ok(str(corpus), *LEVELS, *data)
    before = kb_dump(tmp_path / "kb" / "kato.sqlite3", NODES)
    refused, _ = ingestd(str(corpus), *LEVELS, *data, "--retry-failed", "--fresh")
    assert refused.returncode == 2 and "--retry-failed" in refused.stderr and "--fresh" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert kb_dump(tmp_path / "kb" / "kato.sqlite3", NODES) == before


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_a_missing_or_truncated_kb_under_a_complete_progress_stops_the_run(corpus: Path, tmp_path: Path,
                                                                           damage: str) -> None:  # fmt: skip
    data = ["--data", str(tmp_path / "kb"), "--max-samples", "100"]
    ok(str(corpus), *LEVELS, *data)
    store = tmp_path / "kb" / "kato.sqlite3"
    if damage == "truncated":
        store.write_bytes(b"")
    else:
        store.unlink()
    for leftover in ("kato.sqlite3-wal", "kato.sqlite3-shm"):
        (tmp_path / "kb" / leftover).unlink(missing_ok=True)
    refused, _ = ingestd(str(corpus), *LEVELS, *data)
    assert refused.returncode == 4, refused.stderr[-2000:]
    assert str(store) in refused.stderr and "progress.sqlite3" in refused.stderr and "--fresh" in refused.stderr
    assert ("empty" if damage == "truncated" else "missing") in refused.stderr and "Traceback" not in refused.stderr
    assert ok(str(corpus), *LEVELS, *data, "--fresh")["samples"]["learned"] == 100


def test_a_kb_cleared_behind_the_runs_back_stops_its_resume(corpus: Path, fresh_server: EngineServer, tmp_path: Path) -> None:
    base = [str(corpus), *LEVELS, "--kato", fresh_server.url, "--run-dir", str(tmp_path / "run")]
    kill_after(start(*base), tmp_path / "run", 200)
    with httpx.Client(base_url=fresh_server.url, timeout=30) as client:
        session = client.post("/sessions", json={"node_id": "node1", "config": {"process_predictions": False}}).json()
        client.post(f"/sessions/{session['session_id']}/clear-all").raise_for_status()
    refused, _ = ingestd(*base)
    assert refused.returncode == 4 and "node node1 (level 1)" in refused.stderr and "cleared" in refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.fixture
def metadata_corpus(tmp_path: Path) -> Path:
    """40 records of ~150 tokens with a url; record 5's url is 20 kB, too large for a small body limit."""
    lines = CORPUS.read_text(encoding="utf-8").split("\n")
    records = [{"text": "\n".join(lines[i * 20 : i * 20 + 20]), "url": f"https://example.org/{i}"} for i in range(40)]
    records[5]["url"] = "https://example.org/" + "x" * 20_000
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.mark.parametrize(("server_kind", "again"), [("engine", "--retry-failed"), ("plain KATO", "--retry-failed"),
                                                    ("plain KATO", "a plain resume"),
                                                    ("engine, bulk loads", "--retry-failed")])  # fmt: skip
def test_a_sample_failing_on_its_metadata_level_is_retried_exactly(metadata_corpus: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch, server_kind: str,
                                                                   again: str) -> None:  # fmt: skip
    """Sample 5 fails on its metadata levels (413) after level 0 stored its patterns (KATO's calls; sent in a bulk
    load, it stores nothing); with a larger limit, --retry-failed (or the same command again) learns exactly the
    rest: the KB equals a run where it never failed."""
    bulk = server_kind == "engine, bulk loads"
    options = [str(metadata_corpus), *LEVELS, "--metadata-fields", "url", *([] if bulk else ["--no-bulk-load"])]
    reference = ok(*options, "--data", str(tmp_path / "reference"))
    expected = kb_dump(tmp_path / "reference" / "kato.sqlite3", NODES)
    # a call of sample 5's metadata levels is refused (8,000 bytes), or its load (a sample's load is ~10 KB; its
    # 20,000-character url goes in on 2 levels)
    monkeypatch.setenv("INGESTD_SERVER__MAX_BODY_BYTES", "30000" if bulk else "8000")
    server = EngineServer(tmp_path / "kb").start()
    port = server.port
    proxy = FaultProxy(port, plain_kato=server_kind == "plain KATO").start()
    base = [*options, "--kato", proxy.url, "--run-dir", str(tmp_path / "run")]
    try:
        first = ok(*base, cwd=tmp_path, expect=7)
        reason = first["failures"][0]["reason"]
        assert first["samples"]["failed"] == 1 and first["failures"][0]["sample_index"] == 5
        letter = json.loads((tmp_path / "run" / "failed.jsonl").read_text().splitlines()[0])
        if bulk:  # the load of sample 5 alone was refused whole: nothing of it stored
            assert "413" in reason and letter["stored_chunks_per_level"] == [0, 0, 0]
            assert first["patterns_per_level"][0] < reference["patterns_per_level"][0]
        else:
            assert "413" in reason and ("level 1" in reason or "level 2" in reason)
            assert first["patterns_per_level"][0] == reference["patterns_per_level"][0]  # sample 5's level 0 is counted
            assert letter["stored_chunks_per_level"][0] > 0 and letter["stored_chunks_per_level"][1:] == [0, 0]
        server.stop()
        monkeypatch.setenv("INGESTD_SERVER__MAX_BODY_BYTES", "1000000")
        server = EngineServer(tmp_path / "kb", port).start()
        retried = ok(*base, *(["--retry-failed"] if again == "--retry-failed" else []), cwd=tmp_path)
        assert retried["samples"]["learned"] == 1 and (retried["patterns_per_level"][0] > 0) == bulk
        assert retried["recovery"]["possible_duplicates"] == 0
    finally:
        proxy.stop()
        server.stop()
    assert kb_dump(tmp_path / "kb" / "kato.sqlite3", NODES) == expected


def test_a_signal_stop_keeps_no_ledger_records_of_done_samples(corpus: Path, tmp_path: Path) -> None:
    """The ledger only holds what a later run may need: after a run ends, nothing of its done samples."""
    longer = tmp_path / "twice.txt"  # in-process, 900 paragraphs are one load: the signal must find work left
    longer.write_text("\n\n".join(CORPUS.read_text(encoding="utf-8").split("\n\n") * 2), encoding="utf-8")
    base = [str(longer), *LEVELS, "--data", str(tmp_path / "kb"), "--run-dir", str(tmp_path / "run")]
    process = start(*base)
    deadline = time.monotonic() + 60
    while samples_done(tmp_path / "run") < 200:
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    with sqlite3.connect(tmp_path / "kb" / "kato.sqlite3") as connection:
        assert connection.execute("SELECT count(*) FROM ledger").fetchone()[0] == 0
        assert connection.execute("SELECT count(*) FROM ledger_totals").fetchone()[0] == 3
    ok(*base)
    with sqlite3.connect(tmp_path / "kb" / "kato.sqlite3") as connection:
        assert connection.execute("SELECT count(*) FROM ledger").fetchone()[0] == 0


def test_the_daemon_takes_the_same_options(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "state").start()
    try:
        with daemon.client() as client:
            source = str(tmp_path / "x.txt")
            answer = client.post("/jobs", json={"source": source, "chunk_sizes": [4, 4], "min_chars": -1})
            assert answer.status_code == 422 and "min_chars" in answer.text
            fine = client.post("/jobs", json={"source": source, "chunk_sizes": [4, 4], "min_chars": 0,
                                              "allow_mixed_kb": True})  # fmt: skip
            assert fine.status_code == 201 and fine.json()["spec"]["min_chars"] == 0
    finally:
        daemon.stop()
    assert TOKEN not in daemon.logs


def test_a_worker_goes_on_from_where_the_ledger_is_when_a_late_request_moved_it(tmp_path: Path) -> None:
    """A killed run's last request can be applied after its successor read the sample's resume point: the
    next call then overlaps what is stored, is refused (409 LEDGER_CONFLICT, stored nothing) and the worker
    goes on from the stored position. Every chunk is stored once."""
    import anyio

    from ingestd.backend import EmbeddedKato
    from ingestd.engine import EngineSettings, Place
    from ingestd.hierarchy import Hierarchy
    from ingestd.plan import SamplePlan, plan_levels
    from ingestd.retry import RetryPolicy, ServerWatch
    from ingestd.worker import Worker, level_setups

    tokens = [f"Ġt{i}" for i in range(40)]
    levels = plan_levels(tokens, [4])

    class Counted:
        def retried(self, cause: str, detail: str) -> None: ...
        def session_recreated(self, node_id: str) -> None: ...
        def possible_duplicate(self, sample_index: int, node_id: str) -> None: ...

    async def main() -> tuple[list[int], list[dict[str, Any]]]:
        backend = EmbeddedKato(EngineSettings(data_dir=tmp_path / "kb"))
        await backend.start()
        try:
            setups = level_setups(Hierarchy().add_layer(chunk_size=4), ["late"], batching=True)
            late = await backend.create_session("late", setups[0].session_config)
            await backend.learn(late, levels[0].chunks[:3], metadata=None, auto_learn=True, place=Place("run", 0, 0, 3))
            policy = RetryPolicy()
            worker = Worker(0, backend, setups, 5, policy=policy, watch=ServerWatch(backend.healthy, "", policy, lambda: None),
                            recovery=Counted(), run_key="run")  # fmt: skip
            await worker.open()
            outcome = await worker.learn(SamplePlan(0, len(tokens), levels, start=[0]))  # thinks nothing is stored
            await worker.close()
            assert outcome.rejection is None and outcome.stored == [10]
            return outcome.applied, await backend.engine.patterns("late")
        finally:
            await backend.aclose()

    applied, patterns = anyio.run(main)
    assert applied == [7] and len(patterns) == 10 and all(pattern["frequency"] == 1 for pattern in patterns)


def test_a_fresh_that_stops_before_clearing_the_nodes_is_never_resumed_as_done(corpus: Path, clean: Any,
                                                                             fresh_server: EngineServer, tmp_path: Path) -> None:  # fmt: skip
    """--fresh while the server is unreachable leaves the run as it was; --fresh killed while it clears the
    nodes leaves the run refused until --fresh runs again (never a plain resume that skips everything)."""
    clean_kb, clean_summary = clean
    with FaultProxy(fresh_server.port) as proxy:
        base = [str(corpus), *LEVELS, "--kato", proxy.url, "--run-dir", str(tmp_path / "run")]
        ok(*base)
        proxy.refuse_for(60)
        unreachable, _ = ingestd(*base, "--fresh")
        assert unreachable.returncode == 6 and "cannot reach" in unreachable.stderr
        proxy.clear()
        proxy.refuse_for(0.01)
        time.sleep(0.5)
        resumed = ok(*base)  # nothing was started over: the run is still done
        assert resumed["samples"]["skipped"] == clean_summary["samples"]["learned"]
        proxy.delay_every(1, 30, only_paths="clear-all")  # hold the first clear-all's answer, and kill ingestd then
        process = start(*base, "--fresh")
        deadline = time.monotonic() + 60
        while proxy.injected["delay_every"] < 1:
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.01)
        process.kill()
        process.wait()
        proxy.clear()
        refused, _ = ingestd(*base)
        assert refused.returncode == 4 and "--fresh" in refused.stderr and "stopped before it finished" in refused.stderr
        ok(*base, "--fresh")
    assert kb_dump(fresh_server.data_dir / "kato.sqlite3", NODES) == clean_kb


def test_an_older_copy_of_the_kb_is_refused_even_after_kills(corpus: Path, tmp_path: Path) -> None:
    """A kill leaves chunks stored that progress never confirmed; once resumed they are confirmed, so an older
    copy of kato.sqlite3 put back later is still caught."""
    base = [str(corpus), *LEVELS, "--data", str(tmp_path / "kb"), "--run-dir", str(tmp_path / "run")]
    kill_after(start(*base, "--max-samples", "500", "--no-batching", "--workers", "16"), tmp_path / "run", 250)
    ok(*base, "--max-samples", "500")
    store = tmp_path / "kb" / "kato.sqlite3"
    with sqlite3.connect(tmp_path / "run" / "progress.sqlite3") as progress, sqlite3.connect(store) as kb:
        confirmed = json.loads(progress.execute("SELECT value FROM run WHERE key = 'confirmed'").fetchone()[0])
        totals = dict(kb.execute("SELECT kb_id, chunks FROM ledger_totals").fetchall())
    assert confirmed == [totals[f"{node}_kato"] for node in NODES]  # every stored chunk is confirmed: no slack
    backup = tmp_path / "backup.sqlite3"
    backup.write_bytes(store.read_bytes())
    ok(*base, "--max-samples", "501")  # one more sample
    store.write_bytes(backup.read_bytes())
    refused, _ = ingestd(*base)
    assert refused.returncode == 4 and "restored from an older copy" in refused.stderr


def test_another_server_is_another_run_and_a_run_directory_knows_its_store(corpus: Path, tmp_path: Path) -> None:
    first, second = EngineServer(tmp_path / "a").start(), EngineServer(tmp_path / "b").start()
    try:
        options = [str(corpus), *LEVELS, "--max-samples", "50"]
        assert ok(*options, "--kato", first.url, cwd=tmp_path)["samples"]["learned"] == 50
        elsewhere = ok(*options, "--kato", second.url, cwd=tmp_path)  # the same command, another server
        assert elsewhere["samples"]["learned"] == 50 and elsewhere["samples"]["skipped"] == 0
        same = ok(*options, "--kato", first.url.replace("127.0.0.1", "localhost"), cwd=tmp_path)  # another name
        assert same["samples"]["skipped"] == 50 and same["samples"]["learned"] == 0
        run_dir = ["--run-dir", str(tmp_path / "run")]
        ok(*options, "--kato", first.url, *run_dir)
        refused, _ = ingestd(*options, "--kato", second.url, *run_dir)
        assert refused.returncode == 4 and "another knowledge store" in refused.stderr and "Traceback" not in refused.stderr
    finally:
        first.stop()
        second.stop()
    # In-process on the data directory the first server served: the same store, so the run resumes.
    resumed = ok(str(corpus), *LEVELS, "--max-samples", "60", "--data", str(tmp_path / "a"), *run_dir)
    assert resumed["samples"]["skipped"] == 50 and resumed["samples"]["learned"] == 10


@pytest.mark.parametrize("damage", ["random bytes", "a directory"])
def test_a_damaged_kb_file_is_one_clear_line(corpus: Path, tmp_path: Path, damage: str) -> None:
    store = tmp_path / "kb" / "kato.sqlite3"
    store.parent.mkdir()
    if damage == "random bytes":
        store.write_bytes(os.urandom(5000))
    else:
        store.mkdir()
    result, _ = ingestd(str(corpus), *LEVELS, "--data", str(tmp_path / "kb"), "--max-samples", "5")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"cannot open {store}" in result.stderr and ("directory" if damage == "a directory" else "damaged") in result.stderr


def test_a_source_edited_between_runs_is_refused_not_resumed(tmp_path: Path) -> None:
    """Sample indexes are positions in the source: an edit before a learned sample shifts them. A resume that
    finds a learned index holding another record stops before learning anything."""
    source = tmp_path / "notes.txt"
    paragraphs = [f"Paragraph {i} of the notes, long enough to be learned." for i in range(40)]
    source.write_text("\n\n".join(paragraphs))
    data = ["--chunk-sizes", "4,4", "--data", str(tmp_path / "kb")]
    ok(str(source), *data, "--max-samples", "30")
    before = kb_dump(tmp_path / "kb" / "kato.sqlite3", NODES[:2])
    source.write_text("\n\n".join(["A paragraph put in front of the others."] + paragraphs))
    refused, _ = ingestd(str(source), *data)
    assert refused.returncode == 4 and "sample 0 of notes is not the record this run learned" in refused.stderr
    assert "Traceback" not in refused.stderr and kb_dump(tmp_path / "kb" / "kato.sqlite3", NODES[:2]) == before
    source.write_text("\n\n".join(paragraphs + ["A paragraph added at the end."]))  # appending shifts nothing
    assert ok(str(source), *data)["samples"]["learned"] == 11

    records = tmp_path / "records.jsonl"
    texts: list[Any] = [f"Record number {i}, a good one." for i in range(8)]
    texts[3] = 123  # fails: not a string
    records.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    ok(str(records), *data, expect=7)
    texts[3] = "Ok."  # "fixed" into a record the filter drops: every later index shifts by one
    records.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    shifted, _ = ingestd(str(records), *data, "--retry-failed")
    assert shifted.returncode == 4 and "sample 4 of records is not the record" in shifted.stderr
    texts[3] = "Record number 3, repaired."
    records.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    assert ok(str(records), *data, "--retry-failed")["samples"]["learned"] == 1


def test_a_failed_sample_that_stored_part_of_itself_keeps_its_record(metadata_corpus: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """What a failed sample stored stays in the KB: its record may not change before it is retried."""
    monkeypatch.setenv("INGESTD_SERVER__MAX_BODY_BYTES", "8000")
    server = EngineServer(tmp_path / "kb").start()
    try:
        base = [str(metadata_corpus), *LEVELS, "--metadata-fields", "url", "--kato", server.url,
                "--run-dir", str(tmp_path / "run"), "--no-bulk-load"]  # KATO's calls: sample 5 stores its level 0
        assert ok(*base, expect=7)["failures"][0]["sample_index"] == 5
        records = metadata_corpus.read_text().splitlines()
        edited = json.loads(records[5])
        edited["text"] = "Another text, put in place of the failed one after it stored part of itself."
        metadata_corpus.write_text("\n".join([*records[:5], json.dumps(edited), *records[6:]]) + "\n")
        refused, _ = ingestd(*base)
        assert refused.returncode == 4 and "sample 5 of records failed after storing part of it" in refused.stderr
        assert "Traceback" not in refused.stderr
    finally:
        server.stop()
