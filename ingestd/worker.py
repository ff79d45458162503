"""Worker: takes planned samples from the queue and has KATO learn them, one session per node.

Every level of a sample is sent at once (each on its own session, so there is
never more than one request in flight per session); the plan already knows
every name, so a level need not wait for the one below. Each name the server
returns is checked against the plan.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import anyio
import structlog

from ingestd.backend import KatoBackend
from ingestd.errors import KatoRejected, PlanMismatch, ServerDown, SessionLost, Transient
from ingestd.hierarchy import Hierarchy
from ingestd.plan import LevelPlan, SamplePlan, batches
from ingestd.retry import RetryPolicy, ServerWatch, send

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
                 watch: ServerWatch, recovery: Recovery, key_prefix: str) -> None:  # fmt: skip
        self.number = number
        self.backend = backend
        self.levels = levels
        self.batch_chunks = batch_chunks
        self.policy = policy
        self.watch = watch
        self.recovery = recovery
        self.key_prefix = key_prefix
        self.sessions: list[str] = []
        self._nonce = secrets.token_hex(8)  # session keys are this process's own
        self._created = 0

    async def open(self) -> None:
        for level in self.levels:
            self.sessions.append(await self._create(level))

    async def close(self) -> None:
        """Delete this worker's sessions, resending through outages like any call; a lost one is already gone."""
        sessions, self.sessions = self.sessions, []
        for session_id in sessions:

            async def delete(session_id: str = session_id) -> None:
                try:
                    await self.backend.delete_session(session_id)
                except SessionLost:
                    pass

            try:
                await send(delete, self.policy, on_retry=self._recover_server)
            except (Transient, KatoRejected) as failure:
                log.warning("session left open on the server (it expires with its TTL)", session_id=session_id,
                            reason=str(failure))  # fmt: skip

    async def _create(self, level: LevelSetup) -> str:
        # A key per creation: if the answer is lost and the call resent, a server that honours it (the
        # embedded engine) returns the session it already created instead of leaking a second one.
        self._created += 1
        key = f"{self.key_prefix}:session:{self._nonce}:{self._created}"
        with structlog.contextvars.bound_contextvars(hierarchy_level=level.index, node_id=level.node_id):
            session_id, _ = await send(lambda: self.backend.create_session(level.node_id, level.session_config, key=key),
                                       self.policy, on_retry=self._recover_server)  # fmt: skip
        return session_id

    async def learn(self, plan: SamplePlan) -> None:
        """Learn every level of one sample; returns when all of it is stored."""
        async with anyio.create_task_group() as group:
            for level, level_plan in zip(self.levels, plan.levels, strict=True):
                if level_plan.chunks:
                    group.start_soon(self._learn_level, level, level_plan, plan)

    async def _learn_level(self, level: LevelSetup, level_plan: LevelPlan, plan: SamplePlan) -> None:
        # This level task's own context: every event it logs names the level, its node and the sample.
        structlog.contextvars.bind_contextvars(hierarchy_level=level.index, node_id=level.node_id, sample_index=plan.index)
        metadata = plan.metadata if level.capture_metadata else None
        # One call is the unit of resending: a batch of whole chunks, or (without auto-learn) one chunk.
        size = self.batch_chunks if level.batched else 1
        for number, (chunks, planned) in enumerate(batches(level_plan, size)):
            key = f"{self.key_prefix}:{plan.index}:{level.index}:{number}"
            learned = await self._send(
                level, plan.index,
                lambda session_id, chunks=chunks, key=key: self.backend.learn(
                    session_id, chunks, metadata=metadata, auto_learn=level.batched, key=key),
                resend_may_duplicate=True,
            )  # fmt: skip
            if learned != planned:
                raise PlanMismatch(_mismatch(self.backend.description, level.node_id, plan.index, chunks, learned, planned))
        if metadata:
            # Learn keeps accumulated metadata; clear it so the next sample's patterns get only theirs.
            await self._send(level, plan.index, self.backend.clear_stm, resend_may_duplicate=False)

    async def _send(self, level: LevelSetup, sample_index: int, call: Callable[[str], Awaitable[T]], *,
                    resend_may_duplicate: bool) -> T:  # fmt: skip
        async def on_retry(failure: Transient) -> None:
            self.recovery.retried(failure.cause, str(failure))
            if isinstance(failure, SessionLost):
                await self._recreate(level)
            elif isinstance(failure, ServerDown):
                await self.watch.wait_until_up(str(failure))

        result, ambiguous = await send(lambda: call(self.sessions[level.index]), self.policy, on_retry=on_retry)
        if ambiguous and resend_may_duplicate and not self.backend.exactly_once:
            self.recovery.possible_duplicate(sample_index, level.node_id)
        return result

    async def _recover_server(self, failure: Transient) -> None:
        self.recovery.retried(failure.cause, str(failure))  # session calls belong to no sample
        if isinstance(failure, ServerDown):
            await self.watch.wait_until_up(str(failure))

    async def _recreate(self, level: LevelSetup) -> None:
        self.sessions[level.index] = await self._create(level)
        self.recovery.session_recreated(level.node_id)


def _mismatch(server: str, node_id: str, sample_index: int, chunks: list[list[str]], learned: list[str],
              planned: list[str]) -> str:  # fmt: skip
    position = next((i for i, (got, want) in enumerate(zip(learned, planned, strict=False)) if got != want),
                    min(len(learned), len(planned)))  # fmt: skip
    got = learned[position] if position < len(learned) else "nothing"
    want = planned[position] if position < len(planned) else "nothing"
    chunk = chunks[position] if position < len(chunks) else "?"
    return (f"{server} learned {got} on node {node_id} where KATO 3.10.1's rule gives {want} (sample {sample_index}, "
            f"chunk {chunk}): the server is not KATO-compatible, or names patterns under another Unicode version; "
            "stopping before the knowledge base diverges further")
