"""The engine server as a real process: sessions, TTL, config, clear-all, durability, concurrency, bad input."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
import uuid

import httpx
import pytest

from ingestd.engine.rules import chunk_name

from .conftest import EngineServer, closed_by_the_server


def node(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def create(client: httpx.Client, node_id: str, **extra: object) -> str:
    answer = client.post("/sessions", json={"node_id": node_id, "config": {"process_predictions": False}, **extra})
    assert answer.status_code == 200, answer.text
    return answer.json()["session_id"]


def learn_chunk(client: httpx.Client, session: str, chunk: list[str]) -> str:
    answer = client.post(
        f"/sessions/{session}/observe-sequence",
        json={"observations": [{"strings": [s]} for s in chunk], "learn_at_end": True},
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["final_learned_pattern"]


def frequency(client: httpx.Client, node_id: str, name: str) -> int:
    body = client.get(f"/pattern/{name.replace('|', '%7C')}", params={"node_id": node_id}).json()["pattern"]
    return body["pattern"]["frequency"] if body["status"] == "okay" else 0


@pytest.fixture
def client(engine_server: EngineServer):  # type: ignore[no-untyped-def]
    with httpx.Client(base_url=engine_server.url, timeout=30.0) as http:
        yield http


def test_clear_all_deletes_the_whole_node_kb_and_only_it(client: httpx.Client) -> None:
    node_a, node_b = node("clear-all-a"), node("clear-all-b")
    first, second, other = create(client, node_a), create(client, node_a), create(client, node_b)
    name = learn_chunk(client, first, ["x", "y"])
    learn_chunk(client, second, ["x", "y"])
    learn_chunk(client, other, ["x", "y"])
    client.post(f"/sessions/{second}/observe", json={"strings": ["left"], "metadata": {"m": 1}})
    assert frequency(client, node_a, name) == 2
    answer = client.post(f"/sessions/{second}/clear-all")
    assert answer.json() == {"status": "cleared", "session_id": second, "scope": "all"}
    assert frequency(client, node_a, name) == 0
    assert frequency(client, node_b, name) == 1
    assert client.get(f"/sessions/{second}/stm").json()["stm"] == []
    # The other session of the cleared node lives on and learns into the now empty KB.
    learn_chunk(client, first, ["x", "y"])
    assert frequency(client, node_a, name) == 1


def test_sessions_expire_after_their_ttl(client: httpx.Client) -> None:
    session = create(client, node("ttl"), ttl_seconds=1)
    assert client.post(f"/sessions/{session}/observe", json={"strings": ["a"]}).status_code == 200
    time.sleep(1.3)
    answer = client.post(f"/sessions/{session}/observe", json={"strings": ["b"]})
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "SESSION_NOT_FOUND"
    assert client.get(f"/sessions/{session}").json() == {"detail": f"Session {session} not found or expired"}
    assert client.get(f"/sessions/{session}/exists").json()["exists"] is False


def test_writes_slide_the_expiry_and_extend_sets_it_once(client: httpx.Client) -> None:
    session = create(client, node("slide"), ttl_seconds=2)
    for _ in range(3):
        time.sleep(0.8)
        assert client.post(f"/sessions/{session}/observe", json={"strings": ["a"]}).status_code == 200
    assert client.get(f"/sessions/{session}").json()["ttl_seconds"] in (1, 2)
    extended = client.post(f"/sessions/{session}/extend", params={"ttl_seconds": 100})
    assert extended.json() == {"status": "extended", "session_id": session, "ttl_seconds": 100}
    assert client.get(f"/sessions/{session}").json()["ttl_seconds"] in (99, 100)
    assert client.post(f"/sessions/{session}/clear-stm").status_code == 200  # a write: back to the 2 s TTL
    assert client.get(f"/sessions/{session}").json()["ttl_seconds"] in (1, 2)
    bad = client.post(f"/sessions/{session}/extend", params={"ttl_seconds": "soon"})
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"] == ["query", "ttl_seconds"]


def test_config_updates_take_effect_and_invalid_ones_change_nothing(client: httpx.Client) -> None:
    session = create(client, node("config"))
    ok = client.post(f"/sessions/{session}/config", json={"config": {"max_pattern_length": 2, "stm_mode": "odd"}})
    assert ok.json() == {"status": "okay", "message": "Configuration updated", "session_id": session}
    config = client.get(f"/sessions/{session}/config").json()["config"]
    assert (config["max_pattern_length"], config["stm_mode"]) == (2, "CLEAR")
    client.post(f"/sessions/{session}/observe", json={"strings": ["a"]})
    observed = client.post(f"/sessions/{session}/observe", json={"strings": ["b"]}).json()
    assert observed["auto_learned_pattern"] == chunk_name(["a", "b"]) and observed["stm_length"] == 0
    bad = client.post(f"/sessions/{session}/config", json={"persistence": 0, "recall_threshold": 2})
    assert bad.status_code == 400
    assert set(bad.json()["detail"]["validation_errors"]) == {"persistence", "recall_threshold"}
    assert client.get(f"/sessions/{session}/config").json()["config"]["persistence"] == 5
    # flat body form, and use_token_matching carries sort_symbols along
    client.post(f"/sessions/{session}/config", json={"use_token_matching": False})
    config = client.get(f"/sessions/{session}/config").json()["config"]
    assert (config["use_token_matching"], config["sort_symbols"]) == (False, False)


def test_invalid_config_at_creation_is_dropped_whole(client: httpx.Client) -> None:
    answer = client.post("/sessions", json={"node_id": node("drop"), "config": {"max_pattern_length": 4, "persistence": 0}})
    assert answer.status_code == 200
    assert answer.json()["session_config"]["max_pattern_length"] == 0


def test_rolling_auto_learn_with_length_one_keeps_stm(client: httpx.Client) -> None:
    session = create(client, node("rolling1"))
    client.post(f"/sessions/{session}/observe", json={"strings": ["a"]})
    client.post(f"/sessions/{session}/observe", json={"strings": ["b"]})
    client.post(f"/sessions/{session}/config", json={"max_pattern_length": 1, "stm_mode": "ROLLING"})
    answer = client.post(f"/sessions/{session}/observe", json={"strings": ["c"]}).json()
    assert answer["auto_learned_pattern"] == chunk_name(["a", "b", "c"])
    assert answer["stm_length"] == 3  # KATO slices with -0 and keeps the whole STM


def test_stm_is_trimmed_to_1000_events_but_reported_before_trimming(client: httpx.Client) -> None:
    session = create(client, node("trim"))
    answer = client.post(f"/sessions/{session}/observe-sequence",
                         json={"observations": [{"strings": [str(i)]} for i in range(1005)]}).json()  # fmt: skip
    assert answer["final_stm_length"] == 1005
    stm = client.get(f"/sessions/{session}/stm").json()
    assert stm["length"] == 1000 and stm["stm"][0] == ["5"]


@pytest.mark.parametrize(
    ("method", "path", "content", "status", "detail_type"),
    [
        ("POST", "/sessions", b'{"node_id": ', 422, "json_invalid"),
        ("POST", "/sessions", b"[1, 2]", 422, "model_attributes_type"),  # FastAPI validates with from_attributes
        ("POST", "/sessions", b'{"node_id": "n", "ttl_seconds": "long"}', 422, "int_parsing"),
        ("POST", "/sessions", b'{"node_id": "n", "config": [1]}', 422, "dict_type"),
        ("POST", "/sessions/{sid}/observe", b'{"strings": [1]}', 422, "string_type"),
        ("POST", "/sessions/{sid}/observe", b'{"strings": ["a"], "metadata": "x"}', 422, "dict_type"),
        ("POST", "/sessions/{sid}/observe", b"\xff\xfe", 422, "json_invalid"),
        ("POST", "/sessions/{sid}/observe-sequence", b'{"observations": [1]}', 422, "model_attributes_type"),
        ("POST", "/sessions/{sid}/config", b"[]", 422, "dict_type"),
        ("POST", "/sessions/{sid}/learn", b"", 400, None),
        ("POST", "/sessions/session-00000000000000000000000000000000-0/learn", b"", 404, None),
        ("GET", "/sessions/{sid}/nowhere", b"", 404, None),
        ("PUT", "/sessions", b"", 405, None),
    ],
)
def test_bad_requests_get_katos_status_and_shape(
    client: httpx.Client, method: str, path: str, content: bytes, status: int, detail_type: str | None
) -> None:
    session = create(client, node("bad"))
    answer = client.request(method, path.format(sid=session), content=content,
                            headers={"content-type": "application/json"})  # fmt: skip
    assert answer.status_code == status, answer.text
    body = answer.json()
    if detail_type is not None:
        assert body["detail"][0]["type"] == detail_type
        assert body["detail"][0]["loc"][0] == "body"
    else:
        assert "detail" in body or body["error"]["code"] == "SESSION_NOT_FOUND"
    assert client.get("/health").status_code == 200


def test_oversized_bodies_are_refused_and_the_server_stays_up(tmp_path) -> None:  # type: ignore[no-untyped-def]
    server = EngineServer(tmp_path / "data").start()
    try:
        with httpx.Client(base_url=server.url, timeout=60.0) as client:
            session = create(client, "big")
            huge = b'{"strings": ["' + b"a" * (65 * 1024 * 1024) + b'"]}'
            answer = client.post(f"/sessions/{session}/observe", content=huge, headers={"content-type": "application/json"})
            assert answer.status_code == 413
            assert "limit" in answer.json()["detail"]

            def chunks():  # no content-length: the limit applies while reading
                for _ in range(70):
                    yield b"a" * (1024 * 1024)

            streamed = client.post(f"/sessions/{session}/observe", content=chunks())
            assert streamed.status_code == 413
            assert client.get("/health").status_code == 200
            assert client.get(f"/sessions/{session}/stm").json()["stm"] == []
    finally:
        server.stop()


def test_prediction_endpoints_answer_501_saying_why(client: httpx.Client) -> None:
    session = create(client, node("predict"))
    answer = client.get(f"/sessions/{session}/predictions")
    assert answer.status_code == 501
    assert "not implemented by the embedded ingestd engine" in answer.json()["detail"]
    assert client.get("/sessions/session-00000000000000000000000000000000-0/predictions").status_code == 404


def test_trace_and_session_headers(client: httpx.Client) -> None:
    session = create(client, node("headers"))
    answer = client.get(f"/sessions/{session}/stm", headers={"X-Trace-ID": "trace-1"})
    assert answer.headers["x-trace-id"] == "trace-1"
    assert answer.headers["x-session-id"] == session
    assert client.get("/health").headers["x-trace-id"].startswith("kato-")
    assert "x-session-id" not in client.get(f"/sessions/{session}").headers


@pytest.mark.parametrize("action", ["observe-sequence", "observe", "clear-stm"])
def test_hot_calls_answer_as_the_full_app_does(client: httpx.Client, action: str) -> None:
    """The short way in for training calls: same body and headers as through the middleware."""
    bodies = {"observe-sequence": {"observations": [{"strings": ["a"]}, {"strings": ["b"]}], "learn_at_end": True},
              "observe": {"strings": ["a"]}, "clear-stm": None}  # fmt: skip
    answers = []
    node_id = node("hot")
    for headers in ({"X-Trace-ID": "t-1"}, {"X-Trace-ID": "t-1", "Origin": "http://example.org"}):
        session = create(client, node_id)
        answers.append(client.post(f"/sessions/{session}/{action}", json=bodies[action], headers=headers))
        assert answers[-1].headers["x-session-id"] == session
    plain, with_origin = answers  # an Origin header takes the full app (CORS), the other the short way
    assert plain.status_code == with_origin.status_code == 200
    assert "access-control-allow-origin" in with_origin.headers and "access-control-allow-origin" not in plain.headers
    assert [key for key in plain.headers if key not in ("date", "content-length")] == [
        key for key in with_origin.headers if key not in ("date", "content-length", "vary") and not key.startswith("access-")
    ]
    assert plain.headers["x-trace-id"] == "t-1"
    mask = {"session_id", "unique_id", "results"}
    assert {k: v for k, v in plain.json().items() if k not in mask} == {
        k: v for k, v in with_origin.json().items() if k not in mask
    }


def test_hot_calls_with_bad_bodies_get_kato_errors(client: httpx.Client) -> None:
    session = create(client, node("hot-errors"))
    bad = client.post(f"/sessions/{session}/observe-sequence", json={"observations": [{"strings": [1]}]})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][:3] == ["body", "observations", 0]
    assert client.post(f"/sessions/{session}/observe", content=b"{", headers={"content-type": "application/json"}).status_code == 422
    missing = client.post("/sessions/session-00000000000000000000000000000000-0/observe-sequence",
                          json={"observations": []})  # fmt: skip
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "SESSION_NOT_FOUND"
    assert client.get(f"/sessions/{session}/stm").json()["stm"] == []


def test_sessions_and_kb_survive_a_restart(fresh_server: EngineServer) -> None:
    with httpx.Client(base_url=fresh_server.url, timeout=30.0) as client:
        session = create(client, "restart")
        name = learn_chunk(client, session, ["a", "b"])
        client.post(f"/sessions/{session}/observe", json={"strings": ["pending"], "metadata": {"k": "v"}})
    fresh_server.stop()
    fresh_server.start()
    with httpx.Client(base_url=fresh_server.url, timeout=30.0) as client:
        assert client.get(f"/sessions/{session}/stm").json()["stm"] == [["pending"]]
        client.post(f"/sessions/{session}/observe", json={"strings": ["z"]})
        pattern = client.post(f"/sessions/{session}/learn").json()["pattern_name"]
        stored = client.get(f"/pattern/{pattern.replace('|', '%7C')}", params={"node_id": "restart"}).json()
        assert stored["pattern"]["pattern"]["metadata"] == {"k": ["v"]}
        assert frequency(client, "restart", name) == 1


def test_kill_9_loses_no_acknowledged_learn_and_corrupts_nothing(fresh_server: EngineServer) -> None:
    """Clients learn as fast as they can; the server is killed with SIGKILL in the middle."""
    node_id = "kill9"
    chunks = [[f"t{i}", f"u{i}"] for i in range(40)]
    acknowledged = {chunk_name(chunk): 0 for chunk in chunks}
    attempted = dict(acknowledged)
    lock = threading.Lock()
    stop = threading.Event()

    def learner(offset: int) -> None:
        with httpx.Client(base_url=fresh_server.url, timeout=5.0) as client:
            session = create(client, node_id)
            step = offset
            while not stop.is_set():
                chunk = chunks[step % len(chunks)]
                name = chunk_name(chunk)
                with lock:
                    attempted[name] += 1
                try:
                    learn_chunk(client, session, chunk)
                except (httpx.HTTPError, AssertionError):
                    return
                with lock:
                    acknowledged[name] += 1
                step += 1

    threads = [threading.Thread(target=learner, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    fresh_server.kill()
    stop.set()
    for thread in threads:
        thread.join()
    assert sum(acknowledged.values()) > 100

    database = fresh_server.data_dir / "kato.sqlite3"
    with sqlite3.connect(database) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    fresh_server.start()
    with httpx.Client(base_url=fresh_server.url, timeout=30.0) as client:
        for name in acknowledged:
            stored = frequency(client, node_id, name)
            # Every acknowledged learn is there; at most the in-flight ones were applied without an answer.
            assert acknowledged[name] <= stored <= attempted[name], name


def test_concurrent_sessions_of_one_node_give_exact_frequencies(engine_server: EngineServer) -> None:
    node_id = node("concurrent")
    chunk = ["Ġthe", "Ġsame", "Ġpattern"]

    async def one_client(http: httpx.AsyncClient) -> list[int]:
        answer = await http.post("/sessions", json={"node_id": node_id, "config": {"process_predictions": False}})
        session = answer.json()["session_id"]
        statuses = []
        body = {"observations": [{"strings": [s]} for s in chunk], "learn_at_end": True}
        for _ in range(500):
            statuses.append((await http.post(f"/sessions/{session}/observe-sequence", json=body)).status_code)
        return statuses

    async def main() -> list[list[int]]:
        limits = httpx.Limits(max_connections=8)
        async with httpx.AsyncClient(base_url=engine_server.url, timeout=60.0, limits=limits) as http:
            return await asyncio.gather(*(one_client(http) for _ in range(8)))

    results = asyncio.run(main())
    assert all(status == 200 for statuses in results for status in statuses)
    with httpx.Client(base_url=engine_server.url) as client:
        assert frequency(client, node_id, chunk_name(chunk)) == 4000


def test_unknown_routes_and_methods(client: httpx.Client) -> None:
    assert client.get("/no-such-route").json() == {"detail": "Not Found"}
    answer = client.delete("/health")
    assert answer.status_code == 405 and answer.json() == {"detail": "Method Not Allowed"}
    assert json.loads(client.get("/").content)["version"] == "3.10.1"


def test_a_keyed_call_is_applied_once_even_across_restarts(fresh_server: EngineServer) -> None:
    """ingestd's Idempotency-Key extension: a resent observe-sequence is answered, not re-applied."""
    body = {"observations": [{"strings": ["k"]}, {"strings": ["v"]}], "learn_at_end": True}
    with httpx.Client(base_url=fresh_server.url, timeout=30.0) as client:
        session = create(client, "keyed")
        first = client.post(f"/sessions/{session}/observe-sequence", json=body, headers={"Idempotency-Key": "run:7:0:0"})
        again = client.post(f"/sessions/{session}/observe-sequence", json=body, headers={"Idempotency-Key": "run:7:0:0"})
        name = first.json()["final_learned_pattern"]
        assert "idempotent_replay" not in first.json()
        assert again.json()["idempotent_replay"] is True and again.json()["final_learned_pattern"] == name
        assert frequency(client, "keyed", name) == 1
    fresh_server.stop()
    fresh_server.start()
    with httpx.Client(base_url=fresh_server.url, timeout=30.0) as client:
        other = create(client, "keyed")  # a recreated session: the key still holds
        replay = client.post(f"/sessions/{other}/observe-sequence", json=body, headers={"Idempotency-Key": "run:7:0:0"})
        assert replay.json()["auto_learned_patterns"] == [name]
        unkeyed = client.post(f"/sessions/{other}/observe-sequence", json=body)
        assert unkeyed.json()["final_learned_pattern"] == name
        assert frequency(client, "keyed", name) == 2


