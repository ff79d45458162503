"""Loader: the workers' stage for ingestd's engine (in this process, or served by ``ingestd kato serve``):
planned samples, many at a time, stored in one transaction each.

The engine has no need of sessions to be sent a sample: it stores what a sample's learns would store
(:mod:`ingestd.engine.load`), for a whole batch of samples at once, with the run ledger in the same
transaction. So a batch costs one transaction (and, served, one request), one statement per table and one
write per distinct pattern, where a sample sent as KATO calls costs a call per level, each with its own
session update and transaction. The knowledge base is the same, byte for byte (the equivalence and golden
tests hold the two paths to each other and to KATO).

In-process nothing in a load fails transiently: the store either writes (or cannot, and the run stops), or a
sample's data cannot be stored at all. Served, a load is resent through outages as a worker's calls are
(:mod:`ingestd.retry`), and a resend stores nothing twice: the run ledger decides what is new; a sample longer
than a load goes in pieces (``PIECE_SYMBOLS``). A batch that cannot be stored (or that the server refuses) is
loaded again one sample at a time, so the sample that cannot be stored fails alone, as a refusal would (see
``SampleOutcome.rejection``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import structlog

from ingestd.backend import KatoBackend
from ingestd.engine.load import LevelLoad, SampleLoad
from ingestd.errors import KatoRejected, KatoUnavailable, Transient
from ingestd.plan import SamplePlan
from ingestd.retry import RetryPolicy, send
from ingestd.worker import LevelSetup, SampleOutcome

log = structlog.get_logger("ingestd.loader")

LOAD_TOKENS = 65_536
"""Tokens per load at most (a batch is also cut where the queue runs dry). A load's cost is mostly the
B-tree pages it rewrites, and the patterns of a larger load share more of them: 16k tokens per load
stored 250k tokens/s, 64k 420k, 128k 470k (benchmarks/in-process-profile.md). At 64k a stop or a kill
leaves at most a second's work in flight, and the plans held stay a few MB."""
LOAD_SAMPLES = 4096


LOAD_TOKENS_SERVED = 8_192
"""Tokens per load at most when the engine is served: smaller loads keep the server busy while the next is
planned and sent (several go out at once), and one costs the server a few milliseconds."""

LOADS_IN_FLIGHT = 4
"""Loads sent at once to a served engine (fewer with a smaller ``--workers``): while one is stored, the next
are read and checked (by another server process, if it has several)."""

PIECE_SYMBOLS = (LOAD_TOKENS_SERVED, 2_048)
"""A served sample longer than a load goes in pieces: ranges of one level's chunks, of at most this many symbols at
level 0 and above (a name is about 6 times a token's text), one request each, several at once. A request then
stays a few hundred KB however long the document (under a proxy's body limit, and the server's memory), and one
document keeps several server processes busy. The run ledger joins the ranges, in whatever order they land."""


async def _nothing(failure: Transient) -> None:
    pass


