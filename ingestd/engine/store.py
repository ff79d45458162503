"""Durable storage for knowledge bases and sessions: one SQLite file in WAL mode.

Jobs run on the event loop's thread in the order they were submitted, grouped
into one transaction per turn of the loop ("group commit"): concurrent
requests share one transaction and one sync, so throughput grows with
concurrency while each job still sees a serial order. That order is what makes
frequencies exact under any number of concurrent sessions, and a single
connection means "database is locked" cannot happen. A job's result is handed
back only after its transaction committed, so an acknowledged learn is on disk.

Only the commit leaves the loop, and only when it syncs to disk (``FULL``): it
runs in a thread of its own while the next group gathers. The statements
themselves stay on the loop: a writer thread that ran them would trade the GIL
with the loop at every SQLite step, and on a busy server each of those
hand-overs waits for the loop's switch interval (measured: a writer thread
spent 80% of its time waiting so, and held the server to 60% of one core).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import json
import os
import secrets
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

import orjson

from ingestd.engine import feeders, ledger, rules
from ingestd.engine.session import Learn

T = TypeVar("T")
Job = Callable[[sqlite3.Connection], Any]

# ``patterns`` is a rowid table with its key in an index, not a ``WITHOUT ROWID`` table clustered on the key
# (a store created with that earlier layout keeps it, and works the same): names are SHA-1s, so every new
# pattern lands on a random page of the key's B-tree, and a commit writes each page it dirtied to the WAL in
# full. Index entries are a third of a row, and new rows append to the table's last pages, so a commit
# dirties fewer pages: measured on 200k upserts, 20 us a row instead of 33, and a server's system time
# during an HTTP run 0.8 -> 0.5 s. The file is about a quarter larger.
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
);
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    expires_at REAL NOT NULL,
    document BLOB NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sessions_by_expiry ON sessions (expires_at);
CREATE TABLE IF NOT EXISTS applied (
    key TEXT PRIMARY KEY,
    outcome BLOB NOT NULL,
    applied_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
""" + ledger.SCHEMA + feeders.SCHEMA

_EMPTY_LIST = b"[]"
_EMPTY_MAP = b"{}"
_MAX_GROUP = 512


def _exact(value: bytes) -> bytes:
    """A copy of its own length, for bytes held while a batch is built: orjson (from 3.12) gives every result a
    buffer of at least 4 KB, which a list of a thousand of them would hold at once."""
    return bytes(memoryview(value))


class StoreClosed(RuntimeError):
    """The store was closed; no more jobs are accepted."""


class StoreBusy(OSError):
    """Another process has the store to itself (maintenance such as ``ingestd inspect prune``), or, asking for it
    alone, others are writing to it."""


LOCK_FILE = "kato.lock"
TURN_FILE = "kato.turn"


