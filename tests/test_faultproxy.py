"""The fault-injecting proxy against a real engine server: each fault's observable effect, and plain forwarding."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import httpx
import pytest

from .conftest import EngineServer
from .faultproxy import FaultProxy
from .test_engine_server import create, frequency, learn_chunk, node


@pytest.fixture(autouse=True)
def no_event_loop_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """The proxy's event loop logs no unhandled exception, whatever the test did to its connections."""
    yield
    assert [record.getMessage() for record in caplog.records if record.name == "asyncio"] == []


@pytest.fixture
def upstream(fresh_server: EngineServer) -> Iterator[httpx.Client]:
    """A client talking to the engine server directly."""
    with httpx.Client(base_url=fresh_server.url, timeout=10.0) as http:
        yield http


@pytest.fixture
def proxy(fresh_server: EngineServer) -> Iterator[FaultProxy]:
    with FaultProxy(fresh_server.port) as fault_proxy:
        yield fault_proxy


@pytest.fixture
def client(proxy: FaultProxy) -> Iterator[httpx.Client]:
    """A client talking to the engine server through the proxy."""
    with httpx.Client(base_url=proxy.url, timeout=10.0) as http:
        yield http


def observe(client: httpx.Client, session: str, symbol: str) -> httpx.Response:
    return client.post(f"/sessions/{session}/observe", json={"strings": [symbol]})


def stm(client: httpx.Client, session: str) -> list[list[str]]:
    stm_body: list[list[str]] = client.get(f"/sessions/{session}/stm").json()["stm"]
    return stm_body


def timed(call: Callable[[], object]) -> float:
    started = time.monotonic()
    call()
    return time.monotonic() - started


def test_without_faults_requests_pass_through_unchanged(
    upstream: httpx.Client, proxy: FaultProxy, client: httpx.Client
) -> None:
    proxy.drop_every(1)
    proxy.unavailable_burst(5)
    proxy.session_not_found(1.0)
    proxy.clear()
    session = create(client, node("pass"))
    learn_chunk(client, session, ["a", "b"])
    assert observe(client, session, "c").status_code == 200
    chunked = client.post(f"/sessions/{session}/observe", content=iter([b'{"strings": ', b'["d"]}']),
                          headers={"content-type": "application/json"})  # fmt: skip
    assert chunked.status_code == 200
    trace = {"x-trace-id": "same"}
    for method, path, body in [
        ("GET", f"/sessions/{session}/stm", None),
        ("GET", f"/sessions/{session}/config", None),
        ("GET", "/sessions/missing/stm", None),
        ("GET", "/nowhere", None),
        ("POST", f"/sessions/{session}/observe", b'{"strings": [1]}'),
    ]:
        via = client.request(method, path, content=body, headers=trace)
        direct = upstream.request(method, path, content=body, headers=trace)
        assert (via.status_code, via.headers["content-type"], via.content) == (
            direct.status_code, direct.headers["content-type"], direct.content)  # fmt: skip
    assert stm(upstream, session) == [["c"], ["d"]]
    assert proxy.requests == 9
    assert proxy.injected == Counter()


def test_drop_every_closes_the_connection_before_forwarding(
    upstream: httpx.Client, proxy: FaultProxy, client: httpx.Client
) -> None:
    session = create(upstream, node("drop"))
    proxy.drop_every(3, only_paths="/observe")
    outcomes = []
    for i in range(6):
        assert client.get("/health").status_code == 200  # not counted: the filter excludes it
        try:
            outcomes.append(observe(client, session, str(i)).status_code)
        except httpx.RemoteProtocolError:
            outcomes.append(0)
    assert outcomes == [200, 200, 0, 200, 200, 0]
    assert stm(upstream, session) == [["0"], ["1"], ["3"], ["4"]]  # the dropped ones never reached the server
    assert (proxy.requests, proxy.injected) == (12, Counter(drop_every=2))


