"""Shared fixtures: real engine servers in real subprocesses, and the shared reference data."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, settings

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
GOLDEN = SHARED / "kato-golden"
CORPUS = SHARED / "corpus" / "tinyshakespeare.txt"



def paragraphs(path: Path, count: int) -> Path:
    """``path``, written with the first ``count`` paragraphs of tinyshakespeare (one sample each)."""
    path.write_text("\n\n".join(CORPUS.read_text(encoding="utf-8").split("\n\n")[:count]), encoding="utf-8")
    return path


# Hypothesis on a loaded machine: no per-example deadline and no "input generation is slow" check (both are
# wall-clock limits, which a busy CI runner breaks without any bug).
settings.register_profile("ingestd", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ingestd")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def closed_by_the_server(port: int, partial_request: bytes, count: int, within: float = 30) -> int:
    """Opens ``count`` connections that each send ``partial_request`` and no more; how many of them the server
    on ``port`` closes within ``within`` seconds."""
    stalled = []
    for _ in range(count):
        connection = socket.create_connection(("127.0.0.1", port))
        connection.sendall(partial_request)
        stalled.append(connection)
    deadline = time.monotonic() + within
    closed = 0
    for connection in stalled:
        connection.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            closed += connection.recv(100) == b""
        except (TimeoutError, OSError):
            pass
        connection.close()
    return closed


@dataclass
class EngineServer:
    """``ingestd kato serve`` running in a subprocess on loopback.

    With ``port`` 0 the server binds a port the system chooses (read from the line it prints once bound),
    and restarts keep it. Nothing is taken for started before this process says it is listening, so a
    port that another process holds cannot pass for this server.
    """

    data_dir: Path
    port: int = 0
    extra_args: tuple[str, ...] = ()
    process: subprocess.Popen[str] | None = None
    output: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> EngineServer:
        command = [sys.executable, "-m", "ingestd", "kato", "serve", "--port", str(self.port),
                   "--data", str(self.data_dir), *self.extra_args]  # fmt: skip
        process = self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        listening = threading.Event()
        lines = self.output = []

        def drain() -> None:  # also keeps a chatty server from blocking on a full pipe
            assert process.stderr is not None
            for line in process.stderr:
                lines.append(line)
                if not listening.is_set() and (found := re.search(r"API on http://[^ ]+:(\d+) ", line)):
                    self.port = int(found.group(1))
                    listening.set()

        threading.Thread(target=drain, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not listening.wait(0.02):
            if process.poll() is not None or time.monotonic() > deadline:
                time.sleep(0.2)  # the rest of its output
                raise RuntimeError(f"engine server did not start (exit code {process.poll()}): {''.join(lines)[-3000:]}")
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"engine server exited: {''.join(lines)[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.05)
        raise TimeoutError(f"engine server on port {self.port} did not become healthy")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """kill -9: no chance to flush or close anything."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()


@pytest.fixture(scope="session")
def engine_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineServer]:
    """One engine server shared by the tests that only need 'a KATO'."""
    server = EngineServer(tmp_path_factory.mktemp("kato-data")).start()
    yield server
    server.stop()


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[EngineServer]:
    """A server of the test's own, on an empty data directory."""
    server = EngineServer(tmp_path / "kato-data").start()
    yield server
    server.stop()


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
