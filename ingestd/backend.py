"""KATO backends: any KATO-compatible server over HTTP, or the embedded engine in-process.

Both offer the same few operations the workers need. How a batch of chunks is
said in KATO's API is the backend's business:

* over HTTP, a batch of whole chunks on an auto-learn session
  (``max_pattern_length = chunk_size``, ``stm_mode = CLEAR``) is **one**
  ``observe-sequence`` with ``learn_at_end`` (for a shorter last chunk); on a
  plain session (levels with metadata) it is one ``observe-sequence`` per chunk,
  metadata on its first observation. Only KATO 3.10.1's public API is used.
* in-process, the engine's ``learn_chunks`` does the same in one transaction.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import quote, urlsplit

import aiohttp
import orjson

from ingestd import metrics
from ingestd.engine import Engine, EngineSettings, KatoError, SessionNotFound
from ingestd.errors import Ambiguous, KatoRejected, KatoUnavailable, ServerDown, SessionLost

T = TypeVar("T")


class KatoBackend(Protocol):
    """What a pipeline worker needs from KATO."""

    requests: int
    description: str
    exactly_once: bool  # a resent keyed call is applied once

    async def start(self) -> None: ...
    async def aclose(self) -> None: ...
    async def create_session(self, node_id: str, config: dict[str, Any], *, key: str | None = None) -> str: ...
    async def delete_session(self, session_id: str) -> None: ...
    async def learn(self, session_id: str, chunks: Sequence[Sequence[str]], *, metadata: dict[str, Any] | None,
                    auto_learn: bool, key: str | None = None) -> list[str]: ...  # fmt: skip
    async def healthy(self) -> bool: ...
    async def clear_stm(self, session_id: str) -> None: ...
    async def clear_all(self, node_id: str) -> None: ...
    async def get_pattern(self, node_id: str, name: str) -> dict[str, Any] | None: ...


def _observations(chunk: Sequence[str], metadata: dict[str, Any] | None) -> list[dict[str, Any]]:
    observations: list[dict[str, Any]] = [{"strings": [symbol]} for symbol in chunk]
    if metadata:
        observations[0]["metadata"] = metadata
    return observations


_JSON_HEADERS = {"content-type": "application/json"}


def check_kato_url(url: str) -> str:
    """A KATO server's address as ingestd takes it: ``http(s)://host[:port][/prefix]``, without credentials
    (it is logged, stored with jobs and shown by ``/readyz``); raises ``ValueError`` naming what is wrong."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as error:
        raise ValueError(f"{url!r} is not a URL ({error}): give http://host:port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) address: give http://host:port")
    if parts.username is not None or parts.password is not None:
        raise ValueError("a KATO address must not carry credentials (they would be logged and stored with jobs): "
                         "give http://host:port")  # fmt: skip
    if parts.query or parts.fragment:
        raise ValueError(f"{url!r} has a query or fragment: give http://host:port")
    return url.rstrip("/")


def _endpoint(method: str, path: str) -> str:
    """A low-cardinality name for a KATO call: the route, without ids."""
    parts = path.split("?")[0].strip("/").split("/")
    if parts[0] == "sessions":
        if len(parts) >= 3:
            return parts[2]  # observe-sequence, clear-stm, clear-all, ...
        return "create-session" if len(parts) == 1 else f"{method.lower()}-session"
    return parts[0] or "root"


