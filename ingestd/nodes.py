"""What fed each node: refuse to mix levels, chunk sizes or tokenizers in one knowledge base.

The embedded engine records it in the knowledge base itself (:mod:`ingestd.engine.feeders`). A KATO
server cannot, so for those ingestd keeps its own record of the runs that fed each of the server's nodes
(:class:`NodeRegistry`, one SQLite file beside the run directories). Either way a run claims its nodes
before learning, and a claim that conflicts stops the run with :class:`NodeConflict`.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

from ingestd.engine import Feeder
from ingestd.engine.rules import kb_id
from ingestd.errors import IngestError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS feeders (
    server TEXT NOT NULL,
    kb_id TEXT NOT NULL,
    tokenizer TEXT NOT NULL,
    level INTEGER NOT NULL,
    chunk_size INTEGER NOT NULL,
    node_id TEXT NOT NULL,
    since REAL NOT NULL,
    PRIMARY KEY (server, kb_id, tokenizer, level, chunk_size)
) WITHOUT ROWID;
"""


class NodeConflict(IngestError):
    """A node's knowledge base was fed by another level, chunk size or tokenizer."""

    exit_code = 4


def conflict_message(conflicts: dict[str, list[Feeder]], claims: dict[str, Feeder], where: str) -> str:
    node_id, others = next(iter(conflicts.items()))
    then = "; ".join(other.describe() for other in others)
    more = f" (and {len(conflicts) - 1} more node(s))" if len(conflicts) > 1 else ""
    return (f"node {node_id} on {where} holds patterns fed by {then}; this run would feed it from "
            f"{claims[node_id].describe()}{more}. Give this run its own nodes (e.g. --node-ids 'exp2-node{{level}}'), "
            "clear them with --fresh, or mix them on purpose with --allow-mixed-kb")  # fmt: skip


class NodeRegistry:
    """ingestd's own record of what fed the nodes of KATO servers (which cannot record it themselves)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as error:
            raise IngestError(f"cannot keep the record of what fed KATO's nodes in {self.path} ({error}): "
                              "make its directory writable") from None  # fmt: skip
        return connection

    def claim(self, server: str, claims: Sequence[tuple[str, Feeder]], *, allow_mixed: bool) -> dict[str, list[Feeder]]:
        """As :func:`ingestd.engine.feeders.claim`, except a KATO node's emptiness cannot be known: any
        other recorded feeder conflicts until the node is cleared (``--fresh``)."""
        connection = self._connect()
        try:
            connection.execute("BEGIN IMMEDIATE")
            conflicts: dict[str, list[Feeder]] = {}
            for node_id, feeder in claims:
                rows = connection.execute("SELECT tokenizer, level, chunk_size FROM feeders WHERE server = ? AND kb_id = ?",
                                          (server, kb_id(node_id)))  # fmt: skip
                others = [other for row in rows if (other := Feeder(*row)) != feeder]
                if others:
                    conflicts[node_id] = others
            if not conflicts or allow_mixed:
                now = time.time()
                connection.executemany("INSERT OR IGNORE INTO feeders VALUES (?, ?, ?, ?, ?, ?, ?)", [
                    (server, kb_id(node_id), feeder.tokenizer, feeder.level, feeder.chunk_size, node_id, now)
                    for node_id, feeder in claims])  # fmt: skip
            connection.execute("COMMIT")
            return conflicts
        except sqlite3.Error as error:
            raise IngestError(f"cannot update {self.path} ({error}): check the disk and the file") from None
        finally:
            connection.close()

    def forget(self, server: str, node_id: str) -> None:
        """The node was cleared (``clear-all``): nothing feeds it any more."""
        connection = self._connect()
        try:
            connection.execute("DELETE FROM feeders WHERE server = ? AND kb_id = ?", (server, kb_id(node_id)))
        except sqlite3.Error as error:
            raise IngestError(f"cannot update {self.path} ({error}): check the disk and the file") from None
        finally:
            connection.close()