def _sequence(chunks: list[list[str]]) -> dict[str, object]:
    return {"observations": [{"strings": [symbol]} for chunk in chunks for symbol in chunk], "learn_at_end": True}


def test_the_run_ledger_stores_each_chunk_of_a_run_once(fresh_server: EngineServer) -> None:
    """ingestd's ledger extension: a chunk range of a run is applied once, whichever session, grouping or
    restart resends it; a range ahead of what is stored is stored and kept apart (a long sample's batches go out at
    once); an overlap is refused whole, saying what is stored; status, forget and clear-all."""
    node_id = "ledgered"
    chunks = [["a", "b"], ["c", "d"], ["e", "f"], ["g", "h"]]
    names = [chunk_name(chunk) for chunk in chunks]
    auto = {"process_predictions": False, "max_pattern_length": 2, "stm_mode": "CLEAR"}
    with httpx.Client(base_url=fresh_server.url, timeout=30.0) as client:
        assert client.get("/ingestd").json()["extensions"]["ledger"] == 2
        session = create(client, node_id, config=auto)
        first = client.post(f"/sessions/{session}/observe-sequence", json=_sequence(chunks[:2]),
                            headers={"ingestd-ledger": "run1:7:0:2"})  # fmt: skip
        assert first.headers["ingestd-ledger"] == "run1:7:0:2" and "idempotent_replay" not in first.json()
        assert first.json()["auto_learned_patterns"] == names[:2]
        # The same range again, and a part of it alone: answered with the same names, stored nothing.
        again = client.post(f"/sessions/{session}/observe-sequence", json=_sequence(chunks[:2]),
                            headers={"ingestd-ledger": "run1:7:0:2"})  # fmt: skip
        assert again.json()["idempotent_replay"] is True and again.json()["auto_learned_patterns"] == names[:2]
        part = client.post(f"/sessions/{session}/observe-sequence", json=_sequence(chunks[1:2]),
                           headers={"ingestd-ledger": "run1:7:1:1"})  # fmt: skip
        assert part.json()["idempotent_replay"] is True
        # A range ahead (chunk 3 before chunk 2) is stored; an overlap (chunks 1..2) is refused and stores nothing.
        ahead = client.post(f"/sessions/{session}/observe-sequence", json=_sequence(chunks[3:]),
                            headers={"ingestd-ledger": "run1:7:3:1"})  # fmt: skip
        assert ahead.status_code == 200 and "idempotent_replay" not in ahead.json()
        overlap = client.post(f"/sessions/{session}/observe-sequence", json=_sequence(chunks[1:3]),
                              headers={"ingestd-ledger": "run1:7:1:2"})  # fmt: skip
        assert overlap.status_code == 409
        assert overlap.json()["detail"]["error"] == "LEDGER_CONFLICT"
        assert overlap.json()["detail"]["stored_chunks"] == 2 and overlap.json()["detail"]["ahead"] == [[3, 4]]
        replayed = client.post(f"/sessions/{session}/observe-sequence", json=_sequence(chunks[3:]),
                               headers={"ingestd-ledger": "run1:7:3:1"})  # fmt: skip
        assert replayed.json()["idempotent_replay"] is True
        held = client.post("/ingestd/ledger/run1", json={"node_ids": [node_id], "samples": [7]}).json()
        assert held == {"totals": {node_id: 3}, "samples": {"7": {node_id: 2}}, "ahead": {"7": {node_id: [[3, 4]]}}}
        # Another run's key is another run: it learns the same chunks again.
        other = client.post(f"/sessions/{session}/observe-sequence", json=_sequence(chunks[:1]),
                            headers={"ingestd-ledger": "run2:7:0:1"})  # fmt: skip
        assert "idempotent_replay" not in other.json()
        bad = client.post(f"/sessions/{session}/observe-sequence", json=_sequence(chunks[:1]),
                          headers={"ingestd-ledger": "run1:seven"})  # fmt: skip
        assert bad.status_code == 400 and "ingestd-ledger" in bad.json()["detail"]
        assert [frequency(client, node_id, name) for name in names] == [2, 1, 0, 1]
    fresh_server.stop()
    fresh_server.start()
    with httpx.Client(base_url=fresh_server.url, timeout=30.0) as client:
        plain = create(client, node_id)  # after a restart, on a plain session, one chunk per call
        resent = client.post(f"/sessions/{plain}/observe-sequence", json=_sequence(chunks[1:2]),
                             headers={"ingestd-ledger": "run1:7:1:1"})  # fmt: skip
        assert resent.json()["idempotent_replay"] is True and resent.json()["final_learned_pattern"] == names[1]
        rest = client.post(f"/sessions/{plain}/observe-sequence", json=_sequence(chunks[2:3]),
                           headers={"ingestd-ledger": "run1:7:2:1"})  # fmt: skip
        assert "idempotent_replay" not in rest.json()
        status = client.post("/ingestd/ledger/run1", json={"node_ids": [node_id, "elsewhere"], "samples": [7, 8]}).json()
        # chunk 2 joined what was stored before it and the range ahead: all four, from the first on
        assert status == {"totals": {node_id: 4, "elsewhere": 0},
                          "samples": {"7": {node_id: 4, "elsewhere": 0}, "8": {node_id: 0, "elsewhere": 0}}, "ahead": {}}
        assert client.post("/ingestd/ledger/run1/forget", json={"samples": [7]}).json() == {"forgotten": 1}
        after = client.post("/ingestd/ledger/run1", json={"node_ids": [node_id], "samples": [7]}).json()
        assert after == {"totals": {node_id: 4}, "samples": {"7": {node_id: 0}}, "ahead": {}}  # totals stay
        session = create(client, node_id)
        assert client.post(f"/sessions/{session}/clear-all").status_code == 200
        cleared = client.post("/ingestd/ledger/run2", json={"node_ids": [node_id]}).json()
        assert cleared["totals"] == {node_id: 0}  # a cleared knowledge base holds nothing of any run
        assert client.post("/ingestd/ledger/bad key", json={"node_ids": [node_id]}).status_code == 400


