"""KATO calls are counted the same whether they go over HTTP or to the embedded engine in-process."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest
from prometheus_client import REGISTRY

from ingestd import Hierarchy, run
from ingestd.backend import EmbeddedKato
from ingestd.engine import EngineSettings
from ingestd.errors import SessionLost

from .conftest import CORPUS, EngineServer

ENDPOINTS = ("create-session", "delete-session", "observe-sequence", "clear-stm")


def _calls() -> dict[tuple[str, str], float]:
    """Every ``ingestd_kato_requests_total`` series of this process, and each endpoint's latency count."""
    counts: dict[tuple[str, str], float] = {}
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name == "ingestd_kato_requests_total":
                counts[(sample.labels["endpoint"], sample.labels["status_class"])] = sample.value
            elif sample.name == "ingestd_kato_request_duration_seconds_count":
                counts[(sample.labels["endpoint"], "timed")] = sample.value
    return counts


def _delta(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]) -> dict[tuple[str, str], float]:
    return {key: value - before.get(key, 0.0) for key, value in after.items() if value != before.get(key, 0.0)}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    lines = CORPUS.read_text(encoding="utf-8").split("\n")
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": "\n".join(lines[i * 7 : i * 7 + 7])}) + "\n" for i in range(60)))
    return path


def _hierarchy(prefix: str) -> Hierarchy:
    return Hierarchy(node_id_template=prefix + "-node{level}").add_layer(6).add_layer(3, capture_metadata=True).add_layer(3)


def test_calls_are_counted_and_timed_in_process_and_over_http(corpus: Path, tmp_path: Path,
                                                               engine_server: EngineServer) -> None:  # fmt: skip
    before = _calls()
    embedded = run(str(corpus), _hierarchy("metrics-inproc"), data_dir=tmp_path / "kb", workers=3, batch_chunks=4)
    middle = _calls()
    over_http = run(str(corpus), _hierarchy("metrics-http"), kato_url=engine_server.url, workers=3, batch_chunks=4,
                    parallel_batches=1, run_dir=tmp_path / "http-run", bulk_load=False)  # fmt: skip
    after = _calls()
    loaded = run(str(corpus), _hierarchy("metrics-load"), kato_url=engine_server.url, run_dir=tmp_path / "load-run")
    last = _calls()

    assert embedded.stats.samples_learned == over_http.stats.samples_learned == loaded.stats.samples_learned == 60
    in_process, http, http_loads = _delta(before, middle), _delta(middle, after), _delta(after, last)
    # Served, the engine is sent the same loads (POST /ingestd/load), counted and timed as calls are.
    assert http_loads[("load", "2xx")] == http_loads[("load", "timed")] >= 1
    assert not {endpoint for endpoint, _ in http_loads} & set(ENDPOINTS)
    assert loaded.stats.requests == sum(count for (_, status), count in http_loads.items() if status == "2xx")
    # In-process, samples are stored in loads of many (ingestd.loader): no sessions, no per-chunk calls.
    assert in_process[("load", "2xx")] == in_process[("load", "timed")] >= 1
    assert not {endpoint for endpoint, _ in in_process} & set(ENDPOINTS)
    assert embedded.stats.requests == sum(count for (_, status), count in in_process.items() if status == "2xx")
    for endpoint in ENDPOINTS:
        assert http[(endpoint, "2xx")] > 0
        assert http[(endpoint, "timed")] == http[(endpoint, "2xx")]
    # A worker's three sessions (one a level: --parallel-batches 1) are opened and closed once each; clear-stm once
    # per sample on the metadata level.
    assert http[("create-session", "2xx")] == http[("delete-session", "2xx")] == 9
    assert http[("clear-stm", "2xx")] == 60
    assert over_http.stats.requests == sum(count for (_, status), count in http.items() if status == "2xx")


def test_an_in_process_lost_session_is_a_404_like_over_http(tmp_path: Path) -> None:
    async def scenario() -> dict[tuple[str, str], float]:
        kato = EmbeddedKato(EngineSettings(data_dir=tmp_path))
        await kato.start()
        try:
            before = _calls()
            session_id = await kato.create_session("errors-node0", {"process_predictions": False})
            await kato.engine.delete_session(session_id)  # the server lost it (expired, or restarted without Redis)
            with pytest.raises(SessionLost):
                await kato.learn(session_id, [["a", "b"]], metadata=None, auto_learn=False)
            return _delta(before, _calls())
        finally:
            await kato.aclose()

    counted = anyio.run(scenario)
    assert counted[("observe-sequence", "4xx")] == 1
    assert counted[("create-session", "2xx")] == 1
