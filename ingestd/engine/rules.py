"""KATO 3.10.1's learning rules as pure functions (protocol §5).

Nothing here does I/O. The engine applies these rules to sessions and
knowledge bases, and the ingestion planner uses the very same functions to
know every pattern name before a server answers.
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ingestd.engine._unicode13 import PRINTABLE_RANGES, UNICODE_VERSION
from ingestd.engine._unicode_divergent import DIVERGENT_RANGES

PATTERN_PREFIX = "PTRN|"
MIN_PATTERN_SYMBOLS = 2
"""A pattern needs at least this many symbols in total (duplicates count)."""

Event = list[str]
Events = list[list[str]]

# Characters KATO's node ids may not carry into a knowledge-base id (§5.10).
_KB_ID_UNSAFE = re.compile(r'[/\\."$*<>:|? -]')
_KB_ID_MAX = 60


def sort_event(strings: Iterable[str]) -> Event:
    """One observation's strings as KATO stores them: sorted by code point, duplicates kept."""
    return sorted(strings)


def symbol_count(events: Sequence[Sequence[str]]) -> int:
    """Total number of symbols over all events (a pattern's ``length``)."""
    return sum(map(len, events))


@functools.cache
def _divergent_characters() -> frozenset[str]:
    """Characters whose printability differs between this Python and Unicode 13.0.

    KATO's image runs CPython 3.10 (Unicode 13.0); ``repr`` escapes what
    ``isprintable`` rejects, so a symbol with such a character hashes
    differently under another Unicode version. Read from the table made by
    ``scripts/gen_unicode_divergent.py`` for the Unicode versions of the
    supported Pythons; found by a scan of every code point for any other.
    """
    if unicodedata.unidata_version == UNICODE_VERSION:
        return frozenset()
    known = DIVERGENT_RANGES.get(unicodedata.unidata_version)
    if known is not None:
        return frozenset(chr(code) for low, high in known for code in range(low, high + 1))
    return scan_divergent_characters()


def scan_divergent_characters() -> frozenset[str]:
    """:func:`_divergent_characters` the long way: every code point's printability, now and in Unicode 13.0."""
    printable_then = bytearray(0x110000)
    for low, high in PRINTABLE_RANGES:
        printable_then[low : high + 1] = b"\x01" * (high - low + 1)
    return frozenset(
        chr(code) for code in range(0x110000) if chr(code).isprintable() != bool(printable_then[code])
    )


@functools.cache
def _printable_then() -> frozenset[int]:
    return frozenset(code for low, high in PRINTABLE_RANGES for code in range(low, high + 1))


def _symbol_literal(symbol: str) -> str:
    """Python 3.10's ``repr`` of a str (§5.4), independent of the running interpreter."""
    quote = '"' if "'" in symbol and '"' not in symbol else "'"
    printable = _printable_then()
    parts = [quote]
    for char in symbol:
        code = ord(char)
        if char == "\\":
            parts.append("\\\\")
        elif char == quote:
            parts.append("\\" + quote)
        elif char == "\n":
            parts.append("\\n")
        elif char == "\r":
            parts.append("\\r")
        elif char == "\t":
            parts.append("\\t")
        elif code in printable:
            parts.append(char)
        elif code < 0x100:
            parts.append(f"\\x{code:02x}")
        elif code < 0x10000:
            parts.append(f"\\u{code:04x}")
        else:
            parts.append(f"\\U{code:08x}")
    parts.append(quote)
    return "".join(parts)


def hash_text(events: Sequence[Sequence[str]]) -> str:
    """The exact text KATO hashes: Python's text of the STM as a list of lists of str."""
    # str() of real lists is CPython's repr, which is KATO's rule byte for byte,
    # except for characters whose printability changed after Unicode 13.0.
    text = str(events if isinstance(events, list) else [list(event) for event in events])
    if text.isascii():
        return text
    if _divergent_characters().isdisjoint(text):
        return text
    return "[" + ", ".join("[" + ", ".join(map(_symbol_literal, event)) + "]" for event in events) + "]"


def pattern_hash(events: Sequence[Sequence[str]]) -> str:
    """The 40-hex SHA-1 that KATO stores as a pattern's bare name."""
    return hashlib.sha1(hash_text(events).encode("utf-8")).hexdigest()


def pattern_name(events: Sequence[Sequence[str]]) -> str:
    """The public pattern name ``PTRN|<sha1>`` of these events."""
    return PATTERN_PREFIX + pattern_hash(events)


def chunk_name(symbols: Sequence[str]) -> str:
    """Name of a chunk learned one symbol per event (how text is fed to KATO)."""
    return pattern_name([[symbol] for symbol in symbols])


def strip_prefix(pattern_id: str) -> str:
    """The bare hash of a pattern id given with or without ``PTRN|``."""
    return pattern_id[len(PATTERN_PREFIX) :] if pattern_id.startswith(PATTERN_PREFIX) else pattern_id


def kb_id(node_id: str, service_name: str = "kato") -> str:
    """The knowledge-base id KATO derives from a node id (§5.10)."""
    safe = _KB_ID_UNSAFE.sub("_", node_id)
    suffix = service_name.replace("-", "_")
    if len(safe) + 1 + len(suffix) > _KB_ID_MAX:
        digest = hashlib.md5(safe.encode("utf-8")).hexdigest()[:8]
        safe = safe[: _KB_ID_MAX - len(suffix) - 10] + "_" + digest
    return f"{safe}_{suffix}"


def metadata_text(value: Any) -> str:
    """How KATO stores one metadata value: Python's ``str()`` of the decoded JSON value."""
    return str(value)


def fold_metadata(accumulator: Iterable[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Fold a session's metadata accumulator: per key, sorted unique ``str()`` values (§5.6)."""
    folded: dict[str, set[str]] = {}
    for entry in accumulator:
        for key, value in entry.items():
            folded.setdefault(key, set()).add(metadata_text(value))
    return {key: sorted(values) for key, values in folded.items()}


def merge_metadata(
    stored: Mapping[str, Sequence[str]], new: Mapping[str, Sequence[str]]
) -> dict[str, list[str]]:
    """Union per key, as a re-learn does (§5.5). Key order is not significant."""
    merged = {key: list(values) for key, values in stored.items()}
    for key, values in new.items():
        merged[key] = sorted(set(merged.get(key, ())) | set(values))
    return merged


def merge_emotives(
    stored: Sequence[Mapping[str, float]], new: Sequence[Mapping[str, float]], persistence: int
) -> list[dict[str, float]]:
    """Old entries first, then new ones, trimmed to the last ``persistence`` (§5.7)."""
    combined = [dict(entry) for entry in stored] + [dict(entry) for entry in new]
    return combined[-persistence:] if persistence > 0 else []
