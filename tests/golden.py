"""The golden hierarchy runs, and the plain sequential client the golden README describes.

``SequentialClient`` is deliberately the notebook way (one call per slice,
one sample at a time) so that tests can compare anything ingestd does
against it.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from ingestd.engine.rules import chunk_name, kb_id

from .conftest import GOLDEN

RUNS = sorted(path.name for path in (GOLDEN / "hierarchy").iterdir() if (path / "expected.json").exists())


@dataclass(frozen=True)
class GoldenRun:
    name: str
    texts: list[str]
    expected: dict[str, Any]

    @property
    def chunk_sizes(self) -> list[int]:
        return [level["chunk_size"] for level in self.expected["config"]["levels"]]

    @property
    def metadata_levels(self) -> list[bool]:
        return [level["capture_metadata"] for level in self.expected["config"]["levels"]]

    @property
    def label(self) -> str:
        return self.expected["config"]["metadata_source_label"]


def load_run(name: str) -> GoldenRun:
    folder = GOLDEN / "hierarchy" / name
    texts = [json.loads(line)["text"] for line in (folder / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    return GoldenRun(name, texts, json.loads((folder / "expected.json").read_text(encoding="utf-8")))


class SequentialClient:
    """The golden README's reference driver: one session per node, one observe-sequence per slice."""

    def __init__(self, client: httpx.Client, node_ids: list[str], chunk_sizes: list[int],
                 metadata_levels: list[bool], label: str) -> None:  # fmt: skip
        self.client = client
        self.node_ids = node_ids
        self.chunk_sizes = chunk_sizes
        self.metadata_levels = metadata_levels
        self.label = label
        self.sessions = [self._create(node) for node in node_ids]

    def _create(self, node_id: str) -> str:
        answer = self.client.post("/sessions", json={"node_id": node_id, "config": {"process_predictions": False}})
        answer.raise_for_status()
        return answer.json()["session_id"]

    def learn_sample(self, sample_index: int, tokens: list[str]) -> list[list[str]]:
        names_per_level: list[list[str]] = []
        symbols = tokens
        for level, (session, size) in enumerate(zip(self.sessions, self.chunk_sizes, strict=True)):
            names: list[str] = []
            for start in range(0, len(symbols), size):
                chunk = symbols[start : start + size]
                if len(chunk) < 2:
                    continue
                observations: list[dict[str, Any]] = [{"strings": [symbol]} for symbol in chunk]
                if self.metadata_levels[level]:
                    observations[0]["metadata"] = {"source": self.label, "sample_index": sample_index}
                answer = self.client.post(
                    f"/sessions/{session}/observe-sequence", json={"observations": observations, "learn_at_end": True}
                )
                answer.raise_for_status()
                name = answer.json()["final_learned_pattern"]
                assert name == chunk_name(chunk), f"server name {name} differs from the local hash"
                names.append(name)
                if self.metadata_levels[level]:
                    self.client.post(f"/sessions/{session}/clear-stm").raise_for_status()
            names_per_level.append(names)
            symbols = names
        return names_per_level

    def close(self) -> None:
        for session in self.sessions:
            self.client.delete(f"/sessions/{session}")


def read_back(client: httpx.Client, node_ids: list[str], expected_kb: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every expected pattern as the server returns it, level by level (``GET /pattern``)."""
    actual: dict[str, dict[str, Any]] = {}
    for level, node_id in enumerate(node_ids):
        patterns: dict[str, Any] = {}
        for name in expected_kb[f"node{level}"]:
            answer = client.get(f"/pattern/{name.replace('|', '%7C')}", params={"node_id": node_id})
            answer.raise_for_status()
            body = answer.json()["pattern"]
            assert body["status"] == "okay", f"node{level} lacks {name}: {body}"
            pattern = body["pattern"]
            patterns[name] = {key: pattern[key] for key in ("frequency", "length", "metadata", "pattern_data", "emotives")}
        actual[f"node{level}"] = patterns
    return actual


def stored_counts(database: Path, node_ids: list[str]) -> list[int]:
    """How many patterns the engine's SQLite file holds per node: proves nothing extra was stored."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        return [
            connection.execute("SELECT count(*) FROM patterns WHERE kb_id = ?", (kb_id(node),)).fetchone()[0]
            for node in node_ids
        ]


