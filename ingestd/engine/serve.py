"""Run the engine's HTTP app under uvicorn (``ingestd kato serve``)."""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import signal
import socket
import sqlite3
import sys
import threading
import time
from typing import Any

import uvicorn

from ingestd.engine.http import create_app
from ingestd.engine.settings import ServerSettings
from ingestd.engine.store import KnowledgeStore
from ingestd.runtime import http_protocol, listen_problem, throughput_gc


def serve(settings: ServerSettings) -> None:
    store = KnowledgeStore(settings.data_dir)
    try:
        store.check()  # a damaged or locked store is one line here, not a traceback at startup
    except (OSError, sqlite3.Error) as error:
        print(f"ingestd kato: error: cannot open {store.path} ({error}): give another --data-dir, or move the file "
              "away (a locked one: stop the process that holds it)", file=sys.stderr, flush=True)  # fmt: skip
        sys.exit(2)
    problem = listen_problem(settings.host, settings.port)
    if problem is not None:
        print(f"ingestd kato: error: {problem}: give another --port or --host", file=sys.stderr, flush=True)
        sys.exit(2)
    if settings.workers > 1:  # several processes over one store: each reads sessions back when another wrote them
        settings = settings.model_copy(update={"shared_sessions": True})
    config = _config(settings, None)
    # One process: one socket. Several: each its own on the one port (SO_REUSEPORT), and the kernel gives each new
    # connection to one of them evenly; on one shared socket, whichever process is running when a connection comes
    # takes it, so on a busy machine the busiest process takes most. This one holds the port and accepts nothing.
    try:
        listening = config.bind_socket() if settings.workers == 1 else _port_socket(
            socket.AF_INET6 if ":" in settings.host else socket.AF_INET, settings.host, settings.port)  # fmt: skip
    except OSError as error:  # taken since it was checked
        print(f"ingestd kato: error: cannot listen on {settings.host}:{settings.port} ({error.strerror or error}): "
              "give another --port or --host", file=sys.stderr, flush=True)  # fmt: skip
        sys.exit(2)
    host, port = listening.getsockname()[:2]  # --port 0: the port the system chose
    shown = f"[{host}]" if ":" in host else host
    print(
        f"ingestd kato: KATO 3.10.1 API on http://{shown}:{port} "
        f"(data: {settings.data_dir.resolve()}, durability: {settings.durability}"
        + (f", {settings.workers} worker processes" if settings.workers > 1 else "") + ")",
        file=sys.stderr,
        flush=True,
    )
    if settings.workers > 1:
        _supervise(settings.model_copy(update={"port": port}), listening.family)
        return
    _serve_one(settings, listening)


def _config(settings: ServerSettings, app: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http=http_protocol(settings.header_timeout, settings.body_timeout),
        log_level="warning",
        access_log=False,
        timeout_keep_alive=5,  # as KATO's image
        limit_concurrency=settings.limit_concurrency,  # per process, as uvicorn's
    )


