"""Sharded runs on a real local Ray (no mocks): shards merged equal one process, a killed Ray worker is retried and
resumes, a rerun learns nothing."""

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

from .conftest import CORPUS
from .golden import run_cli, samples_done
from .tools import cpu_seconds

OPTIONS = ["--chunk-sizes", "4,4,4", "--metadata-levels", "1,2"]


def dump(data: Path) -> dict[tuple[str, str], tuple[Any, ...]]:
    with sqlite3.connect(data / "kato.sqlite3") as connection:
        rows = connection.execute("SELECT kb_id, name, frequency, pattern_data, length, metadata FROM patterns")
        return {(kb, name): (frequency, bytes(data), length, json.loads(metadata))
                for kb, name, frequency, data, length, metadata in rows}  # fmt: skip


@pytest.fixture(autouse=True)
def _ray_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")


def test_shards_on_ray_merge_into_the_single_run(tmp_path: Path) -> None:
    shards = 3
    parts = tmp_path / "parts"  # a multi-file source: a directory of jsonl
    parts.mkdir()
    paragraphs = [part for part in CORPUS.read_text(encoding="utf-8").split("\n\n") if part.strip()][:900]
    for number in range(5):
        (parts / f"part-{number}.jsonl").write_text("".join(json.dumps({"text": text}) + "\n"
                                                            for text in paragraphs[number * 180 : (number + 1) * 180]))  # fmt: skip
    single = run_cli(str(parts), "--data", str(tmp_path / "single"), *OPTIONS)
    on_ray = run_cli(str(parts), "--data", str(tmp_path / "ray"), "--shards", str(shards), "--executor", "ray", *OPTIONS,
                     timeout=600)  # fmt: skip
    assert on_ray["samples"] == single["samples"]
    assert on_ray["patterns_per_level"] == single["patterns_per_level"]
    assert on_ray["distinct_patterns_per_level"] == single["distinct_patterns_per_level"]
    assert [shard["shard"] for shard in on_ray["shards"]] == [f"{index}/{shards}" for index in range(shards)]
    assert dump(tmp_path / "ray") == dump(tmp_path / "single")
    # 5 files in 3 shards (files 0, 1-2, 3-4): the files before the last shard's were counted, each once
    assert len(list((tmp_path / "ray" / "shards").glob("*/file-counts/*.count"))) == 3
    from ingestd.source import Shard, Source, SourceSpec

    source = Source(SourceSpec(str(parts)))
    source.counts_dir = tmp_path / "counts"
    assert [source.count_files(Shard(index, shards)) for index in range(shards)] == [1, 2, 0]  # its own files
    assert len(list(source.counts_dir.glob("*.count"))) == 3
    # the whole run is in the catalogue, beside its shards' own runs
    listed = subprocess.run([sys.executable, "-m", "ingestd", "runs", "list", "--data-dir", str(tmp_path / "ray"), "--json"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    whole = [run for run in json.loads(listed.stdout) if run["run_id"].endswith(f"-of-{shards}")]
    assert len(whole) == 1 and whole[0]["status"] == "finished" and whole[0]["done"] == single["samples"]["learned"]
    again = run_cli(str(parts), "--data", str(tmp_path / "ray"), "--shards", str(shards), "--executor", "ray", *OPTIONS,
                    timeout=600)  # fmt: skip
    assert again["samples"]["learned"] == 0 and again["samples"]["skipped"] == single["samples"]["learned"]
    assert all(row["already_merged"] for row in again["merged"])
    assert dump(tmp_path / "ray") == dump(tmp_path / "single")


def _shard_workers() -> list[int]:
    """Ray's workers running a shard now: Ray titles them ``ray::_learn_shard``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"ray::_learn_shard" in command:
            found.append(int(entry.name))
    return found


def test_a_ray_worker_killed_mid_shard_is_retried_and_the_run_is_exact(tmp_path: Path) -> None:
    source = tmp_path / "big.txt"
    source.write_text(CORPUS.read_text(encoding="utf-8"), encoding="utf-8")  # 3,571 samples a shard: killed after 300
    summary_path = tmp_path / "summary.json"
    process = subprocess.Popen([sys.executable, "-m", "ingestd", "run", str(source), "--data", str(tmp_path / "ray"),
                                "--shards", "2", "--executor", "ray", "--no-progress", "--log-level", "warning",
                                "--summary-json", str(summary_path), *OPTIONS],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        killed = None
        deadline = time.monotonic() + 300
        while killed is None and time.monotonic() < deadline and process.poll() is None:
            runs = list((tmp_path / "ray" / "shards").glob("*/*-of-2/runs/*"))
            workers = _shard_workers()
            if workers and any(samples_done(run) > 300 for run in runs):
                killed = workers[0]
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.2)
        assert killed is not None, "the shards finished before one could be killed"
        assert process.wait(timeout=600) == 0, process.stderr.read()  # type: ignore[union-attr]
    finally:
        if process.poll() is None:
            process.kill()
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    run_cli(str(source), "--data", str(tmp_path / "single"), *OPTIONS)
    assert dump(tmp_path / "ray") == dump(tmp_path / "single")  # nothing lost, nothing twice
    assert summary["samples"]["learned"] + summary["samples"]["skipped"] == 7142



def test_shards_spread_over_the_servers_of_one_deployment(tmp_path: Path) -> None:
    """``--kato-url A,B --shards 3``: shards learn through A, B, A, each with a progress of its own (also under
    one --run-id), into the deployment's one store: exactly the single run; typed again, nothing is learned."""
    from .conftest import EngineServer

    source = tmp_path / "docs.jsonl"
    paragraphs = [part for part in CORPUS.read_text(encoding="utf-8").split("\n\n") if part.strip()][:600]
    source.write_text("".join(json.dumps({"text": text}) + "\n" for text in paragraphs), encoding="utf-8")
    servers = [EngineServer(tmp_path / "deployment").start() for _ in range(2)]  # replicas over one storage
    try:
        before = [cpu_seconds(server.process.pid) for server in servers]  # type: ignore[union-attr]
        urls = ",".join(server.url for server in servers)
        command = [str(source), "--kato-url", urls, "--shards", "3", "--executor", "ray", "--run-id", "spread",
                   "--node-ids", "{run_id}-node{level}", "--run-dir", str(tmp_path / "runs"), *OPTIONS]  # fmt: skip
        spread = run_cli(*command, timeout=600)
        used = [cpu_seconds(server.process.pid) - start for server, start in zip(servers, before, strict=True)]  # type: ignore[union-attr]
        assert [shard["backend"] for shard in spread["shards"]] == [servers[0].url, servers[1].url, servers[0].url]
        assert spread["config"]["backend"] == [servers[0].url, servers[1].url]
        assert sorted((tmp_path / "runs").glob("*-of-3")) == [tmp_path / "runs" / f"{index}-of-3" for index in range(3)]
        assert min(used) > 0.25 * max(used), used  # both servers learned (shards 0 and 2 on the first)
        again = run_cli(*command, timeout=600)
        assert again["samples"]["learned"] == 0 and again["samples"]["skipped"] == spread["samples"]["learned"]
    finally:
        for server in servers:
            server.stop()
    run_cli(str(source), "--data", str(tmp_path / "single"), "--run-id", "spread", "--node-ids", "{run_id}-node{level}",
            *OPTIONS)  # fmt: skip
    assert dump(tmp_path / "deployment") == dump(tmp_path / "single")
