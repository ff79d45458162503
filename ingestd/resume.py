"""Between opening a run and learning: start over, claim the nodes, check the knowledge base against the
progress, and find where each interrupted or retried sample resumes.

Everything here happens before the first learn, so a refusal loses nothing:

* ``--fresh`` clears the hierarchy's nodes and drops the old run key's ledger records;
* each node is claimed with what this run feeds it (:mod:`ingestd.nodes`): another level, chunk size or
  tokenizer in a non-empty knowledge base stops the run, unless ``allow_mixed_kb``;
* a resumed run whose knowledge base holds fewer of its chunks than its progress confirms (the file is
  missing, empty, cleared or an older copy) stops: going on would leave samples recorded as done that
  the knowledge base does not have;
* the knowledge store must be the one the run learned into (an engine's store id is the same in-process
  and served from the same data directory; a KATO server is known by its address);
* samples that were in flight when the run stopped, and failed samples tried again, resume at the chunk
  the run ledger says is stored, level by level; without a ledger (KATO), failed samples resume where
  their failure left them, and interrupted ones start over and are reported as possible duplicates.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from ingestd.backend import KatoBackend
from ingestd.engine import Feeder
from ingestd.errors import IngestError
from ingestd.nodes import NodeConflict, conflict_message
from ingestd.progress import Progress

if TYPE_CHECKING:
    from ingestd.pipeline import RunConfig, RunStats

log = structlog.get_logger("ingestd.resume")


class KnowledgeBaseMismatch(IngestError):
    """The knowledge base is not the one the run's progress was recorded against."""

    exit_code = 4


def check_store_file(config: RunConfig, progress: Progress) -> None:
    """Before the embedded engine opens its file (it would create an empty one): a resumed run needs it."""
    if config.fresh or config.kato_url is not None or not progress.learned_before:
        return
    store = Path(config.data_dir) / "kato.sqlite3"
    state = "missing" if not store.exists() else "empty" if store.is_file() and store.stat().st_size == 0 else None
    if state is not None:
        raise KnowledgeBaseMismatch(
            f"{progress.path} records {len(progress.done):,} samples learned into {store}, but that file is {state}: "
            "restore it (with its -wal file) to resume, or start the run over with --fresh"
        )


Reliably = Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]]
"""Sends a backend call through outages and resends, as the workers' calls are (see :mod:`ingestd.retry`)."""


async def prepare(config: RunConfig, progress: Progress, backend: KatoBackend, node_ids: list[str],
                  stats: RunStats, reliably: Reliably) -> dict[int, list[int]]:  # fmt: skip
    """Do the checks above; returns, per sample to resume part-way, the chunks stored per level."""
    if config.fresh:
        progress.begin_fresh()  # stopped from here on, the run is refused until --fresh runs again
        for node_id in node_ids:
            await reliably(lambda node_id=node_id: backend.clear_all(node_id))
        if progress.previous_run_key and backend.ledger:
            await reliably(lambda: backend.ledger_forget(progress.previous_run_key, everything=True))
        progress.restart()
    elif progress.learned_before and progress.store not in (None, backend.store):
        raise KnowledgeBaseMismatch(
            f"{progress.path} records samples learned into another knowledge store ({progress.store}) than "
            f"{backend.description} ({backend.store}): point --data-dir or --kato-url at the one this run learned into, "
            "or give this run its own --run-id or --run-dir (a new run), or start it over with --fresh"
        )
    progress.bind_store(backend.store)
    await _claim(config, backend, node_ids, reliably)
    if not config.fresh and progress.learned_before and backend.ledger:
        totals = (await reliably(lambda: backend.ledger_status(progress.run_key, node_ids)))["totals"]
        _check_totals(progress, backend, node_ids, totals)
    return await _resume_points(config, progress, backend, node_ids, stats, reliably)


async def _claim(config: RunConfig, backend: KatoBackend, node_ids: list[str], reliably: Reliably) -> None:
    claims = {node_id: Feeder(config.tokenizer, level, size)
              for level, (node_id, size) in enumerate(zip(node_ids, config.hierarchy.chunk_sizes, strict=True))}  # fmt: skip
    conflicts = await reliably(lambda: backend.claim_nodes(list(claims.items()), allow_mixed=config.allow_mixed_kb))
    if not conflicts:
        return
    message = conflict_message(conflicts, claims, backend.description)
    if not config.allow_mixed_kb:
        raise NodeConflict(message)
    log.warning("mixing knowledge bases on purpose (--allow-mixed-kb)", nodes=sorted(conflicts), detail=message)


def _check_totals(progress: Progress, backend: KatoBackend, node_ids: list[str], totals: dict[str, int]) -> None:
    for level, (node_id, confirmed) in enumerate(zip(node_ids, progress.confirmed, strict=False)):
        if totals.get(node_id, 0) < confirmed:
            raise KnowledgeBaseMismatch(
                f"node {node_id} (level {level}) on {backend.description} holds {totals.get(node_id, 0):,} chunks of "
                f"this run where {progress.path} confirms {confirmed:,}: the knowledge base was cleared, replaced or "
                "restored from an older copy since. Restore the one that goes with this progress to resume, or "
                "start the run over with --fresh (it clears these nodes)"
            )


async def _resume_points(config: RunConfig, progress: Progress, backend: KatoBackend, node_ids: list[str],
                         stats: RunStats, reliably: Reliably) -> dict[int, list[int]]:  # fmt: skip
    # Failed samples are tried again by any run (--retry-failed: only they), from what they stored; a plain
    # resume also redoes the interrupted ones (and the rest).
    retried = sorted(progress.failed)
    interrupted = [] if config.retry_failed else progress.interrupted
    if interrupted:
        log.warning("resuming: samples were in flight when the last run stopped; what they had not stored is redone",
                    samples=interrupted[:100], count=len(interrupted))  # fmt: skip
    if not retried and not interrupted:
        return {}
    if backend.ledger and progress.ledger_covers_interrupted:
        samples = retried + interrupted
        found = (await reliably(lambda: backend.ledger_status(progress.run_key, node_ids, samples)))["samples"]
        points = {sample: [found[sample][node_id] for node_id in node_ids] for sample in samples}
    else:
        points = {sample: _padded(progress.failed[sample].stored, len(node_ids)) for sample in retried}
        for sample in interrupted:
            stats.possible_duplicate(sample, "(interrupted run)")
    return {sample: stored for sample, stored in points.items() if any(stored)}


def _padded(stored: list[int], levels: int) -> list[int]:
    return (stored + [0] * levels)[:levels]
