"""Process-level tuning shared by the long-running entry points (``ingestd run``, ``ingestd kato serve``).

* uvloop, where installed, for the event loop.
* The garbage collector: a training run allocates millions of short-lived
  containers (JSON bodies, observations, results), and with CPython's default
  thresholds (700, 10, 10) the resulting collections keep rescanning every
  long-lived object of the loaded libraries. Freezing what exists after start
  and collecting young objects less often cut the engine server's CPU per
  sample by about 40% (measured with ``benchmarks/pipeline_bench.py``). A young generation of 500k
  instead of 50k objects bought in-process runs another ~10% (``benchmarks/limits_bench.py``): a load
  allocates hundreds of thousands of small objects, most freed by reference counting anyway.
  Reference cycles are still collected, just in larger batches.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
from collections.abc import Iterator
from typing import Any

THROUGHPUT_THRESHOLDS = (500_000, 20, 100)


def loop_options() -> dict[str, Any]:
    """``anyio.run`` keyword arguments: asyncio, on uvloop when it is installed."""
    if importlib.util.find_spec("uvloop") is not None:
        return {"backend": "asyncio", "backend_options": {"use_uvloop": True}}
    return {"backend": "asyncio"}


@contextlib.contextmanager
def throughput_gc() -> Iterator[None]:
    """Collector settings for a long, allocation-heavy run; the previous ones are restored after."""
    previous = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THROUGHPUT_THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*previous)
        gc.unfreeze()


def http_protocol(header_timeout: float, body_timeout: float) -> type[Any] | str:
    """uvicorn's httptools protocol, closing a connection whose request headers do not arrive in full within
    ``header_timeout`` seconds of its opening (or of a request's first byte), or whose request body does not
    arrive in full within ``body_timeout`` seconds of its headers. uvicorn alone keeps such a connection open
    for ever (its keep-alive timeout only runs between requests), so clients that send partial requests could
    pile up. Falls back to uvicorn's choice where httptools is not installed."""
    if importlib.util.find_spec("httptools") is None:
        return "auto"
    import asyncio

    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class ReadTimeoutProtocol(HttpToolsProtocol):  # type: ignore[misc]
        _read_timer: asyncio.TimerHandle | None = None

        def _arm(self, seconds: float) -> None:
            self._disarm()
            self._read_timer = self.loop.call_later(seconds, self._too_slow)

        def _disarm(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def _too_slow(self) -> None:
            self._read_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm(header_timeout)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._read_timer is None:
                self._arm(header_timeout)

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            self._arm(body_timeout)

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return ReadTimeoutProtocol


def listen_problem(host: str, port: int) -> str | None:
    """Why a server could not listen on ``host:port`` (taken, not an address of this machine), or None: checked
    before starting, so that this is one line and exit 2 instead of uvicorn's exit 3 after a "ready" line."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, protocol, _, address = infos[0]
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except OSError as error:
        return f"cannot listen on {host}:{port} ({error.strerror or error})"
    return None


def process_alive(host: Any, pid: Any) -> bool:
    """Whether process ``pid`` of machine ``host`` may still run: false only when it is this machine's and gone."""
    import os
    import socket

    if host != socket.gethostname():
        return True  # another machine's: it cannot be checked from here
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
