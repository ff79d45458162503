"""What KATO 3.10.1 stores for a knowledge base, computed from its patterns (``kato-storage.md``).

Every value KATO's learning leaves in ClickHouse and Redis is a function of the final patterns (their data,
frequency, metadata and emotives), apart from three representation details KATO itself does not fix
(``token_set`` order, metadata key order after a merge, timestamps). This module computes them:

* one ``kato.patterns_data`` row per pattern (§2), with its MinHash signature (datasketch's, 100
  permutations, seed 1, SHA-1) and its 20 LSH band hashes (CPython's tuple hash);
* per pattern, the ``frequency``, ``emotives`` and ``metadata`` strings (§3.1, JSON in Python's
  ``json.dumps`` style, §3.2);
* per symbol, ``symbols:freq``, ``symbols:pmf`` and ``symbol_to_patterns`` (§3.3), and the three global
  counters, written last.

It also writes the canonical dump lines of ``kato-golden/storage/README.md``, from a computation or from what
a deployment holds, so that the two compare byte for byte.
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from ingestd.engine.rules import strip_prefix

MERSENNE_PRIME = (1 << 61) - 1
MAX_HASH = (1 << 32) - 1
PERMUTATIONS = 100
BANDS = 20
BAND_ROWS = PERMUTATIONS // BANDS
GLOBALS = ("total_symbols_in_patterns_frequencies", "total_pattern_frequencies", "total_unique_patterns")
ROW_COLUMNS = ("kb_id", "name", "pattern_data", "length", "token_set", "token_count", "minhash_sig", "lsh_bands",
               "first_token", "last_token", "created_at", "updated_at")  # fmt: skip

# CPython's tuple hash (xxHash-style, 64-bit, Python >= 3.8): not salted per process, so it is a constant rule.
_XXPRIME_1 = 11400714785074694791
_XXPRIME_2 = 14029467366897019727
_XXPRIME_5 = 2870177450012600261
_MASK = (1 << 64) - 1


@functools.cache
def permutations() -> tuple[np.ndarray, np.ndarray]:
    """datasketch's MinHash permutations (a, b) for ``num_perm=100, seed=1``: numpy's legacy ``RandomState(1)``,
    a then b for each permutation."""
    generator = np.random.RandomState(1)
    pairs = [(generator.randint(1, MERSENNE_PRIME, dtype=np.uint64), generator.randint(0, MERSENNE_PRIME, dtype=np.uint64))
             for _ in range(PERMUTATIONS)]  # fmt: skip
    return np.array([a for a, _ in pairs], dtype=np.uint64), np.array([b for _, b in pairs], dtype=np.uint64)


def _symbol_hash(symbol: str) -> int:
    """datasketch's ``sha1_hash32``: the first 4 bytes of SHA-1, little-endian."""
    return int.from_bytes(hashlib.sha1(symbol.encode("utf-8", "surrogatepass")).digest()[:4], "little")


