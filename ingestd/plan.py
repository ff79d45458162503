"""Plan: a sample's tokens → every chunk and every pattern name at every level, computed locally.

The names come from the same rule the engine uses (:mod:`ingestd.engine.rules`),
so higher levels need not wait for lower ones, and a server that answers
another name is caught.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ingestd.engine.rules import MIN_PATTERN_SYMBOLS, chunk_name


@dataclass(slots=True)
class LevelPlan:
    """What one level learns for one sample: its chunks, in order, and their names."""

    chunks: list[list[str]]
    names: list[str]


@dataclass(slots=True)
class SamplePlan:
    index: int
    token_count: int
    levels: list[LevelPlan]
    metadata: dict[str, Any] = field(default_factory=dict)
    start: list[int] = field(default_factory=list)
    """Per level, how many of its chunks are stored already (a resumed or retried sample); empty = none."""
    digest: int = 0  # of the sample's text and fields (see ingestd.source.sample_digest)

    def first_chunk(self, level: int) -> int:
        return self.start[level] if self.start else 0

    @property
    def pattern_count(self) -> int:
        return sum(len(level.names) for level in self.levels)


def plan_levels(tokens: Sequence[str], chunk_sizes: Sequence[int]) -> list[LevelPlan]:
    """Cut each level's input into consecutive slices of its chunk size; a 1-symbol slice yields nothing.

    The learned names, in order, are the next level's input. Nothing carries
    over between samples.
    """
    levels = []
    symbols = list(tokens)
    for size in chunk_sizes:
        chunks = [symbols[start : start + size] for start in range(0, len(symbols), size)]
        if chunks and len(chunks[-1]) < MIN_PATTERN_SYMBOLS:
            chunks.pop()  # only the last slice can be short
        names = [chunk_name(chunk) for chunk in chunks]
        levels.append(LevelPlan(chunks, names))
        symbols = names
    return levels
