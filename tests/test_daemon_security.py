"""The daemon as a hostile token holder (or a careless one) would try it: it reads only the folders it was given,
sends only to the KATO servers it was given, bounds what it is sent and what it answers, and never quotes a
sample's text. Real daemons; real loopback listeners stand in for the host's internal services."""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import closed_by_the_server
from .test_daemon import TOKEN, Daemon, _NotQuiteKato, _QuietServer, corpus, wait_for


class _Listener:
    """A TCP port standing in for an internal service: it counts the connections made to it and never answers."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.accepted.append(connection)

    def close(self) -> None:
        self.socket.close()
        for connection in self.accepted:
            connection.close()


@pytest.fixture
def listeners() -> Iterator[list[_Listener]]:
    made = [_Listener() for _ in range(12)]
    yield made
    for listener in made:
        listener.close()


def test_sources_outside_the_configured_folders_are_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    secret = tmp_path / "secrets.txt"
    secret.write_text("the password is hunter2\n\nand the other one is swordfish\n")
    (state / "corpora").mkdir(parents=True)
    inside = corpus(state / "corpora", samples=5)
    (state / "corpora" / "link.txt").symlink_to(secret)
    daemon = Daemon(state)
    del daemon.env["INGESTD_SOURCE_ROOTS"]  # the default: <state dir>/corpora
    daemon.start()
    try:
        with daemon.client() as client:
            for source in (str(secret), "/etc/passwd", str(state / "corpora" / ".." / ".." / "secrets.txt"),
                           str(state / "corpora" / "link.txt"), "../secrets.txt", "~/.ssh/id_rsa"):  # fmt: skip
                refused = client.post("/jobs", json={"source": source})
                assert refused.status_code == 422, (source, refused.text)
                detail = refused.json()["detail"][0]
                assert detail["loc"] == ["body", "source"] and "INGESTD_SOURCE_ROOTS" in detail["msg"], detail
                assert str(state / "corpora") in detail["msg"]
            accepted = client.post("/jobs", json={"source": str(inside)})
            assert accepted.status_code == 201
            assert wait_for(client, accepted.json()["id"], {"succeeded", "failed"})["state"] == "succeeded"
            assert client.get("/jobs").json()["total"] == 1  # nothing refused was stored
    finally:
        daemon.stop()
    assert "hunter2" not in daemon.logs and "swordfish" not in daemon.logs


def test_a_list_of_sources_is_checked_entry_by_entry_and_file_by_file(tmp_path: Path) -> None:
    state, roots = tmp_path / "state", tmp_path / "corpora"
    (roots / "parts").mkdir(parents=True)
    secret = tmp_path / "secrets.txt"
    secret.write_text("the password is hunter2\n")
    first, second = corpus(roots, samples=4), corpus(roots / "parts", samples=3)
    (roots / "linked").mkdir()
    (roots / "linked" / "out.txt").symlink_to(secret)  # a folder inside whose file leads out
    daemon = Daemon(state, INGESTD_SOURCE_ROOTS=str(roots)).start()
    try:
        with daemon.client() as client:
            for source in ([str(first), str(secret)], [str(first), str(roots / "*" / ".." / ".." / "secrets.txt")],
                           [str(first), str(roots / "linked")], [str(roots / "parts"), "/etc/passwd"]):  # fmt: skip
                refused = client.post("/jobs", json={"source": source})
                assert refused.status_code == 422, (source, refused.text)
                detail = refused.json()["detail"][0]
                assert detail["loc"] == ["body", "source"] and "INGESTD_SOURCE_ROOTS" in detail["msg"], detail
            accepted = client.post("/jobs", json={"source": [str(second), str(first)]})
            assert accepted.status_code == 201, accepted.text
            job = wait_for(client, accepted.json()["id"], {"succeeded", "failed"})
            assert job["state"] == "succeeded" and job["progress"]["samples"]["learned"] == 7, job
            assert client.get("/jobs").json()["total"] == 1  # nothing refused was stored
    finally:
        daemon.stop()
    assert "hunter2" not in daemon.logs


def test_sources_and_tokenizers_that_are_no_paths_or_lead_outside_are_a_422(tmp_path: Path) -> None:
    roots = tmp_path / "corpora"
    roots.mkdir()
    (roots / "tok").mkdir()
    daemon = Daemon(tmp_path / "state", INGESTD_SOURCE_ROOTS=f"{tmp_path / 'elsewhere'}: {roots} ").start()
    source = str(corpus(roots, samples=3))
    try:
        with daemon.client() as client:
            for body, field in (({"source": str(roots / "a.txt") + "\u0000"}, "source"),
                                ({"source": "~no-such-user-here/a.txt"}, "source"),
                                ({"source": str(roots / ("a" * 300 + ".txt"))}, "source"),
                                ({"source": source, "tokenizer": "/etc"}, "tokenizer"),
                                ({"source": source, "tokenizer": "/nonexistent/tok"}, "tokenizer"),
                                ({"source": source, "tokenizer": "../../etc"}, "tokenizer")):  # fmt: skip
                answer = client.post("/jobs", json=body)
                assert answer.status_code == 422, (body, answer.text[:300])
                assert answer.json()["detail"][0]["loc"] == ["body", field], answer.text[:300]
            # the same message whether a path outside exists or not: no oracle for the host's files
            assert (client.post("/jobs", json={"source": source, "tokenizer": "/etc"}).json()["detail"][0]["msg"]
                    .replace("/etc", "X")) == (client.post("/jobs", json={"source": source, "tokenizer": "/nope"})
                                               .json()["detail"][0]["msg"].replace("/nope", "X"))  # fmt: skip
            inside = client.post("/jobs", json={"source": source, "tokenizer": str(roots / "tok")})
            assert inside.status_code == 201
            assert client.get("/jobs", params={"offset": 10**20}).json() == {"jobs": [], "total": 1, "next_offset": None}
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.logs


def test_the_daemon_closes_connections_whose_body_never_arrives(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "state", INGESTD_BODY_TIMEOUT="1").start()
    try:
        started = time.monotonic()
        stalled = socket.create_connection(("127.0.0.1", daemon.port))
        stalled.sendall(f"POST /jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                        "Content-Type: application/json\r\nContent-Length: 50\r\n\r\n{".encode())  # fmt: skip
        stalled.settimeout(30)
        assert stalled.recv(100) == b"" and time.monotonic() - started < 25
        stalled.close()
        assert httpx.get(daemon.url + "/healthz", timeout=10).status_code == 200
    finally:
        daemon.stop()


def test_a_link_swapped_in_after_submission_is_refused_when_the_job_starts(tmp_path: Path) -> None:
    state, roots = tmp_path / "state", tmp_path / "corpora"
    roots.mkdir()
    secret = tmp_path / "secrets.txt"
    secret.write_text("swordfish\n")
    daemon = Daemon(state, INGESTD_SOURCE_ROOTS=str(roots))
    daemon.start().stop()  # makes the job store
    # A job queued while docs.txt was a file under the root, then the file swapped for a link leading out.
    (roots / "docs.txt").symlink_to(secret)
    with sqlite3.connect(state / "jobs.sqlite3") as jobs:
        jobs.execute("INSERT INTO jobs (id, spec, state, created_at) VALUES ('swapped', ?, 'queued', 0)",
                     (json.dumps({"source": str(roots / "docs.txt")}).encode(),))  # fmt: skip
    daemon.start()
    try:
        with daemon.client() as client:
            swapped = wait_for(client, "swapped", {"failed", "succeeded"})
            assert swapped["state"] == "failed" and "INGESTD_SOURCE_ROOTS" in swapped["error"], swapped
    finally:
        daemon.stop()
    assert "swordfish" not in daemon.logs
    assert not any(b"swordfish" in path.read_bytes() for path in state.rglob("*") if path.is_file())


def test_kato_urls_outside_the_allowlist_are_refused_and_never_called(tmp_path: Path,
                                                                      listeners: list[_Listener]) -> None:  # fmt: skip
    allowed, internal = listeners[0], listeners[1]
    daemon = Daemon(tmp_path / "state", kato_urls=(allowed.url,)).start()
    source = str(corpus(tmp_path, samples=3))
    try:
        with daemon.client() as client:
            for url in (internal.url, internal.url + "/admin", allowed.url + "/other-prefix",
                        f"http://localhost:{allowed.url.rsplit(':', 1)[1]}"):  # fmt: skip
                refused = client.post("/jobs", json={"source": source, "kato_url": url})
                assert refused.status_code == 422, (url, refused.text)
                detail = refused.json()["detail"][0]
                assert detail["loc"] == ["body", "kato_url"] and "INGESTD_KATO_URLS" in detail["msg"]
            assert client.get("/jobs").json()["total"] == 0
            client.get("/readyz")
            time.sleep(0.5)
    finally:
        daemon.stop()
    assert internal.accepted == []
    # And a daemon started without any: jobs use its embedded engine only.
    bare = Daemon(tmp_path / "bare").start()
    try:
        with bare.client() as client:
            refused = client.post("/jobs", json={"source": source, "kato_url": allowed.url})
            assert refused.status_code == 422 and "INGESTD_KATO_URLS: none" in refused.text
    finally:
        bare.stop()


def test_request_bodies_are_bounded_and_malformed_ones_get_a_json_422(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "state", INGESTD_MAX_BODY_BYTES="4096").start()
    try:
        with daemon.client() as client:
            big = client.post("/jobs", content=b'{"source": "' + b"x" * 10_000 + b'"}',
                              headers={"content-type": "application/json"})  # fmt: skip
            assert big.status_code == 413 and "INGESTD_MAX_BODY_BYTES" in big.json()["detail"]

            def streamed() -> Iterator[bytes]:  # no content-length: the daemon stops reading past the limit
                yield b'{"source": "'
                for _ in range(10_000):
                    yield b"x" * 1024
                yield b'"}'

            chunked = client.post("/jobs", content=streamed(), headers={"content-type": "application/json"})
            assert chunked.status_code == 413
            nested = b"[" * 2000 + b"]" * 2000
            deep_object = b'{"source": "x", "metadata_fields": ' + b"[" * 1500 + b"]" * 1500 + b"}"
            for body in (b"", b"{", b"\xff\xfe\x00", b"null", b"[1, 2]", b'"text"', nested, deep_object,
                         b'{"source": "\xc3\x28"}', b'{"source": 5}'):  # fmt: skip
                answer = client.post("/jobs", content=body, headers={"content-type": "application/json"})
                assert answer.status_code == 422, (body[:20], answer.status_code, answer.text[:200])
                assert isinstance(answer.json()["detail"], list) and answer.json()["detail"], answer.text
            assert client.get("/jobs").json()["total"] == 0
            assert client.get("/healthz").status_code == 200
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.logs and '"level": "error"' not in daemon.logs


def test_numeric_fields_are_bounded(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "state").start()
    source = str(corpus(tmp_path, samples=3))
    try:
        with daemon.client() as client:
            for field, value in (("workers", 50_000), ("workers", 0), ("chunk_sizes", [10**23]), ("chunk_sizes", [8] * 17),
                                 ("skip", 10**30), ("max_samples", 2**64), ("min_chars", 10**20), ("wokers", 4)):  # fmt: skip
                answer = client.post("/jobs", json={"source": source, field: value})
                assert answer.status_code == 422, (field, value, answer.text)
                detail = answer.json()["detail"][0]
                assert detail["loc"][:2] == ["body", field] or (field == "chunk_sizes" and "chunk size" in detail["msg"]
                                                                or "levels" in detail["msg"]), (field, detail)  # fmt: skip
            assert client.get("/jobs").json()["total"] == 0
    finally:
        daemon.stop()


def test_the_job_list_is_paginated(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "state", INGESTD_MAX_JOBS="1").start()
    source = str(corpus(tmp_path, samples=3))
    try:
        with daemon.client() as client:
            made = [client.post("/jobs", json={"source": source, "node_ids": f"page{i}-node{{level}}"}).json()["id"]
                    for i in range(7)]  # fmt: skip
            first = client.get("/jobs", params={"limit": 3}).json()
            assert [job["id"] for job in first["jobs"]] == made[:3] and first["total"] == 7 and first["next_offset"] == 3
            rest = client.get("/jobs", params={"limit": 3, "offset": 3}).json()
            last = client.get("/jobs", params={"limit": 3, "offset": rest["next_offset"]}).json()
            assert [job["id"] for job in rest["jobs"] + last["jobs"]] == made[3:] and last["next_offset"] is None
            assert len(client.get("/jobs", params={"limit": 10**9}).json()["jobs"]) == 7  # capped at 1000, not refused
            assert client.get("/jobs", params={"limit": "lots"}).status_code == 422
            assert client.get("/jobs").json()["jobs"][0]["id"] == made[0]
    finally:
        daemon.stop()


def test_readyz_is_bounded_cached_and_shows_urls_to_token_holders_only(tmp_path: Path,
                                                                       listeners: list[_Listener]) -> None:  # fmt: skip
    """Twelve KATO servers that accept connections and never answer: checked one after another with a 2 s
    timeout they would take 24 s; /readyz checks them at once and answers in one timeout."""
    urls = tuple(listener.url for listener in listeners)
    daemon = Daemon(tmp_path / "state", kato_urls=urls, INGESTD_MAX_JOBS="1").start()
    source = str(corpus(tmp_path, samples=3))
    try:
        with daemon.client() as client, daemon.client(token=None) as anonymous:
            for url in urls:
                assert client.post("/jobs", json={"source": source, "kato_url": url}).status_code == 201
            started = time.monotonic()
            ready = anonymous.get("/readyz")
            took = time.monotonic() - started
            assert ready.status_code == 503 and took < 12, took  # 24 s if checked one by one
            assert not any("127.0.0.1" in problem for problem in ready.json()["problems"])
            # Probes within a few seconds get the kept answer: the servers are not called again.
            seen = sum(len(listener.accepted) for listener in listeners)
            shown = client.get("/readyz").json()["problems"]
            assert sum(len(listener.accepted) for listener in listeners) == seen
            assert sorted(problem.split(": ", 1)[1].split()[0] for problem in shown) == sorted(urls)
            assert all("no answer within 2 s" in problem for problem in shown), shown
            for job in client.get("/jobs").json()["jobs"]:
                client.post(f"/jobs/{job['id']}/cancel")
    finally:
        daemon.stop()


class _EchoingKato(_NotQuiteKato):
    """Answers learns as FastAPI answers a body it refuses: a 422 that quotes what it was sent."""

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.path == "/sessions":
            self._answer({"session_id": "session-1"})
            return
        body = json.dumps({"detail": [{"type": "value_error", "loc": ["body"], "msg": "refused",
                                       "input": json.loads(raw), "ctx": {"given": raw.decode()}}]}).encode()  # fmt: skip
        self.send_response(422)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _MisnamingKato(_NotQuiteKato):
    """Learns and answers a name KATO's rule would not give."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self._answer({"session_id": "session-1"} if self.path == "/sessions"
                     else {"auto_learned_patterns": ["PTRN|0123456789abcdef0123456789abcdef01234567"]})  # fmt: skip


