"""The run catalogue: every run leaves a manifest beside its progress, kept through resumes, kills and signals."""

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

from ingestd import Hierarchy, run
from ingestd.engine.rules import kb_id

from .conftest import CORPUS, EngineServer
from .golden import run_cli, samples_done


def cli(*arguments: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "ingestd", *arguments], capture_output=True, text=True, timeout=300)
    assert result.returncode == expect, result.stderr[-3000:]
    return result


def manifest(run_dir: Path) -> dict[str, Any]:
    return json.loads(cli("runs", "show", str(run_dir), "--json").stdout)


def distinct(data: Path, nodes: list[str]) -> list[int]:
    with sqlite3.connect(data / "kato.sqlite3") as connection:
        return [connection.execute("SELECT count(*) FROM patterns WHERE kb_id = ?", (kb_id(node),)).fetchone()[0]
                for node in nodes]  # fmt: skip


def test_a_run_run_twice_is_one_manifest_with_its_history(tmp_path: Path) -> None:
    data = tmp_path / "kb"
    first = run_cli(str(CORPUS), "--data", str(data), "--max-samples", "200", "--metadata-levels", "2", "--run-dir",
                    str(data / "runs" / "mine"))  # fmt: skip
    second = run_cli(str(CORPUS), "--data", str(data), "--max-samples", "500", "--metadata-levels", "2", "--run-dir",
                     str(data / "runs" / "mine"))  # fmt: skip
    nodes = [f"node{level}" for level in range(4)]
    for summary in (first, second):
        assert summary["ingestd_version"] and summary["started_at"] <= summary["finished_at"]
    assert 0 < first["distinct_patterns_per_level"][0] < first["patterns_per_level"][0]  # node0 repeats some chunks
    assert second["distinct_patterns_per_level"] == distinct(data, nodes)
    found = manifest(data / "runs" / "mine")
    assert found["status"] == "finished" and found["node_ids"] == nodes
    assert found["backend"]["kind"] == "embedded" and found["backend"]["data_dir"] == str(data.resolve())
    assert found["hierarchy"][2]["capture_metadata"] is True and found["tokenizer"] == "gpt2"
    assert found["source"]["source"] == str(CORPUS.resolve())
    assert [entry["status"] for entry in found["history"]] == ["finished", "finished"]
    assert [entry["samples"]["learned"] for entry in found["history"]] == [200, 300]
    assert found["created_at"] == found["history"][0]["started_at"] <= found["started_at"] == found["history"][1]["started_at"]
    assert found["summary"]["distinct_patterns_per_level"] == distinct(data, nodes)
    listed = json.loads(cli("runs", "list", "--data", str(data), "--json").stdout)
    assert [entry["run_dir"] for entry in listed] == [str(data / "runs" / "mine")]
    # by run id too, and as a table for people
    assert json.loads(cli("runs", "show", "mine", "--data", str(data), "--json").stdout)["run_id"] == found["run_id"]
    table = cli("runs", "list", "--data", str(data)).stdout
    assert "finished" in table and "500" in table  # samples done by the run directory, over both times


