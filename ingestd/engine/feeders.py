"""What fed each knowledge base (an ingestd extension): the tokenizer, hierarchy level and chunk size.

Patterns of a level-0 node with 8-token chunks and of one with 4-token chunks mixed in one knowledge
base make both useless, and nothing in the patterns themselves tells them apart. So before learning, an
ingestd run *claims* each of its nodes with what it will feed it; the claim is refused if something else
fed the knowledge base (or claimed it: two runs starting at once on an empty node must not both win),
unless mixing is asked for. ``clear-all`` forgets a knowledge base's feeders, so a cleared knowledge
base takes any claim.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS feeders (
    kb_id TEXT NOT NULL,
    tokenizer TEXT NOT NULL,
    level INTEGER NOT NULL,
    chunk_size INTEGER NOT NULL,
    node_id TEXT NOT NULL,
    since REAL NOT NULL,
    PRIMARY KEY (kb_id, tokenizer, level, chunk_size)
) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class Feeder:
    """What feeds a node: the tokenizer of the texts, the level in the hierarchy, and its chunk size."""

    tokenizer: str
    level: int
    chunk_size: int

    def describe(self) -> str:
        return f"level {self.level}, chunk size {self.chunk_size}, tokenizer {self.tokenizer}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Claim:
    node_id: str
    kb_id: str
    feeder: Feeder


def claim(connection: sqlite3.Connection, claims: Sequence[Claim], *, allow_mixed: bool) -> dict[str, list[Feeder]]:
    """Inside one transaction: per node id, the other feeders of its knowledge base.

    Without ``allow_mixed``, nothing is recorded if any node has other feeders; otherwise every claim is recorded.
    """
    conflicts: dict[str, list[Feeder]] = {}
    for one in claims:
        rows = connection.execute("SELECT tokenizer, level, chunk_size FROM feeders WHERE kb_id = ?", (one.kb_id,))
        others = [feeder for row in rows if (feeder := Feeder(*row)) != one.feeder]
        if others:
            conflicts[one.node_id] = others
    if conflicts and not allow_mixed:
        return conflicts
    now = time.time()
    for one in claims:
        connection.execute("INSERT OR IGNORE INTO feeders VALUES (?, ?, ?, ?, ?, ?)",
                           (one.kb_id, one.feeder.tokenizer, one.feeder.level, one.feeder.chunk_size, one.node_id, now))  # fmt: skip
    return conflicts


def forget_kb(connection: sqlite3.Connection, kb_id: str) -> None:
    connection.execute("DELETE FROM feeders WHERE kb_id = ?", (kb_id,))