def test_nodes_are_claimed_by_what_feeds_them(engine_server: EngineServer) -> None:
    """ingestd's feeders extension: another level, chunk size or tokenizer conflicts until the node is cleared."""
    node_id = node("claimed")

    def claim(level: int, chunk_size: int, *, allow_mixed: bool = False) -> dict[str, object]:
        body = {"claims": [{"node_id": node_id, "tokenizer": "gpt2", "level": level, "chunk_size": chunk_size}],
                "allow_mixed": allow_mixed}  # fmt: skip
        answer = engine_server_client.post("/ingestd/nodes/claim", json=body)
        assert answer.status_code == 200, answer.text
        conflicts: dict[str, object] = answer.json()["conflicts"]
        return conflicts

    with httpx.Client(base_url=engine_server.url, timeout=30.0) as engine_server_client:
        assert claim(0, 4) == {}
        assert claim(0, 8) == {node_id: [{"tokenizer": "gpt2", "level": 0, "chunk_size": 4}]}  # claimed, even empty
        session = create(engine_server_client, node_id)
        learn_chunk(engine_server_client, session, ["a", "b"])
        assert claim(0, 4) == {}  # the same feeder again
        assert claim(1, 8) == {node_id: [{"tokenizer": "gpt2", "level": 0, "chunk_size": 4}]}
        assert claim(1, 8, allow_mixed=True) == {node_id: [{"tokenizer": "gpt2", "level": 0, "chunk_size": 4}]}
        assert len(claim(0, 4)[node_id]) == 1  # mixed now: the level-1 feeder is recorded too
        assert engine_server_client.post(f"/sessions/{session}/clear-all").status_code == 200
        assert claim(2, 6) == {}  # a cleared node takes any feeder
        invalid = engine_server_client.post("/ingestd/nodes/claim", json={"claims": []})
        assert invalid.status_code == 422


