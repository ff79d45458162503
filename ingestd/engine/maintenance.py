"""Changes to a knowledge store that are not learning: removing rare patterns (``ingestd inspect prune``).

They take the store to themselves (:func:`ingestd.engine.store.writer_lock`), so they never interleave with a
run or a server learning into it: while one is, they are refused, and while one runs, a run waits for nothing
and is refused instead.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ingestd.engine.reader import STORE_FILE
from ingestd.engine.store import writer_lock


@dataclass(frozen=True, slots=True)
class PruneCount:
    kb_id: str
    patterns: int  # before
    removed: int
    frequency_removed: int  # the learns those patterns stood for


def prune(data_dir: Path, kb_ids: Sequence[str], below: int, *, dry_run: bool = False) -> list[PruneCount]:
    """Remove, from each knowledge base, the patterns whose frequency is below ``below``, in one transaction.
    With ``dry_run`` nothing changes (and nothing is locked): the counts say what would go."""
    path = Path(data_dir) / STORE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no knowledge store at {path}")
    lock = None if dry_run else writer_lock(Path(data_dir), exclusive=True)
    try:
        uri = f"file:{path}?mode={'ro' if dry_run else 'rw'}"
        connection = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=30.0)
        try:
            connection.execute("BEGIN" if dry_run else "BEGIN IMMEDIATE")
            counts = []
            for kb in kb_ids:
                patterns, removed, frequency = connection.execute(
                    "SELECT count(*), coalesce(sum(frequency < ?), 0), coalesce(sum(CASE WHEN frequency < ? "
                    "THEN frequency ELSE 0 END), 0) FROM patterns WHERE kb_id = ?",
                    (below, below, kb),
                ).fetchone()
                if not dry_run and removed:
                    connection.execute("DELETE FROM patterns WHERE kb_id = ? AND frequency < ?", (kb, below))
                counts.append(PruneCount(kb, patterns, removed, frequency))
            connection.execute("ROLLBACK" if dry_run else "COMMIT")
            return counts
        finally:
            connection.close()
    finally:
        if lock is not None:
            lock.close()
