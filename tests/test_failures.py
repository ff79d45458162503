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
from .golden import kb_dump, kb_id, samples_done, wait_for_samples
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


@pytest.mark.parametrize(("learns", "how"), [("/ingestd/load", []), ("observe-sequence", ["--no-bulk-load"])])
def test_503_while_health_says_200_is_an_outage_bounded_by_patience(corpus: Path, clean: Any, tmp_path: Path,
                                                                     fresh_server: EngineServer, learns: str,
                                                                     how: list[str]) -> None:  # fmt: skip
    clean_kb, _ = clean
    with FaultProxy(fresh_server.port) as proxy:
        base = [str(corpus), *LEVELS, "--kato", proxy.url, "--run-dir", str(tmp_path / "run"), *how]
        process, started = _run(*base, "--patience", "2", summary=tmp_path / "s.json")
        wait_for_samples(process, tmp_path / "run", 100)
        proxy.unavailable_burst(10**9, only_paths=learns)  # learns refused; /health fine
        refused_at = time.monotonic()
        code, stderr, _ = _finish(process, started)
        assert code == 6 and "Traceback" not in stderr and time.monotonic() - refused_at < 60
        assert "did not serve a call for 2 s" in stderr and "503" in stderr
        assert json.loads((tmp_path / "s.json").read_text())["error"]["exit_code"] == 6
        proxy.clear()
        ok(*base)
    assert kb_dump(fresh_server.data_dir / "kato.sqlite3", NODES) == clean_kb


def test_a_full_disk_for_the_knowledge_store_is_one_line_and_resumes(corpus: Path, clean: Any, tmp_path: Path) -> None:
    """ingestd may not grow a file past 1 MiB (RLIMIT_FSIZE, as a full disk): a write of the store or of the
    progress fails, the run stops with exit 2 and one line naming the file; run again without the limit, the KB
    is the clean one."""
    clean_kb, _ = clean

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    base = [str(corpus), *LEVELS, "--data", str(tmp_path / "kb"), "--run-dir", str(tmp_path / "run")]
    process, started = _run(*base, summary=tmp_path / "s.json", preexec_fn=limit_file_size)
    code, stderr, _ = _finish(process, started)
    assert code == 2 and "Traceback" not in stderr, stderr[-3000:]
    # Whichever file reaches the limit first: the knowledge store, or the run's progress next to it.
    kind = json.loads((tmp_path / "s.json").read_text())["error"]["kind"]
    assert (kind, "kato.sqlite3" in stderr or "progress.sqlite3" in stderr) in (("StoreUnusable", True),
                                                                                ("ProgressError", True))  # fmt: skip
    assert "free space" in stderr
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


