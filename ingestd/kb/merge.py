"""``ingestd merge``: the knowledge stores of shards (each learned by ``ingestd run --shard I/N``, or a Ray task) merged
into one, exactly the store a single process would have learned (see :mod:`ingestd.engine.merge` for why, and for
what makes it safe to run again after a crash)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ingestd.engine.merge import MergeRefused, merge
from ingestd.engine.reader import StoreMissing
from ingestd.engine.store import StoreBusy
from ingestd.errors import IngestError

if TYPE_CHECKING:
    import pandas as pd


class MergeError(IngestError):
    """The stores cannot be merged as asked."""

    exit_code = 4


def merge_stores(sources: Sequence[str | Path], into: str | Path) -> pd.DataFrame:
    """Merge every source data directory into ``into`` (made if missing); a source merged before is skipped. Per
    source: its store id, the patterns it brought, and whether it had been merged already."""
    import pandas as pd

    target = Path(into).expanduser()
    paths = [Path(source).expanduser() for source in sources]
    if not paths:
        raise IngestError("give the data directories of the shards to merge")
    for path in paths:
        if path.resolve() == target.resolve():
            raise MergeError(f"{path} is the target (--into) itself: give the shards' data directories and another target")
    try:
        results = merge(target, paths)
    except StoreMissing as error:
        raise IngestError(f"{error}: give the data directory a shard learned into (its --data-dir)") from None
    except StoreBusy as error:
        raise MergeError(f"cannot merge into {target} now: {error}") from None
    except MergeRefused as error:
        raise MergeError(str(error)) from None
    return pd.DataFrame([{"source": result.source, "store_id": result.store_id, "patterns": result.patterns,
                          "already_merged": result.already_merged} for result in results])  # fmt: skip