@pytest.mark.parametrize("damage", ["random bytes", "a directory"])
def test_serving_a_damaged_store_is_one_clear_line(tmp_path, damage: str) -> None:  # type: ignore[no-untyped-def]
    import os
    import subprocess
    import sys

    store = tmp_path / "kato.sqlite3"
    if damage == "random bytes":
        store.write_bytes(os.urandom(5000))
    else:
        store.mkdir()
    result = subprocess.run([sys.executable, "-m", "ingestd", "kato", "serve", "--port", "0", "--data", str(tmp_path)],
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr and "API on" not in result.stderr
    assert result.stderr.startswith(f"ingestd kato: error: cannot open {store}") and result.stderr.count("\n") == 1


def _nested(depth: int) -> object:
    value: object = "x"
    for _ in range(depth):
        value = [value]
    return value


def test_deep_nesting_gets_katos_answers_not_500(fresh_server: EngineServer) -> None:
    """KATO parses bodies with Python's json: metadata nested 300 or 900 levels is taken (and stored as str(),
    as KATO does), a body nested past the parser's depth is FastAPI's 400; nothing is a 500."""
    with httpx.Client(base_url=fresh_server.url, timeout=30.0) as client:
        session = create(client, "deep")
        names = []
        for depth in (300, 900):
            body = {"observations": [{"strings": [f"d{depth}"], "metadata": {"m": _nested(depth)}}, {"strings": ["e"]}],
                    "learn_at_end": True}  # fmt: skip
            answer = client.post(f"/sessions/{session}/observe-sequence", content=json.dumps(body),
                                 headers={"content-type": "application/json"})  # fmt: skip
            assert answer.status_code == 200, answer.text
            names.append(answer.json()["final_learned_pattern"])
        too_deep = client.post(f"/sessions/{session}/observe-sequence", content="[" * 5000 + "]" * 5000,
                               headers={"content-type": "application/json"})  # fmt: skip
        assert too_deep.status_code == 400 and too_deep.json() == {"detail": "There was an error parsing the body"}
        # metadata accumulates until clear-stm: the session, holding 900 levels, must survive a restart too
        client.post(f"/sessions/{session}/observe", json={"strings": ["f"], "metadata": {"m": _nested(600)}})
    fresh_server.stop()
    fresh_server.start()
    with httpx.Client(base_url=fresh_server.url, timeout=30.0) as client:
        assert client.get(f"/sessions/{session}/stm").json()["stm"] == [["f"]]
        stored = client.get(f"/pattern/{names[0].replace('|', '%7C')}", params={"node_id": "deep"}).json()
        assert stored["pattern"]["pattern"]["metadata"]["m"] == [str(_nested(300))]


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("an integer past 4,300 digits", b'{"strings": ["a"], "metadata": {"n": 1' + b"0" * 4300 + b"}}"),
        ("bytes that are not UTF-8", b'\xff{"strings": ["a"]}'),
        ("an unknown field nested 1,000 levels", b'{"strings": ["a"], "x": ' + b'{"a": ' * 1000 + b"1" + b"}" * 1001),
        ("metadata nested 1,000 levels", b'{"strings": ["a"], "metadata": {"k": ' + b"[" * 1000 + b"]" * 1000 + b"}}"),
    ],
)
def test_bodies_pythons_json_cannot_read_are_fastapis_400_on_every_path(client: httpx.Client, name: str,
                                                                        content: bytes) -> None:  # fmt: skip
    """FastAPI answers 400 to whatever json.loads fails on other than a JSONDecodeError; the server's fast path
    (orjson reads deeper and takes these) must not apply what KATO refuses. Found by a differential test against
    FastAPI 0.118.3 / pydantic 2.11.9 (KATO's pins)."""
    session = create(client, node("unreadable"))
    for path in ("observe", "observe-sequence"):
        body = content if path == "observe" else b'{"observations": [' + content + b"]}"
        answer = client.post(f"/sessions/{session}/{path}", content=body, headers={"content-type": "application/json"})
        assert answer.status_code == 400, (name, path, answer.text[:200])
        assert answer.json() == {"detail": "There was an error parsing the body"}
    assert client.get(f"/sessions/{session}/stm").json()["stm"] == []  # nothing was applied


