"""Replay every KATO 3.10.1 transcript against the engine server, by the rules of the golden README."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import pytest

from ingestd.engine.rules import kb_id

from .conftest import GOLDEN, EngineServer

TRANSCRIPTS = sorted((GOLDEN / "transcripts").glob("*.json"))

MASKED = "<masked>"
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z$")
ISO_OFFSET = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?\+00:00$")
OBS_ID = re.compile(r"^obs-[0-9a-f]{32}$")
SEQ_OBS_ID = re.compile(r"^seq-obs-[0-9a-f]{32}$")
SESSION_ID = re.compile(r"^session-[0-9a-f]{32}-\d+$")


class Replay:
    """Maps recorded node ids and session ids to the ones of this run."""

    def __init__(self, steps: list[dict[str, Any]]) -> None:
        suffix = "-r" + uuid.uuid4().hex[:8]
        recorded: set[str] = set()
        for step in steps:
            body = step.get("body")
            if step["path"] == "/sessions" and isinstance(body, dict) and isinstance(body.get("node_id"), str):
                recorded.add(body["node_id"])
            for key, value in parse_qsl(urlsplit(step["path"]).query):
                if key == "node_id":
                    recorded.add(value)
            for key, value in (step.get("headers") or {}).items():
                if key.lower() == "x-node-id":
                    recorded.add(value)
        self.node_ids = {node: node + suffix for node in recorded}
        self.kb_ids = {kb_id(node): kb_id(new) for node, new in self.node_ids.items()}
        self.session_ids: dict[str, str] = {}

    def sessions(self, text: str) -> str:
        for recorded, new in self.session_ids.items():
            text = text.replace(recorded, new)
        return text

    def request(self, step: dict[str, Any]) -> tuple[str, str, bytes | None, dict[str, str]]:
        split = urlsplit(step["path"])
        query = [(key, self.node_ids.get(value, value) if key == "node_id" else value)
                 for key, value in parse_qsl(split.query, keep_blank_values=True)]  # fmt: skip
        path = self.sessions(split.path) + ("?" + urlencode(query) if query else "")
        headers = {key: self.node_ids.get(value, value) if key.lower() == "x-node-id" else value
                   for key, value in (step.get("headers") or {}).items()}  # fmt: skip
        body = step.get("body")
        content: bytes | None = None
        if step.get("raw_body"):
            content = body.encode("utf-8")
            headers["content-type"] = "application/json"
        elif body is not None:
            if step["path"] == "/sessions" and isinstance(body, dict) and "node_id" in body:
                body = {**body, "node_id": self.node_ids.get(body["node_id"], body["node_id"])}
            content = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
            headers["content-type"] = "application/json"
        return step["method"], path, content, headers

    def expected(self, value: Any) -> Any:
        if isinstance(value, str):
            if value in self.node_ids:
                return self.node_ids[value]
            if value in self.kb_ids:
                return self.kb_ids[value]
            return self.sessions(value)
        if isinstance(value, list):
            return [self.expected(item) for item in value]
        if isinstance(value, dict):
            return {key: self.expected(item) for key, item in value.items()}
        return value


def mask(step: dict[str, Any], response: Any, sent_unique_ids: set[str]) -> Any:
    """Replace volatile values by a marker after checking their shape (golden README table)."""
    path = urlsplit(step["path"]).path

    def check(value: Any, predicate: Any, what: str) -> str:
        assert predicate(value), f"{what}: unexpected shape {value!r}"
        return MASKED

    def walk(value: Any, key: str | None = None) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(item, key) for item in value]
        if key in ("created_at", "expires_at"):
            return check(value, lambda v: isinstance(v, str) and ISO_Z.match(v), key)
        if key == "unique_id" and value not in sent_unique_ids:
            return check(value, lambda v: isinstance(v, str) and (OBS_ID.match(v) or SEQ_OBS_ID.match(v)), key)
        return value

    masked = walk(response)
    if not isinstance(masked, dict):
        return masked
    if step["method"] == "GET" and re.fullmatch(r"/sessions/[^/]+", path) and "ttl_seconds" in masked:
        masked["ttl_seconds"] = check(masked["ttl_seconds"], lambda v: type(v) is int and v >= 0, "ttl_seconds")
    if path == "/health":
        for key, kind in (("status", str), ("issues", list), ("uptime_seconds", float), ("metrics_collected", int),
                          ("last_collection", float), ("active_sessions", int)):  # fmt: skip
            if key in masked:
                masked[key] = check(masked[key], lambda v, kind=kind: type(v) is kind, key)
        if "timestamp" in masked:
            masked["timestamp"] = check(masked["timestamp"], lambda v: ISO_OFFSET.match(v), "timestamp")
    if path == "/" and "uptime_seconds" in masked:
        masked["uptime_seconds"] = check(masked["uptime_seconds"], lambda v: type(v) is float, "uptime_seconds")
    return masked


def assert_same(expected: Any, actual: Any, where: str = "$", as_map: bool = False) -> None:
    """Strict JSON equality: types and key order, except objects under ``metadata`` (compared as maps)."""
    assert type(expected) is type(actual), f"{where}: expected {expected!r}, got {actual!r}"
    if isinstance(expected, dict):
        if as_map:
            assert set(expected) == set(actual), f"{where}: keys {sorted(expected)} != {sorted(actual)}"
        else:
            assert list(expected) == list(actual), f"{where}: keys {list(expected)} != {list(actual)}"
        for key in expected:
            assert_same(expected[key], actual[key], f"{where}.{key}", as_map=key == "metadata")
    elif isinstance(expected, list):
        assert len(expected) == len(actual), f"{where}: {len(expected)} items expected, got {len(actual)}: {actual!r}"
        for index, (left, right) in enumerate(zip(expected, actual, strict=True)):
            assert_same(left, right, f"{where}[{index}]", as_map=as_map and isinstance(left, dict))
    else:
        assert expected == actual, f"{where}: expected {expected!r}, got {actual!r}"


def replay(server_url: str, transcript: Path) -> None:
    scenario = json.loads(transcript.read_text(encoding="utf-8"))
    steps = scenario["steps"]
    mapping = Replay(steps)
    with httpx.Client(base_url=server_url, timeout=30.0) as client:
        for number, step in enumerate(steps):
            method, path, content, headers = mapping.request(step)
            answer = client.request(method, path, content=content, headers=headers)
            where = f"{transcript.name} step {number}: {step['method']} {step['path']}"
            assert answer.status_code == step["status"], f"{where}: status {answer.status_code}: {answer.text}"
            assert answer.headers["content-type"] == "application/json", where
            actual = answer.json()
            if step["path"] == "/sessions" and step["status"] == 200:
                mapping.session_ids[step["response"]["session_id"]] = actual["session_id"]
                assert SESSION_ID.match(actual["session_id"]), where
            sent_ids = {item["unique_id"] for item in (step.get("body") or {}).get("observations", [])
                        if isinstance(item, dict) and "unique_id" in item} if isinstance(step.get("body"), dict) else set()  # fmt: skip
            expected = mask(step, mapping.expected(step["response"]), sent_ids)
            assert_same(expected, mask(step, actual, sent_ids), where)
            # The body must be KATO's bytes too: compact, raw UTF-8.
            assert answer.content == json.dumps(actual, separators=(",", ":"), ensure_ascii=False).encode(), where


def test_every_transcript_is_present() -> None:
    assert len(TRANSCRIPTS) >= 24


@pytest.mark.parametrize("transcript", TRANSCRIPTS, ids=[path.stem for path in TRANSCRIPTS])
def test_transcript_replays_exactly(engine_server: EngineServer, transcript: Path) -> None:
    replay(engine_server.url, transcript)
