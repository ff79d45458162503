"""`ingestd merge`: shards learned apart, merged in any order and grouping, are exactly the knowledge base one
process learns; a merge runs each shard once, also when it is killed and run again."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingestd import run
from ingestd.errors import IngestError as IngestErrorType
from ingestd.kb.merge import MergeError, merge_stores

from .conftest import CORPUS

CHUNKS = [4, 4, 4]
METADATA = [1, 2]
SAMPLES = 240


def dump(data: Path) -> dict[tuple[str, str], tuple[Any, ...]]:
    """Every pattern of a store, metadata as a map (its key order is not significant, as in KATO)."""
    with sqlite3.connect(data / "kato.sqlite3") as connection:
        rows = connection.execute("SELECT kb_id, name, frequency, pattern_data, length, emotives, metadata FROM patterns")
        return {(kb, name): (frequency, bytes(data), length, bytes(emotives), json.loads(metadata))
                for kb, name, frequency, data, length, emotives, metadata in rows}  # fmt: skip


def learn(data: Path, skip: int = 0, count: int | None = SAMPLES) -> None:
    run(str(CORPUS), chunk_sizes=CHUNKS, metadata_levels=METADATA, data_dir=data, skip=skip, max_samples=count)


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], tuple[Any, ...]]:
    data = tmp_path_factory.mktemp("whole") / "kb"
    learn(data)
    return dump(data)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(1, SAMPLES - 1), max_size=3, unique=True), order=st.randoms(use_true_random=False),
       staged=st.booleans())  # fmt: skip
def test_merge_of_any_split_in_any_order_is_the_single_run(tmp_path_factory: pytest.TempPathFactory,
                                                          whole: dict[tuple[str, str], tuple[Any, ...]],
                                                          cuts: list[int], order: Any, staged: bool) -> None:  # fmt: skip
    scratch = tmp_path_factory.mktemp("split")
    bounds = [0, *sorted(cuts), SAMPLES]
    shards = []
    for number, (start, end) in enumerate(zip(bounds, bounds[1:], strict=False)):
        shards.append(scratch / f"shard{number}")
        learn(shards[-1], skip=start, count=end - start)
    order.shuffle(shards)
    target = scratch / "merged"
    if staged and len(shards) > 2:  # merged in two steps: some into a middle store, that into the target
        merge_stores(shards[:2], scratch / "middle")
        merge_stores([scratch / "middle", *shards[2:]], target)
    else:
        merge_stores(shards, target)
    assert dump(target) == whole
    again = merge_stores(shards, target)  # every shard was merged: nothing changes
    assert again["already_merged"].all() and dump(target) == whole


def test_a_merge_killed_at_any_moment_and_run_again_is_exact(tmp_path: Path) -> None:
    shards = []
    for number, start in enumerate(range(0, 3 * 1500, 1500)):
        shards.append(tmp_path / f"shard{number}")
        learn(shards[-1], skip=start, count=1500)
    reference = tmp_path / "reference"
    merge_stores(shards, reference)
    expected = dump(reference)
    killed_while_merging = 0
    for attempt, delay in enumerate((0.9, 1.4, 2.0)):
        target = tmp_path / f"merged{attempt}"
        process = subprocess.Popen([sys.executable, "-m", "ingestd", "merge", *map(str, shards), "--into", str(target)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(delay)
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            killed_while_merging += 1
        process.wait()
        result = subprocess.run([sys.executable, "-m", "ingestd", "merge", *map(str, shards), "--into", str(target), "--json"],
                                capture_output=True, text=True, timeout=300)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert dump(target) == expected
        merged = json.loads(result.stdout)
        assert len(merged) == 3
    assert killed_while_merging >= 1  # the kill really came during a merge at least once


def test_what_does_not_add_up_is_refused(tmp_path: Path) -> None:
    learn(tmp_path / "a", count=50)
    run(str(CORPUS), chunk_sizes=[6, 4, 4], data_dir=tmp_path / "other", max_samples=50)
    merge_stores([tmp_path / "a"], tmp_path / "target")
    with pytest.raises(MergeError, match="node0 .* chunk size 6.* chunk size 4"):
        merge_stores([tmp_path / "other"], tmp_path / "target")
    with pytest.raises(MergeError, match="target"):
        merge_stores([tmp_path / "target"], tmp_path / "target")
    # a store made by merging carries its shards: none may be counted twice, whichever way round
    learn(tmp_path / "b", skip=50, count=50)
    merge_stores([tmp_path / "a", tmp_path / "b"], tmp_path / "middle")
    with pytest.raises(MergeError, match="count that shard twice"):
        merge_stores([tmp_path / "middle"], tmp_path / "target")  # a is in both
    merge_stores([tmp_path / "b"], tmp_path / "target")
    assert merge_stores([tmp_path / "middle"], tmp_path / "fresh")["patterns"].iloc[0] > 0
    assert merge_stores([tmp_path / "a"], tmp_path / "fresh")["already_merged"].iloc[0]  # through middle
    assert dump(tmp_path / "fresh") == dump(tmp_path / "target")
    merge_stores([tmp_path / "middle"], tmp_path / "copy")
    with pytest.raises(MergeError, match="target twice"):
        merge_stores([tmp_path / "copy"], tmp_path / "middle")  # copy holds middle itself
    refused = subprocess.run([sys.executable, "-m", "ingestd", "merge", str(tmp_path / "nowhere"), "--into",
                              str(tmp_path / "target")], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert refused.returncode == 2 and "no knowledge store" in refused.stderr and "Traceback" not in refused.stderr
    # a target being learned into is not merged into
    from ingestd.engine.store import writer_lock

    with writer_lock(tmp_path / "target", exclusive=False):
        with pytest.raises(MergeError, match="being learned into"):
            merge_stores([tmp_path / "a"], tmp_path / "target")


@pytest.mark.parametrize("count", [1, 2, 3])
def test_shards_learned_by_hand_then_merged_are_the_single_run(tmp_path: Path, count: int) -> None:
    from .golden import run_cli

    options = ["--chunk-sizes", "4,4,4", "--metadata-levels", "1,2", "--max-samples", "700"]
    single = run_cli(str(CORPUS), "--data", str(tmp_path / "single"), *options)
    summaries = [run_cli(str(CORPUS), "--data", str(tmp_path / f"shard{index}"), "--shard", f"{index}/{count}", *options,
                         "--run-dir", str(tmp_path / f"shard{index}" / "runs" / "shard")) for index in range(count)]  # fmt: skip
    # every sample of the source once, in exactly one shard: the counts add up to the single run's
    for key in ("read", "learned", "filtered", "failed"):
        assert sum(summary["samples"][key] for summary in summaries) == single["samples"][key]
    assert [summary["config"]["shard"] for summary in summaries] == [f"{index}/{count}" for index in range(count)]
    merged = subprocess.run([sys.executable, "-m", "ingestd", "merge", *(str(tmp_path / f"shard{index}") for index in range(count)),
                             "--into", str(tmp_path / "merged")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert merged.returncode == 0, merged.stderr
    assert dump(tmp_path / "merged") == dump(tmp_path / "single")
    # a shard run again resumes: nothing more is learned
    again = run_cli(str(CORPUS), "--data", str(tmp_path / "shard0"), "--shard", f"0/{count}", *options, "--run-dir",
                    str(tmp_path / "shard0" / "runs" / "shard"))  # fmt: skip
    assert again["samples"]["learned"] == 0 and again["samples"]["skipped"] == summaries[0]["samples"]["learned"]


def _parts(folder: Path, texts: list[str], size: int, form: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    for number, start in enumerate(range(0, len(texts), size)):
        part = texts[start : start + size]
        where = folder / ("deeper" if number % 3 == 0 else "") / f"part-{number:03d}.{form}"
        where.parent.mkdir(exist_ok=True)
        if form == "parquet":
            pq.write_table(pa.table({"text": part}), where)
        else:
            where.write_text("".join(json.dumps({"text": text}) + "\n" for text in part), encoding="utf-8")


@pytest.mark.parametrize("form", ["jsonl", "parquet"])
def test_a_directory_or_glob_of_files_is_one_source_and_shards_merge_exactly(tmp_path: Path, form: str) -> None:
    from .golden import run_cli

    texts = [part for part in CORPUS.read_text(encoding="utf-8").split("\n\n") if part.strip()][:900]
    texts[5] = "short"  # filtered, in the middle of a file
    _parts(tmp_path / "parts", texts, 70, form)
    # the same texts as one file, in the order of the files' paths (deeper/ sorts first)
    import pyarrow.parquet as pq

    ordered = [text for file in sorted((tmp_path / "parts").rglob(f"*.{form}"))
               for text in (pq.read_table(file).column("text").to_pylist() if form == "parquet"
                            else [json.loads(line)["text"] for line in file.read_text(encoding="utf-8").splitlines()])]  # fmt: skip
    assert sorted(ordered) == sorted(texts) and ordered != texts
    (tmp_path / "whole.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in ordered), encoding="utf-8")
    options = ["--chunk-sizes", "4,4,4", "--metadata-levels", "1,2", "--source-label", "corpus"]
    single = run_cli(str(tmp_path / "whole.jsonl"), "--data", str(tmp_path / "single"), *options)
    by_dir = run_cli(str(tmp_path / "parts"), "--data", str(tmp_path / "dir"), *options)
    assert by_dir["samples"] == single["samples"] and by_dir["samples"]["read"] == 900
    # the files one after another are the one file: sample indices (in the metadata) included
    assert dump(tmp_path / "dir") == dump(tmp_path / "single")
    pattern = str(tmp_path / "parts" / "**" / f"*.{form}")
    # 13 files in 2 shards: each reads its own run of files (and counts the ones before it, once)
    reads = [run_cli(pattern, "--data", str(tmp_path / f"shard{index}"), "--shard", f"{index}/2", *options)["samples"]["read"]
             for index in range(2)]  # fmt: skip
    files = sorted((tmp_path / "parts").rglob(f"*.{form}"))
    sizes = [len(pq.read_table(file)) if form == "parquet" else len(file.read_text(encoding="utf-8").splitlines())
             for file in files]  # fmt: skip
    assert len(files) == 13 and reads == [sum(sizes[:6]), sum(sizes[6:])]  # files 0-5, then 6-12
    assert len(list((tmp_path / "shard1" / "file-counts").glob("*.count"))) == 6  # the files before its own
    merge_stores([tmp_path / "shard0", tmp_path / "shard1"], tmp_path / "merged")
    assert dump(tmp_path / "merged") == dump(tmp_path / "single")
    # --skip and --max-samples keep their meaning over the whole source, whichever files a shard reads
    window = ["--skip", "100", "--max-samples", "500"]
    run_cli(str(tmp_path / "whole.jsonl"), "--data", str(tmp_path / "window"), *options, *window)
    for index in range(3):
        run_cli(pattern, "--data", str(tmp_path / f"window{index}"), "--shard", f"{index}/3", *options, *window)
    merge_stores([tmp_path / f"window{index}" for index in range(3)], tmp_path / "window-merged")
    assert dump(tmp_path / "window-merged") == dump(tmp_path / "window")


def test_a_list_of_files_is_one_source_read_in_its_order(tmp_path: Path) -> None:
    """``ingestd run a b c`` (and ``run([a, b, c])``): the files one after another in the order given, whatever their
    formats, a glob among them; its shards by file merge into it; typed again, it learns nothing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .golden import run_cli

    texts = [part for part in CORPUS.read_text(encoding="utf-8").split("\n\n") if part.strip()][:400]
    (tmp_path / "z-first.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:100]), encoding="utf-8")
    pq.write_table(pa.table({"text": texts[100:250]}), tmp_path / "b-second.parquet")
    for number, (start, end) in enumerate(((250, 320), (320, 400))):  # matched by a glob, in name order
        (tmp_path / f"a-{number}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[start:end]),
                                                    encoding="utf-8")  # fmt: skip
    (tmp_path / "whole.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    files = [str(tmp_path / "z-first.jsonl"), str(tmp_path / "b-second.parquet"), str(tmp_path / "a-*.jsonl")]
    options = ["--chunk-sizes", "4,4,4", "--metadata-levels", "1,2", "--source-label", "corpus"]
    single = run_cli(str(tmp_path / "whole.jsonl"), "--data", str(tmp_path / "single"), *options)
    listed = run_cli(*files, "--data", str(tmp_path / "listed"), *options)
    assert listed["samples"] == single["samples"] and listed["samples"]["read"] == 400
    assert dump(tmp_path / "listed") == dump(tmp_path / "single")  # sample indices (in the metadata) included
    # the Python API takes the list too (paths as Path objects), with the CLI's result
    run([Path(file) for file in files], chunk_sizes=[4, 4, 4], metadata_levels=[1, 2], source_label="corpus",
        data_dir=tmp_path / "api")  # fmt: skip
    assert dump(tmp_path / "api") == dump(tmp_path / "single")
    # 4 files in 2 shards, by file: shard 1 reads the glob's files only
    shards = [run_cli(*files, "--data", str(tmp_path / f"shard{index}"), "--shard", f"{index}/2", *options,
                      "--run-dir", str(tmp_path / f"shard{index}" / "runs" / "shard"))["samples"] for index in range(2)]  # fmt: skip
    assert [shard["read"] for shard in shards] == [250, 150]
    merge_stores([tmp_path / "shard0", tmp_path / "shard1"], tmp_path / "merged")
    assert dump(tmp_path / "merged") == dump(tmp_path / "single")
    again = run_cli(*files, "--data", str(tmp_path / "shard1"), "--shard", "1/2", *options,
                    "--run-dir", str(tmp_path / "shard1" / "runs" / "shard"))  # fmt: skip
    assert again["samples"]["learned"] == 0 and again["samples"]["skipped"] == shards[1]["learned"]
    # another order is another source: not the same knowledge base (indices and order differ)
    run_cli(*reversed(files), "--data", str(tmp_path / "reversed"), *options)
    assert dump(tmp_path / "reversed") != dump(tmp_path / "single")
    # a hub dataset cannot be one of a list: one line, nothing made
    refused = subprocess.run([sys.executable, "-m", "ingestd", "run", files[0], "wikitext", "--data", str(tmp_path / "hub")],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert refused.returncode != 0 and "'wikitext' in a list of sources is not a local file" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "hub").exists()


def test_a_dataset_repository_is_read_as_datasets_reads_it_and_sharded_by_its_files(tmp_path: Path) -> None:
    """A local copy of a hub dataset (``--split``/``--hub-config`` on a directory): one split of one config, through
    ``datasets``' own builder, as the hub's are read; with at least N files, shard I reads only its run of them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .golden import run_cli

    texts = [part for part in CORPUS.read_text(encoding="utf-8").split("\n\n") if part.strip()][:500]
    texts[7] = "short"  # filtered, in the first file: the shards after it must count it out
    repository = tmp_path / "wikitext"
    (repository / "data").mkdir(parents=True)
    for number in range(5):
        pq.write_table(pa.table({"text": texts[number * 100 : (number + 1) * 100]}),
                       repository / "data" / f"train-{number:05d}-of-00005.parquet")  # fmt: skip
    pq.write_table(pa.table({"text": ["a validation sample, not to be learned"] * 30}),
                   repository / "data" / "validation-00000-of-00001.parquet")  # fmt: skip
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    options = ["--chunk-sizes", "4,4,4", "--metadata-levels", "1,2", "--source-label", "wikitext"]
    single = run_cli(str(tmp_path / "train.jsonl"), "--data", str(tmp_path / "single"), *options)
    whole = run_cli(str(repository), "--split", "train", "--data", str(tmp_path / "whole"), *options)
    assert whole["samples"] == single["samples"] and whole["samples"]["read"] == 500  # the train split alone
    assert dump(tmp_path / "whole") == dump(tmp_path / "single")
    reads = [run_cli(str(repository), "--split", "train", "--data", str(tmp_path / f"shard{index}"), "--shard",
                     f"{index}/2", *options)["samples"]["read"] for index in range(2)]  # fmt: skip
    assert reads == [200, 300]  # files 0-1, then 2-4
    assert len(list((tmp_path / "shard1" / "file-counts").glob("*.count"))) == 2  # the files before its own
    merge_stores([tmp_path / "shard0", tmp_path / "shard1"], tmp_path / "merged")
    assert dump(tmp_path / "merged") == dump(tmp_path / "single")
    # another split is another source; a split the repository does not have is one line
    validation = run_cli(str(repository), "--split", "validation", "--data", str(tmp_path / "validation"), *options)
    assert validation["samples"]["read"] == 30
    missing = subprocess.run([sys.executable, "-m", "ingestd", "run", str(repository), "--split", "tset", "--data",
                              str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert missing.returncode != 0 and "split 'tset'" in missing.stderr and "Traceback" not in missing.stderr


def test_merge_refuses_what_would_count_twice_or_miss(tmp_path: Path) -> None:
    from ingestd.engine.store import writer_lock
    from ingestd.source import Shard, SourceError

    from .golden import run_cli

    source = tmp_path / "parts"
    source.mkdir()
    paragraphs = [part for part in CORPUS.read_text(encoding="utf-8").split("\n\n") if part.strip()][:400]
    for number in range(4):
        (source / f"part{number}.txt").write_text("\n\n".join(paragraphs[number * 100 : (number + 1) * 100]), encoding="utf-8")
    options = ["--chunk-sizes", "4,4", "--metadata-levels", "1"]

    def shard(name: str, cut: str, *extra: str) -> Path:
        run_cli(str(source), "--data", str(tmp_path / name), "--shard", cut, *options, *extra,
                "--run-dir", str(tmp_path / name / "runs" / "shard"))  # fmt: skip
        return tmp_path / name

    a, b = shard("a", "0/2"), shard("b", "1/2")
    # shards of other cuts, options or windows are not shards of one run
    for other, why in ((shard("c3", "1/3"), "cut in different numbers"), (shard("m", "1/2", "--min-chars", "60"), "source differ"),
                       (shard("w", "1/2", "--max-samples", "300"), "window differ"),
                       (shard("meta", "1/2", "--metadata-levels", "0,1"), "hierarchy differ")):  # fmt: skip
        with pytest.raises(MergeError, match=why):
            merge_stores([a, other], tmp_path / "t1")
    with pytest.raises(MergeError, match="both shard 0/2"):
        merge_stores([a, shard("a2", "0/2")], tmp_path / "t2")
    # a file added between the shards' runs: their file lists differ
    (source / "part9.txt").write_text("A late file, added after shard 0 ran.\n", encoding="utf-8")
    with pytest.raises(MergeError, match="files differ"):
        merge_stores([a, shard("late", "1/2")], tmp_path / "t3")
    (source / "part9.txt").unlink()
    # a store still being learned into is not merged half-learned
    with writer_lock(b, exclusive=False), pytest.raises(MergeError, match="being learned into"):
        merge_stores([a, b], tmp_path / "t4")
    assert dump(tmp_path / "t4") == dump(a)  # a was merged before b was refused; b comes in once its run is done
    # a store that learned more after it was merged, or a copy of one that learned other samples
    merge_stores([a], tmp_path / "t5")
    run_cli(str(CORPUS), "--data", str(a), "--chunk-sizes", "4,4", "--metadata-levels", "1", "--max-samples", "20")
    with pytest.raises(MergeError, match="holds other patterns now"):
        merge_stores([a], tmp_path / "t5")
    import shutil

    shutil.copytree(b, tmp_path / "copy")
    merge_stores([b], tmp_path / "t6")
    run_cli(str(CORPUS), "--data", str(tmp_path / "copy"), "--chunk-sizes", "4,4", "--metadata-levels", "1",
            "--max-samples", "20")  # fmt: skip
    with pytest.raises(MergeError, match="copy of that data directory"):
        merge_stores([tmp_path / "copy"], tmp_path / "t6")
    # bad targets and sources: one line, nothing made
    (tmp_path / "afile").write_text("x")
    refused = subprocess.run([sys.executable, "-m", "ingestd", "merge", str(b), "--into", str(tmp_path / "afile")],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert refused.returncode == 2 and "Traceback" not in refused.stderr and "cannot merge into" in refused.stderr
    with pytest.raises(IngestErrorType, match="no knowledge store"):
        merge_stores([tmp_path / "nowhere"], tmp_path / "t7")
    assert not (tmp_path / "t7").exists()
    for text in ("1_0/2_0", "١/٢", "1/2/3"):
        with pytest.raises(SourceError):
            Shard.parse(text)

