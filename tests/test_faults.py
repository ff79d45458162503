"""`ingestd run` over HTTP through injected faults ends with the knowledge base of a clean run.

Each test learns the same generated corpus through a :class:`~tests.faultproxy.FaultProxy` in front
of an engine server of its own, with KATO's calls (``--no-bulk-load``: the faults are a KATO's; bulk loads
meet theirs in ``test_served_load``), one kind of fault active during the run, and checks that

* the run succeeds (exit 0, every sample learned, none failed),
* the fault really fired and the summary's ``recovery`` counters name the matching cause,
* the knowledge base is the clean run's, pattern for pattern (name, frequency, pattern_data, length,
  metadata, emotives), level by level, with nothing extra or missing,
* every session ingestd opened on the server was closed again.

One more test answers each session's first DELETE with 503 (the end of a run meeting a brief outage), and
the last kills the engine server itself (SIGKILL) mid-run and restarts it on the same port and data.
"""

from __future__ import annotations

import json
import random
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self

import httpx
import pytest

from ingestd.engine.rules import kb_id

from .conftest import EngineServer
from .faultproxy import FaultProxy, _json_response, _Message, _Upstream
from .golden import kb_dump, run_cli

WORDS = ["the", "King", "queen's", "é", "naïve", "日本", "🎉", "don't", '"quoted"', "rose", "thorn", "and", "of",
         "to", "KATO", "well-met", "—", "back\\slash"]  # fmt: skip
SAMPLES = 90
CHUNKS = "4,4,4"
LEVELS = 3
METADATA_LEVELS = "1,2"  # level 0 is batched (auto-learn); levels 1 and 2 send one call per chunk + clear-stm


# --------------------------------------------------------------------------------------------------------------
# corpus, clean reference, runs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated jsonl: short and long samples, exact repeats (frequencies > 1), a url on most records."""
    rng = random.Random(11)
    texts: list[str] = []
    for index in range(SAMPLES):
        if index % 7 == 3 and texts:
            texts.append(texts[rng.randrange(len(texts))])  # a repeat
        else:
            texts.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 100))))
    path = tmp_path_factory.mktemp("faults-corpus") / "generated.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for index, text in enumerate(texts):
            record: dict[str, Any] = {"text": text}
            if index % 3 != 1:  # the first record must have it: the source checks the fields on it
                record["url"] = f"https://example.org/{index % 11}"
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def node_ids(run_id: str) -> list[str]:
    return [f"{run_id}-node{level}" for level in range(LEVELS)]


def run_arguments(corpus: Path, kato_url: str, run_id: str, run_dir: Path, *extra: str) -> list[str]:
    return [str(corpus), "--kato", kato_url, "--chunk-sizes", CHUNKS, "--metadata-levels", METADATA_LEVELS,
            "--metadata-fields", "url", "--source-label", "gen", "--node-ids", "{run_id}-node{level}",
            "--run-id", run_id, "--run-dir", str(run_dir), "--workers", "4", "--no-bulk-load", *extra]  # fmt: skip


def session_count(url: str) -> int:
    count: int = httpx.get(url + "/sessions/count", timeout=10.0).json()["active_session_count"]
    return count


def stored_kb_ids(database: Path) -> set[str]:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        return {kb for (kb,) in connection.execute("SELECT DISTINCT kb_id FROM patterns")}


