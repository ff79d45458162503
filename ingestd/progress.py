"""A run's durable record: its run key, which samples are done, which were in flight, which failed.

``<run dir>/progress.sqlite3`` (WAL, committed per sample; it survives ``kill -9`` of ingestd) and
``<run dir>/failed.jsonl`` (the dead letters: one line per failed sample, for people and scripts).

* The **run key** is random, made when the run directory is first used (and again by ``--fresh``). Every
  learn of the run carries it (:mod:`ingestd.engine.ledger`), so two runs never take each other's learns
  for their own, while a resumed run is recognised as the same run.
* A sample is *done* only when every level has stored all its chunks; resume skips exactly the done
  ones, whatever order the workers finished them in.
* A sample is *in flight* from its first request until it is done or failed. Rows still there when a
  run starts belong to a run that was killed: they are redone from what the run ledger says is stored
  (or, against a server without one, from the start, and reported as possible duplicates).
* A *failed* sample records how many chunks each level stored before it failed, so ``--retry-failed``
  learns exactly the rest.
* Per level, the chunks whose storing was confirmed: a resumed run checks that the knowledge base holds
  at least that many (:mod:`ingestd.resume`); and the knowledge store it learns into.
* Each done, in-flight or part-stored failed sample's digest (text and fields): a resume checks that the
  source still has that record at that index.
* The run's configuration (source, tokenizer, hierarchy) is fingerprinted; a run directory refuses a
  different one.
* One process at a time: the directory is locked while a run uses it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from ingestd.errors import IngestError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS run (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS done (sample_index INTEGER PRIMARY KEY, digest INTEGER);
CREATE TABLE IF NOT EXISTS inflight (sample_index INTEGER PRIMARY KEY, digest INTEGER);
CREATE TABLE IF NOT EXISTS failed (sample_index INTEGER PRIMARY KEY, reason TEXT NOT NULL, failed_at REAL NOT NULL);
"""


class ProgressError(IngestError):
    """The run directory cannot be used (unwritable, full, in use, or holding another run)."""


class ConfigChanged(ProgressError):
    """The run directory holds a run with a different configuration."""

    exit_code = 4


class RunInUse(ProgressError):
    """Another process is using the run directory."""


class SourceChanged(ProgressError):
    """A sample the run learned (or was learning) is not the one the source now has at its index."""

    exit_code = 4


def fingerprint(identity: dict[str, Any]) -> str:
    """A stable hash of what decides the knowledge base: source, tokenizer, hierarchy."""
    return hashlib.sha256(orjson.dumps(identity, option=orjson.OPT_SORT_KEYS)).hexdigest()


