"""Worker: takes planned samples from the queue and has KATO learn them, one session per node.

Every level of a sample is sent at once (each on its own session, so there is
never more than one request in flight per session); the plan already knows
every name, so a level need not wait for the one below. A long sample's calls
at one level go out on up to ``parallel_batches`` sessions of that level at
once, so one document can keep several server workers busy: each call starts
on an empty STM (auto-learn clears it, learn empties it), so they do not
depend on each other; levels with metadata stay on one session, in order (learn
keeps accumulated metadata). Each name the server returns is checked against
the plan.

Each call carries its place in the run (run key, sample, first chunk, chunks), so a backend with the
run ledger stores every chunk of a run once, whatever is resent. A level the server refuses (a 4xx)
stops there while the sample's other levels finish: the outcome says how many chunks each level
stored, so the sample can be retried from exactly there.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import anyio
import structlog

from ingestd.backend import KatoBackend
from ingestd.engine import Place
from ingestd.errors import (
    KatoRejected,
    KatoUnavailable,
    LedgerOutOfStep,
    PlanMismatch,
    SessionLost,
    Transient,
)
from ingestd.hierarchy import Hierarchy
from ingestd.plan import LevelPlan, SamplePlan
from ingestd.retry import RetryPolicy, ServerWatch, recovering, send

T = TypeVar("T")
log = structlog.get_logger("ingestd.worker")


@dataclass(frozen=True)
class LevelSetup:
    """How one level is driven: its node, whether it batches through auto-learn, and its session config."""

    index: int
    node_id: str
    chunk_size: int
    capture_metadata: bool
    batched: bool
    session_config: dict[str, Any]


def level_setups(hierarchy: Hierarchy, node_ids: list[str], *, batching: bool) -> list[LevelSetup]:
    setups = []
    for index, (level, node_id) in enumerate(zip(hierarchy.levels, node_ids, strict=True)):
        # Auto-learned patterns never carry metadata (KATO §5.8), so metadata levels learn chunk by chunk.
        batched = batching and not level.capture_metadata
        config = {**level.session_config, "process_predictions": False}
        if batched:
            config |= {"max_pattern_length": level.chunk_size, "stm_mode": "CLEAR"}
        else:
            config["max_pattern_length"] = 0
        setups.append(LevelSetup(index, node_id, level.chunk_size, level.capture_metadata, batched, config))
    return setups


@dataclass
class SampleOutcome:
    """What learning one sample did, level by level."""

    stored: list[int]  # chunks stored once its calls are through (all of them, unless refused)
    applied: list[int] = field(default_factory=list)  # patterns this run stored (learns applied)
    replayed: list[int] = field(default_factory=list)  # chunks found already stored (resent or resumed calls)
    rejection: str | None = None  # the first refusal (the sample failed)

    def __post_init__(self) -> None:
        self.applied = self.applied or [0] * len(self.stored)
        self.replayed = self.replayed or [0] * len(self.stored)


class Recovery(Protocol):
    """Where a worker reports what it had to do to get its calls through (the run's stats)."""

    def retried(self, cause: str, detail: str) -> None: ...
    def session_recreated(self, node_id: str) -> None: ...
    def possible_duplicate(self, sample_index: int, node_id: str) -> None: ...


class Worker:
    """One of a run's workers: its own session on every node, one sample at a time.

    Log events while it works carry ``worker`` (bound by the pipeline on the worker's task) and, from
    its level tasks, ``hierarchy_level``, ``node_id`` and ``sample_index`` (``level`` is the event's severity).
    """

    def __init__(self, number: int, backend: KatoBackend, levels: list[LevelSetup], batch_chunks: int, *, policy: RetryPolicy,
                 watch: ServerWatch, recovery: Recovery, run_key: str, parallel_batches: int = 1) -> None:  # fmt: skip
        self.number = number
        self.backend = backend
        self.levels = levels
        self.batch_chunks = batch_chunks
        self.parallel_batches = max(1, parallel_batches)
        self.policy = policy
        self.recovery = recovery
        self.run_key = run_key
        self.sessions: list[list[str]] = []  # per level: its sessions (more than one once a long sample needed them)
        self._nonce = secrets.token_hex(8)  # session keys are this process's own
        self._created = 0
        self._unclean: set[int] = set()  # metadata levels whose session may still hold a sample's metadata
        self._recover_server = recovering(watch, recovery.retried)  # session calls belong to no sample

    async def open(self) -> None:
        for level in self.levels:
            self.sessions.append([await self._create(level)])

    async def close(self) -> None:
        """Delete this worker's sessions, resending through outages like any call; a lost one is already gone."""
        sessions, self.sessions = [session for level in self.sessions for session in level], []
        for session_id in sessions:

            async def delete(session_id: str = session_id) -> None:
                try:
                    await self.backend.delete_session(session_id)
                except SessionLost:
                    pass

            try:
                await send(delete, self.policy, on_retry=self._recover_server, server=self.backend.description)
            except (Transient, KatoRejected, KatoUnavailable) as failure:
                log.warning("session left open on the server (it expires with its TTL)", session_id=session_id,
                            reason=str(failure))  # fmt: skip

    async def _create(self, level: LevelSetup) -> str:
        # A key per creation: if the answer is lost and the call resent, a server that honours it (the
        # embedded engine) returns the session it already created instead of leaking a second one.
        self._created += 1
        key = f"{self.run_key}:session:{self._nonce}:{self._created}"
        with structlog.contextvars.bound_contextvars(hierarchy_level=level.index, node_id=level.node_id):
            session_id, _ = await send(lambda: self.backend.create_session(level.node_id, level.session_config, key=key),
                                       self.policy, on_retry=self._recover_server, server=self.backend.description)  # fmt: skip
        return session_id

    async def learn(self, plan: SamplePlan) -> SampleOutcome:
        """Learn what is not yet stored of every level of one sample; returns when each level is through
        (stored, or refused by the server: see ``rejection``)."""
        outcome = SampleOutcome([plan.first_chunk(level) for level in range(len(self.levels))])
        async with anyio.create_task_group() as group:
            for level, level_plan in zip(self.levels, plan.levels, strict=True):
                if len(level_plan.chunks) > outcome.stored[level.index]:
                    group.start_soon(self._learn_level, level, level_plan, plan, outcome)
        return outcome

    async def _learn_level(self, level: LevelSetup, level_plan: LevelPlan, plan: SamplePlan, outcome: SampleOutcome) -> None:
        # This level task's own context: every event it logs names the level, its node and the sample.
        structlog.contextvars.bind_contextvars(hierarchy_level=level.index, node_id=level.node_id, sample_index=plan.index)
        metadata = plan.metadata if level.capture_metadata else None
        try:
            if metadata:
                await self._clean(level, plan.index)
                self._unclean.add(level.index)
            await self._learn_chunks(level, level_plan, plan, metadata, outcome)
            if metadata:
                await self._clean(level, plan.index)
        except KatoRejected as rejected:
            if outcome.rejection is None:
                outcome.rejection = f"level {level.index} (node {level.node_id}): {rejected}"

    async def _learn_chunks(self, level: LevelSetup, level_plan: LevelPlan, plan: SamplePlan,
                            metadata: dict[str, Any] | None, outcome: SampleOutcome) -> None:  # fmt: skip
        # One call is the unit of resending: a batch of whole chunks, or (without auto-learn) one chunk.
        size = self.batch_chunks if level.batched else 1
        first, total = outcome.stored[level.index], len(level_plan.chunks)
        calls = [(start, min(start + size, total)) for start in range(first, total, size)]
        lanes = 1 if level.capture_metadata else min(len(calls), self.parallel_batches)
        done = [False] * len(calls)
        leading = 0  # calls done from the first on: the level's stored chunks end where the last of them ends
        taken = iter(range(len(calls)))  # shared by the lanes: each call is taken once, in order
        refused: list[KatoRejected] = []

        async def lane(slot: int) -> None:
            nonlocal leading
            for number in taken:
                if refused:  # a refusal stops the level: calls in flight finish, no new one starts
                    return
                try:
                    await self._learn_range(level, slot, level_plan, plan, metadata, outcome, *calls[number])
                except KatoRejected as rejection:
                    refused.append(rejection)
                    return
                done[number] = True
                while leading < len(calls) and done[leading]:
                    leading += 1
                    outcome.stored[level.index] = calls[leading - 1][1]

        if lanes <= 1:
            await lane(0)
        else:
            while len(self.sessions[level.index]) < lanes:  # made when a sample first needs them, kept for the next
                self.sessions[level.index].append(await self._create(level))
            async with anyio.create_task_group() as group:
                for slot in range(lanes):
                    group.start_soon(lane, slot)
        if refused:
            if not self.backend.ledger and any(done[number] and calls[number][0] >= outcome.stored[level.index]
                                               for number in range(len(calls))):  # fmt: skip
                # stored beyond where the sample's retry starts: a server without the ledger would store it again
                self.recovery.possible_duplicate(plan.index, level.node_id)
            raise refused[0]

    async def _learn_range(self, level: LevelSetup, slot: int, level_plan: LevelPlan, plan: SamplePlan,
                           metadata: dict[str, Any] | None, outcome: SampleOutcome, first: int, end: int) -> None:  # fmt: skip
        """Have chunks ``first`` to ``end`` of a level stored, in one call on the level's session ``slot`` (or, if the
        run ledger holds some of them already, one call per range it lacks)."""
        pending, resyncs = [(first, end)], 0
        while pending:
            start, stop = pending.pop(0)
            chunks, planned = level_plan.chunks[start:stop], level_plan.names[start:stop]
            place = Place(self.run_key, plan.index, start, len(chunks))
            try:
                learned = await self._send(
                    level, slot, plan.index,
                    lambda session_id, chunks=chunks, place=place: self.backend.learn(
                        session_id, chunks, metadata=metadata, auto_learn=level.batched, place=place),
                    resend_may_duplicate=True,
                )  # fmt: skip
            except LedgerOutOfStep as step:
                # The ledger holds some of these chunks: a killed run's last request, applied late, or a run resumed
                # with another batch size. Send only what it lacks. More than twice would be a bug; fail the level.
                resyncs += 1
                if resyncs > 2:
                    raise
                log.warning("the run ledger holds some of these chunks already; sending the rest", stored_chunks=step.stored,
                            first_chunk=start, chunks=len(chunks))  # fmt: skip
                missing = step.missing(start, stop)
                outcome.replayed[level.index] += stop - start - sum(high - low for low, high in missing)
                pending = missing + pending
                continue
            if learned.names != planned:
                raise PlanMismatch(_mismatch(self.backend.description, level.node_id, plan.index, learned.names, planned))
            if learned.replayed:
                outcome.replayed[level.index] += len(chunks)
            else:
                outcome.applied[level.index] += len(planned)

    async def _clean(self, level: LevelSetup, sample_index: int) -> None:
        """Clear a metadata level's session if it may hold metadata: learn keeps accumulated metadata, so
        without this the next sample's patterns would get this one's too (also after a refusal)."""
        if level.index in self._unclean:
            await self._send(level, 0, sample_index, self.backend.clear_stm, resend_may_duplicate=False)
            self._unclean.discard(level.index)

    async def _send(self, level: LevelSetup, slot: int, sample_index: int, call: Callable[[str], Awaitable[T]], *,
                    resend_may_duplicate: bool) -> T:  # fmt: skip
        """One call on the level's session ``slot``, resent as the policy says."""
        sessions = self.sessions[level.index]

        async def on_retry(failure: Transient) -> None:
            await self._recover_server(failure)
            if isinstance(failure, SessionLost):
                sessions[slot] = await self._create(level)
                self.recovery.session_recreated(level.node_id)

        result, ambiguous = await send(lambda: call(sessions[slot]), self.policy, on_retry=on_retry,
                                       server=self.backend.description)  # fmt: skip
        if ambiguous and resend_may_duplicate and not self.backend.ledger:
            self.recovery.possible_duplicate(sample_index, level.node_id)
        return result


def _mismatch(server: str, node_id: str, sample_index: int, learned: list[str], planned: list[str]) -> str:
    position = next((i for i, (got, want) in enumerate(zip(learned, planned, strict=False)) if got != want),
                    min(len(learned), len(planned)))  # fmt: skip
    got = learned[position] if position < len(learned) else "nothing"
    want = planned[position] if position < len(planned) else "nothing"
    # The chunk's text is not quoted: errors and logs never carry sample text.
    return (f"{server} learned {got} on node {node_id} where KATO 3.10.1's rule gives {want} (sample {sample_index}, "
            f"chunk {position} of that call): the server is not KATO-compatible, or names patterns under another "
            "Unicode version; stopping before the knowledge base diverges further")
