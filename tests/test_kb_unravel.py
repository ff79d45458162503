"""The whole chain, backwards: every pattern a run learned, unravelled through the knowledge base and decoded,
gives back exactly the text it was learned from (on generated text and on the golden hierarchy runs)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from ingestd import Hierarchy, KnowledgeBase, run
from ingestd.plan import plan_levels
from ingestd.tokenize import load_tokenizer

from .golden import RUNS, load_run

_PIECES = ["the", "King", "naïve", "café", "日本語", "Ωμέγα", "🙂", "👩‍👩‍👧", "e\u0301", "don't", "'tis", "  ", "\n",
           "\n\n", "\t", "PTRN|abc", "Ġ", "Ċ", "—", "“quoted”", "42", "3.14", "<|endoftext|>", "\u00a0", "\ufeff"]  # fmt: skip


def _generated_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = Path(__file__).parents[2].joinpath("shared", "corpus", "tinyshakespeare.txt").read_text(encoding="utf-8").split()
    texts = []
    for _ in range(count):
        parts = [rng.choice(_PIECES) if rng.random() < 0.3 else rng.choice(words) for _ in range(rng.randint(2, 40))]
        texts.append("".join(part + rng.choice([" ", " ", "", "\n"]) for part in parts).strip() or "x y z")
    return texts


def _covered(plan: list, level: int) -> int:  # type: ignore[type-arg]
    """How many tokens the names of ``level`` stand for, from the start of the sample."""
    spans = [len(chunk) for chunk in plan[0].chunks]  # tokens per level-0 name
    for upper in plan[1 : level + 1]:
        position, merged = 0, []
        for chunk in upper.chunks:
            merged.append(sum(spans[position : position + len(chunk)]))
            position += len(chunk)
        spans = merged
    return sum(spans)


def _check_round_trip(kb: KnowledgeBase, texts: list[str], chunk_sizes: list[int]) -> int:
    """Every level's names of every sample unravel to the sample's tokens they cover, and decode to its text;
    returns how many samples one top-level pattern covers whole (those must decode to the sample itself)."""
    tokenizer = load_tokenizer()
    whole = 0
    for text, tokens in zip(texts, tokenizer.tokenize_batch(texts), strict=True):
        plan = plan_levels(tokens, chunk_sizes)
        for level, level_plan in enumerate(plan):
            if not level_plan.names:
                break
            unravelled = [kb.unravel(name, level) for name in level_plan.names]
            assert all(not one.missing for one in unravelled)
            joined = [token for one in unravelled for token in one.tokens]
            assert joined == tokens[: _covered(plan, level)]
            assert "".join(one.text for one in unravelled) == tokenizer.decode(joined) or any(
                "\ufffd" in one.text for one in unravelled)  # a character cut between two patterns decodes alone
            decoded = tokenizer.decode(joined)
            if "\ufffd" not in decoded:
                assert text.startswith(decoded)
        top = max((level for level, level_plan in enumerate(plan) if level_plan.names), default=None)
        if top is not None and len(plan[top].names) == 1 and _covered(plan, top) == len(tokens):
            assert kb.text(plan[top].names[0], top) == text  # exactly the sample, however it was spelled
            whole += 1
    return whole


def test_generated_text_unravels_and_decodes_back_exactly(tmp_path: Path) -> None:
    texts = _generated_texts(400, seed=7)
    source = tmp_path / "generated.jsonl"
    source.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts), encoding="utf-8")
    chunk_sizes = [3, 3, 2]
    hierarchy = Hierarchy.from_chunk_sizes(chunk_sizes, {1})
    summary = run(str(source), hierarchy, data_dir=tmp_path / "kb", min_chars=0)
    assert summary.stats.samples_learned == len(texts)
    with KnowledgeBase(tmp_path / "kb") as kb:
        assert [node.node_id for node in kb.nodes] == ["node0", "node1", "node2"]
        whole = _check_round_trip(kb, texts, chunk_sizes)
    assert whole >= 20, whole  # the exact-text case is really exercised


@pytest.mark.parametrize("run_name", RUNS)
def test_golden_runs_unravel_and_decode_back_exactly(tmp_path: Path, run_name: str) -> None:
    golden = load_run(run_name)
    hierarchy = Hierarchy.from_chunk_sizes(golden.chunk_sizes, {i for i, flag in enumerate(golden.metadata_levels) if flag})
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"text": text}) + "\n" for text in golden.texts), encoding="utf-8")
    run(str(samples), hierarchy, data_dir=tmp_path / "kb")
    with KnowledgeBase(tmp_path / "kb") as kb:
        # The golden names (KATO's own answers) are the ones unravelled.
        for text, expected in zip(golden.texts, golden.expected["per_sample"], strict=True):
            for level, names in enumerate(expected["names"]):
                for name in names:
                    assert not kb.unravel(name, level).missing
        whole = _check_round_trip(kb, golden.texts, golden.chunk_sizes)
    assert whole > 0
