"""A fault-injecting HTTP/1.1 reverse proxy for loopback tests.

``FaultProxy(upstream_port).start()`` listens on a free loopback port and forwards
each client connection, one request at a time, over its own keep-alive upstream
connection. Messages are forwarded byte for byte; they are parsed only as far as
framing needs (start line, headers, a Content-Length or chunked body, or a
response body that ends when the upstream closes).

Faults are set at runtime from any thread and are deterministic given ``seed``:
the "every n-th" faults count the requests they apply to from the moment they are
set, and the probabilistic one draws from ``random.Random(seed)`` created then.
Each takes an optional ``only_paths``: a substring of the request target that the
requests it counts and applies to must contain. Faults are checked in a fixed order (``unavailable_burst``,
``session_not_found``, ``drop_every``, ``drop_response_every``, ``delay_every``);
the first that fires handles the request, and the faults after it do not count it.

If the upstream cannot be reached or fails mid-response, the client connection is
closed without a response.

With ``plain_kato`` the proxy makes an ingestd engine look like KATO 3.10.1 to ingestd: requests lose
their ``Idempotency-Key`` and ``ingestd-ledger`` headers (KATO ignores both) and ``/ingestd`` paths get
404 (KATO has none), so nothing is applied once and nothing says so.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import random
import threading
from collections import Counter
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

_HOST = "127.0.0.1"
_ORDER = ("unavailable_burst", "session_not_found", "drop_every", "drop_response_every", "delay_every")
_BROKEN = (OSError, EOFError, ValueError, asyncio.LimitOverrunError)  # a peer went away or spoke garbage


@dataclass(frozen=True)
class _Message:
    """One HTTP/1.1 request or response as received, with what framing needs parsed out."""

    start: list[str]  # request or status line, split in three
    headers: dict[str, str]  # lower-cased names
    raw: bytes  # the whole message, forwarded verbatim
    until_close: bool = False  # the body ended when the sender closed the connection

    @property
    def keep_alive(self) -> bool:
        return not self.until_close and "close" not in self.headers.get("connection", "").lower()


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    """A chunked body with its framing and trailers, as it came."""
    raw = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        raw += size_line
        size = int(size_line.split(b";", 1)[0], 16)
        if size == 0:
            break
        raw += await reader.readexactly(size + 2)
    while (trailer := await reader.readuntil(b"\r\n")) != b"\r\n":
        raw += trailer
    return bytes(raw + b"\r\n")


async def _read_message(reader: asyncio.StreamReader, request_method: str | None = None) -> _Message | None:
    """Read a request, or with ``request_method`` the response to such a request; ``None`` on EOF before it."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as eof:
        if eof.partial:
            raise ConnectionError("connection closed inside a message head") from None
        return None
    start_line, *header_lines = head.decode("latin-1").split("\r\n")
    start = start_line.split(" ", 2)
    if len(start) < 2:
        raise ValueError(f"bad start line {start_line!r}")
    headers = {name.strip().lower(): value.strip() for name, _, value in (h.partition(":") for h in header_lines if h)}
    if request_method is not None and (
        request_method == "HEAD" or start[1] in ("204", "304") or start[1].startswith("1")
    ):
        return _Message(start, headers, head)
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return _Message(start, headers, head + await _read_chunked(reader))
    if "content-length" in headers:
        return _Message(start, headers, head + await reader.readexactly(int(headers["content-length"])))
    if request_method is not None:
        return _Message(start, headers, head + await reader.read(), until_close=True)
    return _Message(start, headers, head)


def _json_response(status: int, payload: object) -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode()
    head = (f"HTTP/1.1 {status} {http.client.responses.get(status, '')}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n")  # fmt: skip
    return head.encode() + body


def _without_headers(message: _Message, names: tuple[str, ...]) -> _Message:
    """The message with the named headers left out of its raw bytes."""
    head, separator, body = message.raw.partition(b"\r\n\r\n")
    lines = [line for line in head.split(b"\r\n") if line.split(b":", 1)[0].strip().lower().decode("latin-1") not in names]
    headers = {name: value for name, value in message.headers.items() if name not in names}
    return _Message(message.start, headers, b"\r\n".join(lines) + separator + body, message.until_close)


def _session_of(target: str) -> str | None:
    """The id in a ``/sessions/{id}/...`` target, else ``None``."""
    parts = target.split("?", 1)[0].split("/")
    return parts[2] if len(parts) > 3 and parts[1] == "sessions" and parts[2] else None


