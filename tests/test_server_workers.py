"""`ingestd kato serve --workers N`: several server processes over one store, as a multi-worker KATO, and exact under
any concurrency: a session may be served by any of them, a connection stays with the one that accepted it."""

from __future__ import annotations

import concurrent.futures
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import CORPUS, EngineServer
from .faultproxy import FaultProxy
from .golden import kb_dump
from .test_exactly_once import LEVELS, NODES, clean, corpus, ok, start  # noqa: F401 - the fixtures are used by name
from .tools import cpu_seconds


def _children_cpu(pid: int) -> list[float]:
    """CPU seconds of each worker process of the server ``pid`` (its spawned children, not multiprocessing's
    resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"spawn_main" in command:
            found.append((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    return found


def _fresh_connection(url: str) -> httpx.Client:
    """A client whose every request opens a new connection: requests land on whichever process accepts them."""
    return httpx.Client(base_url=url, headers={"Connection": "close"}, timeout=60)


def test_a_session_is_served_by_any_worker_process_and_stays_exact(tmp_path: Path) -> None:
    server = EngineServer(tmp_path / "kb", extra_args=("--workers", "2")).start()
    try:
        assert server.process is not None and len(_children_cpu(server.process.pid)) == 2
        names = []
        with _fresh_connection(server.url) as client:
            for number in range(24):
                session = client.post("/sessions", json={"node_id": "w-node0", "config": {"process_predictions": False}}).json()["session_id"]
                for symbol in ("a", "b", f"c{number % 3}"):
                    assert client.post(f"/sessions/{session}/observe", json={"strings": [symbol]}).status_code == 200
                assert client.get(f"/sessions/{session}/stm").json()["stm"] == [["a"], ["b"], [f"c{number % 3}"]]
                names.append(client.post(f"/sessions/{session}/learn").json()["pattern_name"])
                assert client.get(f"/sessions/{session}/stm").json()["stm"] == []
            assert client.get("/sessions/count").json()["active_session_count"] == 24  # every process's sessions
            for name in set(names):
                pattern = client.get(f"/pattern/{name.replace('|', '%7C')}", params={"node_id": "w-node0"}).json()
                assert pattern["pattern"]["pattern"]["frequency"] == 8
            # one session observed from 40 connections at once: the processes race, none loses an observation
            session = client.post("/sessions", json={"node_id": "w-node1", "config": {"process_predictions": False}}).json()["session_id"]

            def observe(number: int) -> int:
                with _fresh_connection(server.url) as own:
                    return own.post(f"/sessions/{session}/observe", json={"strings": [f"s{number:02d}"]}).status_code

            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                assert set(pool.map(observe, range(40))) == {200}
            stm = client.get(f"/sessions/{session}/stm").json()["stm"]
            assert sorted(event[0] for event in stm) == [f"s{number:02d}" for number in range(40)]
            # deleted through one process, gone for the others
            assert client.delete(f"/sessions/{session}").status_code == 200
            for _ in range(6):
                assert client.get(f"/sessions/{session}/stm").status_code == 404
        assert all(seconds > 0 for seconds in _children_cpu(server.process.pid))  # both processes served
    finally:
        server.stop()


def test_64_workers_against_2_server_processes_limited_to_10_give_the_exact_kb(corpus: Path, clean: Any,
                                                                              tmp_path: Path) -> None:  # fmt: skip
    """The issue's setting: a multi-worker server answering 503 past 10 requests per process; no server-down
    retry, no outage, the knowledge base of a run without faults; a second run learns nothing."""
    clean_kb, _ = clean
    server = EngineServer(tmp_path / "kb", extra_args=("--workers", "2", "--limit-concurrency", "10")).start()
    try:
        base = [str(corpus), *LEVELS, "--kato", server.url, "--run-dir", str(tmp_path / "run"), "--workers", "64",
                "--no-bulk-load"]  # KATO's calls, as to a KATO
        summary = ok(*base)
        recovery = summary["recovery"]
        assert recovery["server_outages"] == 0 and recovery["retries"].get("server_down", 0) == 0, recovery
        assert recovery["possible_duplicates"] == 0 and summary["samples"]["failed"] == 0
        again = ok(*base)
        assert again["samples"]["learned"] == 0 and again["samples"]["skipped"] == summary["samples"]["learned"]
    finally:
        server.stop()
    assert kb_dump(tmp_path / "kb" / "kato.sqlite3", NODES) == clean_kb
    assert json.dumps(clean_kb, default=str)  # (a real knowledge base: the fixture learned the corpus)


def test_resent_calls_and_heartbeats_racing_across_processes_apply_once(tmp_path: Path) -> None:
    """What a client's resends do when they land on another process while the first is still in flight: an
    Idempotency-Key is applied once (a learn, a session's creation), an /extend never undoes an observation or
    brings a deleted session back."""
    server = EngineServer(tmp_path / "kb", extra_args=("--workers", "3")).start()
    try:
        def post(path: str, body: Any, key: str | None = None) -> httpx.Response:
            with _fresh_connection(server.url) as own:
                return own.post(path, json=body, headers={"Idempotency-Key": key} if key else {})

        with _fresh_connection(server.url) as client, concurrent.futures.ThreadPoolExecutor(12) as pool:
            # one session's creation resent four times at once: one session
            answers = list(pool.map(lambda _: post("/sessions", {"node_id": "r-node0", "config": {"process_predictions": False}},
                                                   "create-1"), range(4)))  # fmt: skip
            assert {answer.status_code for answer in answers} == {200}
            assert len({answer.json()["session_id"] for answer in answers}) == 1
            assert client.get("/sessions/count").json()["active_session_count"] == 1
            session = answers[0].json()["session_id"]
            # 30 learns, each resent three times at once under its key: each pattern learned once
            calls = [(number, f"learn-{number}") for number in range(30) for _ in range(3)]
            sequence = lambda number: {"observations": [{"strings": [f"x{number}"]}, {"strings": ["y"]}], "learn_at_end": True}  # noqa: E731
            answers = list(pool.map(lambda call: post(f"/sessions/{session}/observe-sequence", sequence(call[0]), call[1]), calls))
            assert {answer.status_code for answer in answers} == {200}
            names = {answer.json()["final_learned_pattern"] for answer in answers}
            assert len(names) == 30
            for name in names:
                pattern = client.get(f"/pattern/{name.replace('|', '%7C')}", params={"node_id": "r-node0"}).json()
                assert pattern["pattern"]["pattern"]["frequency"] == 1, name
            # observations and heartbeats at once: every observation stays
            other = post("/sessions", {"node_id": "r-node1", "config": {"process_predictions": False}}).json()["session_id"]
            mixed = [("observe", number) for number in range(30)] + [("extend", number) for number in range(30)]
            answers = list(pool.map(lambda call: post(f"/sessions/{other}/observe", {"strings": [f"o{call[1]:02d}"]})
                                    if call[0] == "observe" else post(f"/sessions/{other}/extend?ttl_seconds=600", {}),
                                    mixed))  # fmt: skip
            assert {answer.status_code for answer in answers} == {200}
            assert sorted(event[0] for event in client.get(f"/sessions/{other}/stm").json()["stm"]) == [f"o{n:02d}" for n in range(30)]
            # a deletion and heartbeats at once: once the deletion is answered, the session is gone for good
            answers = list(pool.map(lambda number: post(f"/sessions/{other}/extend?ttl_seconds=600", {}) if number
                                    else httpx.delete(f"{server.url}/sessions/{other}", headers={"Connection": "close"}),
                                    range(12)))  # fmt: skip
            assert answers[0].status_code == 200
            for _ in range(6):
                assert client.get(f"/sessions/{other}/stm").status_code == 404
    finally:
        server.stop()


def test_a_run_spreads_its_connections_over_the_server_processes(corpus: Path, tmp_path: Path) -> None:
    """Connections stay with the process that accepted them; ingestd re-makes them now and then, so each of the
    server's processes does a fair share of a run's work (its CPU time, read from the server side)."""
    server = EngineServer(tmp_path / "kb", extra_args=("--workers", "2")).start()
    try:
        assert server.process is not None
        before = _children_cpu(server.process.pid)
        ok(str(corpus), *LEVELS, "--kato", server.url, "--run-dir", str(tmp_path / "run"), "--workers", "4", "--no-bulk-load")
        used = [after - start for after, start in zip(_children_cpu(server.process.pid), before, strict=True)]
    finally:
        server.stop()
    assert min(used) > 0.3 * sum(used), used  # each of the two did at least 30% of the work


def test_a_run_uses_several_servers_of_one_deployment_together(corpus: Path, clean: Any, tmp_path: Path) -> None:
    """``--kato-url A,B`` (replicas over one store, behind no load balancer): the run's sessions are spread over
    both, each session's calls go to the server that made it, and the knowledge base is exact; servers of
    different stores are refused."""
    clean_kb, _ = clean
    servers = [EngineServer(tmp_path / "kb").start() for _ in range(2)]
    other = EngineServer(tmp_path / "elsewhere").start()
    try:
        assert all(server.process is not None for server in servers)
        before = [cpu_seconds(server.process.pid) for server in servers]  # type: ignore[union-attr]
        urls = ",".join(server.url for server in servers)
        summary = ok(str(corpus), *LEVELS, "--kato", urls, "--run-dir", str(tmp_path / "run"), "--workers", "6")
        used = [cpu_seconds(server.process.pid) - start for server, start in zip(servers, before, strict=True)]  # type: ignore[union-attr]
        assert min(used) > 0.25 * sum(used), used  # both served the run
        assert summary["recovery"]["possible_duplicates"] == 0 and summary["samples"]["failed"] == 0
        refused = ok(str(corpus), *LEVELS, "--kato", f"{servers[0].url},{other.url}", "--run-dir", str(tmp_path / "run2"),
                     expect=6)  # fmt: skip
        assert "not one deployment" in refused["error"]["message"]
    finally:
        for server in (*servers, other):
            server.stop()
    assert kb_dump(tmp_path / "kb" / "kato.sqlite3", NODES) == clean_kb



@pytest.fixture(scope="module")
def books(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four long documents (about 3k tokens each): hundreds of chunks, dozens of batches each at level 0."""
    paragraphs = CORPUS.read_text(encoding="utf-8").split("\n\n")
    path = tmp_path_factory.mktemp("books") / "books.jsonl"
    path.write_text("".join(json.dumps({"text": "\n\n".join(paragraphs[70 * book : 70 * (book + 1)])}) + "\n"
                            for book in range(4)), encoding="utf-8")  # fmt: skip
    return path


def _reference(source: Path, levels: list[str], tmp_path: Path, *options: str) -> list[dict[str, Any]]:
    ok(str(source), *levels, "--data", str(tmp_path / "reference"), *options)
    return kb_dump(tmp_path / "reference" / "kato.sqlite3", NODES[: len(levels[1].split(","))])


def test_a_long_document_keeps_several_sessions_of_one_level_busy(books: Path, tmp_path: Path) -> None:
    """One document, one level: its batches go out on several sessions at once (read at a proxy in front of a
    2-process server), to ingestd's engine and to a plain KATO alike; --parallel-batches 1 sends them one after
    another. The knowledge base is the one the in-process loader learns."""
    one = tmp_path / "one.jsonl"
    one.write_text(books.read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")
    levels = ["--chunk-sizes", "4"]
    reference = _reference(one, levels, tmp_path)
    server = EngineServer(tmp_path / "kb", extra_args=("--workers", "2")).start()
    try:
        peaks = {}
        for parallel, plain in (("4", False), ("4", True), ("1", False)):
            with FaultProxy(server.port, plain_kato=plain) as proxy:
                summary = ok(str(one), *levels, "--kato", proxy.url, "--run-dir", str(tmp_path / f"run{parallel}{plain}"),
                             "--workers", "1", "--batch-chunks", "16", "--parallel-batches", parallel, "--fresh",
                             "--no-bulk-load")  # fmt: skip
                peaks[parallel, plain] = proxy.busy_sessions_peak
            assert summary["samples"]["learned"] == 1 and summary["recovery"]["possible_duplicates"] == 0
            assert kb_dump(tmp_path / "kb" / "kato.sqlite3", NODES[:1]) == reference
    finally:
        server.stop()
    assert peaks["4", False] >= 2 and peaks["4", True] >= 2, peaks
    assert peaks["1", False] == 1, peaks


def test_a_refused_call_of_a_long_document_on_a_plain_kato_is_a_possible_duplicate(books: Path, tmp_path: Path) -> None:
    """Without the run ledger, calls stored beyond a refused one would be stored again by the sample's retry (which
    starts where the stored chunks stop being contiguous): the sample is counted as a possible duplicate."""
    one = tmp_path / "one.jsonl"
    one.write_text(books.read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")
    server = EngineServer(tmp_path / "kb").start()
    try:
        with FaultProxy(server.port, plain_kato=True) as proxy:
            proxy.unavailable_burst(1, status=422, only_paths="observe-sequence")  # one call refused, the others not
            failed = ok(str(one), "--chunk-sizes", "4", "--kato", proxy.url, "--run-dir", str(tmp_path / "run"),
                        "--workers", "1", "--batch-chunks", "16", expect=7)  # fmt: skip
    finally:
        server.stop()
    assert failed["samples"]["failed"] == 1
    assert failed["recovery"]["possible_duplicates"] == 1, failed["recovery"]


def test_long_documents_killed_mid_way_resume_exactly_with_other_batching(books: Path, tmp_path: Path) -> None:
    """Killed while long documents' batches are in flight on several sessions (stored out of order), then resumed
    one batch after another in other sizes, and in-process: every chunk is stored once."""
    reference = _reference(books, LEVELS, tmp_path)
    server = EngineServer(tmp_path / "kb", extra_args=("--workers", "2")).start()
    base = [str(books), *LEVELS, "--run-dir", str(tmp_path / "run")]
    try:
        process = start(*base, "--kato", server.url, "--workers", "2", "--batch-chunks", "8", "--parallel-batches", "6",
                        "--no-bulk-load")  # fmt: skip
        store = tmp_path / "kb" / "kato.sqlite3"
        deadline = time.monotonic() + 120
        while not _chunks_ahead(store):  # some batches stored beyond a sample's first missing one
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.01)
        process.kill()
        process.wait()
        first = ok(*base, "--kato", server.url, "--batch-chunks", "5", "--parallel-batches", "1", "--max-samples", "2",
                   "--no-bulk-load")  # fmt: skip
        assert first["recovery"]["possible_duplicates"] == 0
    finally:
        server.stop()
    rest = ok(*base, "--data", str(tmp_path / "kb"), "--batch-chunks", "7")  # the store itself, in-process
    assert rest["samples"]["failed"] == 0
    assert kb_dump(tmp_path / "kb" / "kato.sqlite3", NODES) == reference


def _chunks_ahead(store: Path) -> bool:
    try:
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=30) as connection:
            return connection.execute("SELECT count(*) FROM ledger_ahead").fetchone()[0] > 0
    except sqlite3.OperationalError:  # not created yet
        return False


def test_a_server_standing_in_for_a_kato_spends_its_cpu_per_request_and_symbol(tmp_path: Path) -> None:
    """--cpu-per-request-ms and --cpu-per-symbol-ms (the benchmarks' stand-in for a real KATO's speed): each
    request costs the server that much CPU before it is served, and is served as without them."""
    server = EngineServer(tmp_path / "kb", extra_args=("--workers", "2", "--cpu-per-request-ms", "30",
                                                       "--cpu-per-symbol-ms", "10")).start()  # fmt: skip
    try:
        assert server.process is not None
        before = sum(_children_cpu(server.process.pid))
        with _fresh_connection(server.url) as client:
            assert "load" not in client.get("/ingestd").json()["extensions"]  # a KATO has no bulk loads: calls come
            session = client.post("/sessions", json={"node_id": "cost-node0", "config": {"process_predictions": False}})
            body = {"observations": [{"strings": [symbol]} for symbol in "abcdefghij"], "learn_at_end": True}
            answers = [client.post(f"/sessions/{session.json()['session_id']}/observe-sequence", json=body) for _ in range(5)]
        used = sum(_children_cpu(server.process.pid)) - before
    finally:
        server.stop()
    assert {answer.status_code for answer in answers} == {200}
    assert len({answer.json()["final_learned_pattern"] for answer in answers}) == 1
    assert used >= 6 * 0.030 + 5 * 10 * 0.010 - 0.05, used  # 6 requests, 50 symbols (and the clock's ticks)
