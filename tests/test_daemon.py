"""`ingestd serve` as a real process: the job API, its token, probes, metrics, restarts, and a real Prometheus."""

from __future__ import annotations

import http.server
import json
import re
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import CORPUS, SHARED, EngineServer, free_port
from .golden import kb_dump, run_cli
from .tools import prometheus_tool

TOKEN = "token-that-must-never-be-logged"


class Daemon:
    """``ingestd serve`` as a real process. Jobs may read sources under the system's temporary folder (where the
    tests write theirs) and the shared corpus, and use the KATO servers in ``kato_urls``."""

    def __init__(self, state_dir: Path, *, kato_urls: tuple[str, ...] = (), **env: str) -> None:
        self.state_dir = state_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "INGESTD_TOKEN": TOKEN, "INGESTD_PORT": str(self.port),
                    "INGESTD_STATE_DIR": str(state_dir), "INGESTD_KATO_URLS": ",".join(kato_urls),
                    "INGESTD_SOURCE_ROOTS": f"{tempfile.gettempdir()}:{SHARED}", **env}  # fmt: skip
        if "INGESTD_TOKEN_FILE" in env:
            del self.env["INGESTD_TOKEN"]
        self.process: subprocess.Popen[str] | None = None
        self.logs = ""

    def start(self) -> Daemon:
        self.process = subprocess.Popen([sys.executable, "-m", "ingestd", "serve"], env=self.env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        # Read its output as it comes: a daemon whose log pipe is full blocks on its next log line (event loop too).
        self._reader = threading.Thread(target=self._drain, args=(self.process,), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.05)
        raise TimeoutError("the daemon did not come up")

    def _drain(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.logs += line

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        self.process.wait(timeout=60)
        self._reader.join(timeout=10)
        return self.process.returncode

    def client(self, token: str | None = TOKEN) -> httpx.Client:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


@pytest.fixture
def daemon(tmp_path: Path, engine_server: EngineServer) -> Iterator[Daemon]:
    running = Daemon(tmp_path / "state", kato_urls=(engine_server.url,)).start()
    yield running
    if running.process is not None and running.process.poll() is None:
        running.stop()


def wait_for(client: httpx.Client, job_id: str, states: set[str], timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} still {job['state']}")


def corpus(tmp_path: Path, samples: int = 300) -> Path:
    path = tmp_path / "docs.jsonl"
    lines = CORPUS.read_text(encoding="utf-8").split("\n")
    path.write_text("".join(json.dumps({"text": "\n".join(lines[i * 12 : i * 12 + 12])}) + "\n" for i in range(samples)))
    return path


def test_the_job_api_needs_the_token_and_the_probes_do_not(daemon: Daemon) -> None:
    with daemon.client(token=None) as anonymous, daemon.client("wrong") as wrong:
        assert anonymous.get("/jobs").status_code == 401
        assert wrong.post("/jobs", json={"source": "x"}).status_code == 401
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        assert anonymous.get("/readyz").status_code == 200
        assert "ingestd_jobs" in anonymous.get("/metrics").text
    with daemon.client() as client:
        assert client.get("/jobs").json() == {"jobs": [], "total": 0, "next_offset": None}
        assert client.post("/jobs", json={"source": 3}).status_code == 422
        assert client.get("/jobs/nope").status_code == 404
    denied = subprocess.run([sys.executable, "-m", "ingestd", "jobs", "list", "--url", daemon.url, "--token", "wrong"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert denied.returncode == 5 and "401" in denied.stderr
    nobody = f"http://127.0.0.1:{free_port()}"
    down = subprocess.run([sys.executable, "-m", "ingestd", "jobs", "list", "--url", nobody, "--token", TOKEN],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert down.returncode == 2 and f"cannot reach the daemon at {nobody}" in down.stderr and "Traceback" not in down.stderr
    daemon.stop()
    assert TOKEN not in daemon.logs


def test_a_job_learns_what_ingestd_run_learns_and_metrics_count_it(daemon: Daemon, engine_server: EngineServer,
                                                                    tmp_path: Path) -> None:  # fmt: skip
    source = corpus(tmp_path)
    spec = {"source": str(source), "chunk_sizes": [8, 8, 8], "metadata_levels": [2], "kato_url": engine_server.url,
            "node_ids": "daemon-a-node{level}", "workers": 4, "bulk_load": False}  # KATO's calls (the CLI: bulk loads)
    with daemon.client() as client:
        created = client.post("/jobs", json=spec)
        assert created.status_code == 201
        job = wait_for(client, created.json()["id"], {"succeeded", "failed"})
        assert job["state"] == "succeeded", job
        assert job["progress"]["samples"]["learned"] == 300
        listed = subprocess.run([sys.executable, "-m", "ingestd", "jobs", "show", job["id"], "--url", daemon.url, "--json"],
                                capture_output=True, text=True, timeout=60, env={**os.environ, "INGESTD_TOKEN": TOKEN})  # fmt: skip
        assert listed.returncode == 0 and json.loads(listed.stdout)["state"] == "succeeded"
        exported = client.get("/metrics").text
    assert "ingestd_samples_learned_total 300.0" in exported
    assert 'ingestd_jobs{state="succeeded"} 1.0' in exported
    assert 'ingestd_kato_requests_total{endpoint="observe-sequence",status_class="2xx"}' in exported
    run_cli(str(source), "--chunk-sizes", "8,8,8", "--metadata-levels", "2", "--kato", engine_server.url,
            "--node-ids", "cli-a-node{level}")  # fmt: skip
    database = engine_server.data_dir / "kato.sqlite3"
    assert kb_dump(database, [f"daemon-a-node{level}" for level in range(3)]) == kb_dump(
        database, [f"cli-a-node{level}" for level in range(3)])  # fmt: skip


def test_a_job_resumes_after_the_daemon_restarts_and_queued_jobs_can_be_cancelled(
    tmp_path: Path, engine_server: EngineServer
) -> None:
    source = corpus(tmp_path, samples=600)
    daemon = Daemon(tmp_path / "state", kato_urls=(engine_server.url,), INGESTD_MAX_JOBS="1").start()
    spec = {"source": str(source), "chunk_sizes": [4, 4, 4], "metadata_levels": [1, 2], "kato_url": engine_server.url,
            "node_ids": "daemon-b-node{level}", "workers": 2}  # fmt: skip
    with daemon.client() as client:
        first = client.post("/jobs", json=spec).json()["id"]
        second = client.post("/jobs", json={**spec, "node_ids": "never-node{level}"}).json()["id"]
        wait_for(client, first, {"running"})
        assert client.get(f"/jobs/{second}").json()["state"] == "queued"  # one slot
        assert client.post(f"/jobs/{second}/cancel").json()["state"] == "cancelled"
        while client.get(f"/jobs/{first}").json()["progress"]["samples"]["learned"] < 100:
            time.sleep(0.05)
    assert daemon.stop() == 0  # SIGTERM: drains, marks the job to resume
    daemon.start()
    with daemon.client() as client:
        job = wait_for(client, first, {"succeeded", "failed"})
        assert job["state"] == "succeeded", job
        assert job["progress"]["samples"]["skipped"] >= 100  # learned before the restart, not again
        assert client.get(f"/jobs/{second}").json()["state"] == "cancelled"
    daemon.stop()
    run_cli(str(source), "--chunk-sizes", "4,4,4", "--metadata-levels", "1,2", "--kato", engine_server.url,
            "--node-ids", "cli-b-node{level}")  # fmt: skip
    database = engine_server.data_dir / "kato.sqlite3"
    assert kb_dump(database, [f"daemon-b-node{level}" for level in range(3)]) == kb_dump(
        database, [f"cli-b-node{level}" for level in range(3)])  # fmt: skip
    assert kb_dump(database, ["never-node0"]) == [{}]


def test_a_real_prometheus_scrapes_the_daemon_during_a_job(daemon: Daemon, tmp_path: Path) -> None:
    prometheus = prometheus_tool("prometheus")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"global:\n  scrape_interval: 200ms\nscrape_configs:\n  - job_name: ingestd\n    static_configs:\n"
                      f"      - targets: ['127.0.0.1:{daemon.port}']\n")  # fmt: skip
    server = subprocess.Popen([prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                               f"--web.listen-address=127.0.0.1:{port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

    def query(expression: str) -> float | None:
        try:
            answer = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": expression}, timeout=5).json()
            results = answer["data"]["result"]
            return float(results[0]["value"][1]) if results else None
        except (httpx.TransportError, KeyError, ValueError):
            return None

    try:
        deadline = time.monotonic() + 60
        while query('up{job="ingestd"}') != 1.0:  # Prometheus scrapes the daemon before the job starts
            assert time.monotonic() < deadline, "Prometheus never scraped the daemon"
            time.sleep(0.1)
        during = []
        with daemon.client() as client:
            job_id = client.post("/jobs", json={"source": str(corpus(tmp_path, samples=3000)), "workers": 2}).json()["id"]
            while (job := client.get(f"/jobs/{job_id}").json())["state"] in ("queued", "running"):
                value = query("ingestd_samples_learned_total")
                if value and client.get(f"/jobs/{job_id}").json()["state"] == "running":
                    during.append(value)
                time.sleep(0.1)
        learned = job["progress"]["samples"]["learned"]
        assert job["state"] == "succeeded" and learned == 3000
        assert any(0 < value < learned for value in during), f"no scrape mid-job: {during}"
        deadline = time.monotonic() + 60
        while (value := query("ingestd_samples_learned_total")) != learned and time.monotonic() < deadline:
            time.sleep(0.2)
        assert value == learned
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize(("env", "needle"), [
    ({"INGESTD_TOKEN": "  "}, "INGESTD_TOKEN is empty"),
    ({"INGESTD_TOKEN": "", "INGESTD_HOST": "0.0.0.0"}, "INGESTD_TOKEN is empty"),
    ({"INGESTD_HOST": "0.0.0.0"}, "needs a bearer token"),
    ({}, "needs a bearer token"),
])  # fmt: skip
def test_the_daemon_refuses_to_start_open_or_with_an_empty_token(tmp_path: Path, env: dict[str, str], needle: str) -> None:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("INGESTD_")}
    result = subprocess.run([sys.executable, "-m", "ingestd", "serve", "--state-dir", str(tmp_path / "s"),
                             "--port", str(free_port())], env={**environment, **env}, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 2 and needle in result.stderr


def test_readyz_names_an_unreachable_kato_to_token_holders_only(tmp_path: Path) -> None:
    gone = f"http://127.0.0.1:{free_port()}"
    daemon = Daemon(tmp_path / "state", kato_urls=(gone,)).start()
    try:
        with daemon.client() as client, daemon.client(token=None) as anonymous:
            job = client.post("/jobs", json={"source": str(corpus(tmp_path, samples=5)), "kato_url": gone}).json()
            ready = client.get("/readyz")
            assert ready.status_code == 503 and any(gone in problem for problem in ready.json()["problems"])
            hidden = anonymous.get("/readyz")
            assert hidden.status_code == 503 and hidden.json()["problems"] == ["a KATO server is not ready"]
            client.post(f"/jobs/{job['id']}/cancel")
    finally:
        daemon.stop()


def test_ingestd_run_serves_metrics_while_it_runs(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "ingestd", "run", str(corpus(tmp_path, samples=3000)), "--data",
                                str(tmp_path / "kb"), "--no-progress", "--metrics-port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        learned = 0.0
        while time.monotonic() < deadline and process.poll() is None and learned == 0:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
                line = next(line for line in text.splitlines() if line.startswith("ingestd_samples_learned_total "))
                learned = float(line.split()[1])
            except (httpx.TransportError, StopIteration):
                time.sleep(0.05)
        assert learned > 0
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_running_jobs_can_be_cancelled_and_failed_samples_retried(daemon: Daemon, tmp_path: Path) -> None:
    with daemon.client() as client:
        long_job = client.post("/jobs", json={"source": str(corpus(tmp_path, samples=3000)), "workers": 2,
                                              "node_ids": "long-node{level}"}).json()["id"]  # fmt: skip
        wait_for(client, long_job, {"running"})
        while client.get(f"/jobs/{long_job}").json()["progress"]["samples"]["learned"] < 50:
            time.sleep(0.05)
        client.post(f"/jobs/{long_job}/cancel")
        cancelled = wait_for(client, long_job, {"cancelled", "succeeded", "failed"})
        assert cancelled["state"] == "cancelled"
        assert 50 <= cancelled["progress"]["samples"]["learned"] < 3000

        records = tmp_path / "records.jsonl"
        records.write_text(json.dumps({"text": "a good sample, long enough"}) + "\n" + json.dumps({"text": 7}) + "\n")
        job = client.post("/jobs", json={"source": str(records), "node_ids": "retry-node{level}"}).json()["id"]
        first = wait_for(client, job, {"succeeded", "failed"})
        assert first["progress"]["samples"]["failed"] == 1 and "retry-failed" in first["error"]
        records.write_text(json.dumps({"text": "a good sample, long enough"}) + "\n"
                           + json.dumps({"text": "the second record, repaired"}) + "\n")  # fmt: skip
        assert client.post(f"/jobs/{job}/retry-failed").json()["state"] == "queued"
        again = wait_for(client, job, {"succeeded", "failed"})
        assert again["state"] == "succeeded" and again["error"] is None
        assert again["progress"]["samples"]["learned"] == 1 and again["progress"]["samples"]["skipped"] == 1
    assert daemon.stop() == 0
    events = [json.loads(line) for line in daemon.logs.splitlines() if line.startswith("{")]  # JSON lines: no TTY
    failed = [event for event in events if event["event"] == "sample failed"]
    assert [(event["job_id"], event["sample_index"], event["level"]) for event in failed] == [(job, 1, "warning")]
    assert {event["job_id"] for event in events if event["event"] == "job started"} == {long_job, job}


class _NotQuiteKato(http.server.BaseHTTPRequestHandler):
    """Healthy, creates sessions, and answers every other call 200 ``{}``: a server ingestd has no answer for."""

    def _answer(self, body: dict[str, Any]) -> None:
        raw = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        self._answer({"status": "healthy"} if self.path == "/health" else {})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self._answer({"session_id": "session-1"} if self.path == "/sessions" else {})

    def do_DELETE(self) -> None:
        self._answer({})

    def log_message(self, *args: Any) -> None:
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the crashing job drops its connections mid-answer


def test_a_job_that_fails_or_crashes_fails_alone(tmp_path: Path) -> None:
    """Bad jobs are refused at submission or fail with their reason; a crash fails only its job; a stored job
    this version cannot run fails at the next start; the daemon runs the next good job every time."""
    broken = _QuietServer(("127.0.0.1", 0), _NotQuiteKato)
    threading.Thread(target=broken.serve_forever, daemon=True).start()
    source = str(corpus(tmp_path, samples=20))
    daemon = Daemon(tmp_path / "state", kato_urls=(f"http://127.0.0.1:{broken.server_port}",), INGESTD_MAX_JOBS="1").start()
    try:
        with daemon.client() as client:
            refused = client.post("/jobs", json={"source": source, "chunk_sizes": [1, 8]})
            assert refused.status_code == 422 and "chunk size 1 of level 0 is below 2" in refused.text
            assert client.post("/jobs", json={"source": source, "chunk_sizes": []}).status_code == 422
            placeholder = client.post("/jobs", json={"source": source, "node_ids": "n{level}{foo}"})
            assert placeholder.status_code == 422 and "only {level} and {run_id}" in placeholder.text
            secret = client.post("/jobs", json={"source": source, "kato_url": "http://user:hunter2@127.0.0.1:9"})
            assert secret.status_code == 422 and "must not carry credentials" in secret.text
            assert client.post("/jobs", json={"source": source, "kato_url": "http://[::1"}).status_code == 422
            missing = client.post("/jobs", json={"source": str(tmp_path / "nope.txt")}).json()["id"]
            crashing = client.post("/jobs", json={"source": source, "kato_url": f"http://127.0.0.1:{broken.server_port}",
                                                  "node_ids": "crash-node{level}"}).json()["id"]  # fmt: skip
            good = client.post("/jobs", json={"source": source, "node_ids": "good-node{level}"}).json()["id"]
            assert wait_for(client, good, {"succeeded", "failed"})["state"] == "succeeded"
            failed = client.get(f"/jobs/{missing}").json()
            assert failed["state"] == "failed" and "nope.txt does not exist" in failed["error"]
            crashed = client.get(f"/jobs/{crashing}").json()
            assert crashed["state"] == "failed" and "ingestd crashed on this job (KeyError" in crashed["error"], crashed
            assert client.get("/healthz").status_code == 200
        assert daemon.stop() == 0
        events = [json.loads(line) for line in daemon.logs.splitlines() if line.startswith("{")]
        crash = next(event for event in events if event["event"] == "job crashed")
        assert crash["job_id"] == crashing and crash["level"] == "error" and "KeyError" in crash["exception"]

        # A queued job whose stored spec this version cannot run (an older ingestd's, or edited by hand).
        with sqlite3.connect(tmp_path / "state" / "jobs.sqlite3") as jobs:
            jobs.execute("INSERT INTO jobs (id, spec, state, created_at) VALUES ('stale', ?, 'queued', 0)",
                         (json.dumps({"source": source, "chunk_sizes": [0]}).encode(),))  # fmt: skip
        daemon.start()
        with daemon.client() as client:
            stale = wait_for(client, "stale", {"failed", "succeeded"})
            assert "not valid for this ingestd" in stale["error"] and "submit it again" in stale["error"]
            after = client.post("/jobs", json={"source": source, "node_ids": "after-node{level}"}).json()["id"]
            assert wait_for(client, after, {"succeeded", "failed"})["state"] == "succeeded"
            assert client.get(f"/jobs/{crashing}").json()["state"] == "failed"  # a failed job is not resumed
    finally:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.stop()
        broken.shutdown()


class _HangingKato(_NotQuiteKato):
    """A KATO that never answers observe-sequence: a job on it can only be drained by giving up."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.path == "/sessions":
            self._answer({"session_id": f"session-{threading.get_ident()}"})
        else:
            time.sleep(600)


def test_a_second_sigterm_stops_the_drain_and_the_job_resumes_later(tmp_path: Path) -> None:
    hanging = _QuietServer(("127.0.0.1", 0), _HangingKato)
    threading.Thread(target=hanging.serve_forever, daemon=True).start()
    daemon = Daemon(tmp_path / "state", kato_urls=(f"http://127.0.0.1:{hanging.server_port}",),
                    INGESTD_DRAIN_TIMEOUT="120").start()  # fmt: skip
    try:
        with daemon.client() as client:
            job = client.post("/jobs", json={"source": str(corpus(tmp_path, samples=20)), "workers": 2,
                                             "kato_url": f"http://127.0.0.1:{hanging.server_port}"}).json()["id"]  # fmt: skip
            wait_for(client, job, {"running"})
        time.sleep(1.0)  # its workers are now waiting on the server
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGTERM)
        time.sleep(1.5)
        assert daemon.process.poll() is None, "the first SIGTERM drains (up to INGESTD_DRAIN_TIMEOUT, 120 s here)"
        started = time.monotonic()
        assert daemon.stop(signal.SIGTERM) == 0
        assert time.monotonic() - started < 30, "a second SIGTERM stops the drain (sessions get 10 s to close)"
    finally:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.stop(signal.SIGKILL)
        hanging.shutdown()
    with sqlite3.connect(tmp_path / "state" / "jobs.sqlite3") as jobs:
        assert jobs.execute("SELECT state FROM jobs WHERE id = ?", (job,)).fetchone() == ("queued",)  # resumes


def test_a_failed_job_resumes_from_its_progress(tmp_path: Path) -> None:
    port = free_port()
    source = str(corpus(tmp_path, samples=200))
    daemon = Daemon(tmp_path / "state", kato_urls=(f"http://127.0.0.1:{port}",)).start()
    server = EngineServer(tmp_path / "kato", port)
    try:
        with daemon.client() as client:
            job = client.post("/jobs", json={"source": source, "kato_url": f"http://127.0.0.1:{port}",
                                             "node_ids": "resume-node{level}"}).json()["id"]  # fmt: skip
            failed = wait_for(client, job, {"failed", "succeeded"})
            assert "cannot reach KATO" in failed["error"] and f"ingestd jobs resume {job}" in failed["error"]
            server.start()
            resumed = subprocess.run([sys.executable, "-m", "ingestd", "jobs", "resume", job, "--url", daemon.url, "--json"],
                                     capture_output=True, text=True, timeout=60, env=daemon.env)  # fmt: skip
            assert resumed.returncode == 0 and json.loads(resumed.stdout)["state"] == "queued"
            done = wait_for(client, job, {"failed", "succeeded"})
            assert done["state"] == "succeeded" and done["error"] is None
            assert done["progress"]["samples"]["learned"] == 200
            assert client.post(f"/jobs/{job}/resume").json()["state"] == "succeeded"  # only failed/cancelled jobs
    finally:
        daemon.stop()
        server.stop()


def test_the_daemon_stops_with_status_1_when_its_job_store_fails_and_the_job_resumes(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "state").start()
    with daemon.client() as client:
        job = client.post("/jobs", json={"source": str(corpus(tmp_path, samples=3000)), "workers": 2}).json()["id"]
        wait_for(client, job, {"running"})
        with sqlite3.connect(tmp_path / "state" / "jobs.sqlite3", isolation_level=None) as other:
            other.execute("BEGIN IMMEDIATE")  # another process holds the job store's write lock
            client.post(f"/jobs/{job}/cancel")  # the job ends, but cannot record it (5 s busy timeout)
            assert daemon.process is not None
            deadline = time.monotonic() + 60
            health = None
            while time.monotonic() < deadline and daemon.process.poll() is None:
                try:
                    health = client.get("/healthz").status_code
                except httpx.TransportError:
                    break
                if health == 503:
                    break
                time.sleep(0.05)
            assert daemon.process.wait(timeout=60) == 1
            other.execute("ROLLBACK")
    daemon._reader.join(timeout=10)
    events = [json.loads(line) for line in daemon.logs.splitlines() if line.startswith("{")]
    assert any(event["event"].startswith("the job runner failed") and event["level"] == "error" for event in events)
    daemon.start()  # the job was still 'running' in the store: it is queued again, and finishes
    with daemon.client() as client:
        assert wait_for(client, job, {"succeeded", "failed", "cancelled"})["state"] == "succeeded"
    daemon.stop()


def test_job_progress_is_stored_while_it_runs(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "state").start()
    store = tmp_path / "state" / "jobs.sqlite3"
    source = tmp_path / "long.jsonl"  # long enough to be running still when the daemon is killed, even on a fast machine
    source.write_bytes(corpus(tmp_path, samples=3000).read_bytes() * 10)
    with daemon.client() as client:
        job = client.post("/jobs", json={"source": str(source), "workers": 1,
                                         "chunk_sizes": [2, 2, 2, 2, 2, 2]}).json()["id"]  # fmt: skip
        wait_for(client, job, {"running"})
        stored = None
        while stored is None and client.get(f"/jobs/{job}").json()["state"] == "running":
            with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as jobs:
                (stored,) = jobs.execute("SELECT summary FROM jobs WHERE id = ?", (job,)).fetchone()
            time.sleep(0.1)
    daemon.stop(signal.SIGKILL)
    with sqlite3.connect(store) as jobs:
        state, summary = jobs.execute("SELECT state, summary FROM jobs WHERE id = ?", (job,)).fetchone()
    assert state == "running" and json.loads(summary)["samples"]["learned"] > 0  # what a killed daemon leaves


def test_token_file_and_closed_metrics(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("token-from-a-file\n")
    daemon = Daemon(tmp_path / "state", INGESTD_TOKEN_FILE=str(token_file), INGESTD_OPEN_METRICS="false").start()
    try:
        with daemon.client(token=None) as anonymous, daemon.client("token-from-a-file") as client:
            assert anonymous.get("/healthz").status_code == 200  # liveness is always open (Docker's HEALTHCHECK)
            assert anonymous.get("/readyz").status_code == 200
            assert anonymous.get("/metrics").status_code == 401
            assert anonymous.get("/jobs").status_code == 401
            assert client.get("/metrics").status_code == 200 and client.get("/jobs").status_code == 200
        assert listening_addresses(daemon.port) == {"127.0.0.1"}  # the default bind address is loopback
    finally:
        daemon.stop()
    assert "token-from-a-file" not in daemon.logs


def listening_addresses(port: int) -> set[str]:
    """The IPv4 addresses a socket listens on at ``port``, from the kernel's table (/proc/net/tcp)."""
    addresses = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
            addresses.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return addresses


def test_jobs_submit_takes_run_s_choices_and_prints_tables(daemon: Daemon, tmp_path: Path) -> None:
    source = daemon.state_dir / "corpora" / "docs.jsonl"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(corpus(tmp_path, samples=120).read_bytes())
    hierarchy = tmp_path / "h.toml"
    hierarchy.write_text('node_id_template = "sub-{level}"\n[[levels]]\nchunk_size = 6\n[[levels]]\nchunk_size = 4\n'
                         "capture_metadata = true\n[run]\nmin_chars = 3\n", encoding="utf-8")
    cli = [sys.executable, "-m", "ingestd", "jobs"]
    submitted = subprocess.run([*cli, "submit", str(source), "--hierarchy", str(hierarchy), "--fresh", "--batch-chunks", "16",
                                "--durability", "normal", "--patience", "30", "--request-timeout", "20", "--source-label",
                                "subs", "--max-sample-chars", "5000", "--url", daemon.url, "--json"],
                               capture_output=True, text=True, timeout=60, env=daemon.env)  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout)
    assert job["spec"]["hierarchy"]["node_id_template"] == "sub-{level}" and job["spec"]["fresh"] is True
    assert (job["spec"]["batch_chunks"], job["spec"]["durability"], job["spec"]["patience"]) == (16, "normal", 30)
    with daemon.client() as client:
        done = wait_for(client, job["id"], {"succeeded", "failed"})
    assert done["state"] == "succeeded", done["error"]
    config = done["progress"]["config"]
    assert [level["node_id"] for level in config["hierarchy"]] == ["sub-0", "sub-1"]
    assert config["hierarchy"][1]["capture_metadata"] is True and config["source"]["label"] == "subs"
    assert config["source"]["min_chars"] == 3 and config["batch_chunks"] == 16
    # the job is in the run catalogue like any run
    catalogued = subprocess.run([sys.executable, "-m", "ingestd", "runs", "list", "--in", str(daemon.state_dir / "runs"),
                                 "--json"], capture_output=True, text=True, timeout=60)  # fmt: skip
    manifest = next(run for run in json.loads(catalogued.stdout) if Path(run["run_dir"]).name == job["id"])
    assert manifest["status"] == "finished" and manifest["node_ids"] == ["sub-0", "sub-1"]
    assert manifest["summary"]["samples"]["learned"] == 120 and manifest["summary"]["distinct_patterns_per_level"][0] > 0
    listed = subprocess.run([*cli, "list", "--url", daemon.url], capture_output=True, text=True, timeout=60, env=daemon.env)
    assert listed.returncode == 0 and job["id"] in listed.stdout and "succeeded" in listed.stdout
    assert re.search(r"20\d\d-\d\d-\d\d \d\d:\d\d:\d\d", listed.stdout)  # readable times, not epoch floats
    shown = subprocess.run([*cli, "show", job["id"], "--url", daemon.url], capture_output=True, text=True, timeout=60,
                           env=daemon.env)  # fmt: skip
    assert shown.returncode == 0 and "succeeded" in shown.stdout and "120 learned" in shown.stdout
    both = subprocess.run([*cli, "submit", str(source), "--hierarchy", str(hierarchy), "--chunk-sizes", "4", "--url",
                           daemon.url], capture_output=True, text=True, timeout=60, env=daemon.env)  # fmt: skip
    assert both.returncode == 2 and "not both" in both.stderr
