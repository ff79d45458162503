"""What fed each node: refuse to mix levels, chunk sizes or tokenizers in one knowledge base.

The embedded engine records it in the knowledge base itself (:mod:`ingestd.engine.feeders`). A KATO
server cannot, so for those ingestd keeps the same record itself (:class:`NodeRegistry`, one SQLite file
beside the run directories), a knowledge base being named there by its server and kb id. Either way a
run claims its nodes before learning, and a claim that conflicts stops the run with :class:`NodeConflict`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from ingestd.engine import Feeder, feeders
from ingestd.engine.rules import kb_id
from ingestd.errors import IngestError

T = TypeVar("T")


class NodeConflict(IngestError):
    """A node's knowledge base was fed by another level, chunk size or tokenizer."""

    exit_code = 4


def conflict_message(conflicts: dict[str, list[Feeder]], claims: dict[str, Feeder], where: str) -> str:
    node_id, others = next(iter(conflicts.items()))
    then = "; ".join(other.describe() for other in others)
    more = f" (and {len(conflicts) - 1} more node(s))" if len(conflicts) > 1 else ""
    return (f"node {node_id} on {where} was fed by {then}; this run would feed it from "
            f"{claims[node_id].describe()}{more}. Give this run its own nodes (e.g. --node-ids 'exp2-node{{level}}'), "
            "clear them with --fresh, or mix them on purpose with --allow-mixed-kb")  # fmt: skip


class NodeRegistry:
    """ingestd's own record of what fed the nodes of KATO servers (which cannot record it themselves)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def claim(self, server: str, claims: Sequence[tuple[str, Feeder]], *, allow_mixed: bool) -> dict[str, list[Feeder]]:
        """As :func:`ingestd.engine.feeders.claim`: another recorded feeder conflicts until the node is
        cleared (``--fresh``)."""
        named = [feeders.Claim(node_id, _key(server, node_id), feeder) for node_id, feeder in claims]
        return self._change(lambda connection: feeders.claim(connection, named, allow_mixed=allow_mixed))

    def forget(self, server: str, node_id: str) -> None:
        """The node was cleared (``clear-all``): nothing feeds it any more."""
        self._change(lambda connection: feeders.forget_kb(connection, _key(server, node_id)))

    def _change(self, change: Callable[[sqlite3.Connection], T]) -> T:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        except (OSError, sqlite3.Error) as error:
            raise IngestError(f"cannot keep the record of what fed KATO's nodes in {self.path} ({error}): "
                              "make its directory writable") from None  # fmt: skip
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.executescript(feeders.SCHEMA)
            connection.execute("BEGIN IMMEDIATE")
            result = change(connection)
            connection.execute("COMMIT")
            return result
        except sqlite3.Error as error:
            raise IngestError(f"cannot update {self.path} ({error}): check the disk and the file") from None
        finally:
            connection.close()


def _key(server: str, node_id: str) -> str:
    return f"{server} {kb_id(node_id)}"