def writer_lock(directory: Path, *, exclusive: bool) -> IO[str]:
    """Hold ``<directory>/kato.lock``: shared by every process that learns into the store (runs, servers), to
    itself for maintenance that must not interleave with learning. Released when the returned file is closed
    (or the process dies). Raises :class:`StoreBusy` at once rather than wait."""
    path = Path(directory) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a+", encoding="utf-8")
    try:
        fcntl.flock(handle, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        if exclusive:
            raise StoreBusy(f"{path.parent} is being learned into (a run or a server has it open): wait for the run "
                            "to finish, or stop the server, then try again") from None  # fmt: skip
        raise StoreBusy(f"{path.parent} is being changed by {holder or 'a maintenance command'}: wait for it to "
                        "finish, then try again") from None  # fmt: skip
    if exclusive:
        handle.seek(0)
        handle.truncate()
        handle.write(f"ingestd (pid {os.getpid()})")
        handle.flush()
    return handle


class KnowledgeStore:
    """Knowledge bases and sessions in ``<directory>/kato.sqlite3``, used from one event loop."""

    def __init__(self, directory: Path, *, synchronous: str = "FULL", persistence: int = 5,
                 busy_timeout: float = 10.0) -> None:  # fmt: skip
        self.path = Path(directory) / "kato.sqlite3"
        self.synchronous = synchronous
        self.busy_timeout = busy_timeout  # seconds a write waits for another process's
        # Processes writing to one store (a server's --workers, a run beside a server) take turns through a lock
        # file, waited for in a thread: SQLite's own wait for its write lock polls, sleeping up to 100 ms between
        # tries, on the caller's thread (here the event loop), so one process would keep the lock while the others
        # sleep. Uncontended, a turn is taken at once, on the loop.
        self._turn: IO[str] | None = None
        self._turns: concurrent.futures.ThreadPoolExecutor | None = None
        self.persistence = persistence
        self._connection: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._pending: list[tuple[Job, asyncio.Future[Any]]] = []
        self._busy = False  # a group is scheduled or committing
        self._idle: asyncio.Event | None = None
        self._syncer: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False
        self._writer_lock: IO[str] | None = None
        self.store_id = ""  # random, made with the file: tells one knowledge store from another

    # -- lifecycle -----------------------------------------------------------
    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer_lock = writer_lock(self.path.parent, exclusive=False)
        try:
            self._connection = self._connect()  # fail here, in the caller, if the file is unusable
        except BaseException:
            self._writer_lock.close()
            self._writer_lock = None
            raise
        self._reader = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None,
                                       check_same_thread=False)  # fmt: skip
        if self.synchronous == "FULL":
            self._syncer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kato-sync")
        self._turn = (self.path.parent / TURN_FILE).open("a+", encoding="utf-8")
        self._turns = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kato-turn")

    def check(self) -> None:
        """Open the file as :meth:`open` would, and close it: raises ``sqlite3.Error`` or ``OSError`` if it
        cannot serve (damaged, locked by another process, a directory, not writable)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        writer_lock(self.path.parent, exclusive=False).close()
        self._connect().close()

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute(f"PRAGMA synchronous={self.synchronous}")
        connection.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
        connection.execute("PRAGMA temp_store=MEMORY")
        connection.executescript(_SCHEMA)
        connection.execute("INSERT OR IGNORE INTO meta VALUES ('store_id', ?)", (secrets.token_hex(8),))
        self.store_id = connection.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()[0]
        return connection

    async def aclose(self) -> None:
        """Finish every submitted job, checkpoint the WAL into the main file, close."""
        if self._connection is None or self._closed:
            return
        self._closed = True
        while self._busy or self._pending:
            self._idle = self._idle or asyncio.Event()
            await self._idle.wait()
            self._idle = None
        connection, self._connection = self._connection, None
        try:
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass
        connection.close()
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._syncer is not None:
            self._syncer.shutdown()
        if self._turns is not None and self._turn is not None:
            self._turns.shutdown()
            self._turn.close()
            self._turn, self._turns = None, None
        if self._writer_lock is not None:
            self._writer_lock.close()
            self._writer_lock = None

    async def run(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``job`` in the next group; returns its result once that group committed."""
        if self._closed or self._connection is None:
            raise StoreClosed("the knowledge store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._pending.append((job, future))
        if not self._busy:
            self._busy = True
            loop.call_soon(self._start_group)  # after the other callbacks of this turn have queued theirs
        return await future

    def read(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """Run a short read-only ``job`` now, on the loop, against what is committed (WAL snapshot)."""
        if self._reader is None:
            raise StoreClosed("the knowledge store is closed")
        return job(self._reader)

    def _start_group(self, after_turn: bool = False) -> None:
        """Run the next group once this process has its turn. Right after a turn it queues for the next one in the
        kernel (from a thread), so that a process already waiting there goes first."""
        if self._turns is None or self._turn is None:
            self._run_group()
            return
        if not after_turn:
            try:
                fcntl.flock(self._turn, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            else:
                self._run_group()
                return
        turn = asyncio.get_running_loop().run_in_executor(self._turns, fcntl.flock, self._turn, fcntl.LOCK_EX)
        turn.add_done_callback(self._turn_taken)

    def _turn_taken(self, turn: asyncio.Future[None]) -> None:
        failure = turn.exception()
        if failure is None:
            self._run_group()
            return
        group, self._pending = self._pending[:_MAX_GROUP], self._pending[_MAX_GROUP:]
        self._finish(group, [], failure)

    def _run_group(self) -> None:
        group, self._pending = self._pending[:_MAX_GROUP], self._pending[_MAX_GROUP:]
        connection = self._connection
        assert connection is not None
        outcomes: list[tuple[bool, Any]] = []
        try:
            connection.execute("BEGIN IMMEDIATE")
            for job, _ in group:
                # A savepoint per job: one failing job leaves the others' work intact.
                connection.execute("SAVEPOINT job")
                try:
                    outcomes.append((True, job(connection)))
                    connection.execute("RELEASE job")
                except Exception as error:  # noqa: BLE001 - handed to the waiting caller
                    connection.execute("ROLLBACK TO job")
                    connection.execute("RELEASE job")
                    outcomes.append((False, error))
        except Exception as error:  # noqa: BLE001 - the transaction could not run (disk, I/O)
            self._finish(group, outcomes, error)
            return
        if self._syncer is None:
            self._finish(group, outcomes, self._commit())
            return
        syncing = asyncio.get_running_loop().run_in_executor(self._syncer, self._commit)
        syncing.add_done_callback(lambda done: self._finish(group, outcomes, done.exception() or done.result()))

    def _commit(self) -> BaseException | None:
        connection = self._connection
        assert connection is not None
        try:
            connection.execute("COMMIT")
        except Exception as error:  # noqa: BLE001 - commit failed (disk full, I/O error)
            with contextlib.suppress(sqlite3.Error):
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
            return error
        return None

    def _finish(self, group: list[tuple[Job, asyncio.Future[Any]]], outcomes: list[tuple[bool, Any]],
                failure: BaseException | None) -> None:  # fmt: skip
        try:
            if failure is not None and self._connection is not None and self._connection.in_transaction:
                self._connection.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # the caller hears of the failure; the connection rolls back when it is next used or closed
        finally:
            if self._turn is not None:
                fcntl.flock(self._turn, fcntl.LOCK_UN)  # the others' turn: one waiting in the kernel is woken now
        for index, (_, future) in enumerate(group):
            if future.done():  # the caller was cancelled; its job ran (or not) all the same
                continue
            if failure is not None:
                future.set_exception(failure)
            elif outcomes[index][0]:
                future.set_result(outcomes[index][1])
            else:
                future.set_exception(outcomes[index][1])
        if self._pending:
            self._start_group(after_turn=True)
        else:
            self._busy = False
            if self._idle is not None:
                self._idle.set()

    # -- jobs (run on the loop, inside a group's transaction) ------------------------------------------
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
    def add_plain(connection: sqlite3.Connection, rows: Iterable[tuple[str, str, bytes, int, int]]) -> None:
        """Learns without emotives or metadata, counted: each row (kb, name, pattern data, length, count)
        is ``count`` learns of one pattern at once (frequencies add; a pattern's data never changes)."""
        connection.executemany(
            "INSERT INTO patterns VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (kb_id, name) DO UPDATE SET frequency = frequency + excluded.frequency",
            # A generator: each row's values are dropped once it is written (rows may be made as they go).
            ((kb, name, data, length, count, _EMPTY_LIST, _EMPTY_MAP) for kb, name, data, length, count in rows),
        )  # fmt: skip

    @staticmethod
    def add_with_metadata(connection: sqlite3.Connection,
                          rows: Iterable[tuple[str, str, bytes, int, int, dict[str, list[str]]]]) -> None:  # fmt: skip
        """Learns carrying metadata, counted: each row (kb, name, pattern data, length, count, metadata) is
        ``count`` learns of one pattern whose metadata, folded together, is ``metadata``; stored metadata
        is merged as each learn would have (sorted union per key, KATO §5.5)."""
        merged = []
        for kb, name, data, length, count, metadata in rows:
            row = connection.execute("SELECT metadata FROM patterns WHERE kb_id = ? AND name = ?", (kb, name)).fetchone()
            if row is not None:
                metadata = rules.merge_metadata(orjson.loads(row[0]), metadata)
            merged.append((kb, name, _exact(data), length, count, _EMPTY_LIST, _exact(orjson.dumps(metadata))))
        connection.executemany(
            "INSERT INTO patterns VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (kb_id, name) "
            "DO UPDATE SET frequency = frequency + excluded.frequency, metadata = excluded.metadata",
            merged,
        )  # fmt: skip

    @staticmethod
    def save_session(connection: sqlite3.Connection, document: dict[str, Any]) -> None:
        connection.execute(
            "INSERT OR REPLACE INTO sessions VALUES (?, ?, ?)",
            (document["session_id"], document["expires_at"], dump_document(document)),
        )

    @staticmethod
    def record_applied(connection: sqlite3.Connection, key: str, outcome: Any, now: float) -> None:
        connection.execute("INSERT OR REPLACE INTO applied VALUES (?, ?, ?)", (key, orjson.dumps(outcome), now))

    @staticmethod
    def applied_outcome(connection: sqlite3.Connection, key: str) -> Any:
        row = connection.execute("SELECT outcome FROM applied WHERE key = ?", (key,)).fetchone()
        return None if row is None else orjson.loads(row[0])

    @staticmethod
    def forget_applied(connection: sqlite3.Connection, before: float) -> int:
        return connection.execute("DELETE FROM applied WHERE applied_at < ?", (before,)).rowcount

    @staticmethod
    def load_session(connection: sqlite3.Connection, session_id: str) -> dict[str, Any] | None:
        row = connection.execute("SELECT document FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
        return None if row is None else load_document(row[0])

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
        """clear-all: the patterns, and what ingestd's extensions recorded about them."""
        connection.execute("DELETE FROM patterns WHERE kb_id = ?", (kb_id,))
        ledger.forget_kb(connection, kb_id)
        feeders.forget_kb(connection, kb_id)

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


def dump_document(document: Any) -> bytes:
    """A session document as JSON. orjson stops at 255 levels of nesting and refuses lone surrogates
    ("\\ud800" is valid JSON), and observation metadata (kept raw in the accumulator until a learn folds it into
    strings) may be anything KATO's own JSON parser takes: those documents are written escaped by json."""
    try:
        return orjson.dumps(document)
    except TypeError:
        return json.dumps(document).encode()


def load_document(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


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
