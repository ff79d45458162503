"""``ingestd merge``: the knowledge stores of shards (each learned by ``ingestd run --shard I/N``, or a Ray task) merged
into one, exactly the store a single process would have learned (see :mod:`ingestd.engine.merge` for why, and for
what makes it safe to run again after a crash)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingestd import catalogue
from ingestd.engine.merge import MergeRefused, merge
from ingestd.engine.reader import StoreMissing
from ingestd.engine.store import StoreBusy
from ingestd.errors import IngestError
from ingestd.progress import read_run

if TYPE_CHECKING:
    import pandas as pd


class MergeError(IngestError):
    """The stores cannot be merged as asked."""

    exit_code = 4


def check_shards(sources: Sequence[Path]) -> None:
    """Refuse stores whose runs do not make one sharded run: another source, tokenizer, hierarchy, window or file
    list; shards of different counts, or the same shard twice; or a run that has not finished. Stores without a
    run of their own (a merged target, say) are not checked here."""
    seen: dict[str, tuple[Path, dict[str, Any]]] = {}
    common: tuple[Path, dict[str, Any]] | None = None
    for source in sources:
        runs = source / "runs"
        for run_dir in sorted(runs.iterdir()) if runs.is_dir() else []:
            record = read_run(run_dir)
            if record is None:
                continue
            manifest = catalogue.read(run_dir) or {}
            if manifest.get("status") not in (None, "finished", "finished with failures"):
                raise MergeError(f"the run in {run_dir} is {manifest.get('status')}: run its command again to finish "
                                 "it, then merge (a shard merged half-learned could not be merged again once finished)")  # fmt: skip
            identity = dict(record.identity)
            shard = identity.pop("shard", None)
            if common is None:
                common = (run_dir, identity)
            elif identity != common[1]:
                differs = sorted(key for key in identity.keys() | common[1].keys() if identity.get(key) != common[1].get(key))
                raise MergeError(f"{run_dir} and {common[0]} are not shards of one run: their {', '.join(differs)} "
                                 "differ (merging them would count samples twice or miss some)")  # fmt: skip
            if shard is not None:
                if shard in seen and seen[shard][0] != run_dir:
                    raise MergeError(f"{run_dir} and {seen[shard][0]} are both shard {shard}")
                seen[shard] = (run_dir, identity)
    counts = {shard.split("/")[1] for shard in seen}
    if len(counts) > 1:
        raise MergeError(f"the shards were cut in different numbers ({', '.join(sorted(seen))}): merge the shards of one "
                         "--shard I/N cut")  # fmt: skip


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
    check_shards(paths)
    try:
        results = merge(target, paths)
    except StoreMissing as error:
        raise IngestError(f"{error}: give the data directory a shard learned into (its --data-dir)") from None
    except (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as error:
        raise IngestError(f"cannot merge into {target} ({error.strerror or error}): give a directory that can hold a "
                          "knowledge store") from None  # fmt: skip
    except StoreBusy as error:
        raise MergeError(f"cannot merge into {target} now: {error}") from None
    except MergeRefused as error:
        raise MergeError(str(error)) from None
    return pd.DataFrame([{"source": result.source, "store_id": result.store_id, "patterns": result.patterns,
                          "already_merged": result.already_merged} for result in results])  # fmt: skip
