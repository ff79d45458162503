"""`ingestd run` reproduces every golden hierarchy run exactly, over HTTP and in-process."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest

from ingestd.plan import plan_levels
from ingestd.tokenize import load_tokenizer

from .conftest import GOLDEN, EngineServer
from .golden import RUNS, assert_kb_equal, kb_dump, load_run, read_back, run_cli, stored_counts


def _arguments(run_name: str, node_template: str) -> list[str]:
    run = load_run(run_name)
    metadata_levels = ",".join(str(i) for i, flag in enumerate(run.metadata_levels) if flag)
    arguments = [str(GOLDEN / "hierarchy" / run_name / "samples.jsonl"),
                 "--chunk-sizes", ",".join(map(str, run.chunk_sizes)), "--node-ids", node_template,
                 "--source-label", run.label, "--workers", "8"]  # fmt: skip
    if metadata_levels:
        arguments += ["--metadata-levels", metadata_levels]
    return arguments


@pytest.mark.parametrize("run_name", RUNS)
def test_plan_gives_the_golden_names_per_sample(run_name: str) -> None:
    run = load_run(run_name)
    tokens = load_tokenizer().tokenize_batch(run.texts)
    for expected, sample_tokens in zip(run.expected["per_sample"], tokens, strict=True):
        assert len(sample_tokens) == expected["token_count"]
        assert [level.names for level in plan_levels(sample_tokens, run.chunk_sizes)] == expected["names"]


@pytest.mark.parametrize("run_name", RUNS)
def test_ingestd_run_over_http_reproduces_the_golden_run(fresh_server: EngineServer, run_name: str) -> None:
    run = load_run(run_name)
    template = f"g{uuid.uuid4().hex[:6]}-node{{level}}"
    node_ids = [template.format(level=level) for level in range(len(run.chunk_sizes))]
    summary = run_cli(*_arguments(run_name, template), "--kato", fresh_server.url)
    assert summary["samples"] == {"read": len(run.texts), "learned": len(run.texts), "filtered": 0, "failed": 0, "skipped": 0, "unfinished": 0}
    assert summary["tokens"] == run.expected["summary"]["tokens"]
    assert summary["patterns_per_level"] == run.expected["summary"]["learns_per_level"]
    with httpx.Client(base_url=fresh_server.url, timeout=30.0) as client:
        assert_kb_equal(run.expected["kb"], read_back(client, node_ids, run.expected["kb"]))
        sessions = client.get("/sessions/count").json()["active_session_count"]
    assert stored_counts(fresh_server.data_dir / "kato.sqlite3", node_ids) == run.expected["summary"]["patterns_per_level"]
    assert sessions == 0  # every session ingestd opened was closed


@pytest.mark.parametrize("run_name", RUNS)
def test_ingestd_run_in_process_reproduces_the_golden_run(tmp_path: Path, run_name: str) -> None:
    run = load_run(run_name)
    template = "node{level}"
    run_cli(*_arguments(run_name, template), "--data", str(tmp_path / "kb"))
    node_ids = [template.format(level=level) for level in range(len(run.chunk_sizes))]
    dump = kb_dump(tmp_path / "kb" / "kato.sqlite3", node_ids)
    assert {f"node{level}": patterns for level, patterns in enumerate(dump)} == run.expected["kb"]