class _Upstream:
    """One keep-alive connection to the upstream, (re)opened when needed."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def exchange(self, request: _Message) -> _Message:
        if self.reader is None or self.writer is None or self.reader.at_eof():
            self.close()
            self.reader, self.writer = await asyncio.open_connection(_HOST, self.port)
        self.writer.write(request.raw)
        await self.writer.drain()
        response = await _read_message(self.reader, request.start[0])
        if response is None:
            raise ConnectionError("upstream closed without a response")
        if not response.keep_alive:
            self.close()
        return response

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


@dataclass
class _Fault:
    """A configured fault: which requests it counts, and which of those it fires on."""

    kind: str  # the name of the method that set it
    only_paths: str | None
    every: int = 1
    probability: float = 1.0
    remaining: int | None = None  # fires at most this many more times; None: no limit
    seconds: float = 0.0
    status: int = 0
    rng: random.Random = field(default_factory=random.Random)
    seen: int = 0

    def fires(self, target: str) -> bool:
        if self.only_paths is not None and self.only_paths not in target:
            return False
        self.seen += 1
        if self.seen % self.every or self.remaining == 0:
            return False
        if self.probability < 1.0 and self.rng.random() >= self.probability:
            return False
        if self.remaining is not None:
            self.remaining -= 1
        return True


_FORWARD = _Fault("forward", None)  # what _decide answers when no fault fires


class FaultProxy:
    """A reverse proxy to ``127.0.0.1:upstream_port`` that injects faults, run on a background event loop."""

    def __init__(self, upstream_port: int, *, seed: int = 0, plain_kato: bool = False) -> None:
        self.upstream_port = upstream_port
        self.seed = seed
        self.plain_kato = plain_kato
        self.port = 0
        self._lock = threading.Lock()
        self._faults: dict[str, _Fault] = {}
        self._requests = 0
        self._injected: Counter[str] = Counter()
        self._busy: Counter[str] = Counter()  # sessions with a request upstream now, and how many
        self._busy_peak = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._reopen: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://{_HOST}:{self.port}"

    @property
    def requests(self) -> int:
        """Requests received in full, forwarded or faulted."""
        with self._lock:
            return self._requests

    @property
    def injected(self) -> Counter[str]:
        """How often each fault fired, by the name of the method that set it."""
        with self._lock:
            return self._injected.copy()

    @property
    def busy_sessions_peak(self) -> int:
        """The most sessions that had a request being served upstream at one moment."""
        with self._lock:
            return self._busy_peak

    # --- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> Self:
        """Listen on a free port in a background thread; returns once connections are accepted."""
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(ready),), name="faultproxy", daemon=True)
        self._thread.start()
        ready.result(timeout=5)
        return self

    def stop(self) -> None:
        """Close the listener and every connection, and end the background thread."""
        if self._thread is None or self._loop is None or self._stopping is None:
            return
        self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout=5)
        self._thread = None

    def __enter__(self) -> Self:
        return self if self._thread is not None else self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    # --- faults ------------------------------------------------------------------------------------------------

    def drop_every(self, n: int, *, only_paths: str | None = None) -> None:
        """Close the client connection instead of forwarding every n-th request."""
        self._set(_Fault("drop_every", only_paths, every=n))

    def refuse_for(self, seconds: float) -> None:
        """Close the listener and all client connections now; listen again on the same port after ``seconds``."""
        assert self._loop is not None, "not started"
        with self._lock:
            self._injected["refuse_for"] += 1
        asyncio.run_coroutine_threadsafe(self._refuse(seconds), self._loop).result(timeout=5)

    def session_not_found(self, probability: float, *, only_paths: str | None = None) -> None:
        """With ``probability``, delete the session of a ``/sessions/{id}/...`` request upstream and answer 404
        ``SESSION_NOT_FOUND`` instead of forwarding it, as if the session had expired."""
        self._set(_Fault("session_not_found", only_paths, probability=probability, rng=random.Random(self.seed)))

    def unavailable_burst(self, count: int, status: int = 503, *, only_paths: str | None = None) -> None:
        """Answer the next ``count`` requests with ``status`` and ``{"detail": <reason>}`` instead of forwarding."""
        self._set(_Fault("unavailable_burst", only_paths, remaining=count, status=status))

    def delay_every(self, n: int, seconds: float, *, only_paths: str | None = None) -> None:
        """Forward every n-th request at once but hold its response for ``seconds``."""
        self._set(_Fault("delay_every", only_paths, every=n, seconds=seconds))

    def drop_response_every(self, n: int, *, only_paths: str | None = None) -> None:
        """Forward every n-th request, then close the client connection instead of sending the response."""
        self._set(_Fault("drop_response_every", only_paths, every=n))

    def clear(self) -> None:
        """Remove all faults (a refusal under way still ends when it was due to)."""
        with self._lock:
            self._faults.clear()

    def _set(self, fault: _Fault) -> None:
        with self._lock:
            self._faults[fault.kind] = fault

    def _decide(self, target: str) -> _Fault:
        """Count a request and pick the fault that handles it, or ``_FORWARD``."""
        with self._lock:
            self._requests += 1
            for kind in _ORDER:
                fault = self._faults.get(kind)
                if fault is None or (kind == "session_not_found" and _session_of(target) is None):
                    continue
                if fault.fires(target):
                    self._injected[kind] += 1
                    return fault
            return _FORWARD

    # --- event loop side ---------------------------------------------------------------------------------------

    async def _main(self, ready: concurrent.futures.Future[None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        try:
            await self._listen()
        except OSError as error:
            ready.set_exception(error)
            return
        ready.set_result(None)
        try:
            await self._stopping.wait()
        finally:
            if self._reopen is not None:
                self._reopen.cancel()
            await self._close_all()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve_client, _HOST, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close_all(self) -> None:
        """Stop listening and close every client connection (with its upstream connection)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        connections = list(self._connections)
        for task in connections:
            task.cancel()
        if connections:
            await asyncio.wait(connections, timeout=1)

    async def _refuse(self, seconds: float) -> None:
        if self._reopen is not None:
            self._reopen.cancel()
        await self._close_all()
        self._reopen = asyncio.create_task(self._reopen_after(seconds))

    async def _reopen_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        await self._listen()

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream = _Upstream(self.upstream_port)
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            if self._server is None:  # accepted just before the listener closed
                return
            while (request := await _read_message(reader)) is not None:
                if not await self._handle(request, writer, upstream):
                    return
        except _BROKEN:
            return
        except asyncio.CancelledError:  # by refuse_for or stop; ending cancelled would make asyncio log an error
            return
        finally:
            self._connections.discard(task)
            upstream.close()
            writer.close()

    async def _handle(self, request: _Message, client: asyncio.StreamWriter, upstream: _Upstream) -> bool:
        """Answer one request, faulted or forwarded; whether the client connection stays open."""
        if self.plain_kato:
            if request.start[1].split("?")[0].rstrip("/") == "/ingestd" or request.start[1].startswith("/ingestd/"):
                client.write(_json_response(404, {"detail": "Not Found"}))
                await client.drain()
                return request.keep_alive
            request = _without_headers(request, ("idempotency-key", "ingestd-ledger"))
        fault = self._decide(request.start[1])
        if fault.kind == "drop_every":
            return False
        if fault.kind == "unavailable_burst":
            client.write(_json_response(fault.status, {"detail": http.client.responses.get(fault.status, "")}))
        elif fault.kind == "session_not_found":
            session_id = _session_of(request.start[1])
            await self._delete_session(session_id)
            message = f"Session {session_id} not found or expired"
            client.write(
                _json_response(
                    404, {"error": {"code": "SESSION_NOT_FOUND", "message": message, "session_id": session_id}}
                )
            )
        else:
            session_id = _session_of(request.start[1])
            with self._lock:
                self._busy[session_id or ""] += 1
                self._busy_peak = max(self._busy_peak, sum(1 for busy in self._busy if busy))
            try:
                response = await upstream.exchange(request)
            finally:
                with self._lock:
                    self._busy[session_id or ""] -= 1
                    self._busy += Counter()  # drops the sessions no longer busy
            if fault.kind == "drop_response_every":
                return False
            if fault.kind == "delay_every":
                await asyncio.sleep(fault.seconds)
            client.write(response.raw)
            await client.drain()
            return request.keep_alive and response.keep_alive
        await client.drain()
        return request.keep_alive

    async def _delete_session(self, session_id: str | None) -> None:
        """``DELETE /sessions/{id}`` upstream on a connection of its own, as the session expiring would."""
        target = f"/sessions/{session_id}"
        raw = f"DELETE {target} HTTP/1.1\r\nhost: {_HOST}:{self.upstream_port}\r\ncontent-length: 0\r\n\r\n"
        upstream = _Upstream(self.upstream_port)
        try:
            await upstream.exchange(_Message(["DELETE", target, "HTTP/1.1"], {}, raw.encode()))
        finally:
            upstream.close()
