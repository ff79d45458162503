"""A node's patterns written out as parquet, streamed (memory stays flat however large the node)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ingestd.kb.knowledge_base import KnowledgeBase


def export_parquet(kb: KnowledgeBase, level: int | str, path: str | Path, *, batch: int = 50_000) -> int:
    """Every pattern of a node as one parquet row (name, length, frequency, pattern_data, metadata), by name;
    returns how many. The file appears whole: it is written beside and renamed into place."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([
        ("name", pa.string()), ("length", pa.int64()), ("frequency", pa.int64()),
        ("pattern_data", pa.list_(pa.list_(pa.string()))), ("metadata", pa.map_(pa.string(), pa.list_(pa.string()))),
    ])  # fmt: skip
    target = Path(path)
    partial = target.with_name(f".{target.name}.partial")
    rows = 0
    try:
        with pq.ParquetWriter(partial, schema) as writer:
            for patterns in kb.iter_patterns(level, batch):
                writer.write_table(pa.Table.from_pydict({
                    "name": [pattern.name for pattern in patterns],
                    "length": [pattern.length for pattern in patterns],
                    "frequency": [pattern.frequency for pattern in patterns],
                    "pattern_data": [pattern.pattern_data for pattern in patterns],
                    "metadata": [list(pattern.metadata.items()) for pattern in patterns],
                }, schema=schema))  # fmt: skip
                rows += len(patterns)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return rows