class MinHasher:
    """MinHash signatures and LSH bands of many patterns at once; each distinct symbol's 100 values are computed
    once and kept (the symbols of a knowledge base repeat far more than they differ)."""

    def __init__(self) -> None:
        self._index: dict[str, int] = {}
        self._values = np.empty((0, PERMUTATIONS), dtype=np.uint64)

    def _rows(self, symbols: Iterable[str]) -> None:
        new = [symbol for symbol in dict.fromkeys(symbols) if symbol not in self._index]
        if not new:
            return
        a, b = permutations()
        hashes = np.array([_symbol_hash(symbol) for symbol in new], dtype=np.uint64)
        with np.errstate(over="ignore"):  # the product wraps at 2^64 before the reduction, as datasketch's does
            values = np.bitwise_and((hashes[:, None] * a[None, :] + b[None, :]) % np.uint64(MERSENNE_PRIME),
                                    np.uint64(MAX_HASH))  # fmt: skip
        for symbol in new:
            self._index[symbol] = len(self._index)
        self._values = np.concatenate([self._values, values])

    def signatures(self, patterns: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
        """For each pattern (its symbols, flattened): its 100 MinHash values and its 20 band hashes."""
        self._rows(symbol for symbols in patterns for symbol in symbols)
        indices = np.fromiter((self._index[symbol] for symbols in patterns for symbol in symbols), dtype=np.int64)
        starts = np.cumsum([0] + [len(symbols) for symbols in patterns[:-1]], dtype=np.int64)
        signatures = np.minimum.reduceat(self._values[indices], starts, axis=0)
        return signatures, band_hashes(signatures)


def band_hashes(signatures: np.ndarray) -> np.ndarray:
    """``abs(hash(tuple(sig[5j:5j+5])))`` for j < 20, per row, as CPython computes it (a tuple of ints < 2^61 - 1
    hashes each to itself), in uint64."""
    bands = signatures.reshape(len(signatures), BANDS, BAND_ROWS).astype(np.uint64)
    with np.errstate(over="ignore"):
        acc = np.full(bands.shape[:2], _XXPRIME_5, dtype=np.uint64)
        for column in range(BAND_ROWS):
            acc = acc + bands[:, :, column] * np.uint64(_XXPRIME_2)
            acc = (acc << np.uint64(31)) | (acc >> np.uint64(33))
            acc = acc * np.uint64(_XXPRIME_1)
        acc = acc + np.uint64(BAND_ROWS ^ (_XXPRIME_5 ^ 3527539))
    acc = np.where(acc == np.uint64(_MASK), np.uint64(1546275796), acc)
    negative = acc > np.uint64((1 << 63) - 1)  # the hash is the signed reading of acc: take its magnitude
    return np.where(negative, ~acc + np.uint64(1), acc)


def python_text(value: Any) -> str:
    """JSON as KATO writes it: Python's ``json.dumps`` with its defaults (``", "``/``": "``, non-ASCII escaped)."""
    return json.dumps(value)


@dataclass(frozen=True, slots=True)
class Pattern:
    """A pattern as a publisher needs it: its hex name, events, frequency, emotives and metadata."""

    hex: str
    pattern_data: list[list[str]]
    frequency: int
    emotives: list[Any]
    metadata: dict[str, list[str]]

    @property
    def symbols(self) -> list[str]:
        return [symbol for event in self.pattern_data for symbol in event]


def pattern(name: str, pattern_data: list[list[str]], frequency: int, emotives: list[Any],
            metadata: dict[str, list[str]]) -> Pattern:  # fmt: skip
    return Pattern(strip_prefix(name), pattern_data, frequency, emotives, metadata)


def rows(kb: str, patterns: Sequence[Pattern], hasher: MinHasher, now: int) -> list[list[Any]]:
    """The ``patterns_data`` rows of ``patterns`` (§2.1), values in the order of :data:`ROW_COLUMNS` (``now``: the
    creation time, seconds since the epoch; KATO's is its worker's clock at the first learn, and nothing reads it)."""
    flat = [item.symbols for item in patterns]
    signatures, bands = hasher.signatures(flat) if patterns else (np.empty((0, PERMUTATIONS)), np.empty((0, BANDS)))
    made = []
    for item, symbols, signature, band in zip(patterns, flat, signatures.tolist(), bands.tolist(), strict=True):
        distinct = list(dict.fromkeys(symbols))
        made.append([kb, item.hex, item.pattern_data, len(symbols), distinct, len(distinct), signature, band,
                     item.pattern_data[0][0] if item.pattern_data[0] else "",
                     item.pattern_data[-1][-1] if item.pattern_data[-1] else "", now, now])  # fmt: skip
    return made


_UINT32 = struct.Struct("<I")
_SIGNATURE = struct.Struct(f"<B{PERMUTATIONS}I")  # the array's length (one varint byte: 100) and its values
_BANDS = struct.Struct(f"<B{BANDS}Q")


def _varint(number: int) -> bytes:
    if number < 0x80:
        return bytes((number,))
    out = bytearray()
    while number >= 0x80:
        out.append((number & 0x7F) | 0x80)
        number >>= 7
    out.append(number)
    return bytes(out)


def _text(value: str) -> bytes:
    encoded = value.encode("utf-8", "surrogatepass")
    return _varint(len(encoded)) + encoded


def _strings(values: Sequence[str]) -> bytes:
    return _varint(len(values)) + b"".join(map(_text, values))


def row_binary(rows: Iterable[Sequence[Any]]) -> bytes:
    """Rows of :func:`rows` in ClickHouse's RowBinary format (columns as :data:`ROW_COLUMNS`): half the bytes of
    JSON, and a tenth of the server's work to parse."""
    out = []
    for kb, name, data, length, token_set, token_count, signature, bands, first, last, created, updated in rows:
        stamps = _UINT32.pack(created) + _UINT32.pack(updated)
        out.append(b"".join((_text(kb), _text(name), _varint(len(data)), b"".join(map(_strings, data)),
                             _UINT32.pack(length), _strings(token_set), _UINT32.pack(token_count),
                             _SIGNATURE.pack(PERMUTATIONS, *signature), _BANDS.pack(BANDS, *bands), _text(first),
                             _text(last), stamps)))  # fmt: skip
    return b"".join(out)


def row_dict(row: Sequence[Any]) -> dict[str, Any]:
    """A row of :func:`rows` by column name."""
    return dict(zip(ROW_COLUMNS, row, strict=True))


def pattern_keys(kb: str, item: Pattern) -> list[tuple[str, str]]:
    """The three strings of a pattern (§3.1): frequency, emotives, metadata."""
    return [(f"{kb}:frequency:{item.hex}", str(item.frequency)), (f"{kb}:emotives:{item.hex}", python_text(item.emotives)),
            (f"{kb}:metadata:{item.hex}", python_text(item.metadata))]  # fmt: skip


@dataclass
class SymbolStatistics:
    """A knowledge base's symbol tables and global counters (§3.3), summed over its patterns."""

    freq: dict[str, int] = field(default_factory=dict)  # symbol → Σ frequency × occurrences
    pmf: dict[str, int] = field(default_factory=dict)  # symbol → distinct patterns holding it
    members: dict[str, list[str]] = field(default_factory=dict)  # symbol → the hex names of those patterns
    symbols_learned: int = 0  # Σ frequency × length
    patterns: int = 0

    def add(self, item: Pattern) -> None:
        symbols = item.symbols
        counts: dict[str, int] = {}
        for symbol in symbols:
            counts[symbol] = counts.get(symbol, 0) + 1
        for symbol, count in counts.items():
            self.freq[symbol] = self.freq.get(symbol, 0) + item.frequency * count
            self.pmf[symbol] = self.pmf.get(symbol, 0) + 1
            self.members.setdefault(symbol, []).append(item.hex)
        self.symbols_learned += item.frequency * len(symbols)
        self.patterns += 1

    def global_keys(self, kb: str) -> list[tuple[str, str]]:
        """The three global counters, in the order KATO writes them; a kb without patterns has none."""
        values = global_counters(self.symbols_learned, self.patterns)
        return [] if not self.patterns else [(f"{kb}:global:{name}", str(value)) for name, value in zip(GLOBALS, values, strict=True)]


def global_counters(symbols_learned: int, patterns: int) -> list[str | None]:
    """The values of :data:`GLOBALS` for a kb of ``patterns`` distinct patterns whose learns stored
    ``symbols_learned`` symbols (Σ frequency × length); None for a kb without patterns, which has no such keys.
    ``total_pattern_frequencies`` is the number of distinct patterns, not of learns: a KATO quirk predictions keep."""
    return [str(symbols_learned), str(patterns), str(patterns)] if patterns else [None, None, None]


# -- canonical dumps (kato-golden/storage/README.md) -------------------------------------------------------------

_DUMPED_SIGNATURES = ("0", "1", "2", "3")


def _line(value: dict[str, Any]) -> str:
    return orjson.dumps(value).decode()


def row_line(level: int, row: dict[str, Any]) -> str:
    """One ``clickhouse.jsonl`` line of a ``patterns_data`` row (read back, or computed)."""
    signature = [int(value) for value in row["minhash_sig"]]
    bands = [int(value) for value in row["lsh_bands"]]
    line: dict[str, Any] = {"table": "patterns_data", "level": level, "kb_id": "{kb}", "name": row["name"],
                            "pattern_data": row["pattern_data"], "length": int(row["length"]),
                            "token_set": sorted(row["token_set"]), "token_count": int(row["token_count"]),
                            "first_token": row["first_token"], "last_token": row["last_token"],
                            "minhash_sha1": hashlib.sha1(orjson.dumps([signature, bands])).hexdigest()}  # fmt: skip
    if row["name"].startswith(_DUMPED_SIGNATURES):
        line["minhash_sig"] = signature
        line["lsh_bands"] = bands
    return _line(line)


def key_line(level: int, kb: str, key: str, kind: str, value: Any) -> str:
    """One ``redis.jsonl`` line: a key under ``<kb>:`` with its type and value (hashes and sets sorted; a metadata
    string's top-level keys sorted, its text otherwise as stored)."""
    if kind == "hash":
        value = dict(sorted(value.items()))
    elif kind == "set":
        value = sorted(value)
    elif key.startswith(f"{kb}:metadata:"):
        try:
            value = python_text(dict(sorted(json.loads(value).items())))
        except (ValueError, AttributeError, TypeError):  # not a JSON object: dumped as it is (and so it differs)
            pass
    return _line({"key": "{kb}" + key[len(kb):], "level": level, "type": kind, "value": value})


def sorted_lines(lines: Iterable[tuple[int, str, str]]) -> Iterator[str]:
    """Lines given with their sort keys (level, row name or key), in the dumps' order."""
    for _, _, line in sorted(lines, key=lambda item: (item[0], item[1])):
        yield line