class Loader:
    def __init__(self, backend: KatoBackend, levels: list[LevelSetup], run_key: str, *, policy: RetryPolicy | None = None,
                 on_retry: Callable[[Transient], Awaitable[None]] = _nothing,
                 pieces_in_flight: int = LOADS_IN_FLIGHT) -> None:  # fmt: skip
        """With ``policy`` (a served engine), loads are resent through outages and overload, as worker calls are
        (``on_retry`` before each resend), and a sample longer than a load goes in pieces."""
        self.backend = backend
        self.levels = levels
        self.run_key = run_key
        self.policy = policy
        self.on_retry = on_retry
        self.pieces_in_flight = anyio.CapacityLimiter(pieces_in_flight)  # shared by the run's loaders

    async def _store(self, samples: list[SampleLoad]) -> list[list[int]]:
        if self.policy is None:
            return await self.backend.load(self.run_key, samples)
        # A resend after an ambiguous failure is exact: the ledger stores only what the first attempt did not.
        held, _ = await send(lambda: self.backend.load(self.run_key, samples), self.policy,
                             on_retry=self.on_retry, server=self.backend.description)  # fmt: skip
        return held

    def _sample(self, plan: SamplePlan) -> SampleLoad:
        return SampleLoad(plan.index, [LevelLoad(level.node_id, level_plan.chunks, level_plan.names,
                                                 plan.metadata if level.capture_metadata else None)
                                       for level, level_plan in zip(self.levels, plan.levels, strict=True)])  # fmt: skip

    async def learn(self, plans: list[SamplePlan]) -> list[SampleOutcome]:
        """Store what is not yet stored of every level of these samples; one outcome per plan, in order."""
        if self.policy is not None and len(plans) == 1 and plans[0].token_count > LOAD_TOKENS_SERVED:
            return [await self._in_pieces(plans[0])]
        samples = [self._sample(plan) for plan in plans]
        try:
            held = await self._store(samples)
        except (TypeError, ValueError, OverflowError, KatoRejected) as failure:
            self._check_loads_taken(failure)
            if len(plans) == 1:
                return [_refused(plans[0], failure)]
            log.warning("a batch could not be stored; storing its samples one at a time", samples=len(plans),
                        reason=f"{type(failure).__name__}: {failure}")  # fmt: skip
            return [outcome for plan in plans for outcome in await self.learn([plan])]
        return [_outcome(plan, positions) for plan, positions in zip(plans, held, strict=True)]

    def _check_loads_taken(self, failure: Exception) -> None:
        if isinstance(failure, KatoRejected) and failure.status in (404, 405):
            # The server no longer offers bulk loads (another server at that address now): no sample's fault.
            raise KatoUnavailable(f"{self.backend.description} no longer takes bulk loads ({failure}): progress "
                                  "is saved; run the same command again (or with --no-bulk-load)") from None  # fmt: skip

    async def _in_pieces(self, plan: SamplePlan) -> SampleOutcome:
        """One long sample in pieces, several at once. Refused in part, it fails; the stored pieces stay (the ledger
        knows them), and its record says what each level stored from the first chunk on."""
        sample = self._sample(plan)
        held, sent = [0] * len(sample.levels), [0] * len(sample.levels)  # per level: found stored, of what was stored
        pieces = []  # (level, piece)
        for number, level in enumerate(sample.levels):
            step = max(1, PIECE_SYMBOLS[min(number, 1)] // max(1, len(level.chunks[0]) if level.chunks else 1))
            for start in range(0, len(level.names), step):
                end = min(start + step, len(level.names))
                if end <= plan.first_chunk(number):  # stored, as the run's progress confirms (a resumed sample)
                    held[number] += end - start
                    continue
                pieces.append((number, LevelLoad(level.node_id, level.chunks[start:end], level.names[start:end],
                                                 level.metadata, start)))  # fmt: skip
        refused: dict[int, Exception] = {}  # by piece

        async def store(position: int, number: int, piece: LevelLoad) -> None:
            async with self.pieces_in_flight:
                try:
                    result = await self._store([SampleLoad(sample.index, [piece])])
                except (TypeError, ValueError, OverflowError, KatoRejected) as failure:
                    self._check_loads_taken(failure)
                    refused[position] = failure
                    return
            held[number] += result[0][0]
            sent[number] += len(piece.names)

        async with anyio.create_task_group() as group:
            for position, (number, piece) in enumerate(pieces):
                group.start_soon(store, position, number, piece)
        if not refused:
            return _outcome(plan, held)
        outcome = _refused(plan, refused[min(refused)])
        outcome.applied = [stored - found for stored, found in zip(sent, held, strict=True)]
        outcome.replayed = [max(0, found - plan.first_chunk(number)) for number, found in enumerate(held)]
        for number in range(len(sample.levels)):  # what is stored from the first chunk on: the pieces before a refused one
            stopped = min((pieces[position][1].first for position in refused if pieces[position][0] == number), default=None)
            total = len(sample.levels[number].names)
            outcome.stored[number] = max(outcome.stored[number], total if stopped is None else stopped)
        return outcome


def _outcome(plan: SamplePlan, held: list[int]) -> SampleOutcome:
    totals = [len(level.names) for level in plan.levels]
    firsts = [plan.first_chunk(level) for level in range(len(totals))]
    return SampleOutcome(totals, [total - before for total, before in zip(totals, held, strict=True)],
                         [max(0, before - first) for before, first in zip(held, firsts, strict=True)])  # fmt: skip


def _refused(plan: SamplePlan, failure: Exception) -> SampleOutcome:
    # Nothing of it was stored (its transaction rolled back): what an earlier run stored stays as it was.
    outcome = SampleOutcome([plan.first_chunk(level) for level in range(len(plan.levels))])
    if isinstance(failure, KatoRejected):  # the server's answer, already without what was sent
        outcome.rejection = str(failure)
        if failure.status == 413:
            outcome.rejection += (" (the sample is larger than the server takes in one request: raise its limit, "
                                  "INGESTD_SERVER__MAX_BODY_BYTES, or learn it with --no-bulk-load, in calls of "
                                  "--batch-chunks chunks)")  # fmt: skip
    else:  # the error's type only: its message may quote the sample (errors and dead letters never carry text)
        outcome.rejection = f"the engine cannot store its text or metadata ({type(failure).__name__})"
    return outcome
