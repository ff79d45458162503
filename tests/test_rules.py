"""The pure learning rules: names, sorting, kb ids, metadata folding (protocol §5, §6.1)."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingestd.engine import rules

# Protocol §6.1, as stored (after in-event sorting).
WORKED_EXAMPLES = [
    ([["hello"], ["world"]], "7d0678ba6305341ce0d25133ab086208656a562f"),
    ([["hello", "world"], ["foo"]], "9893efcd120fe1d7d4622c39f6a5b8c0f5babdef"),
    ([["a", "b"]], "395314cc2f2880a00c3e6e11f1e02d8b8c45a0e4"),
    ([["The"], ["Ġquick"], ["Ġbrown"], ["Ġfox"], ["Ġjumps"], ["Ġover"], ["Ġthe"], ["Ġlazy"]],
     "5763bbb2149dcbc38feaf5b36e4d112a12fd8d4c"),
    ([["It"], ["'s"], ["Ġa"], ['Ġ"'], ["test"], ['"']], "2cddb264bf4b2a2fc61cf4abcc6f4a95913eed65"),
    ([["'\""], ["\\"], ["Ġ\\("]], "6a2857d3791cdd396a4b52270af5be59081bde41"),
    ([[""], ["x"]], "8871ade8af0dedc136bef2f59fa48a2dcb10a292"),
    ([["hello", "hello", "world"], ["a", "Ġthe"], [""]], "7bfb00c33173cf7843b2a5e8a1741478e148c1a5"),
    ([["x"], ["y"]], "0b546fe2eec70a7c81a07579fb158530cdcb848a"),
    ([["a"], ["b"], ["c"]], "b98534b32c1d7489d4ce1a48724aa65aeecbdba9"),
    ([["The"], ["Ġquick"], ["Ġbrown"], ["Ġfox"]], "5ceb1e960e663ddf1d6729cc64f25dfbd3490100"),
    ([["PTRN|5ceb1e960e663ddf1d6729cc64f25dfbd3490100"], ["PTRN|cf74e6f51145a56aa3c480ab782e993c22006f36"]],
     "fd810fd8f2229f2e5591c217d9261aa4732243c1"),
]  # fmt: skip


@pytest.mark.parametrize(("events", "digest"), WORKED_EXAMPLES)
def test_worked_examples(events: list[list[str]], digest: str) -> None:
    assert rules.pattern_name(events) == "PTRN|" + digest


def test_chunk_name_is_one_symbol_per_event() -> None:
    assert rules.chunk_name(["The", "Ġquick", "Ġbrown", "Ġfox"]) == "PTRN|5ceb1e960e663ddf1d6729cc64f25dfbd3490100"


def test_characters_assigned_after_unicode_13_are_escaped_as_python_3_10_does() -> None:
    # U+0870 (Unicode 14) is printable on Python >= 3.11 but escaped by KATO's Python 3.10.
    assert rules.hash_text([["a\u0870b"], ["é"]]) == "[['a\\u0870b'], ['é']]"
    # sha1 of that text as computed by CPython 3.10's own repr.
    assert rules.pattern_hash([["a\u0870b"]]) == "0a932a91bd4fd8fd27171941d89ab6506bd0890f"


def test_the_stored_table_of_characters_changed_since_unicode_13_equals_a_scan_of_this_python() -> None:
    # The table spares every process a scan of 1.1 M code points; this Python's entry must be what the scan finds.
    import unicodedata

    from ingestd.engine._unicode_divergent import DIVERGENT_RANGES

    assert unicodedata.unidata_version in DIVERGENT_RANGES, "run scripts/gen_unicode_divergent.py with this Python"
    assert rules._divergent_characters() == rules.scan_divergent_characters()
    assert "\u0870" in rules._divergent_characters()


def _unchanged_since_unicode_13(text: str) -> bool:
    return rules._divergent_characters().isdisjoint(text)


symbols = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)
event_lists = st.lists(st.lists(symbols, min_size=1, max_size=4), min_size=1, max_size=5)


@given(event_lists)
@settings(max_examples=400)
def test_name_is_sha1_of_python_repr_text(events: list[list[str]]) -> None:
    text = str(events)
    if _unchanged_since_unicode_13(text):
        assert rules.hash_text(events) == text
        assert rules.pattern_hash(events) == hashlib.sha1(text.encode("utf-8")).hexdigest()


@given(symbols)
@settings(max_examples=1000)
def test_explicit_literal_rule_matches_repr(symbol: str) -> None:
    # The rule of §5.4, written out, equals Python's repr wherever Unicode did not change.
    if _unchanged_since_unicode_13(symbol):
        assert rules._symbol_literal(symbol) == repr(symbol)


@given(st.lists(symbols, max_size=8))
def test_events_sort_by_code_point_and_keep_duplicates(strings: list[str]) -> None:
    event = rules.sort_event(strings)
    assert [list(map(ord, s)) for s in event] == sorted(list(map(ord, s)) for s in strings)
    assert sorted(event) == sorted(strings) and len(event) == len(strings)


def test_sorting_examples_from_the_protocol() -> None:
    assert rules.sort_event(["Zoo", "Apple", "apple"]) == ["Apple", "Zoo", "apple"]
    assert rules.sort_event(["10", "2", "1", "20", "100", "3"]) == ["1", "10", "100", "2", "20", "3"]
    assert rules.sort_event(["Ġthe", "é"]) == ["é", "Ġthe"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=6,
)
metadata_entries = st.lists(st.dictionaries(st.sampled_from(["a", "b", "c", "source"]), json_values, max_size=3), max_size=6)


@given(metadata_entries, st.randoms())
def test_metadata_folding_is_order_independent(entries: list[dict[str, object]], shuffler: random.Random) -> None:
    shuffled = list(entries)
    shuffler.shuffle(shuffled)
    assert rules.fold_metadata(entries) == rules.fold_metadata(shuffled)  # dict == ignores key order


@given(metadata_entries, metadata_entries)
def test_merging_folded_metadata_equals_folding_everything(first: list[dict[str, object]], second: list[dict[str, object]]) -> None:
    merged = rules.merge_metadata(rules.fold_metadata(first), rules.fold_metadata(second))
    assert merged == rules.fold_metadata(first + second)
    assert rules.merge_metadata(rules.fold_metadata(second), rules.fold_metadata(first)) == merged


def test_metadata_values_are_python_str_of_json_values() -> None:
    folded = rules.fold_metadata(
        [{"book": "b1", "n": 5, "ch": 1.0}, {"zz": [1, 2], "flag": True, "none": None, "big": 1e16, "tiny": 0.00001,
                                             "obj": {"k": "v"}, "names": ["a"]}, {"book": "a0", "n": 5}]
    )  # fmt: skip
    assert folded == {"book": ["a0", "b1"], "n": ["5"], "ch": ["1.0"], "zz": ["[1, 2]"], "flag": ["True"],
                      "none": ["None"], "big": ["1e+16"], "tiny": ["1e-05"], "obj": ["{'k': 'v'}"], "names": ["['a']"]}  # fmt: skip
    assert list(folded)[:3] == ["book", "n", "ch"]  # first-appearance key order


def test_emotives_keep_the_last_persistence_entries_old_first() -> None:
    stored = [{"e": float(value)} for value in range(3)]
    new = [{"e": float(value)} for value in range(3, 7)]
    assert rules.merge_emotives(stored, new, 5) == [{"e": float(value)} for value in range(2, 7)]


def test_kb_ids() -> None:
    assert rules.kb_id("node0") == "node0_kato"
    assert rules.kb_id("node-0.x") == "node_0_x_kato"
    assert rules.kb_id("node-0") == rules.kb_id("node_0")
    assert rules.kb_id('a/b\\c."d$e*f<g>h:i|j?k-l m') == "a_b_c__d_e_f_g_h_i_j_k_l_m_kato"
    assert rules.kb_id("n", "my-service") == "n_my_service"


def test_long_node_ids_are_truncated_with_an_md5_suffix() -> None:
    node = "training-run-2026-11-24-wikitext-103-hierarchy-level-node0-extra"
    safe = node.replace("-", "_")
    expected = safe[: 60 - 4 - 10] + "_" + hashlib.md5(safe.encode()).hexdigest()[:8] + "_kato"
    assert rules.kb_id(node) == expected
    assert len(expected) == 60
    exactly = "n" * 55  # 55 + len("_kato") == 60: not truncated
    assert rules.kb_id(exactly) == exactly + "_kato"
    assert rules.kb_id("n" * 56) != "n" * 56 + "_kato"


def test_prefix_handling() -> None:
    assert rules.strip_prefix("PTRN|abc") == "abc"
    assert rules.strip_prefix("abc") == "abc"
