"""Worker: takes planned samples from the queue and has KATO learn them, one session per node.

Every level of a sample is sent at once (each on its own session, so there is
never more than one request in flight per session); the plan already knows
every name, so a level need not wait for the one below. Each name the server
returns is checked against the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anyio

from ingestd.backend import KatoBackend
from ingestd.errors import PlanMismatch
from ingestd.hierarchy import Hierarchy
from ingestd.plan import LevelPlan, SamplePlan, batches


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


class Worker:
    def __init__(self, backend: KatoBackend, levels: list[LevelSetup], batch_chunks: int) -> None:
        self.backend = backend
        self.levels = levels
        self.batch_chunks = batch_chunks
        self.sessions: list[str] = []

    async def open(self) -> None:
        for level in self.levels:
            self.sessions.append(await self.backend.create_session(level.node_id, level.session_config))

    async def close(self) -> None:
        sessions, self.sessions = self.sessions, []
        for session_id in sessions:
            await self.backend.delete_session(session_id)

    async def learn(self, plan: SamplePlan) -> None:
        """Learn every level of one sample; returns when all of it is stored."""
        async with anyio.create_task_group() as group:
            for level, level_plan in zip(self.levels, plan.levels, strict=True):
                if level_plan.chunks:
                    group.start_soon(self._learn_level, level, level_plan, plan)

    async def _learn_level(self, level: LevelSetup, level_plan: LevelPlan, plan: SamplePlan) -> None:
        session_id = self.sessions[level.index]
        metadata = plan.metadata if level.capture_metadata else None
        for chunks, planned in batches(level_plan, self.batch_chunks):
            learned = await self.backend.learn(session_id, chunks, metadata=metadata, auto_learn=level.batched)
            if learned != planned:
                raise PlanMismatch(_mismatch(self.backend.description, level.node_id, plan.index, chunks, learned, planned))
        if metadata:
            # Learn keeps accumulated metadata; clear it so the next sample's patterns get only theirs.
            await self.backend.clear_stm(session_id)


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