def assert_kb_equal(expected: dict[str, Any], actual: dict[str, Any]) -> None:
    """Per node, every name with equal frequency, length, pattern_data, emotives; metadata as a map."""
    assert list(expected) == list(actual)
    for node, patterns in expected.items():
        assert set(patterns) == set(actual[node]), f"{node}: different names"
        for name, pattern in patterns.items():
            got = actual[node][name]
            for key in ("frequency", "length", "pattern_data", "emotives"):
                assert got[key] == pattern[key], f"{node} {name} {key}: expected {pattern[key]!r}, got {got[key]!r}"
            assert got["metadata"] == pattern["metadata"], f"{node} {name} metadata"


def kb_dump(database: Path, node_ids: list[str]) -> list[dict[str, dict[str, Any]]]:
    """Every stored pattern per level, read from the engine's SQLite file (metadata compared as a map)."""
    levels = []
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        for node in node_ids:
            rows = connection.execute(
                "SELECT name, pattern_data, length, frequency, emotives, metadata FROM patterns WHERE kb_id = ?",
                (kb_id(node),),
            )
            levels.append({
                "PTRN|" + name: {"pattern_data": json.loads(data), "length": length, "frequency": frequency,
                                 "emotives": json.loads(emotives), "metadata": json.loads(metadata)}
                for name, data, length, frequency, emotives, metadata in rows
            })  # fmt: skip
    return levels


def run_cli(*arguments: str, timeout: float = 300, events: list[dict[str, Any]] | None = None,
            expect: int = 0) -> dict[str, Any]:  # fmt: skip
    """``ingestd run ...`` as a real subprocess, which must exit with ``expect`` (7: samples failed); returns
    its JSON summary. Its log events (JSON lines on stderr, as in production) are appended to ``events``."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        summary_path = Path(scratch) / "summary.json"
        run_dir = [] if "--run-dir" in arguments else ["--run-dir", str(Path(scratch) / "run")]  # a new run each call
        result = subprocess.run([sys.executable, "-m", "ingestd", "run", *arguments, *run_dir, "--summary-json", str(summary_path),
                                 "--log-format", "json"], capture_output=True, text=True, timeout=timeout)  # fmt: skip
        assert result.returncode == expect, f"ingestd run exited {result.returncode}:\n{result.stderr[-3000:]}"
        if events is not None:
            events.extend(json.loads(line) for line in result.stderr.splitlines() if line.startswith("{"))
        return json.loads(summary_path.read_text(encoding="utf-8"))


def samples_done(run_dir: Path) -> int:
    """How many samples a run directory records as done (0 while it does not exist yet)."""
    try:
        with sqlite3.connect(f"file:{run_dir / 'progress.sqlite3'}?mode=ro", uri=True, timeout=5) as connection:
            return connection.execute("SELECT count(*) FROM done").fetchone()[0]
    except sqlite3.Error:
        return 0


def wait_for_samples(process: Any, run_dir: Path, samples: int, timeout: float = 120) -> None:
    """Until ``run_dir`` records ``samples`` done; fails if the ``ingestd run`` process ends first."""
    import time

    deadline = time.monotonic() + timeout
    while samples_done(run_dir) < samples:
        if process.poll() is not None:
            error = process.stderr.read() if getattr(process, "stderr", None) else ""
            raise AssertionError(f"ingestd ended before {samples} samples were done: {error[-3000:]}")
        assert time.monotonic() < deadline, "no progress recorded"
        time.sleep(0.005)
