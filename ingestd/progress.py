"""A run's durable record: which samples are done, which were in flight, which failed.

``<run dir>/progress.sqlite3`` (WAL, committed per sample; it survives ``kill -9`` of ingestd) and
``<run dir>/failed.jsonl`` (the dead letters: one line per failed sample, for people and scripts).

* A sample is *done* only when every level has learned it; resume skips exactly the done ones, whatever
  order the workers finished them in.
* A sample is *in flight* from its first request until it is done or failed. Rows still there when a
  run starts belong to a run that was killed: against a server that honours idempotency keys they are
  redone exactly once; otherwise each is reported as a possible duplicate.
* The run's configuration (source, tokenizer, hierarchy) is fingerprinted; a run directory refuses a
  different one.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from pathlib import Path
from typing import Any

import orjson

from ingestd.errors import IngestError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS run (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS done (sample_index INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS inflight (sample_index INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS failed (sample_index INTEGER PRIMARY KEY, reason TEXT NOT NULL, failed_at REAL NOT NULL);
"""


class ProgressError(IngestError):
    """The run directory cannot be used (unwritable, full, or holding another run)."""


class ConfigChanged(ProgressError):
    """The run directory holds a run with a different configuration."""

    exit_code = 4


def fingerprint(identity: dict[str, Any]) -> str:
    """A stable hash of what decides the knowledge base: source, tokenizer, hierarchy."""
    return hashlib.sha256(orjson.dumps(identity, option=orjson.OPT_SORT_KEYS)).hexdigest()


class Progress:
    def __init__(self, run_dir: Path, identity: dict[str, Any], source_label: str) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "progress.sqlite3"
        self.dead_letters = self.run_dir / "failed.jsonl"
        self.identity = identity
        self.fingerprint = fingerprint(identity)
        self.source_label = source_label
        self.done: set[int] = set()
        self.interrupted: list[int] = []  # in flight when an earlier run stopped
        self.failed: dict[int, str] = {}
        self._connection: sqlite3.Connection | None = None

    def open(self, *, fresh: bool = False) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            connection = self._connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")  # survives kill -9; one fsync per checkpoint
            connection.executescript(_SCHEMA)
            if fresh:
                connection.executescript("DELETE FROM run; DELETE FROM done; DELETE FROM inflight; DELETE FROM failed;")
                self.dead_letters.unlink(missing_ok=True)
            row = connection.execute("SELECT value FROM run WHERE key = 'fingerprint'").fetchone()
        except (OSError, sqlite3.Error) as error:
            raise ProgressError(
                f"cannot keep progress in {self.run_dir} ({error}): give a writable directory with --run-dir"
            ) from None
        if row is not None and row[0].decode() != self.fingerprint:
            stored = connection.execute("SELECT value FROM run WHERE key = 'identity'").fetchone()
            raise ConfigChanged(
                f"{self.run_dir} holds a run with another configuration ({_difference(stored, self.identity)}): "
                "resume it with the same source, tokenizer and hierarchy, or use another --run-id / --run-dir, "
                "or --fresh to start it over"
            )
        self._commit(lambda c: c.executemany("INSERT OR REPLACE INTO run VALUES (?, ?)", [
            ("fingerprint", self.fingerprint.encode()), ("identity", orjson.dumps(self.identity))]))  # fmt: skip
        self.done = {index for (index,) in connection.execute("SELECT sample_index FROM done")}
        self.interrupted = [index for (index,) in connection.execute("SELECT sample_index FROM inflight ORDER BY 1")]
        self.failed = dict(connection.execute("SELECT sample_index, reason FROM failed").fetchall())

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _commit(self, change: Any) -> None:
        assert self._connection is not None
        try:
            change(self._connection)
        except sqlite3.Error as error:
            raise ProgressError(
                f"cannot record progress in {self.path} ({error}): free space there or give another --run-dir; "
                "every sample recorded as done so far stays done, and the run resumes from there"
            ) from None

    def started(self, index: int) -> None:
        self._commit(lambda c: c.execute("INSERT OR IGNORE INTO inflight VALUES (?)", (index,)))

    def finished(self, index: int) -> None:
        def change(connection: sqlite3.Connection) -> None:
            connection.execute("BEGIN")
            connection.execute("INSERT OR IGNORE INTO done VALUES (?)", (index,))
            connection.execute("DELETE FROM inflight WHERE sample_index = ?", (index,))
            connection.execute("DELETE FROM failed WHERE sample_index = ?", (index,))
            connection.execute("COMMIT")

        self._commit(change)
        self.done.add(index)
        self.failed.pop(index, None)

    def fail(self, index: int, reason: str) -> None:
        now = time.time()

        def change(connection: sqlite3.Connection) -> None:
            connection.execute("BEGIN")
            connection.execute("INSERT OR REPLACE INTO failed VALUES (?, ?, ?)", (index, reason, now))
            connection.execute("DELETE FROM inflight WHERE sample_index = ?", (index,))
            connection.execute("COMMIT")

        self._commit(change)
        self.failed[index] = reason
        try:
            with self.dead_letters.open("ab") as letters:
                letters.write(orjson.dumps({"sample_index": index, "source": self.source_label, "reason": reason,
                                            "failed_at": now}) + b"\n")  # fmt: skip
        except OSError as error:
            raise ProgressError(f"cannot append to {self.dead_letters} ({error}): free space or fix its permissions") from None


def _difference(stored: tuple[bytes] | None, identity: dict[str, Any]) -> str:
    if stored is None:
        return "unknown"
    before = orjson.loads(stored[0])
    changed = [key for key in sorted(set(before) | set(identity)) if before.get(key) != identity.get(key)]
    return "; ".join(f"{key}: {before.get(key)!r} then, {identity.get(key)!r} now" for key in changed) or "unknown"