def test_refuse_for_closes_the_port_and_reopens_it_later(proxy: FaultProxy, client: httpx.Client) -> None:
    assert client.get("/health").status_code == 200  # leaves an idle keep-alive connection, which is closed too
    port = proxy.port
    started = time.monotonic()
    proxy.refuse_for(1.0)
    with pytest.raises(httpx.ConnectError):
        client.get("/health")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1.0)
    while True:
        try:
            answer = client.get("/health")
            break
        except httpx.ConnectError:
            assert time.monotonic() - started < 3.0
            time.sleep(0.05)
    assert answer.status_code == 200
    assert 1.0 <= time.monotonic() - started < 2.0
    assert (proxy.port, proxy.injected) == (port, Counter(refuse_for=1))


def test_session_not_found_answers_404_and_really_deletes_the_session(
    upstream: httpx.Client, proxy: FaultProxy, client: httpx.Client
) -> None:
    session = create(upstream, node("expire"))
    proxy.session_not_found(1.0)
    assert create(client, node("unaffected"))  # POST /sessions is not a session's path
    answer = observe(client, session, "a")
    assert answer.status_code == 404
    assert answer.headers["content-type"] == "application/json"
    assert answer.json() == {"error": {"code": "SESSION_NOT_FOUND", "message": f"Session {session} not found or expired",
                                       "session_id": session}}  # fmt: skip
    assert "x-trace-id" not in answer.headers  # answered by the proxy, not forwarded
    assert upstream.get(f"/sessions/{session}/exists").json()["exists"] is False
    assert observe(upstream, session, "a").json()["error"]["code"] == "SESSION_NOT_FOUND"
    assert proxy.injected == Counter(session_not_found=1)


def test_session_not_found_draws_the_same_requests_for_the_same_seed(fresh_server: EngineServer) -> None:
    def faulted(seed: int) -> list[bool]:
        with FaultProxy(fresh_server.port, seed=seed) as proxy, httpx.Client(base_url=proxy.url) as client:
            proxy.session_not_found(0.5)
            # The server's own 404s carry x-trace-id, the proxy's do not.
            return ["x-trace-id" not in client.get(f"/sessions/s{i}/stm").headers for i in range(20)]

    first = faulted(seed=7)
    assert first == faulted(seed=7)
    assert 0 < sum(first) < 20


def test_unavailable_burst_answers_the_next_requests_without_forwarding(
    upstream: httpx.Client, proxy: FaultProxy, client: httpx.Client
) -> None:
    session = create(upstream, node("burst"))
    proxy.unavailable_burst(3)
    answers = [observe(client, session, str(i)) for i in range(5)]
    assert [answer.status_code for answer in answers] == [503, 503, 503, 200, 200]
    assert answers[0].json() == {"detail": "Service Unavailable"}
    assert answers[0].headers["content-type"] == "application/json"
    assert stm(upstream, session) == [["3"], ["4"]]
    proxy.unavailable_burst(1, status=502)
    bad_gateway = client.get("/health")
    assert (bad_gateway.status_code, bad_gateway.json()) == (502, {"detail": "Bad Gateway"})
    assert client.get("/health").status_code == 200
    assert proxy.injected == Counter(unavailable_burst=4)


def test_delay_every_holds_the_response_of_an_applied_request(
    upstream: httpx.Client, proxy: FaultProxy, client: httpx.Client
) -> None:
    node_id = node("delay")
    session = create(upstream, node_id)
    proxy.delay_every(2, 1.0, only_paths="observe-sequence")
    sequence = {"observations": [{"strings": ["x"]}, {"strings": ["y"]}], "learn_at_end": True}
    name = learn_chunk(client, session, ["x", "y"])
    with pytest.raises(httpx.ReadTimeout):
        client.post(f"/sessions/{session}/observe-sequence", json=sequence, timeout=0.3)
    assert frequency(upstream, node_id, name) == 2  # the server applied the request whose answer timed out
    assert timed(lambda: stm(client, session)) < 0.5  # not counted: the filter excludes it
    assert timed(lambda: learn_chunk(client, session, ["x", "y"])) < 0.5
    assert timed(lambda: learn_chunk(client, session, ["x", "y"])) >= 1.0  # a patient client gets the answer
    assert frequency(upstream, node_id, name) == 4
    assert proxy.injected == Counter(delay_every=2)


