"""Logs: JSON lines when stderr is not a terminal (production), readable console lines on a real terminal."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path


def _records(tmp_path: Path) -> Path:
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps({"text": "a good sample, long enough to learn"}) + "\n" + json.dumps({"text": 7}) + "\n")
    return path


def _run(tmp_path: Path, stderr: int, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "ingestd", "run", str(_records(tmp_path)), "--data", str(tmp_path / "kb"),
                             "--no-progress", *extra], stdout=subprocess.DEVNULL, stderr=stderr)  # fmt: skip


def test_logs_are_json_lines_when_stderr_is_not_a_terminal(tmp_path: Path) -> None:
    process = _run(tmp_path, subprocess.PIPE)
    _, err = process.communicate(timeout=120)
    events = [json.loads(line) for line in err.decode().splitlines() if line.strip()]  # every line is JSON
    failed = next(event for event in events if event["event"] == "sample failed")
    assert failed["level"] == "warning" and failed["sample_index"] == 1 and "timestamp" in failed
    assert "text" in failed["reason"]


def test_logs_are_readable_on_a_terminal(tmp_path: Path) -> None:
    controller, terminal = pty.openpty()
    try:
        process = _run(tmp_path, terminal)
        os.close(terminal)
        output = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the terminal is gone once the process exits
                break
            if not chunk:
                break
            output += chunk
        assert process.wait(timeout=120) == 7  # a sample failed
    finally:
        os.close(controller)
    text = output.decode(errors="replace")
    line = next(line for line in text.splitlines() if "sample failed" in line)
    assert not line.lstrip().startswith("{") and "warning" in line and "sample_index" in line


def test_the_format_can_be_chosen(tmp_path: Path) -> None:
    process = _run(tmp_path, subprocess.PIPE, "--log-format", "console", "--log-level", "error")
    _, err = process.communicate(timeout=120)
    assert process.returncode == 7 and "sample failed" not in err.decode()  # a warning, below --log-level error
    process = _run(tmp_path, subprocess.PIPE, "--log-format", "xml")
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2 and "--log-format" in err.decode() and "'xml'" in err.decode()