class HttpKato:
    """A KATO server (real, or ``ingestd kato serve``) over HTTP.

    One aiohttp connection pool sized to the pipeline's concurrency (one
    request in flight per session): every concurrent request has a keep-alive
    connection of its own, and since uvicorn hands each connection to one of
    its workers, the load spreads over all of them. Idle connections are
    dropped after 4 s, before uvicorn's 5 s keep-alive timeout closes them.

    Why aiohttp and not httpx here: this is the pipeline's hot path, and on
    these 2-core machines the client's CPU per request decides throughput.
    Measured against the engine server (sequential observe-sequence calls):
    httpx 0.58 ms of client CPU per request, httpcore alone 0.42, aiohttp 0.19.
    """

    def __init__(self, url: str, *, connections: int = 32, timeout: float = 120.0) -> None:
        self.url = url.rstrip("/")
        self.description = f"KATO at {self.url}"
        self.requests = 0
        self.exactly_once = False  # learned from the first keyed answer: does the server honour Idempotency-Key?
        self._connections = max(1, connections)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._http: aiohttp.ClientSession | None = None

    @property
    def _client(self) -> aiohttp.ClientSession:
        if self._http is None:
            connector = aiohttp.TCPConnector(limit=self._connections, keepalive_timeout=4.0)
            self._http = aiohttp.ClientSession(self.url, connector=connector, timeout=self._timeout,
                                               json_serialize=lambda body: orjson.dumps(body).decode())  # fmt: skip
        return self._http

    async def start(self) -> None:
        try:
            async with self._client.get("/health", timeout=aiohttp.ClientTimeout(total=10.0)) as answer:
                status, content_type, raw = answer.status, answer.headers.get("content-type"), await answer.read()
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            raise KatoUnavailable(
                f"cannot reach KATO at {self.url} ({type(error).__name__}: {error or 'no answer'}): start the server, "
                "or check its address (--kato http://host:port; a daemon job's kato_url)"
            ) from None
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        if status != 200 or not isinstance(body, dict) or "status" not in body:
            raise KatoUnavailable(
                f"{self.url} is not a KATO server (GET /health answered {status} "
                f"{content_type or 'without a content type'}): check the --kato address"
            )

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _call(self, method: str, path: str, body: Any = None, *, key: str | None = None) -> Any:
        """One request; failures are raised as what they mean for a resend (see :mod:`ingestd.errors`)."""
        self.requests += 1
        endpoint = _endpoint(method, path)
        content = None if body is None else orjson.dumps(body)
        headers = _JSON_HEADERS if key is None else {**_JSON_HEADERS, "idempotency-key": key}
        started = time.perf_counter()
        status: int | None = None
        try:
            async with self._client.request(method, path, data=content, headers=headers) as answer:
                raw = await answer.read()
                status = answer.status
                if key is not None and status == 200:
                    self.exactly_once = "idempotency-key" in answer.headers
        except aiohttp.ClientConnectorError as error:  # never connected: nothing was sent
            raise ServerDown(f"cannot connect ({error.os_error or error})") from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError) as error:
            raise Ambiguous(f"connection lost ({type(error).__name__})") from None
        except TimeoutError:
            raise Ambiguous(f"no answer within {self._timeout.total:g} s") from None
        finally:
            metrics.record_request(endpoint, status, time.perf_counter() - started)
        if status == 200:
            return orjson.loads(raw)
        if status in (502, 503, 504):
            raise ServerDown(f"{method} {path} answered {status}")
        text = raw[:500].decode("utf-8", "replace")
        if status == 404 and b"SESSION_NOT_FOUND" in raw[:200]:
            raise SessionLost(path.split("/")[2])
        if 400 <= status < 500:
            raise KatoRejected(status, text)
        raise Ambiguous(f"{method} {path} answered {status}: {text}")

    async def healthy(self) -> bool:
        """Whether ``GET /health`` answers 200 now."""
        try:
            async with self._client.get("/health", timeout=aiohttp.ClientTimeout(total=5.0)) as answer:
                await answer.read()
                return answer.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def create_session(self, node_id: str, config: dict[str, Any], *, key: str | None = None) -> str:
        body = await self._call("POST", "/sessions", {"node_id": node_id, "config": config}, key=key)
        session_id: str = body["session_id"]
        return session_id

    async def delete_session(self, session_id: str) -> None:
        await self._call("DELETE", f"/sessions/{session_id}")

    async def learn(self, session_id: str, chunks: Sequence[Sequence[str]], *, metadata: dict[str, Any] | None,
                    auto_learn: bool, key: str | None = None) -> list[str]:  # fmt: skip
        """One ``observe-sequence`` call. ``key`` goes out as ``Idempotency-Key`` (the embedded engine
        applies a resent call once; KATO ignores the header)."""
        path = f"/sessions/{session_id}/observe-sequence"
        if auto_learn:
            # Whole chunks back to back: KATO learns each as STM reaches chunk_size; learn_at_end
            # takes a shorter last chunk. A 1-symbol chunk is never sent, so no name is "".
            observations = [{"strings": [symbol]} for chunk in chunks for symbol in chunk]
            body = await self._call("POST", path, {"observations": observations, "learn_at_end": True}, key=key)
            return [name for name in body["auto_learned_patterns"] if name]
        if len(chunks) != 1:
            raise ValueError("a level without auto-learn is sent one chunk per call")
        body = await self._call("POST", path, {"observations": _observations(chunks[0], metadata), "learn_at_end": True},
                                key=key)  # fmt: skip
        return [body["final_learned_pattern"]]

    async def clear_stm(self, session_id: str) -> None:
        await self._call("POST", f"/sessions/{session_id}/clear-stm")

    async def clear_all(self, node_id: str) -> None:
        session_id = await self.create_session(node_id, {"process_predictions": False})
        await self._call("POST", f"/sessions/{session_id}/clear-all")
        await self.delete_session(session_id)

    async def get_pattern(self, node_id: str, name: str) -> dict[str, Any] | None:
        body = (await self._call("GET", f"/pattern/{name.replace('|', '%7C')}?node_id={quote(node_id)}"))["pattern"]
        return body["pattern"] if body["status"] == "okay" else None


