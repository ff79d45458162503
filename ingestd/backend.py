"""KATO backends: any KATO-compatible server over HTTP, or the embedded engine in-process.

Both offer the same few operations the workers need. How a batch of chunks is
said in KATO's API is the backend's business:

* over HTTP, a batch of whole chunks on an auto-learn session
  (``max_pattern_length = chunk_size``, ``stm_mode = CLEAR``) is **one**
  ``observe-sequence`` with ``learn_at_end`` (for a shorter last chunk); on a
  plain session (levels with metadata) it is one ``observe-sequence`` per chunk,
  metadata on its first observation. Only KATO 3.10.1's public API is used.
* in-process, the engine's ``learn_chunks`` does the same in one transaction.

Every learn carries its place in the run (:class:`~ingestd.engine.Place`); a backend that keeps the run
ledger (the embedded engine, in-process or served) applies each chunk of a run once, whatever is resent
(see :mod:`ingestd.engine.ledger`). ``ledger`` says whether this one does.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import quote, urlsplit

import aiohttp
import anyio
import orjson

from ingestd import metrics
from ingestd.adaptive import AdaptiveLimit
from ingestd.engine import Engine, EngineSettings, Feeder, KatoError, Learned, Place, SessionNotFound
from ingestd.engine.ledger import HEADER as LEDGER_HEADER
from ingestd.engine.load import SampleLoad
from ingestd.engine.store import StoreBusy
from ingestd.errors import (
    Ambiguous,
    KatoRejected,
    KatoUnavailable,
    Overloaded,
    ServerDown,
    SessionLost,
    StoreUnusable,
    ledger_out_of_step,
)
from ingestd.nodes import NodeRegistry

T = TypeVar("T")


class KatoBackend(Protocol):
    """What a pipeline worker needs from KATO."""

    requests: int
    description: str
    ledger: bool  # keeps the run ledger: a chunk of a run is stored once, whatever is resent (known after start)
    loads: bool  # stores many samples of a run at once (``load``; known after start): ingestd's engine
    store: str  # which knowledge store this is (after start): an engine's store id, or a KATO server's address

    async def start(self) -> None: ...
    async def aclose(self) -> None: ...
    async def create_session(self, node_id: str, config: dict[str, Any], *, key: str | None = None) -> str: ...
    async def delete_session(self, session_id: str) -> None: ...
    async def learn(self, session_id: str, chunks: Sequence[Sequence[str]], *, metadata: dict[str, Any] | None,
                    auto_learn: bool, place: Place | None = None) -> Learned: ...  # fmt: skip
    async def load(self, run_key: str, samples: Sequence[SampleLoad]) -> list[list[int]]:
        """Per sample and level, the chunks the run ledger held before; stores the rest (``loads`` backends only)."""
    async def healthy(self) -> bool: ...
    async def clear_stm(self, session_id: str) -> None: ...
    async def clear_all(self, node_id: str) -> None: ...
    async def get_pattern(self, node_id: str, name: str) -> dict[str, Any] | None: ...
    async def ledger_status(self, run_key: str, node_ids: Sequence[str], samples: Sequence[int] = ()) -> dict[str, Any]:
        """``{"totals": {node_id: chunks}, "samples": {sample_index: {node_id: chunks}}}``: what the run stored."""
    async def ledger_forget(self, run_key: str, *, samples: Sequence[int] | None = None, keep: Sequence[int] = (),
                            everything: bool = False) -> None: ...  # fmt: skip
    async def claim_nodes(self, claims: Sequence[tuple[str, Feeder]], *, allow_mixed: bool) -> dict[str, list[Feeder]]: ...
    async def pattern_counts(self, node_ids: Sequence[str]) -> dict[str, int] | None:
        """Per node id, the distinct patterns stored; None where the server cannot say (KATO has no such call)."""


_LEDGER_BATCH = 5000


def _observations(chunk: Sequence[str], metadata: dict[str, Any] | None) -> list[dict[str, Any]]:
    observations: list[dict[str, Any]] = [{"strings": [symbol]} for symbol in chunk]
    if metadata:
        observations[0]["metadata"] = metadata
    return observations


_JSON_HEADERS = {"content-type": "application/json"}
# observe-sequence answers end with these fields, after one result per observation (KATO §3.7): a 300-token
# call's answer is 50 KB, of which a client needs the last few hundred bytes.
_SEQUENCE_TAIL = b',"auto_learned_patterns":'


def _sequence_answer(raw: bytes) -> Any:
    """The fields after ``results`` of an observe-sequence answer, parsed alone; the whole answer if it is not
    laid out as KATO lays it (compact JSON, ``results`` before them). In compact JSON that key and its comma
    cannot occur inside a string (a quote there is escaped), and the results hold no such key."""
    start = raw.rfind(_SEQUENCE_TAIL)
    if start != -1:
        try:
            tail = orjson.loads(b"{" + raw[start + 1 :])
        except orjson.JSONDecodeError:
            tail = None
        if isinstance(tail, dict) and "final_learned_pattern" in tail:
            return tail
    return orjson.loads(raw)


def _answer_text(raw: bytes) -> str:
    """An error answer, short and without what was sent: FastAPI's 422 details echo their input (sample text),
    which must not reach logs, dead letters or a job's error."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw[:300].decode("utf-8", "replace")
    if isinstance(body, dict) and isinstance(body.get("detail"), list):
        body["detail"] = [{key: value for key, value in item.items() if key not in ("input", "ctx", "url")}
                          if isinstance(item, dict) else item for item in body["detail"][:5]]  # fmt: skip
    return orjson.dumps(body).decode()[:500]


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


