"""Crash-safe progress: stop ingestd (SIGTERM, kill -9) mid-run, run it again, get the uninterrupted result.

Real subprocesses on the embedded engine (the default backend), real signals, real SQLite files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import CORPUS
from .golden import kb_dump, run_cli, samples_done, wait_for_samples

NODES = [f"node{level}" for level in range(4)]
COMMON = ["--chunk-sizes", "8,8,8,8", "--metadata-levels", "2,3", "--no-progress"]


def _start(data: Path, run_dir: Path, summary: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "ingestd", "run", str(CORPUS), *COMMON, "--data", str(data), "--run-dir", str(run_dir),
         "--summary-json", str(summary)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    data = tmp_path_factory.mktemp("clean")
    summary = run_cli(str(CORPUS), *COMMON, "--data", str(data))
    return kb_dump(data / "kato.sqlite3", NODES), summary


def _balanced(summary: dict[str, Any]) -> bool:
    samples = summary["samples"]
    return samples["read"] == (samples["learned"] + samples["filtered"] + samples["failed"] + samples["skipped"]
                               + samples["unfinished"])


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGTERM twice", "SIGKILL"])
def test_stopped_then_resumed_equals_uninterrupted(tmp_path: Path, uninterrupted: Any, stop: str) -> None:
    clean_kb, clean_summary = uninterrupted
    data, run_dir, first = tmp_path / "kb", tmp_path / "run", tmp_path / "first.json"
    process = _start(data, run_dir, first)
    wait_for_samples(process, run_dir, 1500)
    process.send_signal(getattr(signal, stop.split()[0]))
    if stop == "SIGTERM twice":  # the second one stops at once, cancelling in-flight samples
        time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    if stop == "SIGTERM twice":  # stopped at once: whether it got to write a summary depends on timing
        assert process.returncode in (0, -signal.SIGTERM), stderr[-2000:]
    elif stop == "SIGTERM":
        assert process.returncode == 0, stderr[-2000:]
        stopped = json.loads(first.read_text())
        assert stopped["stopped_early"] is True and _balanced(stopped)
        assert 0 < stopped["samples"]["learned"] < clean_summary["samples"]["learned"]
        assert stopped["samples"]["learned"] == samples_done(run_dir)  # every finished sample was recorded
    else:
        assert process.returncode == -signal.SIGKILL
    done_before = samples_done(run_dir)

    resumed = run_cli(str(CORPUS), *COMMON, "--data", str(data), "--run-dir", str(run_dir))
    assert _balanced(resumed)
    assert resumed["samples"]["skipped"] == done_before
    assert resumed["samples"]["learned"] + done_before == clean_summary["samples"]["learned"]
    assert resumed["recovery"]["possible_duplicates"] == 0  # the engine honours idempotency keys
    assert kb_dump(data / "kato.sqlite3", NODES) == clean_kb  # exactly, frequencies included

    again = run_cli(str(CORPUS), *COMMON, "--data", str(data), "--run-dir", str(run_dir))
    assert again["samples"]["learned"] == 0 and again["samples"]["skipped"] == clean_summary["samples"]["learned"]
    assert kb_dump(data / "kato.sqlite3", NODES) == clean_kb


def _run(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ingestd", "run", *arguments], capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def _small_corpus(tmp_path: Path) -> Path:
    corpus = tmp_path / "small.txt"
    corpus.write_text("\n\n".join(f"Paragraph number {i} says something about the sea." for i in range(30)))
    return corpus


def test_resuming_with_another_configuration_is_refused(tmp_path: Path) -> None:
    corpus = _small_corpus(tmp_path)
    base = [str(corpus), "--data", str(tmp_path / "kb"), "--run-id", "exp1", "--no-progress"]
    assert _run(*base, "--chunk-sizes", "8,8").returncode == 0
    changed = _run(*base, "--chunk-sizes", "4,4")
    assert changed.returncode == 4
    assert "another configuration" in changed.stderr and "chunk_size" in changed.stderr and "--fresh" in changed.stderr
    assert _run(*base, "--chunk-sizes", "4,4", "--fresh").returncode == 0  # starting over is one flag away


def test_a_read_only_run_directory_stops_before_learning(tmp_path: Path) -> None:
    if os.geteuid() == 0:  # root ignores permission bits; /proc is read-only for everyone
        locked, run_dir = None, Path("/proc/ingestd-run")
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        run_dir = locked / "run"
    try:
        result = _run(str(_small_corpus(tmp_path)), "--data", str(tmp_path / "kb"), "--run-dir", str(run_dir))
    finally:
        if locked is not None:
            locked.chmod(0o700)
    assert result.returncode == 2
    assert str(run_dir) in result.stderr and "--run-dir" in result.stderr
    assert not (tmp_path / "kb").exists()  # stopped before the engine or any learning


def test_a_run_directory_that_is_a_file_is_named_in_the_error(tmp_path: Path) -> None:
    blocker = tmp_path / "run"
    blocker.write_text("not a directory")
    result = _run(str(_small_corpus(tmp_path)), "--data", str(tmp_path / "kb"), "--run-dir", str(blocker))
    assert result.returncode == 2
    assert str(blocker) in result.stderr and "--run-dir" in result.stderr
    assert blocker.read_text() == "not a directory"


def test_full_disk_for_progress_stops_with_a_clear_error_and_loses_nothing(tmp_path: Path, fresh_server: Any) -> None:
    """ingestd may not grow its files past 200 KiB (RLIMIT_FSIZE: writes fail as on a full disk). It stops with
    a clear error; run again without the limit, the run completes with the uninterrupted knowledge base."""
    import resource

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Sample {i}: " + "words of the sample go here " * (i % 7 + 1) for i in range(400)))

    def arguments(run_id: str) -> list[str]:
        return [str(corpus), "--kato", fresh_server.url, "--node-ids", "{run_id}-node{level}", "--run-id", run_id,
                "--run-dir", str(tmp_path / run_id), "--no-progress", "--chunk-sizes", "4,4", "--metadata-levels", "1",
                "--no-bulk-load"]  # progress committed per sample: the limit falls mid-run

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200 * 1024, 200 * 1024))

    capped = subprocess.run([sys.executable, "-m", "ingestd", "run", *arguments("full")], capture_output=True,
                            text=True, timeout=120, preexec_fn=limit_file_size)  # fmt: skip
    assert capped.returncode == 2, capped.stderr[-2000:]
    assert "ingestd: error: cannot record progress" in capped.stderr and "free space" in capped.stderr
    recorded = samples_done(tmp_path / "full")
    assert 0 < recorded < 400
    resumed = _run(*arguments("full"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _run(*arguments("clean")).returncode == 0
    database = fresh_server.data_dir / "kato.sqlite3"
    assert kb_dump(database, ["full-node0", "full-node1"]) == kb_dump(database, ["clean-node0", "clean-node1"])


def test_failed_samples_go_to_dead_letters_and_can_be_retried(tmp_path: Path) -> None:
    corpus = tmp_path / "records.jsonl"
    lines = [json.dumps({"text": f"A perfectly good sample number {i}."}) for i in range(5)]
    lines[2] = json.dumps({"text": 42})  # not a string: this record fails
    corpus.write_text("\n".join(lines) + "\n")
    base = [str(corpus), "--data", str(tmp_path / "kb"), "--run-dir", str(tmp_path / "run")]
    first = run_cli(*base, expect=7)
    assert first["samples"] == {"read": 5, "learned": 4, "filtered": 0, "failed": 1, "skipped": 0, "unfinished": 0}
    letters = [json.loads(line) for line in (tmp_path / "run" / "failed.jsonl").read_text().splitlines()]
    assert [letter["sample_index"] for letter in letters] == [2] and "text" in letters[0]["reason"]
    assert letters[0]["source"] == "records"

    lines[2] = json.dumps({"text": "The record, repaired."})
    corpus.write_text("\n".join(lines) + "\n")
    retried = run_cli(*base, "--retry-failed")
    assert retried["samples"] == {"read": 5, "learned": 1, "filtered": 0, "failed": 0, "skipped": 4, "unfinished": 0}
    assert run_cli(*base, "--retry-failed")["samples"]["learned"] == 0  # nothing failed any more
