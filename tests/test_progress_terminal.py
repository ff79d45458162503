"""The progress bar in a real terminal (a pty) of 80 columns: a total and the time left, lines that fit, and a
Ctrl-C typed at the keyboard that stops the run with a warning above the bar, not through it."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import sys
import termios
import time
from pathlib import Path

from rich.cells import cell_len

from .conftest import CORPUS

_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def _run_in_terminal(arguments: list[str], cwd: Path, *, interrupt_after: int | None) -> tuple[int, str]:
    """``ingestd`` in a pty of 80 x 24; with ``interrupt_after``, Ctrl-C is typed once the bar has counted that many
    samples. Returns the exit code and everything the terminal showed."""
    pid, master = pty.fork()
    if pid == 0:  # the child: its terminal is the pty
        os.chdir(cwd)
        os.environ.update({"TERM": "xterm-256color", "COLUMNS": "80", "LINES": "24"})
        os.environ.pop("NO_COLOR", None)
        os.execv(sys.executable, [sys.executable, "-m", "ingestd", *arguments])
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    shown = b""
    typed = False
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            shown += data
        if interrupt_after is not None and not typed:
            recent = _ESCAPE.sub("", shown[-4000:].decode("utf-8", "replace"))
            counts = re.findall(r"learning\s.*?\s(\d+)/\d+", recent)
            if counts and int(counts[-1]) >= interrupt_after:
                os.write(master, b"\x03")  # Ctrl-C, through the terminal's line discipline
                typed = True
    else:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    os.close(master)
    return os.waitstatus_to_exitcode(status), _ESCAPE.sub("", shown.decode("utf-8", "replace"))


def test_progress_bar_at_80_columns_with_total_eta_and_ctrl_c(tmp_path: Path) -> None:
    source = tmp_path / "big.txt"
    source.write_text((CORPUS.read_text(encoding="utf-8") + "\n\n") * 8, encoding="utf-8")
    code, shown = _run_in_terminal(["run", str(source), "--data-dir", "kb", "--planners", "0"], tmp_path,
                                   interrupt_after=2000)  # fmt: skip
    assert code == 0, shown[-3000:]
    frames = [line for line in re.split(r"[\r\n]", shown) if line.strip()]
    bars = [line for line in frames if "learning" in line and "━" in line]
    assert bars, shown[-3000:]
    assert all(cell_len(line) <= 80 for line in frames), [line for line in frames if cell_len(line) > 80][:3]
    # the total was known (the file was counted) and the time left shown
    assert any(re.search(r"\d+/57\d\d\d\b", line) and "eta" in line for line in bars), bars[-3:]
    assert any("samples/s" in line and "tokens" in line for line in frames)
    # Ctrl-C: no ^C echoed into the bar, the warning on lines of its own, then the summary
    assert "^C" not in shown
    warning = [line for line in frames if "stopping: no new samples" in line]
    assert warning and not any("━" in line for line in warning)
    assert "stopped early" in shown and "run the same command again" in shown
    # stopped early, the bar keeps the whole total rather than claiming 100%
    assert not re.search(r"(\d+)/\1 100%", bars[-1]), bars[-1]


def test_a_finished_run_fills_the_bar(tmp_path: Path) -> None:
    code, shown = _run_in_terminal(["run", str(CORPUS), "--data-dir", "kb", "--max-samples", "1500"], tmp_path,
                                   interrupt_after=None)  # fmt: skip
    assert code == 0, shown[-3000:]
    bars = [line for line in re.split(r"[\r\n]", shown) if "learning" in line and "━" in line]
    assert re.search(r"(\d+)/\1\s+100%", bars[-1]), bars[-1]
    assert all(cell_len(line) <= 80 for line in re.split(r"[\r\n]", shown))


def test_the_total_is_counted_from_every_local_format(tmp_path: Path) -> None:
    import csv
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ingestd.source import Source, SourceSpec

    texts = [part for part in CORPUS.read_text(encoding="utf-8").split("\n\n") if part.strip()][:500]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts) + "\n\n", encoding="utf-8")
    with (tmp_path / "a.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text"])
        writer.writerows([[text.replace("\n", " ")] for text in texts])
    pq.write_table(pa.table({"text": texts}), tmp_path / "a.parquet")
    (tmp_path / "a.txt").write_text("\n\n\n".join(texts) + "\n", encoding="utf-8")
    (tmp_path / "lines.txt").write_text("\n".join(["one line", "", "two"] * 10), encoding="utf-8")  # no final newline
    for spec in (SourceSpec(source=str(tmp_path / "a.jsonl")), SourceSpec(source=str(tmp_path / "a.csv")),
                 SourceSpec(source=str(tmp_path / "a.parquet")), SourceSpec(source=str(tmp_path / "a.txt")),
                 SourceSpec(source=str(tmp_path / "lines.txt"), txt_mode="line", min_chars=0)):  # fmt: skip
        source = Source(spec)
        read = sum(1 for _ in source.events())
        assert source.count_records() == read, spec.source
