"""Loader: the workers' stage for the embedded engine in this process: planned samples, many at a time,
stored in one transaction each.

In-process there is no server to keep busy, no connection to lose and no session worth emulating: the
engine stores what a sample's learns would store (:mod:`ingestd.engine.load`), for a whole batch of
samples at once, with the run ledger in the same transaction. So a batch costs one transaction, one
statement per table and one write per distinct pattern, where a sample sent as KATO calls costs a
call per level, each with its own session update and transaction. The knowledge base is the same, byte
for byte (the equivalence and golden tests hold the two paths to each other and to KATO).

Nothing in a load fails transiently: the store either writes (or cannot, and the run stops), or a
sample's data cannot be stored at all. A batch that fails so is loaded again one sample at a time, so
the sample that cannot be stored fails alone, as a refusal would (see ``SampleOutcome.rejection``).
"""

from __future__ import annotations

import structlog

from ingestd.backend import EmbeddedKato
from ingestd.engine.load import LevelLoad, SampleLoad
from ingestd.plan import SamplePlan
from ingestd.worker import LevelSetup, SampleOutcome

log = structlog.get_logger("ingestd.loader")

LOAD_TOKENS = 65_536
"""Tokens per load at most (a batch is also cut where the queue runs dry). A load's cost is mostly the
B-tree pages it rewrites, and the patterns of a larger load share more of them: 16k tokens per load
stored 250k tokens/s, 64k 420k, 128k 470k (benchmarks/in-process-profile.md). At 64k a stop or a kill
leaves at most a second's work in flight, and the plans held stay a few MB."""
LOAD_SAMPLES = 4096


class Loader:
    def __init__(self, backend: EmbeddedKato, levels: list[LevelSetup], run_key: str) -> None:
        self.backend = backend
        self.levels = levels
        self.run_key = run_key

    def _sample(self, plan: SamplePlan) -> SampleLoad:
        return SampleLoad(plan.index, [LevelLoad(level.node_id, level_plan.chunks, level_plan.names,
                                                 plan.metadata if level.capture_metadata else None)
                                       for level, level_plan in zip(self.levels, plan.levels, strict=True)])  # fmt: skip

    async def learn(self, plans: list[SamplePlan]) -> list[SampleOutcome]:
        """Store what is not yet stored of every level of these samples; one outcome per plan, in order."""
        samples = [self._sample(plan) for plan in plans]
        try:
            held = await self.backend.load(self.run_key, samples)
        except (TypeError, ValueError, OverflowError) as failure:
            if len(plans) == 1:
                return [_refused(plans[0], failure)]
            log.warning("a batch could not be stored; storing its samples one at a time", samples=len(plans),
                        reason=f"{type(failure).__name__}: {failure}")  # fmt: skip
            return [outcome for plan in plans for outcome in await self.learn([plan])]
        return [_outcome(plan, positions) for plan, positions in zip(plans, held, strict=True)]


def _outcome(plan: SamplePlan, held: list[int]) -> SampleOutcome:
    totals = [len(level.names) for level in plan.levels]
    firsts = [plan.first_chunk(level) for level in range(len(totals))]
    return SampleOutcome(totals, [total - before for total, before in zip(totals, held, strict=True)],
                         [max(0, before - first) for before, first in zip(held, firsts, strict=True)])  # fmt: skip


def _refused(plan: SamplePlan, failure: Exception) -> SampleOutcome:
    # Nothing of it was stored (its transaction rolled back): what an earlier run stored stays as it was.
    outcome = SampleOutcome([plan.first_chunk(level) for level in range(len(plan.levels))])
    # The error's type only: its message may quote the sample (errors and dead letters never carry text).
    outcome.rejection = f"the embedded engine cannot store its text or metadata ({type(failure).__name__})"
    return outcome