def test_drop_response_every_applies_the_request_but_closes_instead_of_answering(
    upstream: httpx.Client, proxy: FaultProxy, client: httpx.Client
) -> None:
    session = create(upstream, node("drop-response"))
    proxy.drop_response_every(2, only_paths="/observe")
    assert observe(client, session, "a").status_code == 200
    with pytest.raises(httpx.RemoteProtocolError):
        observe(client, session, "b")
    assert observe(client, session, "c").status_code == 200
    assert stm(upstream, session) == [["a"], ["b"], ["c"]]
    assert proxy.injected == Counter(drop_response_every=1)


def test_a_failing_upstream_closes_the_client_connection(
    fresh_server: EngineServer, proxy: FaultProxy, client: httpx.Client
) -> None:
    assert client.get("/health").status_code == 200
    fresh_server.kill()
    with pytest.raises(httpx.RemoteProtocolError):
        client.get("/health")
    with pytest.raises(httpx.RemoteProtocolError):
        client.get("/health")


def test_stop_closes_open_connections_quickly(fresh_server: EngineServer) -> None:
    proxy = FaultProxy(fresh_server.port).start()
    idle = httpx.Client(base_url=proxy.url)
    assert idle.get("/health").status_code == 200
    half_sent = socket.create_connection(("127.0.0.1", proxy.port))
    half_sent.sendall(b"POST /sessions HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\n{")
    proxy.delay_every(1, 30.0)
    errors: list[Exception] = []

    def held() -> None:
        try:
            httpx.get(proxy.url + "/health", timeout=10.0)
        except httpx.TransportError as error:
            errors.append(error)

    waiter = threading.Thread(target=held)
    waiter.start()
    while proxy.requests < 2:
        time.sleep(0.01)
    assert timed(proxy.stop) < 2.0
    waiter.join(timeout=5.0)
    assert [type(error) for error in errors] == [httpx.RemoteProtocolError]
    half_sent.settimeout(1.0)
    assert half_sent.recv(100) == b""
    half_sent.close()
    with pytest.raises(httpx.ConnectError):
        idle.get("/health")
    idle.close()


def test_plain_kato_drops_ingestds_headers_and_routes(fresh_server: EngineServer) -> None:
    """Through a plain_kato proxy the engine is KATO to ingestd: no extensions, keys and ledger places ignored."""
    body = {"observations": [{"strings": ["p"]}, {"strings": ["q"]}], "learn_at_end": True}
    with FaultProxy(fresh_server.port, plain_kato=True) as proxy, httpx.Client(base_url=proxy.url, timeout=10.0) as client:
        assert client.get("/ingestd").status_code == 404
        assert client.post("/ingestd/ledger/run", json={"node_ids": ["n"]}).status_code == 404
        session = create(client, "plain-kato")
        for _ in range(2):
            answer = client.post(f"/sessions/{session}/observe-sequence", json=body,
                                 headers={"ingestd-ledger": "run:0:0:1", "idempotency-key": "k"})  # fmt: skip
            assert answer.status_code == 200 and "ingestd-ledger" not in answer.headers
            assert "idempotency-key" not in answer.headers and "idempotent_replay" not in answer.json()
        assert client.get("/health").status_code == 200
    with httpx.Client(base_url=fresh_server.url, timeout=10.0) as direct:
        assert frequency(direct, "plain-kato", answer.json()["final_learned_pattern"]) == 2