def check_kato_urls(text: str) -> list[str]:
    """``--kato-url`` as a run takes it: one server, or several of one deployment separated by commas; each checked
    as :func:`check_kato_url`, each once, in the order given. Raises ``ValueError`` naming what is wrong."""
    urls = list(dict.fromkeys(check_kato_url(part.strip()) for part in text.split(",") if part.strip()))
    if not urls:
        raise ValueError(f"{text!r}: give a KATO server, http://host:port (or several, separated by commas)")
    return urls


def _endpoint(method: str, path: str) -> str:
    """A low-cardinality name for a KATO call: the route, without ids."""
    parts = path.split("?")[0].strip("/").split("/")
    if parts[0] == "sessions":
        if len(parts) >= 3:
            return parts[2]  # observe-sequence, clear-stm, clear-all, ...
        return "create-session" if len(parts) == 1 else f"{method.lower()}-session"
    return parts[0] or "root"


ROTATE_EVERY = 16
"""After one request in this many, its connection is closed (by the client, once the answer is read) rather than kept:
a server with several worker processes keeps each connection with the process that accepted it, so connections made
once would load them unevenly for the whole run; re-made ones are accepted anew by whichever process is free (a new
loopback connection costs far less than the 16 requests it carries)."""


class HttpKato:
    """A KATO server (real, or ``ingestd kato serve``) over HTTP.

    One aiohttp connection pool sized to the pipeline's concurrency (one
    request in flight per session), with requests in flight adapted to what the
    server takes (:mod:`ingestd.adaptive`; a 503 is back-pressure). A connection
    stays with the server process that accepted it, so after one request in
    :data:`ROTATE_EVERY` the client closes its connection: connections are
    re-made and spread over a multi-process server's workers. Idle connections
    are dropped after 4 s, before uvicorn's 5 s keep-alive timeout closes them.

    Why aiohttp and not httpx here: this is the pipeline's hot path, and on
    these 2-core machines the client's CPU per request decides throughput.
    Measured against the engine server (sequential observe-sequence calls):
    httpx 0.58 ms of client CPU per request, httpcore alone 0.42, aiohttp 0.19.
    """

    def __init__(self, url: str, *, connections: int = 32, timeout: float = 120.0,
                 registry: NodeRegistry | None = None) -> None:  # fmt: skip
        self.url = url.rstrip("/")
        self.description = f"KATO at {self.url}"
        self.requests = 0
        self.extensions = False  # the server is ingestd's engine (GET /ingestd): run ledger, feeders
        self.ledger = False  # ... and honours the ledger header (its answers echo it)
        self.loads = False  # ... and loads samples in bulk (POST /ingestd/load)
        self.store = self.url
        self.registry = registry  # what fed the nodes of a server without extensions
        self._connections = max(1, connections)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._http: aiohttp.ClientSession | None = None
        self.limit = AdaptiveLimit(self._connections)  # requests in flight: adapted to what the server takes
        self._sent = 0

    @property
    def _client(self) -> aiohttp.ClientSession:
        if self._http is None:
            connector = aiohttp.TCPConnector(limit=self._connections, keepalive_timeout=4.0)
            self._http = aiohttp.ClientSession(self.url, connector=connector, timeout=self._timeout,
                                               json_serialize=lambda body: orjson.dumps(body).decode())  # fmt: skip
        return self._http

    async def _get(self, path: str) -> tuple[int, str | None, bytes]:
        """``GET path`` (status, content type, body), resent for up to a minute while the server answers 503: a
        server at its concurrency limit is busy, not absent."""
        delay, deadline = 0.1, time.monotonic() + 60.0
        while True:
            async with self._client.get(path, timeout=aiohttp.ClientTimeout(total=10.0)) as answer:
                status, content_type, raw = answer.status, answer.headers.get("content-type"), await answer.read()
            if status != 503 or time.monotonic() > deadline:
                return status, content_type, raw
            await anyio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def start(self) -> None:
        try:
            status, content_type, raw = await self._get("/health")
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            raise KatoUnavailable(
                f"cannot reach KATO at {self.url} ({type(error).__name__}: {error or 'no answer'}): start the server, "
                "or check its address (--kato-url http://host:port; a daemon job's kato_url)"
            ) from None
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        if status != 200 or not isinstance(body, dict) or "status" not in body:
            raise KatoUnavailable(
                f"{self.url} is not a KATO server (GET /health answered {status} "
                f"{content_type or 'without a content type'}): check the --kato-url address"
            )
        engine = await self._engine()
        self.extensions = self.ledger = engine is not None
        if engine is not None:
            self.store = str(engine.get("store_id") or self.url)
            self.loads = engine["extensions"].get("load") == 1

    async def _engine(self) -> dict[str, Any] | None:
        """What ``GET /ingestd`` says if the server is ingestd's engine (KATO answers 404), else None."""
        try:
            status, _, raw = await self._get("/ingestd")
        except (aiohttp.ClientError, TimeoutError):
            return None
        try:
            body = orjson.loads(raw) if status == 200 else None
        except orjson.JSONDecodeError:
            return None
        if isinstance(body, dict) and isinstance(body.get("extensions"), dict) and body["extensions"].get("ledger") == 2:
            return body
        return None

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _call(self, method: str, path: str, body: Any = None, *, key: str | None = None,
                    place: Place | None = None, endpoint: str | None = None,
                    parse: Callable[[bytes], Any] = orjson.loads) -> Any:  # fmt: skip
        """One request; failures are raised as what they mean for a resend (see :mod:`ingestd.errors`)."""
        self.requests += 1
        endpoint = endpoint or _endpoint(method, path)
        content = None if body is None else orjson.dumps(body)
        headers = _JSON_HEADERS
        self._sent += 1
        rotate = bool(ROTATE_EVERY) and self._sent % ROTATE_EVERY == 0
        if key is not None or place is not None:
            headers = {**headers, **({"idempotency-key": key} if key is not None else {}),
                       **({LEDGER_HEADER: place.header()} if place is not None else {})}  # fmt: skip
        status: int | None = None
        async with self.limit.slot() as epoch:
            started = time.perf_counter()
            try:
                async with self._client.request(method, path, data=content, headers=headers) as answer:
                    raw = await answer.read()
                    status = answer.status
                    if rotate:  # this connection, read to its end, is closed rather than kept: the next is new
                        answer.close()
                    if place is not None and status == 200 and LEDGER_HEADER not in answer.headers:
                        self.ledger = False  # not honoured here (say, a proxy dropped the header): resends may duplicate
            except aiohttp.ClientConnectorError as error:  # never connected: nothing was sent
                raise ServerDown(f"cannot connect ({error.os_error or error})") from None
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError) as error:
                raise Ambiguous(f"connection lost ({type(error).__name__})") from None
            except TimeoutError:
                raise Ambiguous(f"no answer within {self._timeout.total:g} s") from None
            finally:
                metrics.record_request(endpoint, status, time.perf_counter() - started)
        if status == 503:  # at its concurrency limit (or unavailable): fewer at once, then resend
            self.limit.refused(epoch)
            raise Overloaded(f"{method} {path} answered 503")
        self.limit.answered()
        if status == 200:
            return parse(raw)
        if status in (502, 504):
            raise ServerDown(f"{method} {path} answered {status}")
        text = _answer_text(raw)
        if status == 404 and b"SESSION_NOT_FOUND" in raw[:200]:
            raise SessionLost(path.split("/")[2])
        if status == 409 and b"LEDGER_CONFLICT" in raw[:200]:
            try:
                conflict = ledger_out_of_step(orjson.loads(raw).get("detail"))
            except (orjson.JSONDecodeError, AttributeError):
                conflict = None
            if conflict is not None:
                raise conflict
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
                    auto_learn: bool, place: Place | None = None) -> Learned:  # fmt: skip
        """One ``observe-sequence`` call. ``place`` goes out in the ``ingestd-ledger`` header (the embedded
        engine stores a chunk of a run once; KATO ignores the header)."""
        path = f"/sessions/{session_id}/observe-sequence"
        if auto_learn:
            # Whole chunks back to back: KATO learns each as STM reaches chunk_size; learn_at_end
            # takes a shorter last chunk. A 1-symbol chunk is never sent, so no name is "".
            observations = [{"strings": [symbol]} for chunk in chunks for symbol in chunk]
            body = await self._call("POST", path, {"observations": observations, "learn_at_end": True}, place=place,
                                    parse=_sequence_answer)  # fmt: skip
            return Learned([name for name in body["auto_learned_patterns"] if name], body.get("idempotent_replay") is True)
        if len(chunks) != 1:
            raise ValueError("a level without auto-learn is sent one chunk per call")
        body = await self._call("POST", path, {"observations": _observations(chunks[0], metadata), "learn_at_end": True},
                                place=place, parse=_sequence_answer)  # fmt: skip
        return Learned([body["final_learned_pattern"]], body.get("idempotent_replay") is True)

    async def clear_stm(self, session_id: str) -> None:
        await self._call("POST", f"/sessions/{session_id}/clear-stm")

    async def clear_all(self, node_id: str) -> None:
        session_id = await self.create_session(node_id, {"process_predictions": False})
        await self._call("POST", f"/sessions/{session_id}/clear-all")
        await self.delete_session(session_id)
        if not self.extensions and self.registry is not None:
            await anyio.to_thread.run_sync(self.registry.forget, self.url, node_id)

    async def get_pattern(self, node_id: str, name: str) -> dict[str, Any] | None:
        body = (await self._call("GET", f"/pattern/{name.replace('|', '%7C')}?node_id={quote(node_id)}"))["pattern"]
        return body["pattern"] if body["status"] == "okay" else None

    # -- ingestd's extensions, when the server has them ----------------------------------------------------
    async def load(self, run_key: str, samples: Sequence[SampleLoad]) -> list[list[int]]:
        """Many samples of a run stored in one transaction on the server (``loads`` servers only); a resend stores
        nothing twice (the run ledger decides what is new)."""
        body = {"samples": [{"index": sample.index,
                             "levels": [{"node_id": level.node_id, "chunks": level.chunks, "names": level.names,
                                         "metadata": level.metadata or None, "first": level.first}
                                        for level in sample.levels]}
                            for sample in samples]}  # fmt: skip
        held: list[list[int]] = (await self._call("POST", f"/ingestd/load/{run_key}", body, endpoint="load"))["held"]
        return held

    async def ledger_status(self, run_key: str, node_ids: Sequence[str], samples: Sequence[int] = ()) -> dict[str, Any]:
        found: dict[str, Any] = {"totals": {}, "samples": {}}
        for start in range(0, max(1, len(samples)), _LEDGER_BATCH):
            body = await self._call("POST", f"/ingestd/ledger/{run_key}",
                                    {"node_ids": list(node_ids), "samples": list(samples[start : start + _LEDGER_BATCH])},
                                    endpoint="ledger-status")  # fmt: skip
            found["totals"] = body["totals"]
            found["samples"].update({int(sample): stored for sample, stored in body["samples"].items()})
        return found

    async def ledger_forget(self, run_key: str, *, samples: Sequence[int] | None = None, keep: Sequence[int] = (),
                            everything: bool = False) -> None:  # fmt: skip
        if self.extensions:
            await self._call("POST", f"/ingestd/ledger/{run_key}/forget",
                             {"samples": None if samples is None else list(samples), "keep": list(keep),
                              "everything": everything}, endpoint="ledger-forget")  # fmt: skip

    async def claim_nodes(self, claims: Sequence[tuple[str, Feeder]], *, allow_mixed: bool) -> dict[str, list[Feeder]]:
        if not self.extensions:
            if self.registry is None:
                return {}
            registry = self.registry  # SQLite, which may wait for a lock: off the event loop
            return await anyio.to_thread.run_sync(lambda: registry.claim(self.url, claims, allow_mixed=allow_mixed))
        body = await self._call("POST", "/ingestd/nodes/claim", {
            "claims": [{"node_id": node_id, **feeder.as_dict()} for node_id, feeder in claims],
            "allow_mixed": allow_mixed}, endpoint="claim-nodes")  # fmt: skip
        return {node_id: [Feeder(**other) for other in others] for node_id, others in body["conflicts"].items()}

    async def pattern_counts(self, node_ids: Sequence[str]) -> dict[str, int] | None:
        if not self.extensions:
            return None
        body = await self._call("POST", "/ingestd/nodes/counts", {"node_ids": list(node_ids)}, endpoint="node-counts")
        return {node_id: int(count) for node_id, count in body["patterns"].items()}