def _plain_run(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ingestd", "run", *arguments, "--no-progress", "--log-format", "json"],
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip


@pytest.mark.parametrize(("chunk_sizes", "needle"), [("99999999999999999999999", "far too large"), ("8,,8", "whole numbers"),
                                                     ("8,x", "whole numbers"), ("5000", "above 4096")])  # fmt: skip
def test_chunk_sizes_out_of_bounds_are_one_clear_line(tmp_path: Path, chunk_sizes: str, needle: str) -> None:
    source = tmp_path / "s.txt"
    source.write_text("A sample long enough to be learned.\n")
    result = _plain_run(str(source), "--chunk-sizes", chunk_sizes, "--data", str(tmp_path / "kb"))
    assert result.returncode == 2 and needle in result.stderr and "Traceback" not in result.stderr


def test_the_daemon_refuses_numbers_out_of_bounds(tmp_path: Path) -> None:
    from .test_daemon import Daemon

    daemon = Daemon(tmp_path / "state").start()
    try:
        with daemon.client() as client:
            for body in ({"chunk_sizes": [1e23]}, {"chunk_sizes": [8] * 17}, {"workers": 50_000}, {"chunk_sizes": [5000]}):
                answer = client.post("/jobs", json={"source": "x.txt", **body})
                assert answer.status_code == 422, (body, answer.text)
    finally:
        daemon.stop()


def test_a_damaged_progress_file_says_so(tmp_path: Path) -> None:
    source = tmp_path / "s.txt"
    source.write_text("A sample long enough to be learned.\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "progress.sqlite3").write_bytes(b"not a database at all " * 200)
    result = _plain_run(str(source), "--data", str(tmp_path / "kb"), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2 and "progress.sqlite3 is damaged" in result.stderr and "Traceback" not in result.stderr


def test_a_json_file_holding_one_array_is_refused_as_a_whole(tmp_path: Path) -> None:
    source = tmp_path / "records.json"
    source.write_text(json.dumps([{"text": "A record of text, long enough."}, {"text": "Another record of text."}]))
    result = _plain_run(str(source), "--data", str(tmp_path / "kb"))
    assert result.returncode == 2 and "one JSON array, not JSON lines" in result.stderr and "jq -c" in result.stderr


def test_deeply_nested_metadata_fails_its_sample_alone(tmp_path: Path) -> None:
    deep: Any = "u"
    for _ in range(300):
        deep = [deep]
    records = [{"text": f"A record of text number {i}.", "url": f"u{i}"} for i in range(5)]
    records[2]["url"] = deep
    source = tmp_path / "r.jsonl"
    source.write_text("".join(json.dumps(record) + "\n" for record in records))
    result = _plain_run(str(source), "--metadata-fields", "url", "--metadata-levels", "0", "--data", str(tmp_path / "kb"),
                        "--summary-json", str(tmp_path / "s.json"))  # fmt: skip
    summary = json.loads((tmp_path / "s.json").read_text())
    assert result.returncode == 7 and "Traceback" not in result.stderr
    assert summary["samples"]["learned"] == 4 and summary["failures"] == [
        {"sample_index": 2, "reason": "field 'url' nests lists or objects more than 64 levels deep"}]


def test_a_bad_csv_row_past_ten_thousand_rows_fails_alone_and_the_file_finishes(tmp_path: Path) -> None:
    import csv

    source = tmp_path / "big.csv"
    with source.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "url"])
        writer.writerows([f"row number {i} with some words in it", f"u{i}"] for i in range(12_000))
        writer.writerow(["a bad row", "u", "with", "extra fields"])
        writer.writerow(["a last good row of text", "ulast"])
    result = _plain_run(str(source), "--chunk-sizes", "4", "--data", str(tmp_path / "kb"), "--summary-json",
                        str(tmp_path / "s.json"))  # fmt: skip
    summary = json.loads((tmp_path / "s.json").read_text())
    assert result.returncode == 7 and "Traceback" not in result.stderr
    assert summary["samples"]["learned"] == 12_001 and summary["failures"] == [
        {"sample_index": 12_000, "reason": "the row at line 12002 has 4 fields where the header has 2"}]


def test_a_latin1_file_is_refused_as_a_whole(tmp_path: Path) -> None:
    """Mostly ASCII, accented letters in latin-1 deep in the file: not UTF-8, refused before learning."""
    paragraphs = [f"Paragraph {i} is plain English text without accents." for i in range(3000)]
    paragraphs[2500] = "Un caf\xe9 cr\xe8me, s'il vous pla\xeet."
    source = tmp_path / "latin1.txt"
    source.write_bytes("\n\n".join(paragraphs).encode("latin-1"))
    result = _plain_run(str(source), "--data", str(tmp_path / "kb"))
    assert result.returncode == 2 and "is not UTF-8 text" in result.stderr and "iconv -f latin1" in result.stderr
    assert not (tmp_path / "kb").exists() or not (tmp_path / "kb" / "kato.sqlite3").exists()


def test_a_300_mb_line_is_skipped_without_holding_it(tmp_path: Path) -> None:
    """A single 300 MB line fails alone; the process never holds it (peak RSS far below its size)."""
    source = tmp_path / "huge.jsonl"
    with source.open("w") as handle:
        handle.write(json.dumps({"text": "A small record before the big one."}) + "\n")
        handle.write('{"text": "' + "word " * 60_000_000 + '"}\n')
        handle.write(json.dumps({"text": "A small record after the big one."}) + "\n")
    script = ("import resource, subprocess, sys; "
              "subprocess.run(sys.argv[1:], check=False, timeout=270); "
              "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")  # fmt: skip
    measured = subprocess.run([sys.executable, "-c", script, sys.executable, "-m", "ingestd", "run", str(source),
                               "--data", str(tmp_path / "kb"), "--no-progress", "--summary-json", str(tmp_path / "s.json")],
                              capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    peak_kib = int(measured.stdout.strip().splitlines()[-1])
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["samples"]["learned"] == 2 and summary["failures"][0]["sample_index"] == 1
    assert "--max-sample-chars" in summary["failures"][0]["reason"]
    assert peak_kib < 150 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB for a 300 MB line"


def test_a_damaged_job_store_stops_the_daemon_with_one_line(tmp_path: Path) -> None:
    import os

    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "jobs.sqlite3").write_bytes(os.urandom(4000))
    result = subprocess.run([sys.executable, "-m", "ingestd", "serve", "--port", "0", "--state-dir", str(tmp_path / "state")],
                            env={**os.environ, "INGESTD_TOKEN": "t"}, capture_output=True, text=True, timeout=60,
                            check=False)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout
    assert result.stderr.startswith("ingestd: error: the job store") and "--state-dir" in result.stderr


def _peak_rss_kib(*command: str) -> int:
    """Peak RSS of a child process running ``command``."""
    script = ("import resource, subprocess, sys; "
              "subprocess.run(sys.argv[1:], check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=270); "
              "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")  # fmt: skip
    measured = subprocess.run([sys.executable, "-c", script, *command], capture_output=True, text=True, timeout=300,
                              check=False)  # fmt: skip
    return int(measured.stdout.strip().splitlines()[-1])


_ROW = "The quick brown fox jumps over the lazy dog"


def _csv_bomb(handle: Any, shape: str) -> None:
    """A row of about 150 MB, in one of the shapes that broke the csv reader."""
    if shape == "a quote that never closes":
        handle.write('"this field opens a quote that never closes,u1\n')
        for _ in range(150):
            handle.write("y" * 999_999 + "\n")
    elif shape == "a line that never ends":
        handle.write("x" * 150_000_000 + ",u1\n")
    elif shape == "a long line inside a quoted field":
        handle.write('"short start\n' + "z" * 150_000_000 + ' end",u1\n')
    elif shape == "a quoted field of many lines":
        handle.write('"a ""quoted"" start, with a comma\n' + ("y" * 99 + "\n") * 1_500_000 + ' end",u1\n')
    else:  # many fields, each below the limit
        handle.write(",".join('"' + ("v" * 999 + "\n") * 500 + '"' for _ in range(300)) + "\n")


@pytest.mark.parametrize("shape", ["a quote that never closes", "a line that never ends", "a long line inside a "
                                   "quoted field", "a quoted field of many lines", "a row of many fields"])  # fmt: skip
def test_a_csv_row_past_the_sample_limit_fails_alone_and_is_not_held(tmp_path: Path, shape: str) -> None:
    """csv is read with each row held to the limit: a 150 MB row fails alone (was 966 MB of RSS), and the rows
    after it are read as csv reads them (a skipped line inside quotes lost the rows after it, or learned the
    rest of a long field as rows)."""
    source = tmp_path / "bomb.csv"
    with source.open("w") as handle:
        handle.write(f"text,url\n{_ROW} before,u0\n")
        _csv_bomb(handle, shape)
        for i in range(5):  # (after a quote that never closes, a quote would close it)
            quoted = f'"{_ROW}, ""quoted"" {i}"' if shape != "a quote that never closes" else f"{_ROW} unquoted {i}"
            handle.write(f"{_ROW} after {i},u{i}\n{quoted},q{i}\n")
    summary_file = tmp_path / "s.json"
    peak_kib = _peak_rss_kib(sys.executable, "-m", "ingestd", "run", str(source), "--data", str(tmp_path / "kb"),
                             "--no-progress", "--max-sample-chars", "1000", "--summary-json", str(summary_file))
    summary = json.loads(summary_file.read_text())
    expected_read = 12 if shape != "a quote that never closes" else 2  # an unclosed quote holds the rest of the file
    assert summary["samples"]["read"] == expected_read and summary["samples"]["failed"] == 1, summary["samples"]
    assert summary["failures"][0]["sample_index"] == 1 and "the row at line 3 is longer" in summary["failures"][0]["reason"]
    assert peak_kib < 150 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB for a 150 MB csv row"


def test_csv_rows_are_what_pythons_csv_reads(tmp_path: Path) -> None:
    """The bounded reader against csv.reader itself, on files with quotes, commas and line ends in fields."""
    import csv
    import io
    import random

    from ingestd.source import _csv_rows

    chooser = random.Random(7)

    def field() -> str:
        words = " ".join(chooser.choice(["a", "bb", "c,d", 'e"f', "g\nh", "ij\r\nk", "", " "])
                         for _ in range(chooser.randint(0, 4)))  # fmt: skip
        quoted = chooser.random() < 0.5 or any(mark in words for mark in ',"\n\r')
        return '"' + words.replace('"', '""') + '"' if quoted else words

    for _ in range(300):
        line_end = chooser.choice(["\n", "\r\n"])
        rows = [",".join(field() for _ in range(chooser.randint(1, 4))) for _ in range(chooser.randint(1, 30))]
        text = line_end.join(rows) + chooser.choice(["", line_end])
        (tmp_path / "r.csv").write_bytes(text.encode())
        ours = [row for _, row in _csv_rows(tmp_path / "r.csv", 1 << 20)]
        assert ours == [row for row in csv.reader(io.StringIO(text, newline="")) if row], text


def test_a_csv_row_failed_for_its_length_is_learned_after_raising_the_limit(tmp_path: Path) -> None:
    source = tmp_path / "rows.csv"
    with source.open("w") as handle:
        handle.write(f"text,url\n{_ROW} before,u0\n")
        handle.write(f'"{_ROW} long\n' + "z " * 1_000_000 + ' end",u1\n')
        handle.write("".join(f"{_ROW} after {i},u{i}\n" for i in range(5)))
    first = _plain_run(str(source), "--data", str(tmp_path / "kb"), "--max-sample-chars", "1000")
    assert first.returncode == 7, first.stderr[-1000:]
    again = _plain_run(str(source), "--data", str(tmp_path / "kb"), "--max-sample-chars", "3000000", "--retry-failed",
                       "--summary-json", str(tmp_path / "s.json"))  # fmt: skip
    assert again.returncode == 0, again.stderr[-1000:]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["samples"]["learned"] == 1 and summary["samples"]["skipped"] == 6, summary["samples"]


def test_parquet_metadata_of_any_arrow_type_is_carried_or_fails_its_sample(tmp_path: Path,
                                                                          engine_server: EngineServer) -> None:  # fmt: skip
    """Decimals, durations, dates and bytes in metadata columns crashed the run (not JSON); now they are
    carried as JSON carries them, the same in-process and over HTTP, and bytes that are not text fail alone."""
    import datetime
    import decimal

    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["The first sample has enough words to learn.", "The second sample has enough words too.",
             "And a third sample closes the little file."]  # fmt: skip
    pq.write_table(pa.table({
        "text": texts,
        "dec": pa.array([decimal.Decimal("1.50"), decimal.Decimal("2.25"), None], pa.decimal128(5, 2)),
        "dur": pa.array([datetime.timedelta(seconds=5)] * 3, pa.duration("s")),
        "ts": pa.array([datetime.datetime(2024, 1, 1, 12, 30)] * 3, pa.timestamp("s")),
        "day": pa.array([datetime.date(2024, 1, 2)] * 3, pa.date32()),
        "raw": pa.array([b"text bytes", b"\xff\xfe not text", b"more"], pa.binary()),
        "odd": pa.array([float("nan"), float("inf"), float("-inf")], pa.float64()),
    }), tmp_path / "types.parquet")  # fmt: skip
    nodes = f"types{time.time_ns()}-{{level}}"
    common = [str(tmp_path / "types.parquet"), "--metadata-fields", "dec,dur,ts,day,raw,odd", "--metadata-levels", "0,1",
              "--chunk-sizes", "4,4", "--no-progress", "--node-ids", nodes]  # fmt: skip
    inproc = subprocess.run([sys.executable, "-m", "ingestd", "run", *common, "--data", str(tmp_path / "kb"),
                             "--summary-json", str(tmp_path / "s.json")], capture_output=True, text=True, timeout=300,
                            check=False)  # fmt: skip
    assert inproc.returncode == 7 and "Traceback" not in inproc.stderr, inproc.stderr[-2000:]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["samples"]["learned"] == 2 and summary["failures"][0]["sample_index"] == 1
    assert "'raw' holds bytes that are not UTF-8" in summary["failures"][0]["reason"]
    over_http = subprocess.run([sys.executable, "-m", "ingestd", "run", *common, "--kato", engine_server.url,
                                "--run-dir", str(tmp_path / "http-run")], capture_output=True, text=True, timeout=300,
                               check=False)  # fmt: skip
    assert over_http.returncode == 7, over_http.stderr[-2000:]
    import sqlite3

    def metadata(data: Path) -> list[str]:
        with sqlite3.connect(data / "kato.sqlite3") as connection:
            rows = connection.execute("SELECT metadata FROM patterns WHERE kb_id IN (?, ?) AND metadata != '{}'",
                                      [kb_id(nodes.format(level=level)) for level in (0, 1)])  # fmt: skip
            return sorted(row[0].decode() if isinstance(row[0], bytes) else row[0] for row in rows)

    stored = metadata(tmp_path / "kb")
    assert stored == metadata(engine_server.data_dir) and stored
    first = json.loads(stored[0])
    assert first["ts"] == ["2024-01-01T12:30:00"] and first["day"] == ["2024-01-02"] and first["dur"] == ["0:00:05"]
    assert {value for row in stored for value in json.loads(row)["dec"]} == {"1.50", "None"}
    assert {value for row in stored for value in json.loads(row)["odd"]} == {"nan", "-inf"}  # orjson sent null


@pytest.mark.parametrize("source, needle", [
    ("/tmp/" + "a" * 300 + ".txt", "cannot be looked up (File name too long)"),
    ("~no-such-user-here/notes.txt", "names the home folder of an unknown user"),
])  # fmt: skip
def test_paths_that_cannot_be_looked_up_are_one_line(tmp_path: Path, source: str, needle: str) -> None:
    result = _plain_run(source, "--data", str(tmp_path / "kb"))
    assert result.returncode == 2 and needle in result.stderr, result.stderr[-2000:]
    assert _plain_lines(result.stderr) == [line for line in result.stderr.splitlines() if line.startswith("ingestd: error:")]


def test_a_byte_order_mark_is_no_text(tmp_path: Path) -> None:
    """Editors on Windows start files with a BOM: jsonl failed its first record, csv named its first column
    '\\ufefftext', txt learned it as part of the first token. Each now learns what the file without it learns."""
    rows = ["The first sample has enough words to learn.", "The second sample has enough words too."]
    formats = {"jsonl": "".join(json.dumps({"text": row}) + "\n" for row in rows),
               "csv": "text\n" + "".join(f"{row}\n" for row in rows), "txt": "\n\n".join(rows) + "\n"}  # fmt: skip
    for suffix, content in formats.items():
        dumps = []
        for bom in (b"", b"\xef\xbb\xbf"):
            name = f"{suffix}-{len(bom)}"
            (tmp_path / f"{name}.{suffix}").write_bytes(bom + content.encode())
            result = _plain_run(str(tmp_path / f"{name}.{suffix}"), "--data", str(tmp_path / name),
                                "--source-label", "same")  # fmt: skip
            assert result.returncode == 0, (suffix, result.stderr[-1000:])
            dumps.append(kb_dump(tmp_path / name / "kato.sqlite3", ["node0", "node1", "node2", "node3"]))
        assert dumps[0] == dumps[1] and dumps[0], suffix


def test_library_logs_keep_the_log_format_and_the_error_is_one_line(tmp_path: Path) -> None:
    """datasets printed its own error line raw beside its structlog copy; now only the configured format."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["x" * 100] * 100}), tmp_path / "whole.parquet")
    (tmp_path / "cut.parquet").write_bytes((tmp_path / "whole.parquet").read_bytes()[:300])
    result = _plain_run(str(tmp_path / "cut.parquet"), "--data", str(tmp_path / "kb"), "--log-format", "json")
    assert result.returncode == 2 and "cannot be read as parquet" in result.stderr
    assert _plain_lines(result.stderr) == [line for line in result.stderr.splitlines() if line.startswith("ingestd: error:")]
    assert len(_plain_lines(result.stderr)) == 1


def test_integers_past_64_bits_in_jsonl_metadata_are_kept_exact(tmp_path: Path, engine_server: EngineServer) -> None:
    """orjson read 18446744073709551616 as 1.8446744073709552e+19 (and a run then crashed encoding the digest)."""
    source = tmp_path / "big.jsonl"
    source.write_text(json.dumps({"text": "A sample with a very large number in its metadata.",
                                  "n": 18446744073709551616, "m": -(2**70), "k": 12, "j": -(2**63) - 1}) + "\n")  # fmt: skip
    nodes = f"bigint{time.time_ns()}-{{level}}"
    common = [str(source), "--metadata-fields", "n,m,k,j", "--metadata-levels", "0", "--chunk-sizes", "4",
              "--node-ids", nodes]  # fmt: skip
    assert _plain_run(*common, "--data", str(tmp_path / "kb")).returncode == 0
    assert _plain_run(*common, "--kato", engine_server.url, "--run-dir", str(tmp_path / "http-run")).returncode == 0
    import sqlite3

    for data in (tmp_path / "kb", engine_server.data_dir):
        with sqlite3.connect(data / "kato.sqlite3") as connection:
            rows = connection.execute("SELECT metadata FROM patterns WHERE kb_id = ?", (kb_id(nodes.format(level=0)),))
            stored = [json.loads(row[0]) for row in rows]
        assert stored and all(item["n"] == ["18446744073709551616"] and item["m"] == [str(-(2**70))]
                              and item["k"] == ["12"] and item["j"] == [str(-(2**63) - 1)] for item in stored), stored  # fmt: skip


def test_a_crash_is_named_by_its_cause_not_by_the_stream_it_broke() -> None:
    """A worker that crashes closes the queue under the reader, whose BrokenResourceError may come first in
    the task group's exception group: the daemon named a job's crash by it once (a flaky daemon test)."""
    import anyio

    from ingestd.errors import first_cause

    cause = KeyError("auto_learned_patterns")
    group = BaseExceptionGroup("tasks", [anyio.BrokenResourceError(), ExceptionGroup("workers", [cause])])
    assert first_cause(group) is cause
    assert isinstance(first_cause(ExceptionGroup("only", [anyio.BrokenResourceError()])), anyio.BrokenResourceError)


def test_busy_ports_are_one_line_and_exit_2(tmp_path: Path) -> None:
    """A port in use was a traceback (--metrics-port, exit 1) or uvicorn's exit 3 after a "ready" line."""
    import os
    import socket

    (tmp_path / "s.txt").write_text("A sample that is long enough to be learned.\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        commands = {
            "--metrics-port": ["run", str(tmp_path / "s.txt"), "--data", str(tmp_path / "kb"), "--no-progress",
                               "--metrics-port", port],
            "serve": ["serve", "--port", port, "--state-dir", str(tmp_path / "state")],
            "kato serve": ["kato", "serve", "--port", port, "--data", str(tmp_path / "engine")],
        }  # fmt: skip
        for name, command in commands.items():
            result = subprocess.run([sys.executable, "-m", "ingestd", *command], capture_output=True, text=True,
                                    timeout=120, check=False, env={**os.environ, "INGESTD_TOKEN": "t"})  # fmt: skip
            assert result.returncode == 2, (name, result.returncode, result.stderr[-1000:])
            assert "Address already in use" in result.stderr and "Traceback" not in result.stderr, name
            assert "daemon ready" not in result.stderr, name


@pytest.mark.parametrize(("argument", "needle"), [
    (["--run-id", "../../elsewhere"], "is not a name"),
    (["--run-id", "r" * 5000], "is not a name"),
])  # fmt: skip
def test_run_ids_that_are_paths_or_huge_are_refused(tmp_path: Path, argument: list[str], needle: str) -> None:
    (tmp_path / "s.txt").write_text("A sample that is long enough to be learned.\n")
    result = _plain_run(str(tmp_path / "s.txt"), "--data", str(tmp_path / "kb"), *argument)
    assert result.returncode == 2 and needle in result.stderr and len(result.stderr) < 2000, result.stderr[-500:]
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path.parent / "elsewhere").exists()


