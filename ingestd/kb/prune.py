"""Removing rare patterns from a hierarchy's nodes (the notebooks' cleanup).

A pruned pattern is gone from its node: a higher pattern that contained it unravels with a gap there
(:class:`ingestd.kb.Missing`), and a later learn of it starts again at frequency 1. Prune a knowledge base
once learning into it is done; while a run or a server is learning into the store, pruning is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ingestd.engine.maintenance import prune as prune_store
from ingestd.engine.store import StoreBusy
from ingestd.errors import IngestError

if TYPE_CHECKING:
    import pandas as pd

    from ingestd.kb.knowledge_base import KnowledgeBase


class StoreInUse(IngestError):
    """The store is being learned into; it cannot be pruned now."""

    exit_code = 4


def prune(kb: KnowledgeBase, below: int, levels: Sequence[int | str] | None = None, *, dry_run: bool = False) -> pd.DataFrame:
    """Remove the patterns of frequency < ``below`` from the chosen nodes (all by default); per node, how many
    patterns there were, how many went (or would go, with ``dry_run``), and the learns they stood for."""
    import pandas as pd

    if kb.deployment is not None:
        raise IngestError("prune changes an embedded knowledge store: prune the store, then publish it (a KATO "
                          "deployment is changed only by KATO, or by ingestd publish --replace)")  # fmt: skip
    if below < 1:
        raise IngestError(f"--below {below}: give a frequency of at least 1 (patterns with a lower one are removed)")
    nodes = list(kb.nodes) if not levels else list(dict.fromkeys(kb.node(level) for level in levels))
    try:
        counts = prune_store(kb.data_dir, [node.kb_id for node in nodes], below, dry_run=dry_run)
    except StoreBusy as error:
        raise StoreInUse(f"cannot prune now: {error}") from None
    return pd.DataFrame([{"level": node.level, "node_id": node.node_id, "patterns": count.patterns,
                          "removed": count.removed, "remaining": count.patterns - count.removed,
                          "frequency_removed": count.frequency_removed, "dry_run": dry_run}
                         for node, count in zip(nodes, counts, strict=True)])  # fmt: skip
