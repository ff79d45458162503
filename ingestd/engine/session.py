"""A KATO session's state and the STM operations on it (protocol §4, §5.1–§5.3, §5.8–§5.9).

Operations here change a :class:`Session` in memory and return the patterns to
store; the engine persists both in one transaction.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ingestd.engine import rules

STM_LIMIT = 1000
"""KATO trims STM and each accumulator to their last 1000 entries on every save (§4.3)."""


@dataclass(slots=True)
class Observation:
    """One observation as the engine takes it: validated, and without vectors (not supported)."""

    strings: list[str] = field(default_factory=list)
    emotives: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    unique_id: str | None = None


@dataclass(slots=True)
class Learn:
    """A pattern to store in a knowledge base (§5.5)."""

    kb_id: str
    pattern_hash: str
    events: list[list[str]]
    length: int
    emotives: list[dict[str, float]]
    metadata: dict[str, list[str]]


def new_session_id() -> str:
    return f"session-{uuid.uuid4().hex}-{int(time.time() * 1000)}"


@dataclass(slots=True)
class Session:
    session_id: str
    node_id: str
    kb_id: str
    created_at: float
    expires_at: float
    ttl_seconds: int
    metadata: dict[str, Any]
    config: dict[str, Any]
    stm: list[list[str]] = field(default_factory=list)
    emotives_accumulator: list[dict[str, float]] = field(default_factory=list)
    metadata_accumulator: list[dict[str, Any]] = field(default_factory=list)
    time: int = 0

    # -- persistence -------------------------------------------------------
    def to_document(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "node_id": self.node_id,
            "kb_id": self.kb_id,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "ttl_seconds": self.ttl_seconds,
            "metadata": self.metadata,
            "config": self.config,
            "stm": self.stm,
            "emotives_accumulator": self.emotives_accumulator,
            "metadata_accumulator": self.metadata_accumulator,
            "time": self.time,
        }

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> Session:
        return cls(**document)

    def copy(self) -> Session:
        """A copy whose STM and accumulators can change without touching this one."""
        return Session(
            self.session_id, self.node_id, self.kb_id, self.created_at, self.expires_at,
            self.ttl_seconds, self.metadata, dict(self.config), [list(e) for e in self.stm],
            list(self.emotives_accumulator), list(self.metadata_accumulator), self.time,
        )  # fmt: skip

    def enforce_limits(self) -> None:
        if len(self.stm) > STM_LIMIT:
            del self.stm[:-STM_LIMIT]
        if len(self.emotives_accumulator) > STM_LIMIT:
            del self.emotives_accumulator[:-STM_LIMIT]
        if len(self.metadata_accumulator) > STM_LIMIT:
            del self.metadata_accumulator[:-STM_LIMIT]

    # -- learning ----------------------------------------------------------
    def learn(self, learns: list[Learn], *, with_accumulators: bool = True) -> str:
        """Empty STM and, when it held >= 2 symbols, queue its pattern (§5.3). Returns the name or ""."""
        events = self.stm
        self.stm = []
        length = rules.symbol_count(events)
        if length < rules.MIN_PATTERN_SYMBOLS:
            return ""
        digest = rules.pattern_hash(events)
        if with_accumulators:
            emotives = list(self.emotives_accumulator)
            metadata = rules.fold_metadata(self.metadata_accumulator)
        else:
            emotives, metadata = [], {}
        learns.append(Learn(self.kb_id, digest, events, length, emotives, metadata))
        return rules.PATTERN_PREFIX + digest

    def _auto_learn(self, learns: list[Learn]) -> str | None:
        """Auto-learn when STM reaches ``max_pattern_length`` (§5.8); no emotives or metadata."""
        limit = self.config.get("max_pattern_length") or 0
        if limit <= 0 or len(self.stm) < limit:
            return None
        if len(self.stm) > 1 and self.config.get("stm_mode") == "ROLLING":
            # KATO slices with -(limit-1); for limit 1 that is -0, which keeps everything.
            keep = self.stm[-(limit - 1) :]
            name = self.learn(learns, with_accumulators=False)
            self.stm = [list(event) for event in keep]
        else:
            name = self.learn(learns, with_accumulators=False)
        return name or None

    def observe(self, observation: Observation, learns: list[Learn]) -> str | None:
        """One observation (§5.1): append the sorted event, auto-learn, advance time, collect."""
        auto_learned = None
        strings = observation.strings
        if strings:
            self.stm.append(rules.sort_event(strings) if len(strings) > 1 else list(strings))
            if len(self.stm) >= (self.config.get("max_pattern_length") or 0) > 0:
                auto_learned = self._auto_learn(learns)
        self.time += 1
        if observation.emotives:
            self.emotives_accumulator.append(observation.emotives)
        if observation.metadata:
            self.metadata_accumulator.append(observation.metadata)
        return auto_learned

    def clear(self) -> None:
        """clear-stm: STM, both accumulators and time (§3.10)."""
        self.stm = []
        self.emotives_accumulator = []
        self.metadata_accumulator = []
        self.time = 0
