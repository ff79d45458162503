"""Bad input stops `ingestd run` before any learning with a one-line error; a bad record costs one sample."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import CORPUS, free_port
from .golden import run_cli


def run_ingestd(*arguments: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    import tempfile

    run_dir = [] if "--run-dir" in arguments else ["--run-dir", tempfile.mkdtemp(prefix="ingestd-run-")]
    return subprocess.run([sys.executable, "-m", "ingestd", "run", *arguments, *run_dir], capture_output=True,
                          text=True, timeout=120, cwd=cwd)  # fmt: skip


def assert_refused(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0
    message = result.stderr.strip()
    assert "Traceback" not in message, message
    for needle in needles:
        assert needle in message, message


@pytest.fixture
def jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "ok.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"sample number {i} with enough text"}) for i in range(5)) + "\n")
    return path


def test_missing_file(tmp_path: Path) -> None:
    result = run_ingestd(str(tmp_path / "absent.jsonl"), "--data", str(tmp_path / "kb"))
    assert_refused(result, "absent.jsonl", "does not exist")
    assert not (tmp_path / "kb").exists()  # nothing was started, let alone learned


def test_unknown_dataset_key(tmp_path: Path) -> None:
    assert_refused(run_ingestd("wikitexx", "--data", str(tmp_path / "kb")), "wikitexx", "wikitext", "c4")


def test_text_field_that_does_not_exist(jsonl: Path, tmp_path: Path) -> None:
    assert_refused(run_ingestd(str(jsonl), "--text-field", "body", "--data", str(tmp_path / "kb")), "'body'", "--text-field")


def test_metadata_field_that_does_not_exist(jsonl: Path, tmp_path: Path) -> None:
    assert_refused(run_ingestd(str(jsonl), "--metadata-fields", "url", "--data", str(tmp_path / "kb")), "'url'")


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("Ceci est un texte français, écrit en latin-1.\n".encode("latin-1") * 3)
    assert_refused(run_ingestd(str(path), "--data", str(tmp_path / "kb")), "latin1.txt", "not UTF-8", "iconv")


def test_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "blob.txt"
    path.write_bytes(bytes(range(256)) * 10)
    assert_refused(run_ingestd(str(path), "--data", str(tmp_path / "kb")), "blob.txt", "binary")


@pytest.mark.parametrize("sizes", ["8,1,8", "0", "8,x"])
def test_chunk_sizes_below_two_or_not_numbers(jsonl: Path, tmp_path: Path, sizes: str) -> None:
    assert_refused(run_ingestd(str(jsonl), "--chunk-sizes", sizes, "--data", str(tmp_path / "kb")))


def test_chunk_size_one_names_the_level(jsonl: Path, tmp_path: Path) -> None:
    assert_refused(run_ingestd(str(jsonl), "--chunk-sizes", "8,1", "--data", str(tmp_path / "kb")), "level 1", "2")


@pytest.mark.parametrize("workers", ["0", "-3"])
def test_zero_or_negative_workers(jsonl: Path, tmp_path: Path, workers: str) -> None:
    assert_refused(run_ingestd(str(jsonl), "--workers", workers, "--data", str(tmp_path / "kb")), "--workers")


def test_unreachable_kato(jsonl: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert_refused(run_ingestd(str(jsonl), "--kato", url), url, "cannot reach KATO", "--kato")


def test_a_web_server_that_is_not_kato(jsonl: Path, tmp_path: Path) -> None:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        import time

        import httpx

        for _ in range(100):
            try:
                httpx.get(f"http://127.0.0.1:{port}/")
                break
            except httpx.TransportError:
                time.sleep(0.05)
        assert_refused(run_ingestd(str(jsonl), "--kato", f"http://127.0.0.1:{port}"), "is not a KATO server")
    finally:
        server.terminate()
        server.wait()


def test_invalid_hierarchy_file(jsonl: Path, tmp_path: Path) -> None:
    bad = tmp_path / "h.toml"
    bad.write_text("[[levels]]\nchunk_size = 1\n")
    assert_refused(run_ingestd(str(jsonl), "--hierarchy", str(bad), "--data", str(tmp_path / "kb")), "h.toml", "chunk_size")
    broken = tmp_path / "broken.toml"
    broken.write_text("levels = [")
    assert_refused(run_ingestd(str(jsonl), "--hierarchy", str(broken), "--data", str(tmp_path / "kb")), "broken.toml")


def test_hierarchy_files_in_toml_and_yaml(jsonl: Path, tmp_path: Path) -> None:
    toml = tmp_path / "h.toml"
    toml.write_text('node_id_template = "t-node{level}"\n[[levels]]\nchunk_size = 3\n[[levels]]\nchunk_size = 2\n'
                    'capture_metadata = true\nsession_config = {recall_threshold = 0.6}\n')  # fmt: skip
    yaml = tmp_path / "h.yaml"
    yaml.write_text("node_id_template: t-node{level}\nlevels:\n  - chunk_size: 3\n  - chunk_size: 2\n"
                    "    capture_metadata: true\n    session_config: {recall_threshold: 0.6}\n")  # fmt: skip
    first = run_cli(str(jsonl), "--hierarchy", str(toml), "--data", str(tmp_path / "a"))
    second = run_cli(str(jsonl), "--hierarchy", str(yaml), "--data", str(tmp_path / "b"))
    assert first["patterns_per_level"] == second["patterns_per_level"] and first["patterns_per_level"][1] > 0
    assert first["config"]["hierarchy"][1]["node_id"] == "t-node1"


def test_bad_records_fail_alone_and_the_run_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps({"text": "a perfectly good first sample"}),
        json.dumps({"text": 42}),
        "{not json",
        json.dumps({"title": "no text field here"}),
        json.dumps(["a", "list"]),
        json.dumps({"text": "short"}),
        json.dumps({"text": "a perfectly good last sample"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    summary = run_cli(str(path), "--data", str(tmp_path / "kb"), expect=7)
    assert summary["samples"] == {"read": 7, "learned": 2, "filtered": 1, "failed": 4, "skipped": 0, "unfinished": 0}
    assert [failure["sample_index"] for failure in summary["failures"]] == [1, 2, 3, 4]
    reasons = " | ".join(failure["reason"] for failure in summary["failures"])
    assert "int, not a string" in reasons and "not valid JSON" in reasons and "missing" in reasons


def test_undecodable_lines_in_a_utf8_file_fail_alone(tmp_path: Path) -> None:
    path = tmp_path / "lines.txt"
    path.write_bytes("a good first line: café, naïve\n".encode() + b"bad \xff\xfe bytes in this line\n"
                     + b"a good last line of text\n")  # UTF-8 beyond ASCII: a UTF-8 file with one bad line
    summary = run_cli(str(path), "--txt-mode", "line", "--data", str(tmp_path / "kb"), expect=7)
    assert summary["samples"] == {"read": 3, "learned": 2, "filtered": 0, "failed": 1, "skipped": 0, "unfinished": 0}
    assert summary["failures"][0] == {"sample_index": 1, "reason": "line 2 is not valid UTF-8"}


def test_skip_and_max_samples_count_the_filtered_stream(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    texts = ["short", *(f"sample text number {i}" for i in range(10))]
    path.write_text("\n".join(json.dumps({"text": text}) for text in texts) + "\n")
    summary = run_cli(str(path), "--skip", "3", "--max-samples", "4", "--data", str(tmp_path / "kb"))
    assert summary["samples"]["learned"] == 4


def test_local_parquet_and_csv_through_datasets(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [line for line in CORPUS.read_text(encoding="utf-8").split("\n\n")[:30]]
    pq.write_table(pa.table({"content": texts, "url": [f"u{i}" for i in range(30)]}), tmp_path / "c.parquet")
    with (tmp_path / "c.csv").open("w", encoding="utf-8", newline="") as handle:
        import csv

        writer = csv.writer(handle)
        writer.writerow(["content", "url"])
        writer.writerows([text, f"u{i}"] for i, text in enumerate(texts))
    from_parquet = run_cli(str(tmp_path / "c.parquet"), "--text-field", "content", "--metadata-fields", "url",
                           "--metadata-levels", "0", "--data", str(tmp_path / "p"))  # fmt: skip
    from_csv = run_cli(str(tmp_path / "c.csv"), "--text-field", "content", "--metadata-fields", "url",
                       "--metadata-levels", "0", "--data", str(tmp_path / "c"))  # fmt: skip
    assert from_parquet["samples"]["learned"] + from_parquet["samples"]["filtered"] == 30
    assert from_parquet["patterns_per_level"] == from_csv["patterns_per_level"]
    assert_refused(run_ingestd(str(tmp_path / "c.parquet"), "--data", str(tmp_path / "x")), "'text'", "content")


def test_a_server_that_names_patterns_differently_stops_the_run(jsonl: Path, tmp_path: Path) -> None:
    """A KATO-like server whose names differ from KATO's rule: the run stops with a clear error."""
    import threading

    import orjson
    import uvicorn

    from ingestd.engine import EngineSettings, create_app

    engine_app = create_app(EngineSettings(data_dir=tmp_path / "kb"))

    async def renaming(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] != "http" or not scope["path"].endswith("/observe-sequence"):
            await engine_app(scope, receive, send)
            return
        start: dict = {}

        async def rewrite(message):  # type: ignore[no-untyped-def]
            if message["type"] == "http.response.start":
                start.update(message)
                return
            body = orjson.loads(message["body"])
            body["auto_learned_patterns"] = ["PTRN|" + "0" * 40 for _ in body["auto_learned_patterns"]]
            body["final_learned_pattern"] = "PTRN|" + "0" * 40
            content = orjson.dumps(body)
            headers = [(k, v) for k, v in start["headers"] if k != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(content)).encode())]})
            await send({"type": "http.response.body", "body": content})

        await engine_app(scope, receive, rewrite)

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(renaming, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        import time

        while not server.started:
            time.sleep(0.02)
        result = run_ingestd(str(jsonl), "--kato", f"http://127.0.0.1:{port}", "--no-bulk-load")  # names come back
        assert_refused(result, "PTRN|" + "0" * 40, "KATO 3.10.1's rule gives", "node0")
        assert result.returncode == 3
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_text("")
    result = run_ingestd(str(path), "--data", str(tmp_path / "kb"))
    assert result.returncode == 2
    assert_refused(result, "empty.txt", "is empty")


def test_only_short_lines_learn_nothing_and_say_why(tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("a\nbb\n\nshort one\n\nten chars!\n")
    result = run_ingestd(str(path), "--data", str(tmp_path / "kb"), "--run-dir", str(tmp_path / "run"), "--no-progress")
    assert result.returncode == 0
    assert "every record of" in result.stderr and "--text-field" in result.stderr


def test_a_50_mb_single_line_sample_fails_alone(tmp_path: Path) -> None:
    path = tmp_path / "huge.jsonl"
    with path.open("w") as handle:
        handle.write(json.dumps({"text": "a small sample before the big one"}) + "\n")
        handle.write(json.dumps({"text": "word " * 10_000_000}) + "\n")  # 50 MB on one line
        handle.write(json.dumps({"text": "a small sample after the big one"}) + "\n")
    summary = run_cli(str(path), "--data", str(tmp_path / "kb"), expect=7)
    assert summary["samples"] == {"read": 3, "learned": 2, "filtered": 0, "failed": 1, "skipped": 0, "unfinished": 0}
    assert summary["failures"][0]["sample_index"] == 1 and "--max-sample-chars" in summary["failures"][0]["reason"]


def test_parquet_without_the_text_column(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "records.parquet"
    pq.write_table(pa.table({"body": ["a sample long enough to learn"]}), path)
    assert_refused(run_ingestd(str(path), "--data", str(tmp_path / "kb")), "records.parquet", "'text'", "body",
                   "--text-field")  # fmt: skip


def test_unknown_tokenizer(jsonl: Path, tmp_path: Path) -> None:
    result = run_ingestd(str(jsonl), "--tokenizer", "no-such/tokenizer", "--data", str(tmp_path / "kb"))
    assert result.returncode == 2
    assert_refused(result, "no-such/tokenizer", "offline", "gpt2")
    assert not (tmp_path / "kb").exists()