class ReplicatedKato:
    """Several servers of one KATO deployment (replicas over one storage, behind no load balancer), used together:
    each session is created on the next server in turn and all its calls go to that server (a server may not know
    another's sessions); reads and the run ledger go to the first. They must be one deployment: ingestd's engine
    servers say which store they serve, and different stores are refused."""

    def __init__(self, servers: Sequence[HttpKato]) -> None:
        self.servers = list(servers)
        self.description = "KATO at " + ", ".join(server.url for server in self.servers)
        self._owner: dict[str, HttpKato] = {}
        self._turn = 0

    @property
    def requests(self) -> int:
        return sum(server.requests for server in self.servers)

    @property
    def store(self) -> str:
        return self.servers[0].store

    @property
    def ledger(self) -> bool:
        return all(server.ledger for server in self.servers)

    @property
    def extensions(self) -> bool:
        return all(server.extensions for server in self.servers)

    @property
    def loads(self) -> bool:
        return all(server.loads for server in self.servers)

    @property
    def registry(self) -> NodeRegistry | None:
        return self.servers[0].registry

    async def start(self) -> None:
        for server in self.servers:
            await server.start()
        stores = {server.store for server in self.servers if server.extensions}
        if len(stores) > 1 or (stores and not self.extensions):
            raise KatoUnavailable(f"{self.description} are not one deployment (they serve different knowledge stores): "
                                  "give the servers of one deployment to --kato-url, or one server")  # fmt: skip

    async def aclose(self) -> None:
        for server in self.servers:
            await server.aclose()

    def _of(self, session_id: str) -> HttpKato:
        return self._owner.get(session_id, self.servers[0])

    async def create_session(self, node_id: str, config: dict[str, Any], *, key: str | None = None) -> str:
        server = self.servers[self._turn % len(self.servers)]
        self._turn += 1
        session_id = await server.create_session(node_id, config, key=key)
        self._owner[session_id] = server
        return session_id

    async def delete_session(self, session_id: str) -> None:
        await self._of(session_id).delete_session(session_id)
        self._owner.pop(session_id, None)

    async def learn(self, session_id: str, chunks: Sequence[Sequence[str]], *, metadata: dict[str, Any] | None,
                    auto_learn: bool, place: Place | None = None) -> Learned:  # fmt: skip
        return await self._of(session_id).learn(session_id, chunks, metadata=metadata, auto_learn=auto_learn, place=place)

    async def clear_stm(self, session_id: str) -> None:
        await self._of(session_id).clear_stm(session_id)

    async def load(self, run_key: str, samples: Sequence[SampleLoad]) -> list[list[int]]:
        server = self.servers[self._turn % len(self.servers)]  # loads take turns, as sessions do
        self._turn += 1
        return await server.load(run_key, samples)

    async def healthy(self) -> bool:
        return all([await server.healthy() for server in self.servers])

    async def clear_all(self, node_id: str) -> None:
        await self.servers[0].clear_all(node_id)

    async def get_pattern(self, node_id: str, name: str) -> dict[str, Any] | None:
        return await self.servers[0].get_pattern(node_id, name)

    async def ledger_status(self, run_key: str, node_ids: Sequence[str], samples: Sequence[int] = ()) -> dict[str, Any]:
        return await self.servers[0].ledger_status(run_key, node_ids, samples)

    async def ledger_forget(self, run_key: str, *, samples: Sequence[int] | None = None, keep: Sequence[int] = (),
                            everything: bool = False) -> None:  # fmt: skip
        await self.servers[0].ledger_forget(run_key, samples=samples, keep=keep, everything=everything)

    async def claim_nodes(self, claims: Sequence[tuple[str, Feeder]], *, allow_mixed: bool) -> dict[str, list[Feeder]]:
        return await self.servers[0].claim_nodes(claims, allow_mixed=allow_mixed)

    async def pattern_counts(self, node_ids: Sequence[str]) -> dict[str, int] | None:
        return await self.servers[0].pattern_counts(node_ids)


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
        self.ledger = True
        self.loads = True
        self.store = ""

    async def start(self) -> None:
        store = Path(self.engine.settings.data_dir) / "kato.sqlite3"
        try:
            await self.engine.start()
        except StoreBusy as error:
            raise StoreUnusable(f"the embedded engine cannot open its store now: {error}") from None
        except OSError as error:
            raise StoreUnusable(
                f"the embedded engine cannot use {self.engine.settings.data_dir} ({error}): give a writable --data-dir "
                "directory"
            ) from None
        except sqlite3.Error as error:
            if "locked" in str(error):
                hint = "another process holds it (a stopped or paused `ingestd kato serve` on it?): let it go on, or stop it"
            elif store.is_dir():
                hint = "it is a directory: move it away, or give another --data-dir"
            else:
                hint = "it is damaged or not a knowledge store: give another --data-dir, or move it away to start an empty one"
            raise StoreUnusable(f"the embedded engine cannot open {store} ({error}): {hint}") from None
        self.store = self.engine.store_id

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
            conflict = ledger_out_of_step(error.detail) if error.status == 409 else None
            if conflict is not None:
                raise conflict from None
            if 400 <= error.status < 500:
                raise KatoRejected(error.status, str(error.detail)) from None
            raise
        except sqlite3.Error as error:  # the store cannot write (disk full, file size limit, I/O): the run stops
            status = 500
            store = Path(self.engine.settings.data_dir) / "kato.sqlite3"
            raise StoreUnusable(
                f"the embedded engine cannot write {store} ({error}): free space there (or lift the file size "
                "limit), then run the same command again; nothing unstored is recorded as done"
            ) from None
        finally:
            metrics.record_request(endpoint, status, time.perf_counter() - started)

    async def create_session(self, node_id: str, config: dict[str, Any], *, key: str | None = None) -> str:
        body = await self._call("create-session", self.engine.create_session(node_id, config, idempotency_key=key))
        session_id: str = body["session_id"]
        return session_id

    async def delete_session(self, session_id: str) -> None:
        await self._call("delete-session", self.engine.delete_session(session_id))

    async def learn(self, session_id: str, chunks: Sequence[Sequence[str]], *, metadata: dict[str, Any] | None,
                    auto_learn: bool, place: Place | None = None) -> Learned:  # fmt: skip
        return await self._call("observe-sequence", self.engine.learn_chunks(session_id, chunks, metadata, place=place))

    async def load(self, run_key: str, samples: Sequence[SampleLoad]) -> list[list[int]]:
        """Store many samples of a run in one transaction (the engine's bulk loading; see :mod:`ingestd.loader`)."""
        return await self._call("load", self.engine.load(run_key, samples))

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

    async def ledger_status(self, run_key: str, node_ids: Sequence[str], samples: Sequence[int] = ()) -> dict[str, Any]:
        return await self._call("ledger-status", self.engine.ledger_status(run_key, node_ids, samples))

    async def ledger_forget(self, run_key: str, *, samples: Sequence[int] | None = None, keep: Sequence[int] = (),
                            everything: bool = False) -> None:  # fmt: skip
        await self._call("ledger-forget", self.engine.ledger_forget(run_key, samples=samples, keep=keep,
                                                                    everything=everything))  # fmt: skip

    async def claim_nodes(self, claims: Sequence[tuple[str, Feeder]], *, allow_mixed: bool) -> dict[str, list[Feeder]]:
        return await self._call("claim-nodes", self.engine.claim_nodes(claims, allow_mixed=allow_mixed))

    async def pattern_counts(self, node_ids: Sequence[str]) -> dict[str, int] | None:
        return self.engine.pattern_counts(node_ids)