@pytest.fixture(scope="module")
def clean(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The clean reference: the same corpus straight to an engine server, no proxy, run id 'clean'."""
    folder = tmp_path_factory.mktemp("faults-clean")
    server = EngineServer(folder / "kato-data").start()
    try:
        summary = run_cli(*run_arguments(corpus, server.url, "clean", folder / "run"), timeout=120)
        assert session_count(server.url) == 0
        kb = kb_dump(server.data_dir / "kato.sqlite3", node_ids("clean"))
    finally:
        server.stop()
    assert summary["samples"]["learned"] == SAMPLES and summary["samples"]["failed"] == 0
    assert summary["recovery"]["retries"] == {}
    assert all(kb), "every level learned something"
    return {"summary": summary, "kb": kb}


def test_clean_reference_is_not_trivial(clean: dict[str, Any]) -> None:
    kb = clean["kb"]
    assert max(pattern["frequency"] for pattern in kb[0].values()) > 1
    assert max(pattern["frequency"] for pattern in kb[2].values()) > 1  # repeated samples repeat up the hierarchy
    assert all(pattern["metadata"] == {} for pattern in kb[0].values())
    assert all(pattern["metadata"]["source"] == ["gen"] for level in (1, 2) for pattern in kb[level].values())
    assert any(len(pattern["metadata"]["sample_index"]) > 1 for pattern in kb[1].values())
    assert any("url" in pattern["metadata"] for pattern in kb[1].values())
    assert any("url" not in pattern["metadata"] for pattern in kb[1].values())


def assert_same_kb(server: EngineServer, run_id: str, clean_kb: list[dict[str, dict[str, Any]]]) -> None:
    """The run's KB is the clean one, level by level and pattern for pattern; nothing else was stored."""
    database = server.data_dir / "kato.sqlite3"
    faulty = kb_dump(database, node_ids(run_id))
    for level, (want, got) in enumerate(zip(clean_kb, faulty, strict=True)):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        assert not missing and not extra, (
            f"level {level}: {len(missing)} patterns missing, {len(extra)} extra (e.g. {(missing + extra)[:3]})"
        )
        differing = [name for name in want if got[name] != want[name]]
        if differing:
            higher = sum(got[name]["frequency"] > want[name]["frequency"] for name in differing)
            name = differing[0]
            pytest.fail(f"level {level}: {len(differing)} of {len(want)} patterns differ ({higher} with a higher "
                        f"frequency than the clean run), e.g. {name}: clean {want[name]}, faulty {got[name]}")  # fmt: skip
    assert stored_kb_ids(database) == {kb_id(node) for node in node_ids(run_id)}


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[EngineServer]:
    """An engine server of the test's own (idempotency keys and KBs of one test never meet another's)."""
    server = EngineServer(tmp_path / "kato-data").start()
    yield server
    server.stop()


@pytest.fixture
def proxy(upstream: EngineServer) -> Iterator[FaultProxy]:
    with FaultProxy(upstream.port, seed=5) as fault_proxy:
        yield fault_proxy


class Trigger(threading.Thread):
    """Calls ``action()`` from a background thread each time the proxy has seen ``at`` requests, for each ``at``."""

    def __init__(self, proxy: FaultProxy, thresholds: list[int], action: Callable[[], None]) -> None:
        super().__init__(name="fault-trigger", daemon=True)
        self.proxy = proxy
        self.thresholds = thresholds
        self.action = action
        self.fired: list[int] = []  # proxy.requests when each action ran
        self.stopping = threading.Event()

    def run(self) -> None:
        for threshold in self.thresholds:
            while self.proxy.requests < threshold:
                if self.stopping.wait(0.005):
                    return
            self.fired.append(self.proxy.requests)
            self.action()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopping.set()
        self.join(timeout=10)


def faulty_run(corpus: Path, upstream: EngineServer, proxy: FaultProxy, tmp_path: Path, *extra: str,
               events: list[dict[str, Any]] | None = None) -> tuple[dict[str, Any], int]:  # fmt: skip
    """``ingestd run`` through the proxy, run id 'faulty'; checks the run itself succeeded.

    Returns its summary and how many sessions the server had open before it; its log events go to ``events``.
    """
    before = session_count(upstream.url)
    summary = run_cli(*run_arguments(corpus, proxy.url, "faulty", tmp_path / "run", *extra), timeout=120, events=events)
    samples = summary["samples"]
    assert (samples["read"], samples["learned"], samples["failed"]) == (SAMPLES, SAMPLES, 0), summary["failures"][:5]
    assert summary["failures"] == []
    return summary, before


def open_sessions(server: EngineServer) -> list[str]:
    """The sessions stored on the server, for a failure message: node, and whether any call reached it after
    its creation (every write slides its expiry, so an untouched one expires exactly a TTL after creation)."""
    with sqlite3.connect(f"file:{server.data_dir / 'kato.sqlite3'}?mode=ro", uri=True) as connection:
        documents = [json.loads(raw) for (raw,) in connection.execute("SELECT document FROM sessions")]
    untouched = [abs(doc["expires_at"] - doc["created_at"] - doc["ttl_seconds"]) < 1e-3 for doc in documents]
    return sorted(f"{doc['node_id']} ({'never used' if fresh else 'used'})" for doc, fresh in zip(documents, untouched))


def assert_sessions_closed(server: EngineServer, before: int, recovery: dict[str, Any], injected: object) -> None:
    left = session_count(server.url) - before
    assert left == 0, (
        f"{left} session(s) ingestd opened are still open on the server after the run: {open_sessions(server)} "
        f"(faults injected: {injected}, recovery: {recovery})"
    )


# --------------------------------------------------------------------------------------------------------------
# one test per fault kind


def test_dropped_connections(corpus: Path, clean: dict[str, Any], upstream: EngineServer, proxy: FaultProxy,
                             tmp_path: Path) -> None:  # fmt: skip
    """Every 9th request: the proxy closes the connection without forwarding it (ambiguous to the client)."""
    proxy.drop_every(9)
    summary, before = faulty_run(corpus, upstream, proxy, tmp_path)
    recovery = summary["recovery"]
    assert proxy.injected["drop_every"] > 50
    assert recovery["retries"].get("ambiguous", 0) > 50
    assert recovery["possible_duplicates"] == 0  # the engine said it honours idempotency keys
    assert summary["patterns_per_level"] == clean["summary"]["patterns_per_level"]
    assert_same_kb(upstream, "faulty", clean["kb"])
    assert_sessions_closed(upstream, before, summary["recovery"], dict(proxy.injected))


def test_connections_refused_mid_run(corpus: Path, clean: dict[str, Any], upstream: EngineServer, proxy: FaultProxy,
                                     tmp_path: Path) -> None:  # fmt: skip
    """Once 300 requests went through, the proxy closes every connection and refuses new ones for 1.5 s."""
    events: list[dict[str, Any]] = []
    with Trigger(proxy, [300], lambda: proxy.refuse_for(1.5)) as trigger:
        started = time.monotonic()
        summary, before = faulty_run(corpus, upstream, proxy, tmp_path, events=events)
        elapsed = time.monotonic() - started
    recovery = summary["recovery"]
    waits = [event for event in events if event["event"] == "KATO unreachable; waiting for it"]
    assert len(waits) == recovery["server_outages"] and all(event["level"] == "warning" for event in waits)
    assert all(event["cause"] and event["server"] == f"KATO at {proxy.url}" for event in waits)
    down = [event for event in events if event["event"] == "retrying a KATO call" and event["cause"] == "server_down"]
    assert len(down) == recovery["retries"]["server_down"] and all("worker" in event for event in down)
    assert trigger.fired and proxy.injected["refuse_for"] == 1
    assert proxy.requests - trigger.fired[0] > 300, "the refusal came mid-run, not at its end"
    assert recovery["server_outages"] >= 1
    assert recovery["retries"].get("server_down", 0) >= 1
    assert recovery["possible_duplicates"] == 0
    assert elapsed > 1.5  # the run waited for the server
    assert_same_kb(upstream, "faulty", clean["kb"])
    assert_sessions_closed(upstream, before, summary["recovery"], dict(proxy.injected))


def test_sessions_lost_at_random(corpus: Path, clean: dict[str, Any], upstream: EngineServer, proxy: FaultProxy,
                                 tmp_path: Path) -> None:  # fmt: skip
    """5 % of session requests: the proxy deletes the session upstream and answers 404 SESSION_NOT_FOUND."""
    proxy.session_not_found(0.05)
    events: list[dict[str, Any]] = []
    summary, before = faulty_run(corpus, upstream, proxy, tmp_path, events=events)
    recovery = summary["recovery"]
    lost = proxy.injected["session_not_found"]
    assert lost > 10
    assert recovery["retries"].get("session_lost", 0) == lost
    assert recovery["session_recreations"] == lost
    # Logged once each, at warning, with the cause and where it happened: worker, level and its node, sample.
    retries = [event for event in events if event["event"] == "retrying a KATO call"]
    recreations = [event for event in events if event["event"] == "session recreated"]
    assert len(retries) == len(recreations) == lost
    for event in retries + recreations:
        assert event["level"] == "warning" and event["cause"] == "session_lost", event
        assert event["worker"] in range(4) and event["hierarchy_level"] in range(LEVELS), event
        assert event["node_id"] == f"faulty-node{event['hierarchy_level']}" and event["sample_index"] in range(SAMPLES)
    assert recovery["possible_duplicates"] == 0
    assert_same_kb(upstream, "faulty", clean["kb"])
    assert_sessions_closed(upstream, before, summary["recovery"], dict(proxy.injected))


def test_unavailable_bursts(corpus: Path, clean: dict[str, Any], upstream: EngineServer, proxy: FaultProxy,
                            tmp_path: Path) -> None:  # fmt: skip
    """Three bursts mid-run: the next 6 requests each get 503 (then one burst of 502). A 503 is back-pressure (the
    server at its concurrency limit): resent with fewer requests at once, not an outage; a 502 is an outage."""
    statuses = iter([503, 503, 502])
    with Trigger(proxy, [150, 350, 550], lambda: proxy.unavailable_burst(6, next(statuses))) as trigger:
        summary, before = faulty_run(corpus, upstream, proxy, tmp_path)
    recovery = summary["recovery"]
    assert len(trigger.fired) == 3
    assert proxy.injected["unavailable_burst"] == 18
    assert recovery["retries"].get("overloaded", 0) >= 2 and recovery["retries"].get("server_down", 0) >= 1
    assert recovery["server_outages"] >= 1  # the 502s
    assert recovery["possible_duplicates"] == 0
    assert_same_kb(upstream, "faulty", clean["kb"])
    assert_sessions_closed(upstream, before, summary["recovery"], dict(proxy.injected))


def test_responses_delayed_past_the_client_timeout(corpus: Path, clean: dict[str, Any], upstream: EngineServer,
                                                   proxy: FaultProxy, tmp_path: Path) -> None:  # fmt: skip
    """Every 80th observe-sequence is applied, but its answer is held 2 s: past --request-timeout 1.

    The client resends with the same Idempotency-Key; the engine answers from its record, applying nothing.
    """
    proxy.delay_every(80, 2.0, only_paths="observe-sequence")
    summary, before = faulty_run(corpus, upstream, proxy, tmp_path, "--request-timeout", "1")
    recovery = summary["recovery"]
    assert proxy.injected["delay_every"] >= 5
    assert recovery["retries"].get("ambiguous", 0) >= proxy.injected["delay_every"]
    assert recovery["possible_duplicates"] == 0
    assert recovery["possible_duplicate_samples"] == []
    assert_same_kb(upstream, "faulty", clean["kb"])
    assert_sessions_closed(upstream, before, summary["recovery"], dict(proxy.injected))


def test_responses_dropped_after_the_server_applied_them(corpus: Path, clean: dict[str, Any], upstream: EngineServer,
                                                         proxy: FaultProxy, tmp_path: Path) -> None:  # fmt: skip
    """Every 5th request is forwarded and applied, then the proxy closes the connection instead of answering.

    Keyed resends (observe-sequence) are applied once; the other calls must be safe to resend or not resent.
    """
    proxy.drop_response_every(5)
    summary, before = faulty_run(corpus, upstream, proxy, tmp_path)
    recovery = summary["recovery"]
    assert proxy.injected["drop_response_every"] > 100
    assert recovery["retries"].get("ambiguous", 0) > 100
    assert recovery["possible_duplicates"] == 0
    assert_same_kb(upstream, "faulty", clean["kb"])
    assert_sessions_closed(upstream, before, summary["recovery"], dict(proxy.injected))


class UnavailableOnFirstDelete(FaultProxy):
    """Answers the first ``DELETE /sessions/{id}`` of each session 503, without forwarding it: a server that is
    briefly unavailable just as the run closes its sessions. (The proxy's own faults choose by path, and a
    session's DELETE path is a prefix of all its other paths.)"""

    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port)
        self.refused: set[str] = set()

    async def _handle(self, request: _Message, client: Any, upstream: _Upstream) -> bool:
        method, target = request.start[0], request.start[1]
        if method != "DELETE" or target in self.refused:
            return await super()._handle(request, client, upstream)
        self.refused.add(target)
        client.write(_json_response(503, {"detail": "Service Unavailable"}))
        await client.drain()
        return request.keep_alive


