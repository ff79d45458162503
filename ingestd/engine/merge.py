"""Merging knowledge stores: the knowledge bases of shards, learned apart, made into the one a single process
would have learned.

A knowledge base is a sum: a pattern's data is a function of its name, frequencies add, and metadata values
unite per key (KATO §5.5), so merging in any order, in any grouping, gives the same result. Emotives do not
merge that way (KATO keeps the last few, in learning order), so a store holding any is refused; ingestd never
learns emotives.

Each source store is merged in one transaction of the target, which also records the source's store id: a
store is never merged twice, and a merge killed at any moment has merged each source wholly or not at all.
The target is held alone (:func:`ingestd.engine.store.writer_lock`) while it merges.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from ingestd.engine import feeders, rules
from ingestd.engine.reader import STORE_FILE, StoredPattern, StoreReader
from ingestd.engine.store import KnowledgeStore, StoreBusy, writer_lock

MERGED_SCHEMA = """
CREATE TABLE IF NOT EXISTS merged (
    store_id TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    patterns INTEGER NOT NULL,
    merged_at REAL NOT NULL,
    content TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID;
"""
_BATCH = 5000


class MergeRefused(ValueError):
    """A source cannot be merged into the target (the message says which and why)."""


@dataclass(frozen=True, slots=True)
class MergeResult:
    source: str
    store_id: str
    patterns: int  # rows read from the source (0 when it had been merged before)
    already_merged: bool


def merge(target_dir: Path, source_dirs: Sequence[Path]) -> list[MergeResult]:
    """Merge each source store into the target store (made if missing), each at most once."""
    target_dir = Path(target_dir)
    for source in source_dirs:  # every source is there before a target is made
        StoreReader(source).close()
    KnowledgeStore(target_dir).check()  # the file and its tables exist, as the engine makes them
    lock = writer_lock(target_dir, exclusive=True)
    try:
        connection = sqlite3.connect(target_dir / STORE_FILE, isolation_level=None, timeout=30.0)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.executescript(MERGED_SCHEMA)
            if "content" not in {row[1] for row in connection.execute("PRAGMA table_info(merged)")}:
                connection.execute("ALTER TABLE merged ADD COLUMN content TEXT NOT NULL DEFAULT ''")
            target_id = connection.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()[0]
            return [_merge_one(connection, target_id, Path(source)) for source in source_dirs]
        finally:
            connection.close()
    finally:
        lock.close()


def _merge_one(connection: sqlite3.Connection, target_id: str, source_dir: Path) -> MergeResult:
    # The source is held alone too while it is read: a shard still learning is not merged half-learned.
    try:
        source_lock = writer_lock(source_dir, exclusive=True)
    except StoreBusy:
        raise MergeRefused(f"{source_dir} is being learned into (a run or a server has it open): merge it once its "
                           "run has finished") from None  # fmt: skip
    with source_lock, StoreReader(source_dir) as source:
        source_id = source.store_id()
        if source_id == target_id:
            raise MergeRefused(f"{source_dir} is the target store itself")
        content = source.content()
        earlier = connection.execute("SELECT content, path FROM merged WHERE store_id = ?", (source_id,)).fetchone()
        if earlier is not None:
            if earlier[0] in ("", content):  # ("": recorded through a store merged into the target)
                return MergeResult(str(source_dir), source_id, 0, already_merged=True)
            raise MergeRefused(f"{source_dir} has store id {source_id}, merged into the target before (from "
                               f"{earlier[1]}), but it holds other patterns now: it learned more since, or it is a "
                               "copy of that data directory that learned other samples. Merging it again would count "
                               "what was merged twice; merge the shards, finished, into a new target")  # fmt: skip
        # A store made by merging carries what it merged: none of that may be in the target already, and once it
        # is merged, so is all of that (merging one of those shards again is then skipped, not counted twice).
        inner = source.merged_stores()
        if target_id in inner:
            raise MergeRefused(f"{source_dir} holds the target merged into it already: merging it back would count "
                               "the target twice")  # fmt: skip
        twice = [store for store in inner if connection.execute("SELECT 1 FROM merged WHERE store_id = ?", (store,)).fetchone()]
        if twice:
            raise MergeRefused(f"{source_dir} was made by merging store {twice[0]}, which is merged into the target "
                               "already: merging it would count that shard twice")  # fmt: skip
        _check_feeders(connection, source, source_dir)
        connection.execute("BEGIN IMMEDIATE")
        try:
            count = 0
            for kb in source.kb_ids():
                for batch in source.iter_patterns(kb, _BATCH):
                    count += len(batch)
                    _add(connection, kb, batch, source_dir)
            for fed in source.fed_nodes():
                connection.execute("INSERT OR IGNORE INTO feeders VALUES (?, ?, ?, ?, ?, ?)",
                                   (fed.kb_id, fed.feeder.tokenizer, fed.feeder.level, fed.feeder.chunk_size,
                                    fed.node_id, time.time()))  # fmt: skip
            now = time.time()
            connection.execute("INSERT INTO merged VALUES (?, ?, ?, ?, ?)", (source_id, str(source_dir), count, now, content))
            connection.executemany("INSERT OR IGNORE INTO merged VALUES (?, ?, 0, ?, '')",
                                   [(store, f"(through {source_dir})", now) for store in inner])  # fmt: skip
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
    return MergeResult(str(source_dir), source_id, count, already_merged=False)


def _check_feeders(connection: sqlite3.Connection, source: StoreReader, source_dir: Path) -> None:
    """Refuse a source whose knowledge bases were fed otherwise (level, chunk size, tokenizer) than the target's."""
    for fed in source.fed_nodes():
        rows = connection.execute("SELECT tokenizer, level, chunk_size FROM feeders WHERE kb_id = ?", (fed.kb_id,))
        others = [other for row in rows if (other := feeders.Feeder(*row)) != fed.feeder]
        if others:
            raise MergeRefused(f"node {fed.node_id} of {source_dir} was fed by {fed.feeder.describe()}, but in the target "
                               f"by {others[0].describe()}: these knowledge bases do not add up; merge shards of one "
                               "run (one tokenizer, one hierarchy) only")  # fmt: skip


def _add(connection: sqlite3.Connection, kb: str, batch: Sequence[StoredPattern], source_dir: Path) -> None:
    plain = []
    for pattern in batch:
        if pattern.emotives:
            raise MergeRefused(f"{source_dir} holds emotives ({pattern.name}): they depend on the order of learning, "
                               "so they cannot be merged exactly")  # fmt: skip
        name = rules.strip_prefix(pattern.name)
        data = orjson.dumps(pattern.pattern_data)
        if not pattern.metadata:
            plain.append((kb, name, data, pattern.length, pattern.frequency, b"[]", b"{}"))
            continue
        row = connection.execute("SELECT metadata FROM patterns WHERE kb_id = ? AND name = ?", (kb, name)).fetchone()
        metadata = pattern.metadata if row is None else rules.merge_metadata(orjson.loads(row[0]), pattern.metadata)
        connection.execute(
            "INSERT INTO patterns VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (kb_id, name) "
            "DO UPDATE SET frequency = frequency + excluded.frequency, metadata = excluded.metadata",
            (kb, name, data, pattern.length, pattern.frequency, b"[]", orjson.dumps(metadata)),
        )
    connection.executemany(
        "INSERT INTO patterns VALUES (?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (kb_id, name) DO UPDATE SET frequency = frequency + excluded.frequency",
        plain,
    )