def test_a_file_with_carriage_returns_alone_is_refused_as_a_whole(tmp_path: Path) -> None:
    for suffix, content in (("csv", "text\rfirst row of the file\rsecond row\r"), ("txt", "first\r\rsecond paragraph\r")):
        (tmp_path / f"mac.{suffix}").write_text(content, newline="")
        result = _plain_run(str(tmp_path / f"mac.{suffix}"), "--data", str(tmp_path / "kb"))
        assert result.returncode == 2 and "ends its lines with \\r alone" in result.stderr, result.stderr[-500:]


def test_a_reader_of_standard_output_that_goes_away_costs_the_display_only(tmp_path: Path) -> None:
    """`ingestd run … | head -0`: rich exited 1 on the broken pipe, before --summary-json was written."""
    import os

    (tmp_path / "s.txt").write_text("A sample that is long enough to be learned.\n\nAnd a second one, just as long.\n")
    reader, writer = os.pipe()
    os.close(reader)
    try:
        result = subprocess.run([sys.executable, "-m", "ingestd", "run", str(tmp_path / "s.txt"), "--data",
                                 str(tmp_path / "kb"), "--no-progress", "--summary-json", str(tmp_path / "s.json")],
                                stdout=writer, stderr=subprocess.PIPE, text=True, timeout=300, check=False)  # fmt: skip
    finally:
        os.close(writer)
    assert result.returncode == 0, result.stderr[-1000:]
    assert json.loads((tmp_path / "s.json").read_text())["samples"]["learned"] == 2


