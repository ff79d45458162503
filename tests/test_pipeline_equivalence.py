"""The pipeline's knowledge base is the same however it runs, and the same as a plain sequential client's."""

from __future__ import annotations

import fcntl
import json
import os
import random
from pathlib import Path

import httpx
import pytest

from ingestd import Hierarchy, run
from ingestd.tokenize import load_tokenizer

from .conftest import EngineServer
from .golden import SequentialClient, kb_dump, run_cli

WORDS = ["the", "King", "queen's", "é", "naïve", "日本", "🎉", "don't", '"quoted"', "back\\slash", "tab\there",
         "Ġodd", "x", "rose", "thorn", "and", "of", "to", "KATO", "well-met", "—", "\u0870"]  # fmt: skip
CHUNKS = [3, 4, 3]
METADATA_LEVELS = {1}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated jsonl: long and short samples, repeats (frequencies > 1), a url field for metadata."""
    rng = random.Random(7)
    path = tmp_path_factory.mktemp("corpus") / "generated.jsonl"
    texts = []
    for index in range(160):
        if index % 17 == 0:
            texts.append("too short")  # filtered
        elif index % 5 == 0 and texts:
            texts.append(texts[rng.randrange(len(texts))])  # a repeat
        else:
            texts.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 140))))
    with path.open("w", encoding="utf-8") as handle:
        for index, text in enumerate(texts):
            handle.write(json.dumps({"text": text, "url": f"https://example.org/{index % 23}"}, ensure_ascii=False) + "\n")
    return path


def _short_count(corpus: Path) -> int:
    return sum(len(json.loads(line)["text"].strip()) <= 10 for line in corpus.read_text(encoding="utf-8").splitlines())


def _cli_arguments(corpus: Path, *extra: str) -> list[str]:
    return [str(corpus), "--chunk-sizes", ",".join(map(str, CHUNKS)), "--metadata-levels", "1",
            "--metadata-fields", "url", "--source-label", "gen", *extra]  # fmt: skip


def _node_ids(prefix: str) -> list[str]:
    return [f"{prefix}-node{level}" for level in range(len(CHUNKS))]


@pytest.fixture(scope="module")
def reference(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The knowledge base a notebook-style client builds: one call per chunk, one sample at a time. Built once per
    test session: under pytest-xdist the first worker to need it builds it, the others read it (the corpus is the
    same generated one)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return _reference(corpus, tmp_path_factory)
    shared = tmp_path_factory.getbasetemp().parent / "equivalence-reference.json"  # this session's, all workers'
    with shared.with_suffix(".lock").open("a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if shared.exists():
            return json.loads(shared.read_text(encoding="utf-8"))  # type: ignore[no-any-return]
        built = _reference(corpus, tmp_path_factory)
        shared.write_text(json.dumps(built), encoding="utf-8")
        return built


def _reference(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    from .conftest import EngineServer

    # fsync per commit changes nothing the reference is compared on; it only took most of its time
    server = EngineServer(tmp_path_factory.mktemp("reference"), extra_args=("--durability", "normal")).start()
    try:
        records = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines()]
        kept = [record for record in records if len(record["text"].strip()) > 10]
        tokens = load_tokenizer().tokenize_batch([record["text"] for record in kept])
        with httpx.Client(base_url=server.url, timeout=30.0) as client:
            driver = SequentialClient(client, _node_ids("ref"), CHUNKS, [i in METADATA_LEVELS for i in range(3)], "gen")
            for index, (record, sample_tokens) in enumerate(zip(kept, tokens, strict=True)):
                driver.label = "gen"
                _learn_with_url(driver, index, sample_tokens, record["url"])
            driver.close()
        return kb_dump(server.data_dir / "kato.sqlite3", _node_ids("ref"))
    finally:
        server.stop()


def _learn_with_url(driver: SequentialClient, index: int, tokens: list[str], url: str) -> None:
    """The sequential client, with the sample's url in the metadata as ingestd adds it."""
    symbols = tokens
    for level, (session, size) in enumerate(zip(driver.sessions, driver.chunk_sizes, strict=True)):
        names = []
        for start in range(0, len(symbols), size):
            chunk = symbols[start : start + size]
            if len(chunk) < 2:
                continue
            observations = [{"strings": [symbol]} for symbol in chunk]
            if driver.metadata_levels[level]:
                observations[0]["metadata"] = {"source": "gen", "sample_index": index, "url": url}
            driver.client.post(f"/sessions/{session}/clear-stm").raise_for_status()
            answer = driver.client.post(f"/sessions/{session}/observe-sequence",
                                        json={"observations": observations, "learn_at_end": True})  # fmt: skip
            names.append(answer.json()["final_learned_pattern"])
        symbols = names


def test_reference_is_not_trivial(reference: list[dict]) -> None:
    assert all(reference)  # every level learned something
    assert max(p["frequency"] for p in reference[0].values()) > 1
    assert any(len(p["metadata"].get("sample_index", [])) > 1 for p in reference[1].values())


@pytest.mark.parametrize(
    ("label", "extra"),
    [
        ("inproc-8-batched", ["--workers", "8"]),
        ("inproc-1-unbatched", ["--workers", "1", "--no-batching"]),
        ("inproc-3-batch2", ["--workers", "3", "--batch-chunks", "2"]),
    ],
)
def test_in_process_runs_equal_the_sequential_client(corpus: Path, reference: list[dict], tmp_path: Path,
                                                     label: str, extra: list[str]) -> None:  # fmt: skip
    summary = run_cli(*_cli_arguments(corpus, "--node-ids", "ref-node{level}", "--data", str(tmp_path), *extra))
    assert summary["samples"]["read"] == summary["samples"]["learned"] + summary["samples"]["filtered"]
    assert summary["samples"]["filtered"] == _short_count(corpus) > 0
    assert kb_dump(tmp_path / "kato.sqlite3", _node_ids("ref")) == reference


@pytest.mark.parametrize(("label", "extra"), [("http-8-batched", ["--workers", "8"]),
                                              ("http-1-unbatched", ["--workers", "1", "--no-batching"])])  # fmt: skip
def test_http_runs_equal_the_sequential_client(corpus: Path, reference: list[dict], fresh_server: EngineServer,
                                               label: str, extra: list[str]) -> None:  # fmt: skip
    run_cli(*_cli_arguments(corpus, "--node-ids", "ref-node{level}", "--kato", fresh_server.url, *extra))
    assert kb_dump(fresh_server.data_dir / "kato.sqlite3", _node_ids("ref")) == reference


def test_python_api_equals_the_cli(corpus: Path, reference: list[dict], tmp_path: Path) -> None:
    hierarchy = (Hierarchy(node_id_template="ref-node{level}").add_layer(3)
                 .add_layer(4, capture_metadata=True).add_layer(3))  # fmt: skip
    summary = run(str(corpus), hierarchy, data_dir=tmp_path, workers=4, metadata_fields=["url"], label="gen")
    assert summary.stats.samples_learned == 160 - _short_count(corpus)
    assert kb_dump(tmp_path / "kato.sqlite3", _node_ids("ref")) == reference
