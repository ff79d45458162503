"""A KATO deployment's storage for the tests: a real Redis (Debian's ``redis-server``, on loopback) and the real
ClickHouse SQL engine (chDB) behind ClickHouse's HTTP interface (``tests/clickhouse_http.py``), each a process
of its own, started on an empty directory."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .conftest import free_port
from .tools import _from_debian, _works

ROOT = Path(__file__).resolve().parents[1]


def redis_server() -> tuple[str, dict[str, str]]:
    """A redis-server that runs, and the environment to run it in (Debian's, unpacked into the tests' cache)."""
    env = dict(os.environ)
    found = shutil.which("redis-server")
    if _works(found):
        return str(found), env
    root = _from_debian("redis-server", with_dependencies=True)
    if root is not None:
        env["LD_LIBRARY_PATH"] = ":".join([str(root / "usr" / "lib" / "x86_64-linux-gnu"), env.get("LD_LIBRARY_PATH", "")])
        binary = root / "usr" / "bin" / "redis-server"
        if _works(str(binary), env):
            return str(binary), env
    pytest.fail("redis-server is not installed and could not be obtained: apt-get install redis-server", pytrace=False)


@dataclass
class Storage:
    """Redis and ClickHouse-over-HTTP, empty, with optional credentials."""

    directory: Path
    password: str | None = None
    clickhouse_user: str = "default"
    clickhouse_password: str = ""
    redis_port: int = 0
    clickhouse_port: int = 0
    processes: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def clickhouse_url(self) -> str:
        return f"http://127.0.0.1:{self.clickhouse_port}"

    def env(self) -> dict[str, str]:
        """The environment `ingestd publish` and `ingestd inspect` take the credentials from."""
        env = dict(os.environ)
        if self.password:
            env["INGESTD_REDIS_PASSWORD"] = self.password
        if self.clickhouse_password:
            env["INGESTD_CLICKHOUSE_USER"] = self.clickhouse_user
            env["INGESTD_CLICKHOUSE_PASSWORD"] = self.clickhouse_password
        return env

    def start(self) -> Storage:
        self.directory.mkdir(parents=True, exist_ok=True)
        binary, env = redis_server()
        self.redis_port = free_port()
        command = [binary, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                   "--dir", str(self.directory)]  # fmt: skip
        if self.password:
            command += ["--requirepass", self.password]
        self.processes.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                               text=True))  # fmt: skip
        clickhouse = subprocess.Popen([sys.executable, "-m", "tests.clickhouse_http", "--path", str(self.directory / "chdb"),
                                       "--user", self.clickhouse_user, "--password", self.clickhouse_password],
                                      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        self.processes.append(clickhouse)
        lines: list[str] = []
        bound = threading.Event()

        def read() -> None:
            assert clickhouse.stdout is not None
            for line in clickhouse.stdout:
                lines.append(line)
                found = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
                if found and not bound.is_set():
                    self.clickhouse_port = int(found.group(1))
                    bound.set()

        threading.Thread(target=read, daemon=True).start()
        if not bound.wait(120):
            self.stop()
            raise RuntimeError(f"the ClickHouse stand-in did not start: {''.join(lines)[-2000:]}")
        import redis

        client = redis.Redis(port=self.redis_port, password=self.password)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()
        return self

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.processes.clear()
