"""Bulk loading (an ingestd extension): many samples of a run stored in one transaction.

What a run's sample does to a knowledge base is fixed by KATO's rules: on each level, each chunk is
observed one symbol per event and learned with ``learn_at_end`` on a session whose STM is empty at the
sample's start, carrying the sample's metadata on the levels that have it (learn keeps accumulated
metadata, so every chunk of the sample carries the same fold of it; see :mod:`ingestd.worker`). So
loading needs no session: each chunk is one learn of the pattern whose events are the chunk's symbols.
The learns of a batch are aggregated before they are written: frequencies add up, and metadata is a
sorted union per key (:func:`ingestd.engine.rules.merge_metadata`), so one write per distinct pattern
stores exactly what the learns one by one would have.

**Names are taken from the caller, not computed again.** The caller is ingestd's planner, in the same
process, naming chunks with the very rule the engine learns by (:func:`ingestd.engine.rules.chunk_name`);
a check would hash every chunk a second time, a fifth of a load's cost, to compare a function with itself.
KATO's side of that rule is held by the golden tests (names answered by a real KATO 3.10.1).

Served (``POST /ingestd/load/{run_key}``), the caller is another process, so :func:`check` holds each
name to the rule first (about a fifth of a load's cost, on the server's side).

**The run ledger decides what is stored** (:mod:`ingestd.engine.ledger`), in the same transaction: a level
of a sample is stored from the chunk the ledger records on, whatever the caller believed, so a batch sent
again after a crash, or a sample redone from a stale resume point, stores nothing twice and nothing less.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from ingestd.engine import ledger, rules
from ingestd.engine.store import KnowledgeStore

_PREFIX = len(rules.PATTERN_PREFIX)


@dataclass(frozen=True, slots=True)
class LevelLoad:
    """One level of one sample: its chunks from ``first`` on (all of them, or a piece of a long sample), their
    names (``PTRN|…``), and the sample's metadata if this level carries it (None or empty: learned without)."""

    node_id: str
    chunks: Sequence[Sequence[str]]
    names: Sequence[str]
    metadata: Mapping[str, Any] | None = None
    first: int = 0


@dataclass(frozen=True, slots=True)
class SampleLoad:
    index: int
    levels: Sequence[LevelLoad]


class _Pattern:
    """What a batch learns of one pattern: how often, and the union of its learns' metadata (None: none)."""

    __slots__ = ("chunk", "count", "metadata")

    def __init__(self, chunk: Sequence[str]) -> None:
        self.chunk = chunk
        self.count = 0
        self.metadata: dict[str, set[str]] | None = None


def _data(chunk: Sequence[str]) -> bytes:
    """A chunk's pattern data as stored: one event per symbol. Made as rows are written, not kept: orjson
    (from 3.12) gives every result a buffer of at least 4 KB, which a load of 9k patterns would hold at once."""
    return orjson.dumps([[symbol] for symbol in chunk])


def check(samples: Sequence[SampleLoad], kb_of: Callable[[str], str]) -> str | None:
    """What makes ``samples`` unfit to load from another process (None if nothing): a sample given twice, two
    levels of a sample in one knowledge base (the ledger keeps one record per sample and knowledge base), a level
    whose names are not its chunks' names by KATO's rule, or a chunk too short to be learned."""
    seen: set[int] = set()
    for number, sample in enumerate(samples):
        if sample.index in seen:
            return f"samples[{number}]: sample {sample.index} is given twice"
        seen.add(sample.index)
        kbs: dict[str, str] = {}
        for level_number, level in enumerate(sample.levels):
            where = f"samples[{number}].levels[{level_number}]"
            kb = kb_of(level.node_id)
            if kb in kbs:
                return f"{where}: node {level.node_id!r} is the knowledge base of node {kbs[kb]!r}, given before"
            kbs[kb] = level.node_id
            if len(level.names) != len(level.chunks):
                return f"{where}: {len(level.chunks)} chunks but {len(level.names)} names"
            if level.first + len(level.names) > ledger.SAMPLE_INDEX_MAX:
                return f"{where}: its chunks end past position {ledger.SAMPLE_INDEX_MAX}"
            for position, (chunk, name) in enumerate(zip(level.chunks, level.names, strict=True)):
                if len(chunk) < 2:
                    return f"{where}.chunks[{position}]: a pattern needs at least 2 symbols"
                if rules.chunk_name(chunk) != name:
                    return f"{where}.names[{position}] is not the name KATO gives chunks[{position}] ({rules.chunk_name(chunk)})"
    return None


def _key(item: tuple[tuple[str, str], _Pattern]) -> tuple[str, str]:
    return item[0]


def load(connection: sqlite3.Connection, run_key: str, samples: Sequence[SampleLoad],
         kb_of: Callable[[str], str]) -> list[list[int]]:  # fmt: skip
    """Inside a transaction: store every chunk of ``samples`` the run ledger does not hold yet, and move the
    ledger on. Returns, per sample and level, how many of the chunks given the ledger held before: the caller's measure
    of what this call stored and what was there already."""
    kbs = [[kb_of(level.node_id) for level in sample.levels] for sample in samples]
    held = ledger.positions(connection, run_key, [sample.index for sample in samples])
    patterns: dict[tuple[str, str], _Pattern] = {}
    advanced: list[tuple[int, str, int]] = []
    added: dict[str, int] = {}
    pieces: list[tuple[int, str, int, list[tuple[int, int]], int, int]] = []
    before: list[list[int]] = []
    for sample, sample_kbs in zip(samples, kbs, strict=True):
        positions = []
        for level, kb in zip(sample.levels, sample_kbs, strict=True):
            first, end = level.first, level.first + len(level.names)
            prefix, ahead = held.get((sample.index, kb), (0, []))
            lacking = ledger.missing(prefix, ahead, first, end)
            count = sum(high - low for low, high in lacking)
            positions.append(len(level.names) - count)
            if not count:
                continue
            folded = rules.fold_metadata([level.metadata]) if level.metadata else None
            for position in itertools.chain.from_iterable(range(low, high) for low, high in lacking):
                key = (kb, level.names[position - first][_PREFIX:])
                pattern = patterns.get(key)
                if pattern is None:
                    pattern = patterns[key] = _Pattern(level.chunks[position - first])
                pattern.count += 1
                if folded:
                    union = pattern.metadata if pattern.metadata is not None else {}
                    for field, values in folded.items():
                        union.setdefault(field, set()).update(values)
                    pattern.metadata = union
            if first == 0 and not ahead:
                advanced.append((sample.index, kb, end))
            else:  # a piece, or ranges stored out of order before: the record's ranges joined anew
                pieces.append((sample.index, kb, prefix, ahead, first, end))
            added[kb] = added.get(kb, 0) + count
        before.append(positions)
    # In key order: each B-tree page is then visited once per load, not once per pattern on it.
    ordered = sorted(patterns.items(), key=_key)
    plain = ((kb, name, _data(p.chunk), len(p.chunk), p.count) for (kb, name), p in ordered if p.metadata is None)
    tagged = ((kb, name, _data(p.chunk), len(p.chunk), p.count,
               {field: sorted(values) for field, values in p.metadata.items()})
              for (kb, name), p in ordered if p.metadata is not None)  # fmt: skip
    KnowledgeStore.add_plain(connection, plain)
    KnowledgeStore.add_with_metadata(connection, tagged)
    ledger.advance(connection, run_key, advanced, added)
    for sample_index, kb, prefix, ahead, first, end in pieces:
        ledger.join(connection, run_key, sample_index, kb, prefix, ahead, first, end)
    return before