def _port_socket(family: socket.AddressFamily, host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` that other processes' sockets may bind too (SO_REUSEPORT)."""
    sock = socket.socket(family=family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _serve_one(settings: ServerSettings, listening: socket.socket | None, parent: int | None = None,
               family: socket.AddressFamily = socket.AF_INET) -> None:  # fmt: skip
    """One server process: the only one, on ``listening``; or one of ``--workers`` on a socket of its own on the
    port (``parent`` is the supervisor: when it is gone, even by kill -9, this one stops too)."""
    if parent is not None:
        threading.Thread(target=_orphaned, args=(parent,), name="kato-parent-watch", daemon=True).start()
    if listening is None:
        listening = _port_socket(family, settings.host, settings.port)
    standing_in = bool(settings.cpu_per_request_ms or settings.cpu_per_symbol_ms)  # for a KATO, which has no bulk loads
    app = create_app(settings, max_body_bytes=settings.max_body_bytes, bulk_loads=not standing_in)
    if standing_in:
        app = _with_kato_costs(app, settings.cpu_per_request_ms / 1000, settings.cpu_per_symbol_ms / 1000,
                               settings.max_body_bytes)
    config = _config(settings, app)
    with throughput_gc():
        uvicorn.Server(config).run(sockets=[listening])


def _with_kato_costs(app: Any, per_request: float, per_symbol: float, limit: int) -> Any:
    """``app`` behind a wrapper that first spends CPU as a real KATO would on the request (``--cpu-per-request-ms``,
    ``--cpu-per-symbol-ms``; a symbol is one ``"strings"`` list of the body), on the serving thread, as KATO's work
    holds its uvicorn worker."""

    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in ("/health", "/"):
            await app(scope, receive, send)
            return
        parts, more, size = [], True, 0
        while more and size <= limit:  # a body past the limit is the app's to refuse, unread here
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            more = message.get("more_body", False)
        body = b"".join(parts)
        until = time.thread_time() + per_request + per_symbol * body.count(b'"strings"')
        while time.thread_time() < until:
            pass
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": more}
            return await receive()  # type: ignore[no-any-return]

        await app(scope, replay, send)

    return wrapped


def _supervise(settings: ServerSettings, family: socket.AddressFamily) -> None:
    """``--workers`` processes, each accepting connections on a socket of its own on the one port (each connection
    stays with the process that accepted it, as with uvicorn's workers); one that dies is started again; SIGINT or
    SIGTERM stops them all."""
    context = multiprocessing.get_context("spawn")
    stopping = threading.Event()
    failures = [0] * settings.workers  # quick deaths in a row, per worker: restarts back off

    def start() -> multiprocessing.process.BaseProcess:
        process = context.Process(target=_serve_one, args=(settings, None, os.getpid(), family), daemon=False)
        process.start()
        return process

    def stop(*_: object) -> None:
        stopping.set()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    workers = [start() for _ in range(settings.workers)]
    started_at = [time.monotonic()] * settings.workers
    restart_at = [0.0] * settings.workers  # when a dead worker starts again (0: not dead)
    try:
        while not stopping.wait(0.5):
            for index, process in enumerate(workers):
                if process.is_alive() or stopping.is_set():
                    continue
                now = time.monotonic()
                if not restart_at[index]:  # found dead: again at once, or later if it keeps dying on start
                    quick = now - started_at[index] < 10
                    failures[index] = failures[index] + 1 if quick else 0
                    restart_at[index] = now + (min(30.0, 0.5 * 2 ** failures[index]) if failures[index] else 0.0)
                    if failures[index] == 3:
                        print(f"ingestd kato: a worker process keeps exiting (code {process.exitcode}); restarting it "
                              "with backoff", file=sys.stderr, flush=True)  # fmt: skip
                if now >= restart_at[index]:
                    workers[index] = start()
                    started_at[index], restart_at[index] = now, 0.0
    finally:
        for process in workers:
            if process.is_alive():
                process.terminate()  # SIGTERM: uvicorn's graceful shutdown
        for process in workers:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _orphaned(parent: int) -> None:
    """Stop this worker (gracefully, as SIGTERM does) once its supervisor has gone."""
    while os.getppid() == parent:
        time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGTERM)


class ServerProcess:
    """``ingestd kato serve`` in a child process on a free loopback port (demo, benchmarks)."""

    def __init__(self, data_dir: str, *extra_args: str) -> None:
        import socket
        import subprocess

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ingestd", "kato", "serve", "--port", str(self.port), "--data", data_dir, *extra_args],
            stderr=subprocess.DEVNULL,
        )

    def wait_healthy(self, timeout: float = 30.0) -> ServerProcess:
        import time

        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the engine server exited with code {self.process.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.05)
        raise TimeoutError(f"the engine server on {self.url} did not become healthy in {timeout:g} s")

    def __enter__(self) -> ServerProcess:
        return self.wait_healthy()

    def __exit__(self, *exc_info: object) -> None:
        self.process.terminate()
        self.process.wait()