class EmbeddedKato:
    """The embedded engine in this process, on a local directory (the default backend).

    Each operation is counted and timed like the HTTP call it stands for (same endpoint names and
    status classes in ``ingestd_kato_requests_total``), and the engine's errors become what a KATO
    server's answers would: a lost session is :class:`SessionLost` (404), a refusal :class:`KatoRejected`.
    """

    def __init__(self, settings: EngineSettings) -> None:
        self.engine = Engine(settings)
        self.description = f"embedded engine on {Path(settings.data_dir).resolve()}"
        self.requests = 0
        self.exactly_once = True

    async def start(self) -> None:
        try:
            await self.engine.start()
        except OSError as error:
            raise KatoUnavailable(
                f"the embedded engine cannot use {self.engine.settings.data_dir} ({error}): give a writable --data "
                "directory"
            ) from None

    async def aclose(self) -> None:
        await self.engine.aclose()

    async def _call(self, endpoint: str, operation: Awaitable[T]) -> T:
        self.requests += 1
        started = time.perf_counter()
        status: int | None = None
        try:
            result = await operation
            status = 200
            return result
        except SessionNotFound as lost:
            status = 404
            raise SessionLost(lost.session_id) from None
        except KatoError as error:
            status = error.status
            if 400 <= error.status < 500:
                raise KatoRejected(error.status, str(error.detail)) from None
            raise
        finally:
            metrics.record_request(endpoint, status, time.perf_counter() - started)

    async def create_session(self, node_id: str, config: dict[str, Any], *, key: str | None = None) -> str:
        body = await self._call("create-session", self.engine.create_session(node_id, config, idempotency_key=key))
        session_id: str = body["session_id"]
        return session_id

    async def delete_session(self, session_id: str) -> None:
        await self._call("delete-session", self.engine.delete_session(session_id))

    async def learn(self, session_id: str, chunks: Sequence[Sequence[str]], *, metadata: dict[str, Any] | None,
                    auto_learn: bool, key: str | None = None) -> list[str]:  # fmt: skip
        return await self._call("observe-sequence",
                                self.engine.learn_chunks(session_id, chunks, metadata, idempotency_key=key))  # fmt: skip

    async def healthy(self) -> bool:
        return True

    async def clear_stm(self, session_id: str) -> None:
        await self._call("clear-stm", self.engine.clear_stm(session_id))

    async def clear_all(self, node_id: str) -> None:
        session_id = await self.create_session(node_id, {"process_predictions": False})
        await self._call("clear-all", self.engine.clear_all(session_id))
        await self.delete_session(session_id)

    async def get_pattern(self, node_id: str, name: str) -> dict[str, Any] | None:
        body = (await self._call("pattern", self.engine.get_pattern(name, node_id)))["pattern"]
        return body["pattern"] if body["status"] == "okay" else None
