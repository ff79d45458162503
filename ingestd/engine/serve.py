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
    listening = config.bind_socket()
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
        _supervise(settings, listening)
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


def _serve_one(settings: ServerSettings, listening: socket.socket, parent: int | None = None) -> None:
    """One server process on the listening socket (the only one, or one of ``--workers``, whose ``parent`` is the
    supervisor: when it is gone, even by kill -9, this one stops too)."""
    if parent is not None:
        threading.Thread(target=_orphaned, args=(parent,), name="kato-parent-watch", daemon=True).start()
    config = _config(settings, create_app(settings, max_body_bytes=settings.max_body_bytes))
    with throughput_gc():
        uvicorn.Server(config).run(sockets=[listening])


def _supervise(settings: ServerSettings, listening: socket.socket) -> None:
    """``--workers`` processes accepting connections on one socket (each connection stays with the process that
    accepted it, as with uvicorn's workers); one that dies is started again; SIGINT or SIGTERM stops them all."""
    context = multiprocessing.get_context("spawn")
    stopping = threading.Event()
    failures = [0] * settings.workers  # quick deaths in a row, per worker: restarts back off

    def start() -> multiprocessing.process.BaseProcess:
        process = context.Process(target=_serve_one, args=(settings, listening, os.getpid()), daemon=False)
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