def test_lone_surrogates_are_refused_before_anything_is_applied(client: httpx.Client) -> None:
    """A lone UTF-16 surrogate is valid JSON but no character: KATO takes it and then cannot store or answer it.
    The engine refuses it (422, KATO's JSON-error shape) wherever it is; a valid pair is one character."""
    session = create(client, node("surrogates"))
    for body in (b'{"strings": ["\\ud800"]}', b'{"strings": ["\xed\xa0\x80"]}', b'{"strings": ["b"], "metadata": {"m": "\\udc00"}}',
                 b'{"strings": ["b"], "metadata": {"\\udfff": 1}}'):  # fmt: skip
        for path, sent in (("observe", body), ("observe-sequence", b'{"observations": [' + body + b"]}")):
            answer = client.post(f"/sessions/{session}/{path}", content=sent, headers={"content-type": "application/json"})
            assert answer.status_code == 422, (body, path, answer.text)
            assert answer.json()["detail"][0]["type"] == "json_invalid"
    assert client.post("/sessions", content=b'{"node_id": "\\ud800"}').status_code == 422
    assert client.get(f"/sessions/{session}/stm").json()["stm"] == []
    paired = client.post(f"/sessions/{session}/observe", content=b'{"strings": ["\\ud83d\\ude00"]}')
    assert paired.status_code == 200 and client.get(f"/sessions/{session}/stm").json()["stm"] == [["\U0001f600"]]