def test_a_server_at_its_concurrency_limit_gets_back_pressure_not_a_storm(corpus: Path, clean: Any, tmp_path: Path) -> None:
    """Against a server answering 503 past 10 requests at once (uvicorn's --limit-concurrency, as KATO's 100 per
    worker), a run with 64 workers adapts how many it sends: no outage, no server-down retry, the exact KB."""
    clean_kb, _ = clean
    server = EngineServer(tmp_path / "kb", extra_args=("--limit-concurrency", "10")).start()
    try:
        base = [str(corpus), *LEVELS, "--kato", server.url, "--run-dir", str(tmp_path / "run"), "--workers", "64",
                "--no-bulk-load"]  # KATO's calls, as to a KATO
        process, started = _run(*base, summary=tmp_path / "s.json")
        code, stderr, _ = _finish(process, started)
        assert code == 0 and "Traceback" not in stderr, stderr[-3000:]
    finally:
        server.stop()
    recovery = json.loads((tmp_path / "s.json").read_text())["recovery"]
    assert recovery["server_outages"] == 0 and recovery["retries"].get("server_down", 0) == 0, recovery
    assert recovery["retries"].get("overloaded", 0) > 0  # the limit was met, and taken as back-pressure
    assert recovery["possible_duplicates"] == 0
    assert kb_dump(tmp_path / "kb" / "kato.sqlite3", NODES) == clean_kb
