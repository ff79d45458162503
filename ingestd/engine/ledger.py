"""The run ledger (an ingestd extension): where each sample of a run stands, stored with its learns.

A learn call of an ingestd run carries its :class:`Place`: the run's key (random, one per run), the
sample, and which of that sample's chunks on the call's node it carries (the first one and how many).
Per (run key, sample, knowledge base) the engine records which chunks are stored, **in the same
transaction as the patterns**: how many from the first on (the *prefix*), and the ranges stored beyond it
(a long sample's batches go out on several sessions at once, so they may land out of order):

* a call that stores nothing stored yet is applied, and recorded: it moves the prefix on if it starts
  where the prefix ends (taking in the ranges it now reaches), else it is recorded as a range ahead;
* a call whose chunks all lie in the prefix or in one range was applied already (a resend after a lost
  answer, or a resumed run redoing a sample that was in flight): it is answered without storing anything
  again (a *replay*);
* a call that overlaps what is stored in part is refused with 409, the prefix and the ranges ahead
  (``{"detail": {"error": "LEDGER_CONFLICT", "stored_chunks": n, "ahead": [[first, end], ...], ...}}``),
  for the client to send only what is missing: a killed client's last request may have been applied
  after its successor asked the ledger, or a run resumed with another batch size.

Chunks, not calls, are counted, so the record does not depend on how chunks were grouped into calls: a
run resumed with another batch size, or without batching, picks up at the exact chunk. Nothing here
expires (unlike ``Idempotency-Key``): a run forgets the records of the samples it has recorded as done.

Per (run key, knowledge base) the engine also keeps the total number of chunks the run stored. A
resumed run compares it with its own progress: fewer means the knowledge base is not the one the
progress was recorded against (missing, cleared, or restored from an older copy).

Over HTTP a call's place travels in the ``ingestd-ledger: <run key>:<sample>:<first chunk>:<chunks>``
header, echoed in the answer when honoured (KATO ignores the header, and echoes nothing).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

HEADER = "ingestd-ledger"
SAMPLE_INDEX_MAX = 2**63 - 1
"""What SQLite's integers hold: sample indices, chunk positions and counts beyond are refused."""
_RUN_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")

SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger (
    run_key TEXT NOT NULL,
    sample_index INTEGER NOT NULL,
    kb_id TEXT NOT NULL,
    chunks INTEGER NOT NULL,
    PRIMARY KEY (run_key, sample_index, kb_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ledger_ahead (
    run_key TEXT NOT NULL,
    sample_index INTEGER NOT NULL,
    kb_id TEXT NOT NULL,
    first_chunk INTEGER NOT NULL,
    end_chunk INTEGER NOT NULL,
    PRIMARY KEY (run_key, sample_index, kb_id, first_chunk)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ledger_totals (
    run_key TEXT NOT NULL,
    kb_id TEXT NOT NULL,
    chunks INTEGER NOT NULL,
    PRIMARY KEY (run_key, kb_id)
) WITHOUT ROWID;
"""


class LedgerConflict(Exception):
    """A call's chunks are stored in part: nothing was stored. ``stored`` (the prefix) and ``ahead`` (the
    ranges beyond it, ``(first, end)``) are what the record holds, for the caller to send only what is
    missing (KATO-style body: see :meth:`body`)."""

    def __init__(self, message: str, stored: int, ahead: Sequence[tuple[int, int]] = ()) -> None:
        super().__init__(message)
        self.stored = stored
        self.ahead = list(ahead)

    def body(self) -> dict[str, Any]:
        return {"error": "LEDGER_CONFLICT", "message": str(self), "stored_chunks": self.stored,
                "ahead": [list(span) for span in self.ahead]}  # fmt: skip


def check_run_key(run_key: str) -> None:
    if not _RUN_KEY.fullmatch(run_key):
        raise ValueError(f"run key {run_key!r}: 1 to 64 letters, digits, '_', '.' or '-'")


@dataclass(frozen=True, slots=True)
class Place:
    """Where one learn call sits in a run: chunks ``first_chunk .. first_chunk + chunks - 1`` of a
    sample, on the node of the session it is sent on."""

    run_key: str
    sample_index: int
    first_chunk: int
    chunks: int

    def __post_init__(self) -> None:
        check_run_key(self.run_key)
        if self.sample_index < 0 or self.first_chunk < 0 or self.chunks < 1:
            raise ValueError("sample index and first chunk must be >= 0, chunks >= 1")
        if self.first_chunk + self.chunks > SAMPLE_INDEX_MAX:
            raise ValueError(f"the chunks must end by position {SAMPLE_INDEX_MAX}")

    def header(self) -> str:
        return f"{self.run_key}:{self.sample_index}:{self.first_chunk}:{self.chunks}"

    @classmethod
    def from_header(cls, value: str) -> Place:
        """Parse the header; raises ``ValueError`` saying what is wrong."""
        parts = value.strip().split(":")
        if len(parts) != 4:
            raise ValueError(f"{HEADER} must be '<run key>:<sample>:<first chunk>:<chunks>', not {value!r}")
        try:
            sample_index, first_chunk, chunks = (int(part) for part in parts[1:])
        except ValueError:
            raise ValueError(f"{HEADER} {value!r}: sample, first chunk and chunks must be integers") from None
        if not all(0 <= number <= SAMPLE_INDEX_MAX for number in (sample_index, first_chunk, chunks)):
            raise ValueError(f"{HEADER} {value!r}: sample, first chunk and chunks must be from 0 to {SAMPLE_INDEX_MAX}")
        return cls(parts[0], sample_index, first_chunk, chunks)


def _ahead(connection: sqlite3.Connection, run_key: str, sample_index: int, kb_id: str) -> list[tuple[int, int]]:
    return connection.execute(
        "SELECT first_chunk, end_chunk FROM ledger_ahead WHERE run_key = ? AND sample_index = ? AND kb_id = ? "
        "ORDER BY first_chunk", (run_key, sample_index, kb_id)).fetchall()  # fmt: skip


def record(connection: sqlite3.Connection, place: Place, kb_id: str) -> bool:
    """Inside the call's transaction: True if the call is to be applied (and is now recorded), False if
    it was applied already (a replay); :class:`LedgerConflict` if it overlaps what is stored in part."""
    key = (place.run_key, place.sample_index, kb_id)
    row = connection.execute("SELECT chunks FROM ledger WHERE run_key = ? AND sample_index = ? AND kb_id = ?", key).fetchone()
    stored = 0 if row is None else row[0]
    ahead = _ahead(connection, *key)
    first, end = place.first_chunk, place.first_chunk + place.chunks
    if end <= stored or any(low <= first and end <= high for low, high in ahead):
        return False
    if first < stored or any(first < high and low < end for low, high in ahead):
        raise LedgerConflict(
            f"run {place.run_key}, sample {place.sample_index}: the call carries chunks {first}..{end - 1} of {kb_id}, "
            f"of which some are stored (chunks 0..{stored - 1} and {len(ahead)} range(s) beyond); is another process "
            "using this run's key?",
            stored, ahead,
        )  # fmt: skip
    join(connection, place.run_key, place.sample_index, kb_id, stored, ahead, first, end)
    connection.execute(
        "INSERT INTO ledger_totals VALUES (?, ?, ?) ON CONFLICT (run_key, kb_id) DO UPDATE SET chunks = chunks + ?",
        (place.run_key, kb_id, place.chunks, place.chunks),
    )
    return True


def missing(stored: int, ahead: Sequence[tuple[int, int]], first: int, end: int) -> list[tuple[int, int]]:
    """The ranges of chunks ``first`` to ``end`` a record does not hold, in order: it holds ``stored`` chunks from
    the first on and the ``ahead`` ranges (first, end) beyond them."""
    lacking, position = [], max(first, stored)
    for low, high in sorted(ahead):
        if low > position and position < end:
            lacking.append((position, min(low, end)))
        position = max(position, high)
    if position < end:
        lacking.append((position, end))
    return lacking


def positions(connection: sqlite3.Connection, run_key: str,
              samples: Sequence[int]) -> dict[tuple[int, str], tuple[int, list[tuple[int, int]]]]:  # fmt: skip
    """Per (sample, knowledge base) with a record, what is stored: the prefix and the ranges beyond it. For a
    batch, in one query per table."""
    wanted = (run_key, "[" + ",".join(str(int(sample)) for sample in samples) + "]")
    found: dict[tuple[int, str], tuple[int, list[tuple[int, int]]]] = {}
    for sample, kb, chunks in connection.execute(
            "SELECT sample_index, kb_id, chunks FROM ledger WHERE run_key = ? AND sample_index IN "
            "(SELECT value FROM json_each(?))", wanted):  # fmt: skip
        found[(sample, kb)] = (chunks, [])
    for sample, kb, low, high in connection.execute(
            "SELECT sample_index, kb_id, first_chunk, end_chunk FROM ledger_ahead WHERE run_key = ? AND sample_index IN "
            "(SELECT value FROM json_each(?)) ORDER BY first_chunk", wanted):  # fmt: skip
        found.setdefault((sample, kb), (0, []))[1].append((low, high))
    return found


def advance(connection: sqlite3.Connection, run_key: str, records: Sequence[tuple[int, str, int]],
            added: dict[str, int]) -> None:  # fmt: skip
    """Inside the transaction that stored them: each (sample, knowledge base, chunks), whose record has no range
    ahead, is now stored up to ``chunks`` (other records are :func:`join`'s); ``added`` counts, per knowledge base,
    the chunks newly stored (for the run's totals). In bulk: a statement per table for a whole load."""
    connection.executemany("INSERT OR REPLACE INTO ledger VALUES (?, ?, ?, ?)",
                           [(run_key, sample, kb, chunks) for sample, kb, chunks in records])  # fmt: skip
    connection.executemany(
        "INSERT INTO ledger_totals VALUES (?, ?, ?) ON CONFLICT (run_key, kb_id) DO UPDATE SET chunks = chunks + excluded.chunks",
        [(run_key, kb, chunks) for kb, chunks in added.items()],
    )


def join(connection: sqlite3.Connection, run_key: str, sample_index: int, kb_id: str, stored: int,
         ahead: Sequence[tuple[int, int]], first: int, end: int) -> None:  # fmt: skip
    """Inside the transaction that stored them: chunks ``first`` to ``end`` of a sample are stored, besides what
    its record held (``stored`` from the first on, the ``ahead`` ranges); the record is written anew, its ranges
    joined where they meet and taken into the prefix when it reaches them. (The run's totals are the caller's to
    add, as with :func:`advance`.)"""
    prefix, beyond = stored, []
    for low, high in sorted([*ahead, (first, end)]):
        if low <= prefix:
            prefix = max(prefix, high)
        elif beyond and low <= beyond[-1][1]:
            beyond[-1] = (beyond[-1][0], max(beyond[-1][1], high))
        else:
            beyond.append((low, high))
    key = (run_key, sample_index, kb_id)
    if prefix != stored:
        connection.execute("INSERT OR REPLACE INTO ledger VALUES (?, ?, ?, ?)", (*key, prefix))
    if ahead:
        connection.execute("DELETE FROM ledger_ahead WHERE run_key = ? AND sample_index = ? AND kb_id = ?", key)
    connection.executemany("INSERT INTO ledger_ahead VALUES (?, ?, ?, ?, ?)", [(*key, low, high) for low, high in beyond])


def status(connection: sqlite3.Connection, run_key: str, kb_ids: Sequence[str],
           samples: Iterable[int]) -> dict[str, Any]:  # fmt: skip
    """Totals per knowledge base, and per asked sample the chunks stored per knowledge base from the first on
    (0 if none); ``ahead`` lists, per sample and knowledge base that has any, the ranges stored beyond."""
    totals = {kb: 0 for kb in kb_ids}
    for kb, chunks in connection.execute("SELECT kb_id, chunks FROM ledger_totals WHERE run_key = ?", (run_key,)):
        if kb in totals:
            totals[kb] = chunks
    per_sample: dict[int, dict[str, int]] = {}
    ahead: dict[int, dict[str, list[list[int]]]] = {}
    samples = list(samples)
    found = positions(connection, run_key, samples)
    for sample in samples:
        held = {kb: found.get((sample, kb), (0, [])) for kb in kb_ids}
        per_sample[sample] = {kb: prefix for kb, (prefix, _) in held.items()}
        if ranges := {kb: [list(span) for span in spans] for kb, (_, spans) in held.items() if spans}:
            ahead[sample] = ranges
    return {"totals": totals, "samples": per_sample, "ahead": ahead}


def forget(connection: sqlite3.Connection, run_key: str, *, samples: Sequence[int] | None = None,
           keep: Sequence[int] = (), everything: bool = False) -> int:  # fmt: skip
    """Drop records of a run: of ``samples``; or of every sample but ``keep``; or, with ``everything``,
    the run's whole record, totals included (the run is over, or started over). Returns how many
    (sample, knowledge base) records went."""
    if everything:
        connection.execute("DELETE FROM ledger_totals WHERE run_key = ?", (run_key,))
        connection.execute("DELETE FROM ledger_ahead WHERE run_key = ?", (run_key,))
        return connection.execute("DELETE FROM ledger WHERE run_key = ?", (run_key,)).rowcount
    if samples is not None:
        listed = (run_key, "[" + ",".join(str(int(sample)) for sample in samples) + "]")
        connection.execute("DELETE FROM ledger_ahead WHERE run_key = ? AND sample_index IN (SELECT value FROM json_each(?))", listed)
        return connection.execute("DELETE FROM ledger WHERE run_key = ? AND sample_index IN (SELECT value FROM json_each(?))",
                                  listed).rowcount  # fmt: skip
    kept = (run_key, "[" + ",".join(str(int(sample)) for sample in keep) + "]")
    connection.execute("DELETE FROM ledger_ahead WHERE run_key = ? AND sample_index NOT IN (SELECT value FROM json_each(?))", kept)
    return connection.execute("DELETE FROM ledger WHERE run_key = ? AND sample_index NOT IN (SELECT value FROM json_each(?))",
                              kept).rowcount  # fmt: skip


def forget_kb(connection: sqlite3.Connection, kb_id: str) -> None:
    """A knowledge base was cleared: no run has anything stored in it any more."""
    connection.execute("DELETE FROM ledger WHERE kb_id = ?", (kb_id,))
    connection.execute("DELETE FROM ledger_ahead WHERE kb_id = ?", (kb_id,))
    connection.execute("DELETE FROM ledger_totals WHERE kb_id = ?", (kb_id,))
