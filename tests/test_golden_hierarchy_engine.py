"""Drive every golden hierarchy run through the engine server over HTTP, as the golden README's client did."""

from __future__ import annotations

import uuid

import httpx
import pytest

from ingestd.tokenize import load_tokenizer

from .conftest import EngineServer
from .golden import RUNS, SequentialClient, assert_kb_equal, load_run, read_back, stored_counts


@pytest.fixture(scope="module")
def gpt2():  # type: ignore[no-untyped-def]
    return load_tokenizer("gpt2")


@pytest.mark.parametrize("run_name", RUNS)
def test_golden_run_over_http(fresh_server: EngineServer, gpt2, run_name: str) -> None:  # type: ignore[no-untyped-def]
    run = load_run(run_name)
    prefix = f"gold-{run_name}-{uuid.uuid4().hex[:8]}"
    node_ids = [f"{prefix}-node{level}" for level in range(len(run.chunk_sizes))]
    token_lists = gpt2.tokenize_batch(run.texts)
    with httpx.Client(base_url=fresh_server.url, timeout=30.0) as client:
        driver = SequentialClient(client, node_ids, run.chunk_sizes, run.metadata_levels, run.label)
        per_sample = []
        for index, tokens in enumerate(token_lists):
            per_sample.append({"sample_index": index, "token_count": len(tokens), "names": driver.learn_sample(index, tokens)})
        driver.close()
        assert per_sample == run.expected["per_sample"]
        assert_kb_equal(run.expected["kb"], read_back(client, node_ids, run.expected["kb"]))
    assert stored_counts(fresh_server.data_dir / "kato.sqlite3", node_ids) == run.expected["summary"]["patterns_per_level"]
