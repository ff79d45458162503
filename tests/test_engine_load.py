"""Bulk loading stores exactly what KATO's calls one by one store, and the run ledger keeps it exactly-once."""

from __future__ import annotations

import asyncio
import itertools
import random
import sqlite3
from pathlib import Path
from typing import Any

import hypothesis
from hypothesis import strategies as st

from ingestd.engine import Engine, EngineSettings, Observation
from ingestd.engine.load import LevelLoad, SampleLoad
from ingestd.plan import SamplePlan, plan_levels

NODES = ["load-node0", "load-node1", "load-node2"]
METADATA_LEVELS = (False, True, True)


def _samples(count: int, seed: int) -> list[tuple[list[str], dict[str, Any]]]:
    """Token lists over a small vocabulary (so patterns repeat across samples and batches), with metadata
    whose keys differ between samples (key order in the stored metadata follows first appearance)."""
    rng = random.Random(seed)
    vocabulary = ["Ġthe", "Ġa", "'s", "Ġcat", "Ġdog", "\n", "é", "Ġ🙂", "x"]
    samples = []
    for index in range(count):
        tokens = [rng.choice(vocabulary[: 3 + index % 6]) for _ in range(rng.randint(1, 40))]
        metadata: dict[str, Any] = {"source": "s", "sample_index": index % 7}
        if index % 3 == 0:
            metadata = {"tag": [index % 2, None], **metadata}
        samples.append((tokens, metadata))
    return samples


