"""Every failure is one failed sample or one clear line: runs that meet an unusable server or store stop with
their own exit code, a summary and --summary-json, and resume to the uninterrupted result."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import EngineServer
from .faultproxy import FaultProxy
from .golden import kb_dump, samples_done, wait_for_samples
from .test_exactly_once import LEVELS, NODES, clean, corpus, ok  # noqa: F401 - the fixtures are used by name


def _run(*arguments: str, summary: Path, **popen: Any) -> tuple[subprocess.Popen[str], float]:
    """``ingestd run`` in the background, writing its summary to ``summary``; the process and when it started."""
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "ingestd", "run", *arguments, "--no-progress", "--log-format",
                                "json", "--summary-json", str(summary)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, **popen)  # fmt: skip
    return process, started


def _finish(process: subprocess.Popen[str], started: float, timeout: float = 300) -> tuple[int, str, float]:
    _, stderr = process.communicate(timeout=timeout)
    return process.returncode, stderr, time.monotonic() - started


def _plain_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("{")]


def test_a_hung_server_is_an_outage_bounded_by_patience(corpus: Path, clean: Any, tmp_path: Path) -> None:
    """A server that stops answering (SIGSTOP) is resent to with --request-timeout for --patience seconds, then
    the run stops with exit 6, one line, the summary and --summary-json; resumed later it ends exactly."""
    clean_kb, _ = clean
    server = EngineServer(tmp_path / "kb").start()
    base = [str(corpus), *LEVELS, "--kato", server.url, "--run-dir", str(tmp_path / "run")]
    try:
        process, started = _run(*base, "--request-timeout", "0.5", "--patience", "3", summary=tmp_path / "s.json")
        wait_for_samples(process, tmp_path / "run", 100)
        assert server.process is not None
        server.process.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        code, stderr, _ = _finish(process, started)
        assert time.monotonic() - stopped < 60  # bounded by patience (plus closing), not retries of 120 s calls
        server.process.send_signal(signal.SIGCONT)
        assert code == 6 and "Traceback" not in stderr
        assert _plain_lines(stderr) == [line for line in _plain_lines(stderr) if line.startswith("ingestd: error: ")]
        assert "--patience" in stderr and "run the same command again" in stderr
        summary = json.loads((tmp_path / "s.json").read_text())
        assert summary["error"]["exit_code"] == 6 and summary["error"]["kind"] == "KatoUnavailable"
        assert summary["samples"]["learned"] >= 100 and summary["samples"]["learned"] == samples_done(tmp_path / "run")
        ok(*base)
    finally:
        if server.process is not None and server.process.poll() is None:
            server.process.send_signal(signal.SIGCONT)
        server.stop()
    assert kb_dump(tmp_path / "kb" / "kato.sqlite3", NODES) == clean_kb


def test_503_while_health_says_200_is_an_outage_bounded_by_patience(corpus: Path, clean: Any, tmp_path: Path,
                                                                     fresh_server: EngineServer) -> None:  # fmt: skip
    clean_kb, _ = clean
    with FaultProxy(fresh_server.port) as proxy:
        base = [str(corpus), *LEVELS, "--kato", proxy.url, "--run-dir", str(tmp_path / "run")]
        process, started = _run(*base, "--patience", "2", summary=tmp_path / "s.json")
        wait_for_samples(process, tmp_path / "run", 100)
        proxy.unavailable_burst(10**9, only_paths="observe-sequence")  # learns refused; /health fine
        refused_at = time.monotonic()
        code, stderr, _ = _finish(process, started)
        assert code == 6 and "Traceback" not in stderr and time.monotonic() - refused_at < 60
        assert "did not serve a call for 2 s" in stderr and "503" in stderr
        assert json.loads((tmp_path / "s.json").read_text())["error"]["exit_code"] == 6
        proxy.clear()
        ok(*base)
    assert kb_dump(fresh_server.data_dir / "kato.sqlite3", NODES) == clean_kb


def test_a_full_disk_for_the_knowledge_store_is_one_line_and_resumes(corpus: Path, clean: Any, tmp_path: Path) -> None:
    """ingestd may not grow a file past 1 MiB (RLIMIT_FSIZE, as a full disk): the store's write fails, the run
    stops with exit 2 and one line naming kato.sqlite3; run again without the limit, the KB is the clean one."""
    clean_kb, _ = clean

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    base = [str(corpus), *LEVELS, "--data", str(tmp_path / "kb"), "--run-dir", str(tmp_path / "run")]
    process, started = _run(*base, summary=tmp_path / "s.json", preexec_fn=limit_file_size)
    code, stderr, _ = _finish(process, started)
    assert code == 2 and "Traceback" not in stderr, stderr[-3000:]
    assert "kato.sqlite3" in stderr and "free space" in stderr
    assert json.loads((tmp_path / "s.json").read_text())["error"]["kind"] == "StoreUnusable"
    assert ok(*base)["recovery"]["possible_duplicates"] == 0
    assert kb_dump(tmp_path / "kb" / "kato.sqlite3", NODES) == clean_kb


def test_an_error_before_learning_still_writes_the_summary(tmp_path: Path) -> None:
    process, started = _run(str(tmp_path / "missing.txt"), "--data", str(tmp_path / "kb"), summary=tmp_path / "s.json")
    code, stderr, _ = _finish(process, started)
    assert code == 2 and _plain_lines(stderr) == [f"ingestd: error: file {tmp_path / 'missing.txt'} does not exist: "
                                                  f"check the path (relative paths start at {Path.cwd()})"]  # fmt: skip
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["error"]["kind"] == "SourceError" and summary["samples"]["read"] == 0


@pytest.mark.parametrize("failing", ["some", "all"])
def test_a_run_with_failed_samples_exits_7(tmp_path: Path, failing: str) -> None:
    records = tmp_path / "r.jsonl"
    texts: list[Any] = [7, 8] if failing == "all" else ["A good record of some length.", 8]
    records.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    process, started = _run(str(records), "--data", str(tmp_path / "kb"), summary=tmp_path / "s.json")
    code, stderr, _ = _finish(process, started)
    assert code == 7 and _plain_lines(stderr) == [] and "Traceback" not in stderr
    event = next(json.loads(line) for line in stderr.splitlines() if "dead letters" in line)
    assert event["samples_failed"] == (2 if failing == "all" else 1) and event["dead_letters"].endswith("failed.jsonl")
