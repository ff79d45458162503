"""A learned hierarchy, read back: statistics, top patterns, patterns unravelled to tokens and text, sampling.

::

    from ingestd import KnowledgeBase

    kb = KnowledgeBase("kato-data")               # the hierarchy the store holds (or run_id=, node_ids=, run_dir=)
    kb.stats()                                    # per node: patterns, frequencies, lengths (a DataFrame)
    kb.top(level=1, n=10)                         # the most frequent node1 patterns, with their text
    kb.show("PTRN|…").text                        # one pattern unravelled down to node0's tokens, decoded
    kb.sample(level=2, n=5, seed=0)               # drawn by frequency, as the notebooks generated text

Read-only: safe while a run or ``ingestd kato serve`` writes to the store; each call sees what was committed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingestd.engine.reader import StoredPattern, StoreMissing, StoreReader
from ingestd.engine.rules import PATTERN_PREFIX
from ingestd.errors import IngestError
from ingestd.kb.nodes import Hierarchy, Node, NodesUnknown, resolve

if TYPE_CHECKING:
    import pandas as pd

    from ingestd.kb.deployment import Deployment
    from ingestd.tokenize import Tokenizer


class PatternNotFound(IngestError):
    """No node of the hierarchy holds that pattern."""


@dataclass(frozen=True, slots=True)
class Missing:
    """A name an unravelling could not follow: its node does not hold it (pruned, or cleared)."""

    level: int
    name: str

    def __str__(self) -> str:
        return f"⟨missing {self.name[:13]}…⟩"


@dataclass
class Unravelled:
    """A pattern followed down to node0: the names at every level below it, and the tokens they come to."""

    tokens: list[str]
    text: str
    levels: list[list[str]]  # the names at each level below the pattern's, from the next one down to node0
    missing: list[Missing] = field(default_factory=list)


@dataclass
class PatternView:
    """One pattern of the hierarchy, with what it stands for."""

    name: str
    node: str
    level: int
    frequency: int
    length: int
    metadata: dict[str, list[str]]
    emotives: list[Any]
    pattern_data: list[list[str]]
    tokens: list[str]
    text: str
    below: list[list[str]]
    missing: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "node": self.node, "level": self.level, "frequency": self.frequency,
                "length": self.length, "metadata": self.metadata, "emotives": self.emotives,
                "pattern_data": self.pattern_data, "tokens": self.tokens, "text": self.text, "below": self.below,
                "missing": self.missing}  # fmt: skip


_HEX = frozenset("0123456789abcdef")


def pattern_name(text: str) -> str:
    """A pattern name as KATO writes it, from how a person may give it: ``PTRN|<sha1>``, the bare sha1, any case,
    with spaces around."""
    bare = text.strip()
    if bare[:5].upper() == PATTERN_PREFIX.upper():
        bare = bare[5:]
    if len(bare) == 40 and set(bare.lower()) <= _HEX:
        bare = bare.lower()
    return PATTERN_PREFIX + bare


def _check_count(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise IngestError(f"n = {n!r}: give how many, a whole number of 1 or more")


def _store_of(run_dir: Path) -> Path:
    """The data directory an in-process run learned into: its manifest says, or it sits in ``<data>/runs``."""
    from ingestd import catalogue

    manifest = catalogue.read(run_dir) or {}
    backend = manifest.get("backend") or {}
    if backend.get("kind") == "embedded" and backend.get("data_dir"):
        return Path(backend["data_dir"])
    home = run_dir.resolve().parent.parent
    return home if (home / "kato.sqlite3").is_file() else Path("kato-data")


class KnowledgeBase:
    """The hierarchy learned into an embedded knowledge store (``ingestd run --data-dir DIR``)."""

    def __init__(self, data_dir: str | Path | None = None, *, node_ids: str | None = None, run_id: str | None = None,
                 run_dir: str | Path | None = None, tokenizer: str | Tokenizer | None = None,
                 deployment: Deployment | None = None) -> None:  # fmt: skip
        """``data_dir``: the store (default ``./kato-data``, or with ``run_dir`` the store that run learned into).
        ``deployment``: read a KATO deployment's storage instead (its nodes named by ``node_ids``)."""
        self.deployment = deployment
        if deployment is not None:
            if not node_ids or run_id or run_dir:
                raise NodesUnknown("a KATO deployment records no runs: name its nodes with --node-ids (a template "
                                   "with {level}, or ids separated by commas)")  # fmt: skip
            from ingestd.kb.deployment import DeploymentReader

            self.data_dir = Path(deployment.address)
            self._reader: Any = DeploymentReader(deployment)
            self.hierarchy = resolve(self._reader, self.data_dir, node_ids=node_ids)
            self._tokenizer_choice = tokenizer
            self._tokenizer = None
            return
        if data_dir is None:
            data_dir = _store_of(Path(run_dir).expanduser()) if run_dir is not None else Path("kato-data")
        self.data_dir = Path(data_dir).expanduser()
        try:
            self._reader = StoreReader(self.data_dir)
        except StoreMissing:
            raise NodesUnknown(f"no knowledge store in {self.data_dir} (no kato.sqlite3): give the --data-dir directory "
                               "a run learned into (default ./kato-data)") from None  # fmt: skip
        try:
            self.hierarchy: Hierarchy = resolve(self._reader, self.data_dir, node_ids=node_ids, run_id=run_id,
                                                run_dir=Path(run_dir).expanduser() if run_dir is not None else None)  # fmt: skip
        except BaseException:
            self._reader.close()
            raise
        self._tokenizer_choice = tokenizer
        self._tokenizer: Tokenizer | None = None

    # -- plumbing ----------------------------------------------------------------------------------------
    @property
    def store_id(self) -> str:
        """The store's own random id (one store, under whatever path)."""
        return self._reader.store_id()

    @property
    def nodes(self) -> list[Node]:
        return self.hierarchy.nodes

    def node(self, which: int | str) -> Node:
        """A node by level (``2``) or node id (``"node2"``)."""
        if isinstance(which, bool):
            raise NodesUnknown(f"a node is a level or a node id, not {which!r}")
        for node in self.nodes:
            if which in (node.level, node.node_id) or str(which) == str(node.level):
                return node
        raise NodesUnknown(f"this hierarchy has no node {which!r}: its nodes are "
                           f"{', '.join(f'{node.level} ({node.node_id})' for node in self.nodes)}")  # fmt: skip

    def _chosen(self, levels: Sequence[int | str] | None) -> list[Node]:
        """The nodes named (each once, in the order given), or all."""
        return list(self.nodes) if not levels else list(dict.fromkeys(self.node(level) for level in levels))

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            from ingestd.tokenize import Tokenizer, load_tokenizer

            choice = self._tokenizer_choice
            self._tokenizer = choice if isinstance(choice, Tokenizer) else load_tokenizer(choice or self.hierarchy.tokenizer)
        return self._tokenizer

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> KnowledgeBase:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.deployment is not None:
            return f"KnowledgeBase(deployment={self.deployment.address!r}, nodes={[node.node_id for node in self.nodes]})"
        return f"KnowledgeBase({str(self.data_dir)!r}, nodes={[node.node_id for node in self.nodes]})"

    # -- unravelling ----------------------------------------------------------------------------------
    def unravel(self, name: str, level: int | str | None = None) -> Unravelled:
        """``name`` followed down through every level below its own to node0's tokens, and their text."""
        name = pattern_name(name)
        node = self.node(level) if level is not None else self.locate(name)[0]
        return self._unravel_many([name], node.level)[0]

    def _unravel_many(self, names: Sequence[str], level: int, known: dict[str, StoredPattern] | None = None) -> list[Unravelled]:
        """Each name of one level, unravelled; the lookups of a level are made together for all of them."""
        frontier: list[list[str | Missing]] = [[name] for name in names]
        below: list[list[list[str]]] = [[] for _ in names]
        missing: list[list[Missing]] = [[] for _ in names]
        for current in range(level, -1, -1):
            wanted = [symbol for symbols in frontier for symbol in symbols if isinstance(symbol, str)]
            found = dict(known or {}) if current == level else {}
            found.update(self._reader.patterns(self.nodes[current].kb_id, [name for name in wanted if name not in found]))
            for index, symbols in enumerate(frontier):
                expanded: list[str | Missing] = []
                for symbol in symbols:
                    if isinstance(symbol, Missing):
                        expanded.append(symbol)
                    elif (pattern := found.get(symbol)) is None:
                        gap = Missing(current, symbol)
                        missing[index].append(gap)
                        expanded.append(gap)
                    else:
                        expanded.extend(item for event in pattern.pattern_data for item in event)
                frontier[index] = expanded
                if current > 0:
                    below[index].append([symbol for symbol in expanded if isinstance(symbol, str)])
        return [Unravelled([symbol for symbol in symbols if isinstance(symbol, str)], self._text(symbols), levels, gaps)
                for symbols, levels, gaps in zip(frontier, below, missing, strict=True)]  # fmt: skip

    def _text(self, symbols: Sequence[str | Missing]) -> str:
        parts: list[str] = []
        run: list[str] = []
        for symbol in symbols:
            if isinstance(symbol, Missing):
                parts.append(self.tokenizer.decode(run))
                parts.append(str(symbol))
                run = []
            else:
                run.append(symbol)
        parts.append(self.tokenizer.decode(run))
        return "".join(parts)

    def text(self, name: str, level: int | str | None = None) -> str:
        """The text a pattern stands for."""
        return self.unravel(name, level).text

    def locate(self, name: str) -> tuple[Node, StoredPattern]:
        """The node holding ``name`` (with or without ``PTRN|``), and the pattern there; the lowest level
        when several do (the same chunk of names at two levels)."""
        name = pattern_name(name)
        found = self._reader.find([node.kb_id for node in self.nodes], name)
        if not found:
            raise PatternNotFound(f"no node of {self!r} holds {name}: list some with `ingestd inspect top`")
        by_kb = {node.kb_id: node for node in self.nodes}
        kb, pattern = found[0]
        return by_kb[kb], pattern

    def show(self, name: str, level: int | str | None = None) -> PatternView:
        """One pattern: frequency, metadata, and its unravelling down to node0's tokens and text."""
        name = pattern_name(name)
        if level is None:
            node, pattern = self.locate(name)
        else:
            node = self.node(level)
            pattern = self._reader.patterns(node.kb_id, [name]).get(name)  # type: ignore[assignment]
            if pattern is None:
                raise PatternNotFound(f"node {node.node_id} does not hold {name}")
        unravelled = self._unravel_many([pattern.name], node.level, {pattern.name: pattern})[0]
        return PatternView(pattern.name, node.node_id, node.level, pattern.frequency, pattern.length,
                           pattern.metadata, pattern.emotives, pattern.pattern_data, unravelled.tokens,
                           unravelled.text, unravelled.levels, [gap.name for gap in unravelled.missing])  # fmt: skip

    # -- tables ---------------------------------------------------------------------------------------
    def frequencies(self, level: int | str) -> Iterator[tuple[str, int, int]]:
        """(name, frequency, length) of every pattern of a node, by name."""
        return self._reader.frequencies(self.node(level).kb_id)

    def stats(self, levels: Sequence[int | str] | None = None) -> pd.DataFrame:
        """Per node: distinct patterns, total frequency (every learn adds one to one pattern's frequency, so
        this is also the number of learns), lengths, frequency quantiles, and the share seen once."""
        import numpy as np
        import pandas as pd

        rows = []
        for node in self._chosen(levels):
            pairs = np.fromiter(((row[1], row[2]) for row in self._reader.frequencies(node.kb_id)),
                                dtype=np.dtype((np.int64, 2)))
            frequency, length = pairs[:, 0], pairs[:, 1]
            count = len(frequency)
            p50, p90, p99 = (float(value) for value in np.quantile(frequency, [0.5, 0.9, 0.99])) if count else (0.0,) * 3
            lengths, counts = np.unique(length, return_counts=True)
            rows.append({
                "level": node.level, "node_id": node.node_id, "chunk_size": node.chunk_size, "patterns": count,
                "total_frequency": int(frequency.sum()), "singletons": int((frequency == 1).sum()),
                "singleton_share": float((frequency == 1).mean()) if count else 0.0,
                "frequency_mean": float(frequency.mean()) if count else 0.0,
                "frequency_p50": p50, "frequency_p90": p90, "frequency_p99": p99,
                "frequency_max": int(frequency.max()) if count else 0,
                "length_min": int(length.min()) if count else 0, "length_mean": float(length.mean()) if count else 0.0,
                "length_max": int(length.max()) if count else 0,
                "lengths": {int(size): int(number) for size, number in zip(lengths, counts, strict=True)},
            })  # fmt: skip
        return pd.DataFrame(rows)

    def top(self, level: int | str = 0, n: int = 10) -> pd.DataFrame:
        """The ``n`` most frequent patterns of a node (ties by name), each with its text."""
        import pandas as pd

        _check_count(n)
        node = self.node(level)
        patterns = self._reader.most_frequent(node.kb_id, n)
        unravelled = self._unravel_many([pattern.name for pattern in patterns], node.level,
                                        {pattern.name: pattern for pattern in patterns})  # fmt: skip
        rows = [{"rank": rank, "name": pattern.name, "frequency": pattern.frequency, "length": pattern.length,
                 "tokens": len(view.tokens), "text": view.text, "metadata": pattern.metadata}
                for rank, (pattern, view) in enumerate(zip(patterns, unravelled, strict=True), start=1)]  # fmt: skip
        return pd.DataFrame(rows, columns=["rank", "name", "frequency", "length", "tokens", "text", "metadata"])

    def histogram(self, levels: Sequence[int | str] | None = None) -> pd.DataFrame:
        """How many patterns each frequency has, per node: (level, node_id, frequency, patterns)."""
        import pandas as pd

        frames = []
        for node in self._chosen(levels):
            frame = pd.DataFrame(((row[1],) for row in self._reader.frequencies(node.kb_id)), columns=["frequency"])
            counts = frame.groupby("frequency").size().reset_index(name="patterns")
            counts.insert(0, "node_id", node.node_id)
            counts.insert(0, "level", node.level)
            frames.append(counts)
        if not frames:
            return pd.DataFrame(columns=["level", "node_id", "frequency", "patterns"])
        return pd.concat(frames, ignore_index=True).astype({"frequency": "int64", "patterns": "int64"})

    def sample(self, level: int | str = 0, n: int = 5, *, seed: int | None = 0) -> pd.DataFrame:
        """``n`` patterns of a node drawn with replacement, each with probability frequency / total (the
        notebooks' generation), unravelled to text. The same seed on the same knowledge base draws the same."""
        import numpy as np
        import pandas as pd

        _check_count(n)
        if seed is not None and seed < 0:
            raise IngestError(f"seed {seed}: give a whole number of 0 or more (or None for a fresh draw)")
        node = self.node(level)
        names, frequencies = [], []
        for name, frequency, _ in self._reader.frequencies(node.kb_id):
            names.append(name)
            frequencies.append(frequency)
        if not names:
            raise PatternNotFound(f"node {node.node_id} holds no patterns to sample")
        weights = np.asarray(frequencies, dtype=np.float64)
        drawn = np.random.default_rng(seed).choice(len(names), size=n, p=weights / weights.sum())
        chosen = [names[index] for index in drawn]
        unravelled = self._unravel_many(chosen, node.level)
        return pd.DataFrame([{"draw": draw, "name": name, "frequency": frequencies[index], "text": view.text}
                             for draw, (index, name, view) in enumerate(zip(drawn, chosen, unravelled, strict=True))],
                            columns=["draw", "name", "frequency", "text"])  # fmt: skip

    def prune(self, below: int, levels: Sequence[int | str] | None = None, *, dry_run: bool = False) -> pd.DataFrame:
        """Remove the patterns of frequency < ``below`` from the chosen nodes (see :mod:`ingestd.kb.prune`): the
        one method that writes; refused while a run or a server learns into the store."""
        from ingestd.kb.prune import prune

        return prune(self, below, levels, dry_run=dry_run)

    def iter_patterns(self, level: int | str, batch: int = 10_000) -> Iterator[list[StoredPattern]]:
        """Every pattern of a node, by name, in lists of at most ``batch``."""
        return self._reader.iter_patterns(self.node(level).kb_id, batch)
