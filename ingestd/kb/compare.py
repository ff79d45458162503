"""Two knowledge bases side by side: which patterns each holds, and how their frequencies differ."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

    from ingestd.kb.knowledge_base import KnowledgeBase


def diff(a: KnowledgeBase, b: KnowledgeBase) -> pd.DataFrame:
    """Per level (of either hierarchy): patterns only in ``a``, only in ``b``, in both, and in both with another
    frequency; each side's distinct patterns and total frequency; and ``same_kb`` where both sides are one knowledge
    base (two runs into the same nodes of one store: it compares with itself)."""
    import pandas as pd

    rows = []
    nothing: Iterator[tuple[str, int, int]] = iter(())
    for level in range(max(len(a.nodes), len(b.nodes))):
        node_a = a.nodes[level] if level < len(a.nodes) else None
        node_b = b.nodes[level] if level < len(b.nodes) else None
        # Both lists come by name, so one merge walk compares them without holding both as dicts.
        left = a.frequencies(level) if node_a else nothing
        right = b.frequencies(level) if node_b else nothing
        only_a = only_b = both = changed = total_a = total_b = count_a = count_b = 0
        x, y = next(left, None), next(right, None)
        while x is not None or y is not None:
            if y is None or (x is not None and x[0] < y[0]):
                only_a += 1
                total_a += x[1]  # type: ignore[index]
                count_a += 1
                x = next(left, None)
            elif x is None or y[0] < x[0]:
                only_b += 1
                total_b += y[1]
                count_b += 1
                y = next(right, None)
            else:
                both += 1
                changed += x[1] != y[1]
                total_a += x[1]
                total_b += y[1]
                count_a += 1
                count_b += 1
                x, y = next(left, None), next(right, None)
        same = node_a is not None and node_b is not None and node_a.kb_id == node_b.kb_id and a.store_id == b.store_id
        rows.append({"level": level, "node_a": node_a.node_id if node_a else None,
                     "node_b": node_b.node_id if node_b else None, "same_kb": same, "patterns_a": count_a,
                     "patterns_b": count_b, "only_a": only_a, "only_b": only_b, "both": both,
                     "frequency_changed": changed, "total_frequency_a": total_a, "total_frequency_b": total_b})  # fmt: skip
    return pd.DataFrame(rows)
