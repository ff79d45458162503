"""Reading a knowledge store from outside the engine: read-only, safe while a run or a server writes to it.

The store is SQLite in WAL mode, so a reader sees the last committed state and never blocks a writer.
Everything here is in KATO's own terms (node ids' knowledge bases, pattern names, frequencies, metadata);
the table layout stays the engine's business.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ingestd.engine.feeders import Feeder
from ingestd.engine.rules import PATTERN_PREFIX, strip_prefix

STORE_FILE = "kato.sqlite3"
_IN_CHUNK = 500  # names per IN (...) query: well under SQLite's variable limit


class StoreMissing(OSError):
    """There is no knowledge store at that path."""


@dataclass(frozen=True, slots=True)
class StoredPattern:
    """One pattern as KATO stores it, with its public name ``PTRN|<sha1>``."""

    name: str
    pattern_data: list[list[str]]
    length: int
    frequency: int
    emotives: list[Any]
    metadata: dict[str, list[str]]


@dataclass(frozen=True, slots=True)
class FedNode:
    """A knowledge base and what an ingestd run recorded feeding it."""

    kb_id: str
    node_id: str
    feeder: Feeder


class StoreReader:
    """A read-only view of ``<data dir>/kato.sqlite3``."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / STORE_FILE
        if not self.path.is_file():
            raise StoreMissing(f"no knowledge store at {self.path}")
        # mode=ro: this connection can never write, whatever a caller does with it.
        self._connection = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None,
                                           check_same_thread=False)  # fmt: skip
        self._connection.execute("PRAGMA query_only=1")

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """Every read inside sees one committed state of the store, whatever is learned meanwhile."""
        self._connection.execute("BEGIN")
        try:
            yield
        finally:
            self._connection.execute("COMMIT")

    # -- what the store holds ----------------------------------------------------------------------
    def store_id(self) -> str:
        row = self._connection.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
        return "" if row is None else row[0]

    def content(self) -> str:
        """A summary of everything the store holds (patterns, total frequency, metadata size, per knowledge base):
        it changes whenever anything is learned, so a store is known again only while it is unchanged."""
        rows = self._connection.execute(
            "SELECT kb_id, count(*), total(frequency), total(length(metadata)) FROM patterns GROUP BY kb_id ORDER BY kb_id"
        ).fetchall()
        return hashlib.sha1(repr(rows).encode()).hexdigest()

    def merged_stores(self) -> list[str]:
        """The store ids of every store merged into this one, directly or through a store merged into it."""
        try:
            return [store for (store,) in self._connection.execute("SELECT store_id FROM merged ORDER BY 1")]
        except sqlite3.OperationalError:  # never merged into: no table
            return []

    def kb_ids(self) -> list[str]:
        """Every knowledge base holding at least one pattern."""
        return [kb for (kb,) in self._connection.execute("SELECT DISTINCT kb_id FROM patterns ORDER BY 1")]

    def fed_nodes(self) -> list[FedNode]:
        """What ingestd runs recorded feeding (level, chunk size, tokenizer), per knowledge base."""
        rows = self._connection.execute(
            "SELECT kb_id, node_id, tokenizer, level, chunk_size FROM feeders ORDER BY level, kb_id"
        )
        return [FedNode(kb, node_id, Feeder(tokenizer, level, chunk_size)) for kb, node_id, tokenizer, level, chunk_size in rows]

    # -- patterns ------------------------------------------------------------------------------------
    def count(self, kb_id: str) -> int:
        return self._connection.execute("SELECT count(*) FROM patterns WHERE kb_id = ?", (kb_id,)).fetchone()[0]

    def count_with_emotives(self, kb_id: str) -> int:
        """How many patterns carry emotives."""
        return self._connection.execute("SELECT count(*) FROM patterns WHERE kb_id = ? AND CAST(emotives AS TEXT) != '[]'",
                                        (kb_id,)).fetchone()[0]  # fmt: skip

    def frequencies(self, kb_id: str) -> Iterator[tuple[str, int, int]]:
        """(name, frequency, length) of every pattern, by name."""
        rows = self._connection.execute(
            "SELECT name, frequency, length FROM patterns WHERE kb_id = ? ORDER BY name", (kb_id,)
        )
        for name, frequency, length in rows:
            yield PATTERN_PREFIX + name, frequency, length

    def most_frequent(self, kb_id: str, limit: int) -> list[StoredPattern]:
        """The ``limit`` most frequent patterns, ties by name."""
        rows = self._connection.execute(
            f"SELECT {_COLUMNS} FROM patterns WHERE kb_id = ? ORDER BY frequency DESC, name LIMIT ?", (kb_id, limit)
        )
        return [_pattern(row) for row in rows]

    def patterns(self, kb_id: str, names: Iterable[str]) -> dict[str, StoredPattern]:
        """The stored ones among ``names`` (with or without ``PTRN|``), by public name."""
        found: dict[str, StoredPattern] = {}
        wanted = list(dict.fromkeys(strip_prefix(name) for name in names))
        for start in range(0, len(wanted), _IN_CHUNK):
            part = wanted[start : start + _IN_CHUNK]
            rows = self._connection.execute(
                f"SELECT {_COLUMNS} FROM patterns WHERE kb_id = ? AND name IN ({','.join('?' * len(part))})",
                (kb_id, *part),
            )
            for row in rows:
                pattern = _pattern(row)
                found[pattern.name] = pattern
        return found

    def iter_patterns(self, kb_id: str, batch: int = 10_000) -> Iterator[list[StoredPattern]]:
        """Every pattern of a knowledge base, by name, in lists of at most ``batch`` (memory stays flat)."""
        rows = self._connection.execute(f"SELECT {_COLUMNS} FROM patterns WHERE kb_id = ? ORDER BY name", (kb_id,))
        while chunk := rows.fetchmany(batch):
            yield [_pattern(row) for row in chunk]

    def find(self, kb_ids: Sequence[str], name: str) -> list[tuple[str, StoredPattern]]:
        """Which of these knowledge bases hold ``name``, and the pattern each holds."""
        found = []
        for kb in kb_ids:
            pattern = self.patterns(kb, [name]).get(PATTERN_PREFIX + strip_prefix(name))
            if pattern is not None:
                found.append((kb, pattern))
        return found


_COLUMNS = "name, pattern_data, length, frequency, emotives, metadata"


def _pattern(row: tuple[Any, ...]) -> StoredPattern:
    name, pattern_data, length, frequency, emotives, metadata = row
    return StoredPattern(PATTERN_PREFIX + name, orjson.loads(pattern_data), length, frequency,
                         orjson.loads(emotives), orjson.loads(metadata))  # fmt: skip