class SampleSet:
    """Sample indices, one bit each, in blocks of 65,536: a run of millions of samples remembers which are
    done in a few hundred KB, where a Python set takes over 50 MB per million."""

    _BLOCK = 1 << 16

    def __init__(self) -> None:
        self._blocks: dict[int, bytearray] = {}
        self._count = 0

    def add(self, index: int) -> None:
        block = self._blocks.get(index >> 16)
        if block is None:
            block = self._blocks[index >> 16] = bytearray(self._BLOCK // 8)
        byte, mask = (index & 0xFFFF) >> 3, 1 << (index & 7)
        if not block[byte] & mask:
            block[byte] |= mask
            self._count += 1

    def __contains__(self, index: object) -> bool:
        if not isinstance(index, int):
            return False
        block = self._blocks.get(index >> 16)
        return block is not None and bool(block[(index & 0xFFFF) >> 3] & (1 << (index & 7)))

    def __len__(self) -> int:
        return self._count


@dataclass(frozen=True)
class FailedSample:
    reason: str
    stored: list[int]  # chunks stored per level before it failed (empty: nothing was sent)


class Progress:
    def __init__(self, run_dir: Path, identity: dict[str, Any], source_label: str) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "progress.sqlite3"
        self.dead_letters = self.run_dir / "failed.jsonl"
        self.identity = identity
        self.fingerprint = fingerprint(identity)
        self.source_label = source_label
        self.run_key = ""
        self.previous_run_key: str | None = None  # replaced by --fresh: its ledger records can go
        self.done = SampleSet()
        self.interrupted: list[int] = []  # in flight when an earlier run stopped
        self.failed: dict[int, FailedSample] = {}
        self.confirmed: list[int] = []  # per level, chunks whose storing was confirmed
        self.store: str | None = None  # the knowledge store it learns into (an engine's store id, or a KATO's URL)
        self.ledger_covers_interrupted = True
        self._connection: sqlite3.Connection | None = None
        self._lock: IO[str] | None = None

    @property
    def learned_before(self) -> bool:
        """Whether an earlier run of this directory stored anything it knows of."""
        return any(self.confirmed)

    def open(self, *, fresh: bool = False) -> None:
        """Lock the directory and read the run. With ``fresh`` nothing is checked or changed yet: the run
        starts over in :meth:`restart`, once its nodes are cleared (see :meth:`begin_fresh`)."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._take_lock()
            connection = self._connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")  # survives kill -9; one fsync per checkpoint
            connection.executescript(_SCHEMA)
            for table, column in (("failed", "stored TEXT"), ("failed", "digest INTEGER"), ("done", "digest INTEGER"),
                                  ("inflight", "digest INTEGER")):  # fmt: skip
                if column.split()[0] not in {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}:
                    connection.execute(f"ALTER TABLE {table} ADD COLUMN {column}")  # made by ingestd <= 0.1.0
            stored = dict(connection.execute("SELECT key, value FROM run").fetchall())
        except ProgressError:
            self.close()
            raise
        except sqlite3.DatabaseError as error:
            self.close()
            if self.path.is_file() and ("not a database" in str(error) or "malformed" in str(error)):
                raise ProgressError(
                    f"{self.path} is damaged ({error}): move the run directory away to start the run over (its "
                    "samples are then learned again), or give another --run-dir"
                ) from None
            raise ProgressError(f"cannot keep progress in {self.run_dir} ({error}): give a writable directory "
                                "with --run-dir") from None  # fmt: skip
        except OSError as error:
            self.close()
            raise ProgressError(
                f"cannot keep progress in {self.run_dir} ({error}): give a writable directory with --run-dir"
            ) from None
        if fresh:
            previous = stored.get("run_key")
            self.previous_run_key = previous.decode() if previous else None
            return
        if "fingerprint" in stored and stored["fingerprint"].decode() != self.fingerprint:
            self.close()
            raise ConfigChanged(
                f"{self.run_dir} holds a run with another configuration ({_difference(stored.get('identity'), self.identity)}): "
                "resume it with the same source, tokenizer and hierarchy, or use another --run-id / --run-dir, "
                "or --fresh to start it over"
            )
        if "fresh_pending" in stored:
            self.close()
            raise ConfigChanged(
                f"an earlier --fresh of the run in {self.run_dir} stopped before it finished: its nodes may be partly "
                "cleared. Run the command again with --fresh"
            )
        # A run directory made before run keys (ingestd <= 0.1.0) has none: what its interrupted samples
        # stored is not in any ledger under the new key.
        self.ledger_covers_interrupted = "run_key" in stored or "fingerprint" not in stored
        self.run_key = stored["run_key"].decode() if "run_key" in stored else secrets.token_hex(8)
        self.confirmed = orjson.loads(stored["confirmed"]) if "confirmed" in stored else []
        self.store = stored["store"].decode() if "store" in stored else None
        self._write_identity()
        self.done = SampleSet()
        for (index,) in connection.execute("SELECT sample_index FROM done"):
            self.done.add(index)
        self.interrupted = [index for (index,) in connection.execute("SELECT sample_index FROM inflight ORDER BY 1")]
        self.failed = {index: FailedSample(reason, orjson.loads(chunks) if chunks else [])
                       for index, reason, chunks in connection.execute("SELECT sample_index, reason, stored FROM failed")}  # fmt: skip

    def _identity_rows(self) -> list[tuple[str, bytes]]:
        return [("fingerprint", self.fingerprint.encode()), ("identity", orjson.dumps(self.identity)),
                ("run_key", self.run_key.encode())]  # fmt: skip

    def _write_identity(self) -> None:
        self._commit(lambda c: c.executemany("INSERT OR REPLACE INTO run VALUES (?, ?)", self._identity_rows()))

    def begin_fresh(self) -> None:
        """Say, before the nodes are cleared, that the run is starting over: if it stops before
        :meth:`restart`, the next run without --fresh is refused instead of resuming on half-cleared nodes."""
        self._commit(lambda c: c.execute("INSERT OR REPLACE INTO run VALUES ('fresh_pending', x'31')"))

    def restart(self) -> None:
        """The nodes are cleared: forget the old run, and start this one with a new run key (one transaction)."""
        self.run_key = secrets.token_hex(8)

        def change(connection: sqlite3.Connection) -> None:
            connection.execute("BEGIN")
            try:
                for table in ("run", "done", "inflight", "failed"):
                    connection.execute(f"DELETE FROM {table}")
                connection.executemany("INSERT INTO run VALUES (?, ?)", self._identity_rows())
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise

        self._commit(change)
        self.dead_letters.unlink(missing_ok=True)
        self.done, self.interrupted, self.failed, self.confirmed, self.store = SampleSet(), [], {}, [], None

    def bind_store(self, store: str) -> None:
        """Record which knowledge store this run learns into (see :mod:`ingestd.resume`)."""
        if store != self.store:
            self.store = store
            self._commit(lambda c: c.execute("INSERT OR REPLACE INTO run VALUES ('store', ?)", (store.encode(),)))

    def _take_lock(self) -> None:
        lock = (self.run_dir / "lock").open("a+", encoding="utf-8")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            lock.close()
            raise RunInUse(
                f"{self.run_dir} is in use by another ingestd (pid {holder}): wait for it to finish, or give this "
                "run its own --run-id or --run-dir"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        self._lock = lock

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if self._lock is not None:
            self._lock.close()  # releases the lock
            self._lock = None

    def _commit(self, change: Any) -> None:
        assert self._connection is not None
        try:
            change(self._connection)
        except sqlite3.Error as error:
            raise ProgressError(
                f"cannot record progress in {self.path} ({error}): free space there or give another --run-dir; "
                "every sample recorded as done so far stays done, and the run resumes from there"
            ) from None

    def _add_confirmed(self, connection: sqlite3.Connection, confirmed: list[int]) -> None:
        if not any(confirmed):
            return
        if len(self.confirmed) < len(confirmed):
            self.confirmed += [0] * (len(confirmed) - len(self.confirmed))
        for level, chunks in enumerate(confirmed):
            self.confirmed[level] += chunks
        connection.execute("INSERT OR REPLACE INTO run VALUES ('confirmed', ?)", (orjson.dumps(self.confirmed),))

    def unsettled(self) -> list[int]:
        """Samples in flight or failed: the ones whose ledger records a later run may still need."""
        assert self._connection is not None
        rows = self._connection.execute("SELECT sample_index FROM inflight UNION SELECT sample_index FROM failed")
        return [index for (index,) in rows]

    def partly_stored(self) -> set[int]:
        """Failed samples that stored some of their chunks: what is stored belongs to the record of that time."""
        return {index for index, failure in self.failed.items() if any(failure.stored)}

    def digests(self, indices: list[int]) -> dict[int, int | None]:
        """The digests recorded for these samples, done, in flight or failed part-way (None: not recorded)."""
        assert self._connection is not None
        wanted = orjson.dumps(indices).decode()
        rows = self._connection.execute(
            "SELECT sample_index, digest FROM done WHERE sample_index IN (SELECT value FROM json_each(?1)) UNION ALL "
            "SELECT sample_index, digest FROM inflight WHERE sample_index IN (SELECT value FROM json_each(?1)) UNION ALL "
            "SELECT sample_index, digest FROM failed WHERE sample_index IN (SELECT value FROM json_each(?1))",
            (wanted,))  # fmt: skip
        return dict(rows.fetchall())

    def started(self, samples: list[tuple[int, int]]) -> None:
        """These samples (index, digest) are in flight from now: one commit for all of them."""
        self._commit(lambda c: c.executemany("INSERT OR REPLACE INTO inflight VALUES (?, ?)", samples))

    def finished(self, samples: list[tuple[int, int, list[int]]]) -> None:
        """Each sample (index, digest, confirmed) is stored whole; ``confirmed`` = chunks per level this run
        saw stored. One transaction for all of them."""

        def change(connection: sqlite3.Connection) -> None:
            connection.execute("BEGIN")
            try:
                connection.executemany("INSERT OR REPLACE INTO done VALUES (?, ?)",
                                       [(index, digest) for index, digest, _ in samples])  # fmt: skip
                connection.executemany("DELETE FROM inflight WHERE sample_index = ?", [(index,) for index, _, _ in samples])
                connection.executemany("DELETE FROM failed WHERE sample_index = ?",
                                       [(index,) for index, _, _ in samples if index in self.failed])  # fmt: skip
                confirmed = [sum(level) for level in zip(*(chunks for _, _, chunks in samples), strict=True)] if samples else []
                self._add_confirmed(connection, confirmed)
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise

        self._commit(change)
        for index, _, _ in samples:
            self.done.add(index)
            self.failed.pop(index, None)

    def fail(self, index: int, reason: str, stored: list[int] | None = None, confirmed: list[int] | None = None,
             digest: int | None = None) -> None:  # fmt: skip
        """Sample ``index`` (of ``digest``) failed after its levels stored ``stored`` chunks (``confirmed`` of
        them learned of now)."""
        now = time.time()
        stored = stored or []

        def change(connection: sqlite3.Connection) -> None:
            connection.execute("BEGIN")
            try:
                connection.execute("INSERT OR REPLACE INTO failed (sample_index, reason, failed_at, stored, digest) "
                                   "VALUES (?, ?, ?, ?, ?)", (index, reason, now, orjson.dumps(stored).decode(), digest))  # fmt: skip
                connection.execute("DELETE FROM inflight WHERE sample_index = ?", (index,))
                self._add_confirmed(connection, confirmed or [])
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise

        self._commit(change)
        self.failed[index] = FailedSample(reason, stored)
        try:
            with self.dead_letters.open("ab") as letters:
                letters.write(orjson.dumps({"sample_index": index, "source": self.source_label, "reason": reason,
                                            "stored_chunks_per_level": stored, "failed_at": now}) + b"\n")  # fmt: skip
        except OSError as error:
            raise ProgressError(f"cannot append to {self.dead_letters} ({error}): free space or fix its permissions") from None


@dataclass(frozen=True)
class RunRecord:
    """What a run directory says of its run, read from outside."""

    identity: dict[str, Any]  # source, tokenizer, hierarchy
    store: str | None  # the knowledge store it learns into: an engine's store id, or a KATO server's address
    done: int  # samples done


def read_run(run_dir: Path) -> RunRecord | None:
    """The run a directory holds, read without locking it or writing to it (a run may be using it); None when it
    holds none (or its progress cannot be read)."""
    path = Path(run_dir) / "progress.sqlite3"
    if not path.is_file():
        return None
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            stored = dict(connection.execute("SELECT key, value FROM run WHERE key IN ('identity', 'store')").fetchall())
            done = connection.execute("SELECT count(*) FROM done").fetchone()[0]
        finally:
            connection.close()
    except sqlite3.Error:
        return None
    if "identity" not in stored:
        return None
    store = stored.get("store")
    return RunRecord(orjson.loads(stored["identity"]), store.decode() if store else None, done)


def _difference(stored: bytes | None, identity: dict[str, Any]) -> str:
    if stored is None:
        return "unknown"
    before = orjson.loads(stored)
    changed = [key for key in sorted(set(before) | set(identity)) if before.get(key) != identity.get(key)]
    return "; ".join(f"{key}: {before.get(key)!r} then, {identity.get(key)!r} now" for key in changed) or "unknown"