def test_a_killed_run_reads_as_interrupted_and_its_resume_as_finished(tmp_path: Path) -> None:
    data = tmp_path / "kb"
    run_dir = tmp_path / "run"
    source = tmp_path / "big.txt"
    source.write_text((CORPUS.read_text(encoding="utf-8") + "\n\n") * 4, encoding="utf-8")
    arguments = [sys.executable, "-m", "ingestd", "run", str(source), "--data", str(data), "--run-dir", str(run_dir),
                 "--no-progress", "--log-level", "warning", "--planners", "0"]  # fmt: skip
    process = subprocess.Popen(arguments, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while samples_done(run_dir) < 500 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed = manifest(run_dir)
    assert killed["status"] == "interrupted" and killed["history"][-1]["status"] == "interrupted"
    assert killed["done"] == samples_done(run_dir) >= 500  # from its progress: exact, though it never said goodbye
    listed = json.loads(cli("runs", "list", "--in", str(tmp_path), "--json").stdout)
    mine = [entry for entry in listed if Path(entry["run_dir"]).resolve() == run_dir.resolve()]  # (not the cwd's runs)
    assert [(entry["status"], entry["done"]) for entry in mine] == [("interrupted", killed["done"])]
    run_cli(str(source), "--data", str(data), "--run-dir", str(run_dir), "--max-samples", "3000")
    found = manifest(run_dir)
    assert found["status"] == "finished"
    assert [entry["status"] for entry in found["history"]] == ["interrupted", "finished"]


def test_a_stopped_run_and_one_over_http(tmp_path: Path, fresh_server: EngineServer) -> None:
    run_dir = tmp_path / "run"
    source = tmp_path / "big.txt"
    source.write_text((CORPUS.read_text(encoding="utf-8") + "\n\n") * 4, encoding="utf-8")
    process = subprocess.Popen([sys.executable, "-m", "ingestd", "run", str(source), "--kato", fresh_server.url,
                                "--run-dir", str(run_dir), "--no-progress", "--log-level", "warning"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while samples_done(run_dir) < 50 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 0
    found = manifest(run_dir)
    assert found["status"] == "stopped" and found["summary"]["stopped_early"] is True
    assert found["backend"] == {"kind": "kato", "url": fresh_server.url, "store": found["backend"]["store"]}
    # ingestd's own engine says how many distinct patterns its nodes hold, over HTTP too
    nodes = [f"node{level}" for level in range(4)]
    assert found["summary"]["distinct_patterns_per_level"] == distinct(fresh_server.data_dir, nodes)


def test_the_python_api_writes_a_manifest(tmp_path: Path) -> None:
    summary = run(str(CORPUS), Hierarchy.from_chunk_sizes([4, 4]), data_dir=tmp_path / "kb", max_samples=30)
    runs = list((tmp_path / "kb" / "runs").iterdir())
    assert len(runs) == 1
    found = manifest(runs[0])
    assert found["status"] == "finished" and found["summary"]["samples"]["learned"] == summary.stats.samples_learned == 30
    assert found["node_ids"] == ["node0", "node1"]


def test_runs_without_a_readable_manifest_are_still_listed(tmp_path: Path) -> None:
    data = tmp_path / "kb"
    for name in ("broken", "old", "gone"):
        run_cli(str(CORPUS), "--data", str(data), "--chunk-sizes", "4", "--max-samples", "20", "--run-dir",
                str(data / "runs" / name))  # fmt: skip
    (data / "runs" / "broken" / "manifest.json").write_text("{bad", encoding="utf-8")
    (data / "runs" / "old" / "manifest.json").unlink()  # as a run directory made before the catalogue
    (data / "runs" / "gone" / "manifest.json").unlink()
    (data / "runs" / "gone" / "manifest.json").mkdir()
    listed = {Path(entry["run_dir"]).name: entry for entry in json.loads(cli("runs", "list", "--data", str(data), "--json").stdout)}
    assert listed["broken"]["status"] == listed["gone"]["status"] == "manifest unreadable"
    assert listed["old"]["status"] == "no manifest"
    assert all(entry["done"] == 20 and entry["node_ids"] == ["node0"] for entry in listed.values())
    assert "no manifest" in cli("runs", "show", str(data / "runs" / "old")).stdout
    # a run of that directory writes a good one again, and leaves nothing behind when it cannot
    run_cli(str(CORPUS), "--data", str(data), "--chunk-sizes", "4", "--max-samples", "30", "--run-dir", str(data / "runs" / "old"))
    assert manifest(data / "runs" / "old")["status"] == "finished"
    run_cli(str(CORPUS), "--data", str(data), "--chunk-sizes", "4", "--max-samples", "30", "--run-dir", str(data / "runs" / "gone"))
    assert not list((data / "runs" / "gone").glob(".*partial"))


def test_a_refused_run_is_recorded_as_failed(tmp_path: Path) -> None:
    from ingestd.engine.store import writer_lock

    data = tmp_path / "kb"
    run_cli(str(CORPUS), "--data", str(data), "--max-samples", "20", "--run-dir", str(data / "runs" / "first"))
    with writer_lock(data, exclusive=True):
        run_cli(str(CORPUS), "--data", str(data), "--max-samples", "20", "--run-dir", str(data / "runs" / "locked"), expect=2)
    refused = manifest(data / "runs" / "locked")
    assert refused["status"] == "failed" and "being changed" in refused["summary"]["error"]["message"]
    assert refused["done"] == 0