def test_errors_and_logs_never_quote_sample_text(tmp_path: Path) -> None:
    echoing = _QuietServer(("127.0.0.1", 0), _EchoingKato)
    misnaming = _QuietServer(("127.0.0.1", 0), _MisnamingKato)
    for server in (echoing, misnaming):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    source = tmp_path / "private.jsonl"
    source.write_text("".join(json.dumps({"text": f"confidential zanzibar record {i} of the quarterly figures"}) + "\n"
                              for i in range(4)))  # fmt: skip
    urls = (f"http://127.0.0.1:{echoing.server_port}", f"http://127.0.0.1:{misnaming.server_port}")
    daemon = Daemon(tmp_path / "state", kato_urls=urls, INGESTD_MAX_JOBS="1").start()
    try:
        with daemon.client() as client:
            refused = client.post("/jobs", json={"source": str(source), "kato_url": urls[0]}).json()["id"]
            refused_job = wait_for(client, refused, {"succeeded", "failed"})
            assert refused_job["progress"]["samples"]["failed"] == 4, refused_job
            misnamed = client.post("/jobs", json={"source": str(source), "kato_url": urls[1]}).json()["id"]
            misnamed_job = wait_for(client, misnamed, {"succeeded", "failed"})
            assert misnamed_job["state"] == "failed" and "not KATO-compatible" in misnamed_job["error"]
            shown = json.dumps(client.get("/jobs").json())
    finally:
        daemon.stop()
        echoing.shutdown()
        misnaming.shutdown()
    assert "refused" in json.dumps(refused_job)  # the server's reason is kept...
    for word in ("zanzibar", "confidential", "quarterly", "\\u0120"):  # ...never the text, nor its tokens
        assert word not in shown and word not in daemon.logs, word
        for path in (tmp_path / "state").rglob("*"):
            if path.is_file():
                assert word.encode() not in path.read_bytes(), (word, path)


def test_the_daemon_closes_connections_that_never_finish_their_headers(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "state", INGESTD_HEADER_TIMEOUT="1").start()
    try:
        # and never the rest of the headers
        assert closed_by_the_server(daemon.port, b"POST /jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ", 50) == 50
        assert httpx.get(daemon.url + "/healthz", timeout=10).status_code == 200
    finally:
        daemon.stop()
