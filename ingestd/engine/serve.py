"""Run the engine's HTTP app under uvicorn (``ingestd kato serve``)."""

from __future__ import annotations

import importlib.util
import sqlite3
import sys

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
    app = create_app(settings, max_body_bytes=settings.max_body_bytes)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http=http_protocol(settings.header_timeout, settings.body_timeout),
        log_level="warning",
        access_log=False,
        timeout_keep_alive=5,  # as KATO's image
        limit_concurrency=settings.limit_concurrency,
    )
    server = uvicorn.Server(config)
    listening = config.bind_socket()
    host, port = listening.getsockname()[:2]  # --port 0: the port the system chose
    print(
        f"ingestd kato: KATO 3.10.1 API on http://{host}:{port} "
        f"(data: {settings.data_dir.resolve()}, durability: {settings.durability})",
        file=sys.stderr,
        flush=True,
    )
    with throughput_gc():
        server.run(sockets=[listening])


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