def test_metadata_is_stored_as_pythons_json_reads_it_on_the_fast_path_too(client: httpx.Client) -> None:
    """orjson reads an integer past 64 bits as a float; KATO (json.loads) keeps it exact."""
    session = create(client, node("bigint"))
    client.post(f"/sessions/{session}/observe", content=b'{"strings": ["x"], "metadata": {"n": 18446744073709551616}}')
    client.post(f"/sessions/{session}/observe-sequence",
                content=b'{"observations": [{"strings": ["y"], "metadata": {"m": 123456789012345678901234567890}}]}')
    name = client.post(f"/sessions/{session}/learn").json()["pattern_name"]
    stored = client.get(f"/pattern/{name.replace('|', '%7C')}", params={"node_id": node_of(client, session)}).json()
    assert stored["pattern"]["pattern"]["metadata"] == {"n": ["18446744073709551616"],
                                                        "m": ["123456789012345678901234567890"]}  # fmt: skip


def node_of(client: httpx.Client, session: str) -> str:
    return str(client.get(f"/sessions/{session}").json()["node_id"])


def test_the_first_content_type_counts_as_starlette_reads_it(client: httpx.Client) -> None:
    session = create(client, node("two-types"))
    answer = client.post(f"/sessions/{session}/observe", content=b'{"strings": ["a"]}',
                         headers=[("content-type", "text/plain"), ("content-type", "application/json")])  # fmt: skip
    assert answer.status_code == 422 and answer.json()["detail"][0]["type"] == "model_attributes_type"
    assert client.get(f"/sessions/{session}/stm").json()["stm"] == []