def test_unavailable_while_sessions_are_closed(corpus: Path, clean: dict[str, Any], upstream: EngineServer,
                                               tmp_path: Path) -> None:  # fmt: skip
    """A 503 is retried whatever call it answers, DELETE /sessions/{id} included: no session is left open."""
    with UnavailableOnFirstDelete(upstream.port) as proxy:
        summary, before = faulty_run(corpus, upstream, proxy, tmp_path)  # type: ignore[arg-type]
        assert len(proxy.refused) == 12  # 4 workers x 3 levels
    assert_same_kb(upstream, "faulty", clean["kb"])
    assert_sessions_closed(upstream, before, summary["recovery"], f"503 on {len(proxy.refused)} DELETEs")


# --------------------------------------------------------------------------------------------------------------
# the server itself dies


def _done_samples(progress: Path) -> int:
    try:
        with sqlite3.connect(f"file:{progress}?mode=ro", uri=True, timeout=0.5) as connection:
            done: int = connection.execute("SELECT count(*) FROM done").fetchone()[0]
            return done
    except sqlite3.Error:
        return 0  # not created yet


def test_engine_server_killed_and_restarted_mid_run(corpus: Path, clean: dict[str, Any], upstream: EngineServer,
                                                    tmp_path: Path) -> None:  # fmt: skip
    """kill -9 of the engine server after some samples were learned; it is back on the same port and data 1 s later."""
    before = session_count(upstream.url)
    run_dir = tmp_path / "run"
    summary_path = tmp_path / "summary.json"
    command = [sys.executable, "-m", "ingestd", "run",
               *run_arguments(corpus, upstream.url, "faulty", run_dir, "--patience", "60"),
               "--summary-json", str(summary_path)]  # fmt: skip
    with (tmp_path / "stderr.log").open("wb") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + 60
            while (done := _done_samples(run_dir / "progress.sqlite3")) < 15:
                assert process.poll() is None, "the run ended before the server could be killed"
                assert time.monotonic() < deadline, "the run learned nothing"
                time.sleep(0.005)
            upstream.kill()
            assert process.poll() is None
            time.sleep(1.0)
            upstream.start()
            returncode = process.wait(timeout=90)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    log = (tmp_path / "stderr.log").read_text(encoding="utf-8", errors="replace")
    assert returncode == 0, log[-3000:]
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    samples = summary["samples"]
    assert (samples["read"], samples["learned"], samples["failed"]) == (SAMPLES, SAMPLES, 0)
    assert done < SAMPLES  # killed mid-run
    recovery = summary["recovery"]
    assert recovery["server_outages"] >= 1
    assert recovery["retries"].get("server_down", 0) >= 1
    assert recovery["possible_duplicates"] == 0
    assert_same_kb(upstream, "faulty", clean["kb"])
    assert_sessions_closed(upstream, before, recovery, "kill -9 and restart")