def _patterns(data_dir: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(data_dir / "kato.sqlite3") as connection:
        return sorted(connection.execute("SELECT kb_id, name, pattern_data, length, frequency, emotives, metadata, "
                                         "typeof(pattern_data), typeof(metadata) FROM patterns"))  # fmt: skip


async def _one_by_one(engine: Engine, samples: list[tuple[list[str], dict[str, Any]]]) -> None:
    """What a KATO client does: per level, one observe-sequence per chunk; clear-stm around metadata levels."""
    sessions = [(await engine.create_session(node, {"process_predictions": False}))["session_id"] for node in NODES]
    for tokens, metadata in samples:
        for level, level_plan in enumerate(plan_levels(tokens, [2, 3, 2])):
            for chunk in level_plan.chunks:
                observations = [Observation([symbol]) for symbol in chunk]
                if METADATA_LEVELS[level]:
                    observations[0].metadata = metadata
                await engine.observe_sequence(sessions[level], observations, learn_at_end=True)
            if METADATA_LEVELS[level]:
                await engine.clear_stm(sessions[level])


def _load(tokens: list[str], metadata: dict[str, Any], index: int) -> SampleLoad:
    levels = plan_levels(tokens, [2, 3, 2])
    return SampleLoad(index, [LevelLoad(node, level.chunks, level.names, metadata if METADATA_LEVELS[number] else None)
                              for number, (node, level) in enumerate(zip(NODES, levels, strict=True))])  # fmt: skip


def test_a_load_stores_what_kato_calls_one_by_one_store_also_on_a_knowledge_base_that_has_them(tmp_path: Path) -> None:
    first, second = _samples(120, seed=1), _samples(90, seed=2)

    async def by_calls() -> None:
        async with Engine(EngineSettings(data_dir=tmp_path / "calls")) as engine:
            await _one_by_one(engine, first)
            await _one_by_one(engine, second)

    async def by_loads() -> None:
        async with Engine(EngineSettings(data_dir=tmp_path / "loads")) as engine:
            for run_key, samples, size in (("first", first, 7), ("second", second, 50)):
                loads = [_load(tokens, metadata, index) for index, (tokens, metadata) in enumerate(samples)]
                for start in range(0, len(loads), size):
                    await engine.load(run_key, loads[start : start + size])

    asyncio.run(by_calls())
    asyncio.run(by_loads())
    expected = _patterns(tmp_path / "calls")
    assert len(expected) > 100 and any(row[4] > 1 and row[6] != b"{}" for row in expected)
    assert _patterns(tmp_path / "loads") == expected


def test_the_ledger_makes_a_load_sent_again_or_from_a_stale_position_store_nothing_twice(tmp_path: Path) -> None:
    samples = [_load(tokens, metadata, index) for index, (tokens, metadata) in enumerate(_samples(30, seed=3))]

    async def scenario() -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
        async with Engine(EngineSettings(data_dir=tmp_path / "kb")) as engine:
            # A killed run stored the first two chunks of sample 5's level 0 (a plain KATO call with its place).
            level0 = samples[5].levels[0]
            partial = SampleLoad(5, [LevelLoad(level0.node_id, level0.chunks[:2], level0.names[:2])])
            await engine.load("run", [partial])
            first = await engine.load("run", samples)
            again = await engine.load("run", samples)
            other_run = await engine.load("other", samples[:2])
            return first, again, other_run

    first, again, other_run = asyncio.run(scenario())
    totals = [[len(level.names) for level in sample.levels] for sample in samples]
    assert first[5][0] == 2 and all(positions == [0, 0, 0] for index, positions in enumerate(first) if index != 5)
    assert again == totals  # everything held: nothing stored again
    assert other_run == [[0, 0, 0], [0, 0, 0]]

    async def by_calls() -> None:
        async with Engine(EngineSettings(data_dir=tmp_path / "calls")) as engine:
            picked = _samples(30, seed=3)
            await _one_by_one(engine, picked)
            await _one_by_one(engine, picked[:2])

    asyncio.run(by_calls())
    assert _patterns(tmp_path / "kb") == _patterns(tmp_path / "calls")


def test_a_sample_that_cannot_be_stored_fails_alone(tmp_path: Path) -> None:
    from ingestd.backend import EmbeddedKato
    from ingestd.loader import Loader
    from ingestd.worker import LevelSetup

    setups = [LevelSetup(level, node, 2, METADATA_LEVELS[level], False, {}) for level, node in enumerate(NODES)]
    plans = []
    for index, (tokens, metadata) in enumerate(_samples(12, seed=4)):
        if index == 4:
            metadata = {**metadata, "bad": "\ud800"}  # a lone surrogate: not storable as JSON
            tokens = tokens + ["Ġcat", "Ġdog"] * 4  # enough chunks to reach the metadata levels
        plans.append(SamplePlan(index, len(tokens), plan_levels(tokens, [2, 3, 2]), metadata))

    async def scenario() -> list[Any]:
        backend = EmbeddedKato(EngineSettings(data_dir=tmp_path))
        await backend.start()
        try:
            return await Loader(backend, setups, "run").learn(plans)
        finally:
            await backend.aclose()

    outcomes = asyncio.run(scenario())
    assert [index for index, outcome in enumerate(outcomes) if outcome.rejection] == [4]
    assert "cannot store" in outcomes[4].rejection and "\ud800" not in outcomes[4].rejection
    assert outcomes[4].stored == [0, 0, 0] and outcomes[3].stored == [len(level.names) for level in plans[3].levels]
    stored = sum(row[4] for row in _patterns(tmp_path))
    assert stored == sum(len(level.names) for index, plan in enumerate(plans) if index != 4 for level in plan.levels)


def test_a_store_made_with_the_earlier_clustered_layout_learns_the_same_as_a_new_one(tmp_path: Path) -> None:
    # Stores created before ``patterns`` became a rowid table keep their WITHOUT ROWID table; both layouts
    # must take calls and loads alike, also when the older one already holds patterns.
    old = tmp_path / "old"
    old.mkdir()
    with sqlite3.connect(old / "kato.sqlite3") as connection:
        connection.execute("CREATE TABLE patterns (kb_id TEXT NOT NULL, name TEXT NOT NULL, pattern_data BLOB NOT NULL, "
                           "length INTEGER NOT NULL, frequency INTEGER NOT NULL, emotives BLOB NOT NULL, "
                           "metadata BLOB NOT NULL, PRIMARY KEY (kb_id, name)) WITHOUT ROWID")  # fmt: skip
    first, second = _samples(60, seed=3), _samples(60, seed=4)

    async def learn(data_dir: Path) -> None:
        for run_key, samples in (("first", first), ("second", second)):
            async with Engine(EngineSettings(data_dir=data_dir)) as engine:
                await _one_by_one(engine, samples[:30])
                await engine.load(run_key, [_load(tokens, metadata, index) for index, (tokens, metadata)
                                            in enumerate(samples[30:])])  # fmt: skip

    asyncio.run(learn(old))
    asyncio.run(learn(tmp_path / "new"))
    with sqlite3.connect(old / "kato.sqlite3") as connection:
        assert "WITHOUT ROWID" in connection.execute("SELECT sql FROM sqlite_master WHERE name = 'patterns'").fetchone()[0]
    with sqlite3.connect(tmp_path / "new" / "kato.sqlite3") as connection:
        assert "WITHOUT ROWID" not in connection.execute("SELECT sql FROM sqlite_master WHERE name = 'patterns'").fetchone()[0]
    expected = _patterns(tmp_path / "new")
    assert len(expected) > 50 and any(row[4] > 2 for row in expected)
    assert _patterns(old) == expected


@hypothesis.given(total=st.integers(1, 24), cuts=st.lists(st.integers(1, 23), max_size=8), resends=st.integers(0, 6),
                  order=st.randoms(use_true_random=False), resize=st.integers(1, 9))  # fmt: skip
def test_the_ledger_stores_each_chunk_once_whatever_order_the_calls_land_in(total: int, cuts: list[int], resends: int,
                                                                           order: random.Random, resize: int) -> None:  # fmt: skip
    """A sample's calls land in any order (a long sample's batches go out on several sessions at once) and some
    are sent again, whole or regrouped (a resumed run with another batch size): each chunk is applied exactly
    once; a regrouped call that overlaps what is stored is refused with what is stored, and sending what the
    refusal says is missing completes the sample."""
    from ingestd.engine import ledger
    from ingestd.errors import LedgerOutOfStep

    connection = sqlite3.connect(":memory:")
    connection.executescript(ledger.SCHEMA)
    bounds = sorted({0, total, *(cut for cut in cuts if cut < total)})
    calls = list(itertools.pairwise(bounds))
    sent = calls + [order.choice(calls) for _ in range(resends)]
    order.shuffle(sent)
    applied = [0] * total

    def send(first: int, end: int) -> None:
        try:
            if ledger.record(connection, ledger.Place("run", 3, first, end - first), "kb"):
                for chunk in range(first, end):
                    applied[chunk] += 1
        except ledger.LedgerConflict as conflict:
            assert conflict.stored < end or conflict.ahead  # it does hold some of them
            for low, high in LedgerOutOfStep(conflict.stored, "", conflict.ahead).missing(first, end):
                send(low, high)

    half = len(sent) // 2
    for first, end in sent[:half]:
        send(first, end)
    for first in range(0, total, resize):  # the rest, regrouped: a resumed run with another batch size
        send(first, min(first + resize, total))
    assert applied == [1] * total
    found = ledger.positions(connection, "run", [3])
    assert found[(3, "kb")] == (total, [])  # all joined into the prefix
    assert ledger.status(connection, "run", ["kb"], [3])["totals"] == {"kb": total}


def test_a_load_after_calls_stored_ranges_ahead_stores_only_the_rest(tmp_path: Path) -> None:
    """A run over HTTP stored some of a long sample's batches out of order and was killed; resumed in-process,
    the load stores only the chunks the ledger lacks: the knowledge base equals learning the sample once."""
    tokens = [f"Ġw{index % 13}" for index in range(90)]
    levels = plan_levels(tokens, [2])
    sample = SampleLoad(0, [LevelLoad("ahead-node0", levels[0].chunks, levels[0].names)])

    async def whole(data_dir: Path) -> list[list[int]]:
        async with Engine(EngineSettings(data_dir=data_dir)) as engine:
            return await engine.load("run", [sample])

    async def calls(data_dir: Path, ranges: list[tuple[int, int]]) -> None:
        """Ranges of the sample stored as a server stores calls with their ledger place (here out of order)."""
        from ingestd.engine import Place

        async with Engine(EngineSettings(data_dir=data_dir)) as engine:
            config = {"process_predictions": False, "max_pattern_length": 2, "stm_mode": "CLEAR"}
            session = (await engine.create_session("ahead-node0", config))["session_id"]
            for first, end in ranges:
                observations = [Observation(strings=[symbol]) for chunk in levels[0].chunks[first:end] for symbol in chunk]
                await engine.observe_sequence(session, observations, learn_at_end=True, place=Place("run", 0, first, end - first))

    asyncio.run(calls(tmp_path / "kb", [(10, 20), (30, 35), (0, 4)]))
    assert asyncio.run(whole(tmp_path / "kb")) == [[4 + 10 + 5]]  # held before: what the calls stored
    assert asyncio.run(whole(tmp_path / "kb")) == [[len(levels[0].names)]]  # and now all of it
    asyncio.run(whole(tmp_path / "reference"))
    assert _patterns(tmp_path / "kb") == _patterns(tmp_path / "reference")