def test_session_errors_come_in_katos_field_order(client: httpx.Client) -> None:
    answer = client.post("/sessions", json={"node_id": 1, "config": 1, "metadata": 1, "ttl_seconds": "x"})
    assert [error["loc"][1] for error in answer.json()["detail"]] == ["node_id", "metadata", "ttl_seconds", "config"]


def test_numbers_past_what_the_engine_can_keep_are_a_4xx_not_a_500(client: httpx.Client) -> None:
    """KATO answers 500 to these (Redis refuses the TTL, its clock overflows); they are client input: 4xx."""
    for ttl in (-5, 10**20):
        answer = client.post("/sessions", json={"node_id": node("ttl"), "ttl_seconds": ttl})
        assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["body", "ttl_seconds"], answer.text
    session = create(client, node("extend"))
    assert client.post(f"/sessions/{session}/extend", params={"ttl_seconds": 10**20}).status_code == 422
    assert client.get(f"/sessions/{session}").status_code == 200  # the session was not broken by it
    place = client.post(f"/sessions/{session}/observe-sequence", json={"observations": [{"strings": ["a"]}]},
                        headers={"ingestd-ledger": "key:0:0:99999999999999999999999"})  # fmt: skip
    assert place.status_code == 400
    for path in ("/ingestd/ledger/abcd", "/ingestd/ledger/abcd/forget"):
        answer = client.post(path, json={"node_ids": ["n"], "samples": [2**63]})
        assert answer.status_code == 422, (path, answer.text)
    nan = client.post(f"/sessions/{session}/config", content=b"NaN", headers={"content-type": "application/json"})
    assert nan.status_code == 422 and nan.json()["detail"][0]["type"] == "dict_type"
    claim = client.post("/ingestd/nodes/claim", content=b'{"claims": [{"node_id": "\\ud800", "tokenizer": "gpt2", '
                        b'"level": 0, "chunk_size": 8}]}', headers={"content-type": "application/json"})  # fmt: skip
    assert claim.status_code == 422
    huge = client.post("/ingestd/nodes/claim", json={"claims": [{"node_id": "n", "tokenizer": "gpt2", "level": 2**63,
                                                                 "chunk_size": 8}]})  # fmt: skip
    assert huge.status_code == 422
    before = client.get("/sessions/count").json()["active_session_count"]
    for body in (b'{"node_id": "nan", "metadata": {"a": NaN}}', b'{"node_id": "inf", "metadata": {"a": [1e309]}}',
                 b'{"node_id": "inf", "config": {"max_pattern_length": Infinity}}'):  # fmt: skip
        answer = client.post("/sessions", content=body, headers={"content-type": "application/json"})
        assert answer.status_code == 422 and answer.json()["detail"][0]["type"] == "finite_number", answer.text
    assert client.get("/sessions/count").json()["active_session_count"] == before  # refused before creating


