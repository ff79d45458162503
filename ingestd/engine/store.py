"""Durable storage for knowledge bases and sessions: one SQLite file in WAL mode.

All access goes through a single writer thread that commits groups of jobs
together ("group commit"): concurrent requests share one transaction and one
sync, so throughput grows with concurrency while each job still sees a
serial order. That order is what makes frequencies exact under any number of
concurrent sessions, and a single connection means "database is locked"
cannot happen. A job's future resolves only after its transaction committed,
so an acknowledged learn is on disk.
"""

from __future__ import annotations

import concurrent.futures
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import orjson

from ingestd.engine import rules
from ingestd.engine.session import Learn

T = TypeVar("T")
Job = Callable[[sqlite3.Connection], Any]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS patterns (
    kb_id TEXT NOT NULL,
    name TEXT NOT NULL,
    pattern_data BLOB NOT NULL,
    length INTEGER NOT NULL,
    frequency INTEGER NOT NULL,
    emotives BLOB NOT NULL,
    metadata BLOB NOT NULL,
    PRIMARY KEY (kb_id, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    expires_at REAL NOT NULL,
    document BLOB NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sessions_by_expiry ON sessions (expires_at);
"""

_EMPTY_LIST = b"[]"
_EMPTY_MAP = b"{}"
_MAX_GROUP = 512


class StoreClosed(RuntimeError):
    """The store was closed; no more jobs are accepted."""


class KnowledgeStore:
    """Knowledge bases and sessions in ``<directory>/kato.sqlite3``."""

    def __init__(self, directory: Path, *, synchronous: str = "FULL", persistence: int = 5) -> None:
        self.path = Path(directory) / "kato.sqlite3"
        self.synchronous = synchronous
        self.persistence = persistence
        self._jobs: queue.SimpleQueue[tuple[Job, concurrent.futures.Future[Any]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- lifecycle -----------------------------------------------------------
    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = self._connect()  # fail here, in the caller, if the file is unusable
        self._thread = threading.Thread(target=self._run, args=(connection,), name="kato-store", daemon=True)
        self._thread.start()

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute(f"PRAGMA synchronous={self.synchronous}")
        connection.execute("PRAGMA busy_timeout=10000")
        connection.executescript(_SCHEMA)
        return connection

    def close(self) -> None:
        if self._thread is None or self._closed:
            return
        self._closed = True
        self._jobs.put(None)
        self._thread.join()

    def submit(self, job: Callable[[sqlite3.Connection], T]) -> concurrent.futures.Future[T]:
        """Queue ``job``; its future resolves after the transaction that ran it committed."""
        if self._closed or self._thread is None:
            raise StoreClosed("the knowledge store is closed")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((job, future))
        return future

    def _run(self, connection: sqlite3.Connection) -> None:
        try:
            while True:
                item = self._jobs.get()
                if item is None:
                    break
                group = [item]
                stop = False
                while len(group) < _MAX_GROUP:
                    try:
                        item = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    group.append(item)
                self._run_group(connection, group)
                if stop:
                    break
        finally:
            try:
                connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            connection.close()

    @staticmethod
    def _run_group(
        connection: sqlite3.Connection, group: list[tuple[Job, concurrent.futures.Future[Any]]]
    ) -> None:
        outcomes: list[tuple[bool, Any]] = []
        try:
            connection.execute("BEGIN IMMEDIATE")
            for job, _ in group:
                # A savepoint per job: one failing job leaves the others' work intact.
                connection.execute("SAVEPOINT job")
                try:
                    outcomes.append((True, job(connection)))
                    connection.execute("RELEASE job")
                except BaseException as error:  # noqa: BLE001 - handed to the waiting caller
                    connection.execute("ROLLBACK TO job")
                    connection.execute("RELEASE job")
                    outcomes.append((False, error))
            connection.execute("COMMIT")
        except BaseException as error:  # noqa: BLE001 - commit failed (disk full, I/O error)
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            for _, future in group:
                future.set_exception(error)
            return
        for (ok, value), (_, future) in zip(outcomes, group, strict=True):
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    # -- jobs (run on the writer thread) ------------------------------------------
    def apply_learns(self, connection: sqlite3.Connection, learns: Sequence[Learn]) -> None:
        """Store patterns as KATO's ``learnPattern`` does (§5.5), in order."""
        plain = [learn for learn in learns if not learn.emotives and not learn.metadata]
        if plain:
            # Frequency increments commute, and a pattern's data never changes after its first learn,
            # so plain learns can go in one statement ahead of the ones that merge emotives/metadata.
            connection.executemany(
                "INSERT INTO patterns VALUES (?, ?, ?, ?, 1, ?, ?) "
                "ON CONFLICT (kb_id, name) DO UPDATE SET frequency = frequency + 1",
                [(learn.kb_id, learn.pattern_hash, orjson.dumps(learn.events), learn.length, _EMPTY_LIST, _EMPTY_MAP)
                 for learn in plain],
            )  # fmt: skip
        for learn in learns:
            if not learn.emotives and not learn.metadata:
                continue
            row = connection.execute(
                "SELECT emotives, metadata FROM patterns WHERE kb_id = ? AND name = ?",
                (learn.kb_id, learn.pattern_hash),
            ).fetchone()
            if row is None:
                connection.execute(
                    "INSERT INTO patterns VALUES (?, ?, ?, ?, 1, ?, ?)",
                    (learn.kb_id, learn.pattern_hash, orjson.dumps(learn.events), learn.length,
                     orjson.dumps(learn.emotives[-self.persistence :]), orjson.dumps(learn.metadata)),
                )  # fmt: skip
                continue
            emotives, metadata = row
            if learn.emotives:
                emotives = orjson.dumps(rules.merge_emotives(orjson.loads(emotives), learn.emotives, self.persistence))
            if learn.metadata:
                metadata = orjson.dumps(rules.merge_metadata(orjson.loads(metadata), learn.metadata))
            connection.execute(
                "UPDATE patterns SET frequency = frequency + 1, emotives = ?, metadata = ? "
                "WHERE kb_id = ? AND name = ?",
                (emotives, metadata, learn.kb_id, learn.pattern_hash),
            )

    @staticmethod
    def save_session(connection: sqlite3.Connection, document: dict[str, Any]) -> None:
        connection.execute(
            "INSERT OR REPLACE INTO sessions VALUES (?, ?, ?)",
            (document["session_id"], document["expires_at"], orjson.dumps(document)),
        )

    @staticmethod
    def load_session(connection: sqlite3.Connection, session_id: str) -> dict[str, Any] | None:
        row = connection.execute("SELECT document FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
        return None if row is None else orjson.loads(row[0])

    @staticmethod
    def delete_session(connection: sqlite3.Connection, session_id: str) -> None:
        connection.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,))

    @staticmethod
    def delete_expired_sessions(connection: sqlite3.Connection, now: float) -> int:
        return connection.execute("DELETE FROM sessions WHERE expires_at < ?", (now,)).rowcount

    @staticmethod
    def count_sessions(connection: sqlite3.Connection, now: float) -> int:
        return connection.execute("SELECT count(*) FROM sessions WHERE expires_at >= ?", (now,)).fetchone()[0]

    @staticmethod
    def clear_kb(connection: sqlite3.Connection, kb_id: str) -> None:
        connection.execute("DELETE FROM patterns WHERE kb_id = ?", (kb_id,))

    @staticmethod
    def get_pattern(connection: sqlite3.Connection, kb_id: str, pattern_hash: str) -> dict[str, Any] | None:
        row = connection.execute(
            f"SELECT {_PATTERN_COLUMNS} FROM patterns WHERE kb_id = ? AND name = ?", (kb_id, pattern_hash)
        ).fetchone()
        return None if row is None else _pattern_from_row(row)

    @staticmethod
    def iter_patterns(connection: sqlite3.Connection, kb_id: str) -> list[dict[str, Any]]:
        """Every pattern of one knowledge base (for exports and tests)."""
        rows = connection.execute(f"SELECT {_PATTERN_COLUMNS} FROM patterns WHERE kb_id = ?", (kb_id,))
        return [_pattern_from_row(row) for row in rows]


_PATTERN_COLUMNS = "name, pattern_data, length, frequency, emotives, metadata"


def _pattern_from_row(row: tuple[Any, ...]) -> dict[str, Any]:
    """A stored pattern in the shape of KATO's ``GET /pattern`` (key order included)."""
    name, pattern_data, length, frequency, emotives, metadata = row
    return {
        "name": rules.PATTERN_PREFIX + name,
        "pattern_data": orjson.loads(pattern_data),
        "length": length,
        "frequency": frequency,
        "emotives": orjson.loads(emotives),
        "metadata": orjson.loads(metadata),
    }
