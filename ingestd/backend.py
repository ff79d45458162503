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

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import httpx
import orjson

from ingestd.engine import Engine, EngineSettings
from ingestd.errors import KatoRejected, KatoUnavailable


class KatoBackend(Protocol):
    """What a pipeline worker needs from KATO."""

    requests: int
    description: str

    async def start(self) -> None: ...
    async def aclose(self) -> None: ...
    async def create_session(self, node_id: str, config: dict[str, Any]) -> str: ...
    async def delete_session(self, session_id: str) -> None: ...
    async def learn(self, session_id: str, chunks: Sequence[Sequence[str]], *, metadata: dict[str, Any] | None,
                    auto_learn: bool) -> list[str]: ...  # fmt: skip
    async def clear_stm(self, session_id: str) -> None: ...
    async def clear_all(self, node_id: str) -> None: ...
    async def get_pattern(self, node_id: str, name: str) -> dict[str, Any] | None: ...


def _observations(chunk: Sequence[str], metadata: dict[str, Any] | None) -> list[dict[str, Any]]:
    observations: list[dict[str, Any]] = [{"strings": [symbol]} for symbol in chunk]
    if metadata:
        observations[0]["metadata"] = metadata
    return observations


class HttpKato:
    """A KATO server (real, or ``ingestd kato serve``) over HTTP.

    Each session gets a lane: a one-connection ``httpx.AsyncClient`` of its
    own, kept alive. A pipeline keeps one request in flight per session, so a
    lane never waits, and since uvicorn hands each connection to one of its
    workers, one connection per session spreads the load over all of them.
    (One shared pool of that size costs O(connections) per request in
    httpcore's pool bookkeeping, which made the client the bottleneck.)
    """

    def __init__(self, url: str, *, connections: int = 32, timeout: float = 120.0) -> None:
        self.url = url.rstrip("/")
        self.description = f"KATO at {self.url}"
        self.requests = 0
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        tls = httpx.create_ssl_context()  # loading CA certificates once, not once per lane
        self._lanes = [httpx.AsyncClient(base_url=self.url, timeout=timeout, limits=limits, verify=tls)
                       for _ in range(max(1, connections))]  # fmt: skip
        self._client = self._lanes[0]
        self._next_lane = 0
        self._session_lanes: dict[str, httpx.AsyncClient] = {}

    async def start(self) -> None:
        try:
            answer = await self._client.get("/health", timeout=10.0)
        except httpx.HTTPError as error:
            raise KatoUnavailable(
                f"cannot reach KATO at {self.url} ({type(error).__name__}: {error or 'no answer'}): start the server, "
                "or give its address with --kato http://host:port"
            ) from None
        try:
            body = answer.json()
        except ValueError:
            body = None
        if answer.status_code != 200 or not isinstance(body, dict) or "status" not in body:
            raise KatoUnavailable(
                f"{self.url} is not a KATO server (GET /health answered {answer.status_code} "
                f"{answer.headers.get('content-type', 'without a content type')}): check the --kato address"
            )

    async def aclose(self) -> None:
        for lane in self._lanes:
            await lane.aclose()

    async def _call(self, method: str, path: str, body: Any = None, *, session_id: str | None = None) -> Any:
        self.requests += 1
        content = None if body is None else orjson.dumps(body)
        headers = {"content-type": "application/json"} if content is not None else None
        lane = self._session_lanes.get(session_id, self._client) if session_id else self._client
        answer = await lane.request(method, path, content=content, headers=headers)
        if 400 <= answer.status_code < 500:
            raise KatoRejected(answer.status_code, answer.text[:500])
        answer.raise_for_status()
        return orjson.loads(answer.content)

    async def create_session(self, node_id: str, config: dict[str, Any]) -> str:
        body = await self._call("POST", "/sessions", {"node_id": node_id, "config": config})
        session_id: str = body["session_id"]
        self._session_lanes[session_id] = self._lanes[self._next_lane % len(self._lanes)]
        self._next_lane += 1
        return session_id

    async def delete_session(self, session_id: str) -> None:
        await self._call("DELETE", f"/sessions/{session_id}", session_id=session_id)
        self._session_lanes.pop(session_id, None)

    async def learn(self, session_id: str, chunks: Sequence[Sequence[str]], *, metadata: dict[str, Any] | None,
                    auto_learn: bool) -> list[str]:  # fmt: skip
        path = f"/sessions/{session_id}/observe-sequence"
        if auto_learn:
            # Whole chunks back to back: KATO learns each as STM reaches chunk_size; learn_at_end
            # takes a shorter last chunk. A 1-symbol chunk is never sent, so no name is "".
            observations = [{"strings": [symbol]} for chunk in chunks for symbol in chunk]
            body = await self._call("POST", path, {"observations": observations, "learn_at_end": True},
                                    session_id=session_id)  # fmt: skip
            return [name for name in body["auto_learned_patterns"] if name]
        names = []
        for chunk in chunks:
            body = await self._call("POST", path, {"observations": _observations(chunk, metadata), "learn_at_end": True},
                                    session_id=session_id)  # fmt: skip
            names.append(body["final_learned_pattern"])
        return names

    async def clear_stm(self, session_id: str) -> None:
        await self._call("POST", f"/sessions/{session_id}/clear-stm", session_id=session_id)

    async def clear_all(self, node_id: str) -> None:
        session_id = await self.create_session(node_id, {"process_predictions": False})
        await self._call("POST", f"/sessions/{session_id}/clear-all")
        await self.delete_session(session_id)

    async def get_pattern(self, node_id: str, name: str) -> dict[str, Any] | None:
        self.requests += 1
        answer = await self._client.get(f"/pattern/{name.replace('|', '%7C')}", params={"node_id": node_id})
        answer.raise_for_status()
        body = answer.json()["pattern"]
        return body["pattern"] if body["status"] == "okay" else None


class EmbeddedKato:
    """The embedded engine in this process, on a local directory (the default backend)."""

    def __init__(self, settings: EngineSettings) -> None:
        self.engine = Engine(settings)
        self.description = f"embedded engine on {Path(settings.data_dir).resolve()}"
        self.requests = 0

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

    async def create_session(self, node_id: str, config: dict[str, Any]) -> str:
        self.requests += 1
        return (await self.engine.create_session(node_id, config))["session_id"]

    async def delete_session(self, session_id: str) -> None:
        self.requests += 1
        await self.engine.delete_session(session_id)

    async def learn(self, session_id: str, chunks: Sequence[Sequence[str]], *, metadata: dict[str, Any] | None,
                    auto_learn: bool) -> list[str]:  # fmt: skip
        self.requests += 1
        return await self.engine.learn_chunks(session_id, chunks, metadata)

    async def clear_stm(self, session_id: str) -> None:
        self.requests += 1
        await self.engine.clear_stm(session_id)

    async def clear_all(self, node_id: str) -> None:
        session_id = await self.create_session(node_id, {"process_predictions": False})
        self.requests += 1
        await self.engine.clear_all(session_id)
        await self.delete_session(session_id)

    async def get_pattern(self, node_id: str, name: str) -> dict[str, Any] | None:
        self.requests += 1
        body = (await self.engine.get_pattern(name, node_id))["pattern"]
        return body["pattern"] if body["status"] == "okay" else None