def test_connections_whose_body_never_arrives_are_closed(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import socket

    monkeypatch.setenv("INGESTD_SERVER__BODY_TIMEOUT", "1")
    server = EngineServer(tmp_path / "kb").start()
    try:
        partial = b"POST /sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n{"
        assert closed_by_the_server(server.port, partial, 20) == 20
        slow_but_whole = socket.create_connection(("127.0.0.1", server.port))
        body = b'{"node_id": "slow"}'
        slow_but_whole.sendall(b"POST /sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               b"Content-Length: %d\r\n\r\n" % len(body))  # fmt: skip
        time.sleep(0.3)
        slow_but_whole.sendall(body)
        slow_but_whole.settimeout(30)
        assert slow_but_whole.recv(12) == b"HTTP/1.1 200"
        slow_but_whole.close()
    finally:
        server.stop()


def test_bodies_of_the_wrong_json_type_get_fastapis_error(client: httpx.Client) -> None:
    answer = client.post("/sessions", json=[1, 2])
    assert answer.status_code == 422
    assert answer.json() == {"detail": [{"type": "model_attributes_type", "loc": ["body"],
                                         "msg": "Input should be a valid dictionary or object to extract fields from",
                                         "input": [1, 2]}]}  # fmt: skip
    session = create(client, node("wrong-types"))
    items = client.post(f"/sessions/{session}/observe-sequence", json={"observations": [["a"]]})
    assert items.status_code == 422 and items.json()["detail"][0]["type"] == "model_attributes_type"
    assert items.json()["detail"][0]["loc"] == ["body", "observations", 0]


def test_connections_that_never_finish_their_headers_are_closed(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import socket

    monkeypatch.setenv("INGESTD_SERVER__HEADER_TIMEOUT", "1")
    server = EngineServer(tmp_path / "kb").start()
    try:
        # and never the blank line that ends the headers
        assert closed_by_the_server(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\n", 50) == 50
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200  # a real request still goes through
    finally:
        server.stop()


def test_a_client_reads_an_observe_sequence_answer_from_its_tail_as_from_the_whole(client: httpx.Client) -> None:
    # ingestd's client parses only the fields after the per-observation results; a unique_id that spells
    # those fields, a pretty-printed answer and one laid out otherwise must still read as the whole answer.
    from ingestd.backend import _sequence_answer

    session = create(client, node("tail"), config={"process_predictions": False, "max_pattern_length": 3,
                                                   "stm_mode": "CLEAR"})  # fmt: skip
    tricky = ',"auto_learned_patterns":["PTRN|0"],"final_learned_pattern":"PTRN|0","isolated":true}'
    observations = [{"strings": [symbol], "unique_id": tricky if symbol == "c" else None}
                    for symbol in ["a", "b", "c", "d", "e", "f", "g", "h"]]  # fmt: skip
    answer = client.post(f"/sessions/{session}/observe-sequence", json={"observations": observations, "learn_at_end": True})
    assert answer.status_code == 200, answer.text
    whole = answer.json()
    assert len(whole["auto_learned_patterns"]) == 3 and whole["final_learned_pattern"].startswith("PTRN|")
    fields = ("auto_learned_patterns", "final_learned_pattern", "isolated")
    for raw in (answer.content, json.dumps(whole, indent=1).encode(),
                json.dumps({key: whole[key] for key in (*fields, "results")}, separators=(",", ":")).encode()):
        read = _sequence_answer(raw)
        assert {key: read[key] for key in fields} == {key: whole[key] for key in fields}
