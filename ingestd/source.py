"""Source: a corpus as a stream of samples (Hugging Face hub datasets, or local files).

Every record read is accounted for: it becomes a :class:`Sample`, is
:class:`Filtered` (stripped text shorter than ``min_chars``, 11 by default: the
notebooks' filter), or is a :class:`BadRecord` (not a string, undecodable,
malformed), which the pipeline counts as failed and goes on. ``sample_index`` is
the position in the filtered stream, so it is the same on every run.

Local txt, jsonl and csv files are read here rather than with ``datasets``:
its readers fail a whole file on one bad line, and one bad line must cost one
sample, not the run. Parquet files and hub datasets are streamed with
``datasets`` (a stream that breaks off stops the run with one line).
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import functools
import glob
import hashlib
import itertools
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, Literal

import orjson

from ingestd.errors import IngestError

MIN_CHARS = 11
"""Default ``--min-chars``: samples whose stripped text is shorter are filtered out (0 keeps every sample)."""
MAX_TEXT_CHARS = 1_000_000
"""Default limit on one sample's text: ~250k GPT-2 tokens; a longer record fails alone (``--max-sample-chars``)."""
MAX_COUNT = 2**53 - 1
"""Counts a user gives (samples to skip or take, characters): beyond, they no longer fit JSON's or SQLite's numbers."""


@dataclass(frozen=True)
class HubDataset:
    name: str
    config: str | None = None
    text_field: str = "text"
    split: str = "train"


# The notebooks' dataset keys (kato-lm's StreamingDatasetLoader), with their hub names.
HUB_DATASETS: dict[str, HubDataset] = {
    "wikitext": HubDataset("Salesforce/wikitext", "wikitext-103-raw-v1"),
    "c4": HubDataset("allenai/c4", "en"),
    "refinedweb": HubDataset("tiiuae/falcon-refinedweb", text_field="content"),
    "openwebtext": HubDataset("Skylion007/openwebtext"),
    "redpajama_sample": HubDataset("togethercomputer/RedPajama-Data-1T-Sample"),
    "pile": HubDataset("monology/pile-uncopyrighted"),
    "dolma": HubDataset("allenai/dolma"),
    "bookcorpus": HubDataset("bookcorpusopen"),
    "simple_wiki": HubDataset("legacy-datasets/wikipedia", "20220301.simple"),
}

LOCAL_FORMATS = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
                 ".parquet": "parquet", ".csv": "csv"}  # fmt: skip


class SourceError(IngestError):
    """The source cannot be read; the message names it and says what to do."""


def _path_problem(source: str) -> str | None:
    """Why ``source`` cannot even be looked up as a path (a NUL byte, an unknown ``~user``, a name too long for
    the file system), or None."""
    shown = source if len(source) <= 120 else source[:100] + "…"
    if "\0" in source:
        return f"the source {shown!r} contains a NUL character: give a file's path or a dataset name"
    try:
        Path(source).expanduser().exists()
    except RuntimeError:
        return f"the source {shown!r} names the home folder of an unknown user: give the file's full path"
    except OSError as error:
        return f"the source {shown!r} cannot be looked up ({error.strerror}): give a shorter path"
    return None


@dataclass(frozen=True, slots=True)
class Sample:
    index: int
    text: str
    fields: dict[str, Any] = field(default_factory=dict)
    digest: int = 0  # of text and fields: a resumed run checks that sample ``index`` is still this one


def sample_digest(text: str, fields: dict[str, Any]) -> int:
    """A 64-bit digest of a sample's text and metadata fields (signed, as SQLite stores integers)."""
    content = text.encode("utf-8", "surrogatepass")
    if fields:
        content += b"\0" + orjson.dumps(fields, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS, default=str)
    return int.from_bytes(hashlib.blake2b(content, digest_size=8).digest(), "big", signed=True)


@dataclass(frozen=True, slots=True)
class BadRecord:
    index: int
    reason: str


@dataclass(frozen=True, slots=True)
class Filtered:
    """A record whose text is too short to learn."""


SourceEvent = Sample | BadRecord | Filtered

MAX_SHARDS = 100_000


@dataclass(frozen=True)
class Shard:
    """One of ``count`` shares of a source (``--shard index/count``, 0-based): the samples whose index modulo
    ``count`` is ``index``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not (1 <= self.count <= MAX_SHARDS and 0 <= self.index < self.count):
            raise SourceError(f"shard {self.index}/{self.count}: give I/N with 0 <= I < N <= {MAX_SHARDS} (e.g. 0/4 "
                              "... 3/4), or leave it out to learn the whole source")  # fmt: skip

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/N"`` (as ``--shard`` takes it)."""
        found = re.fullmatch(r"\s*([0-9]+)/([0-9]+)\s*", text, flags=re.ASCII)
        if found is None:
            raise SourceError(f"--shard {text!r}: give I/N, e.g. 0/4 (shard 0 of 4, counted from 0)")
        return cls(int(found[1]), int(found[2]))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def _is_local(source: str) -> bool:
    """Whether one source entry names local files (else a dataset key or a hub dataset name)."""
    path = Path(source).expanduser()
    if source in HUB_DATASETS and not path.exists():
        return False
    return bool(path.suffix.lower() in LOCAL_FORMATS or path.exists() or source.startswith((".", "/", "~"))
                or GLOB_CHARACTERS & set(source))  # fmt: skip


def _resolved(source: str) -> str:
    """A local entry's path made absolute (symlinks resolved); a glob made absolute, matched when read; a path
    that does not exist left as given, for the error to name it."""
    path = Path(source).expanduser()
    if not path.exists() and GLOB_CHARACTERS & set(source):
        return os.path.abspath(path)
    if not path.exists():
        return source
    return str(path.resolve(strict=True))


@dataclass(frozen=True)
class SourceSpec:
    """What to read: a dataset key, a hub dataset name, local files (a file, a directory or a glob), or a list
    of local files, directories and globs (``data_files``, as ``datasets`` names it), read in the list's order."""

    source: str | tuple[str, ...]
    text_field: str | None = None
    hub_config: str | None = None
    split: str | None = None
    txt_mode: Literal["line", "paragraph"] = "paragraph"
    metadata_fields: tuple[str, ...] = ()
    label: str | None = None
    max_chars: int = MAX_TEXT_CHARS
    min_chars: int = MIN_CHARS

    def __post_init__(self) -> None:
        if not 0 <= self.min_chars <= MAX_COUNT:
            raise ValueError(f"min_chars {self.min_chars}: give 0 to {MAX_COUNT} (0 keeps every sample)")
        if not 1 <= self.max_chars <= MAX_COUNT:
            raise ValueError(f"max_chars {self.max_chars}: give 1 to {MAX_COUNT}")
        if not isinstance(self.source, str):  # a list of files: a tuple (hashable, as the spec is frozen)
            entries = tuple(self.source)
            if not entries or not all(isinstance(entry, str) and entry for entry in entries):
                raise SourceError("a list of sources must name at least one file, each a non-empty path")
            object.__setattr__(self, "source", entries[0] if len(entries) == 1 else entries)
        for entry in self.sources:
            problem = _path_problem(entry)
            if problem is not None:
                raise SourceError(problem)
        if len(self.sources) > 1:
            remote = [entry for entry in self.sources if not _is_local(entry)]
            if remote:
                raise SourceError(f"{remote[0]!r} in a list of sources is not a local file: a list names local "
                                  "files, directories or globs; give a hub dataset alone")  # fmt: skip

    @property
    def sources(self) -> tuple[str, ...]:
        """The source's entries: one, or the list given."""
        return (self.source,) if isinstance(self.source, str) else self.source

    @property
    def shown(self) -> str:
        """The source as messages name it."""
        return self.source if isinstance(self.source, str) else " ".join(self.source)

    @property
    def source_label(self) -> str:
        if self.label:
            return self.label
        path = Path(self.sources[0])
        return path.stem if path.suffix.lower() in LOCAL_FORMATS else self.sources[0]

    @property
    def repository(self) -> bool:
        """A local directory read as a dataset repository (a copy of a hub dataset): named with ``hub_config`` or
        ``split``, it is read as ``datasets`` reads the hub's, its configs and splits apart."""
        return (isinstance(self.source, str) and (self.hub_config is not None or self.split is not None)
                and Path(self.source).expanduser().is_dir())  # fmt: skip

    @property
    def is_local(self) -> bool:
        """Local files (else a dataset key or a hub dataset name)."""
        return all(_is_local(entry) for entry in self.sources)

    def resolved(self) -> SourceSpec:
        """This spec with local paths made absolute (symlinks resolved): one file, one identity."""
        if not self.is_local:
            return self
        entries = tuple(_resolved(entry) for entry in self.sources)
        return replace(self, source=entries[0] if len(entries) == 1 else entries)

    def local_files(self) -> list[Path]:
        """The files a local source names now, in reading order: each entry's files (a directory's or a glob's in
        name order), entry after entry."""
        files: list[Path] = []
        for entry in self.sources:
            files.extend(_local_files(entry, Path(entry).expanduser()))
        return files

    def file_list(self) -> str:
        """A fingerprint of the files a local source names now (their paths, in reading order): shards of one run
        must have read the same list, or their indices do not line up."""
        try:
            files = self.local_files() if self.is_local else []
        except (SourceError, OSError):
            files = []
        return hashlib.sha1("\n".join(map(str, files)).encode()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """What identifies this source (used in the run's fingerprint and summary)."""
        return {"source": self.source if isinstance(self.source, str) else list(self.source),
                "text_field": self.text_field, "hub_config": self.hub_config,
                "split": self.split, "txt_mode": self.txt_mode, "metadata_fields": list(self.metadata_fields),
                "label": self.source_label, "min_chars": self.min_chars}  # fmt: skip


# -- raw records ---------------------------------------------------------------------------
# A reader yields, per record, either (text, fields) or a str reason why the record is bad.
RawRecord = tuple[str, dict[str, Any]] | str


_SAMPLE_BLOCK = 1 << 16


def _sample_blocks(path: Path, count: int = 8) -> list[bytes]:
    """The file's head and up to ``count - 1`` blocks spread over the rest, each cut to whole lines."""
    size = path.stat().st_size
    offsets = sorted({0, *(size * part // count for part in range(1, count))}) if size > _SAMPLE_BLOCK else [0]
    blocks = []
    with path.open("rb") as handle:
        for offset in offsets:
            handle.seek(offset)
            block = handle.read(_SAMPLE_BLOCK)
            if offset:
                block = block.partition(b"\n")[2]  # may start inside a line, or a character
            if len(block) == _SAMPLE_BLOCK or offset + len(block) < size:
                block = block.rpartition(b"\n")[0]  # may end inside one
            blocks.append(block)
    return blocks


def _check_utf8(path: Path) -> None:
    """Refuse a file that is not UTF-8 text before anything is learned from it (its head and blocks spread
    over it are read): one undecodable line costs one sample, but a file in another encoding is refused whole."""
    blocks = _sample_blocks(path)
    if b"\r" in blocks[0] and b"\n" not in blocks[0]:
        raise SourceError(f"{path} ends its lines with \\r alone (classic Mac OS), which ingestd does not read: "
                          f"convert it first, for example with `tr '\\r' '\\n' < {path.name} > {path.stem}.unix"
                          f"{path.suffix}`")  # fmt: skip
    if b"\x00" in blocks[0]:
        raise SourceError(f"{path} looks like a binary file (it contains NUL bytes): give a UTF-8 text, jsonl, "
                          "parquet or csv file")  # fmt: skip
    lines = [line for block in blocks for line in block.split(b"\n")]
    failing = [line for line in lines if _decode(line) is None]
    # Another encoding: most lines fail, or every line with non-ASCII bytes fails (latin-1 text mostly in ASCII).
    utf8_beyond_ascii = any(not line.isascii() and _decode(line) is not None for line in lines)
    if failing and (len(failing) * 2 >= len(lines) or not utf8_beyond_ascii):
        try:
            failing[0].decode("utf-8")
        except UnicodeDecodeError as error:
            byte = failing[0][error.start : error.start + 1].hex()
        raise SourceError(
            f"{path} is not UTF-8 text ({len(failing)} of {len(lines)} lines read have bytes such as 0x{byte} that "
            f"UTF-8 does not allow, and none uses UTF-8 beyond ASCII): convert it first, for example with "
            f"`iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}`"
        )


class _TooLong:
    """A line longer than the reader's limit: its bytes were skipped, not held."""


TOO_LONG = _TooLong()


def _lines(path: Path, limit: int) -> Iterator[bytes | _TooLong]:
    """The file's lines without their newline; a line longer than ``limit`` bytes is skipped in pieces and given
    as ``TOO_LONG``, so memory stays bounded by the limit whatever the file's shape."""
    with path.open("rb") as handle:
        _skip_bom(handle)
        while line := handle.readline(limit + 1):
            if len(line) > limit and not line.endswith(b"\n"):
                while (rest := handle.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass
                yield TOO_LONG
                continue
            yield line[:-1] if line.endswith(b"\n") else line


_BOM = b"\xef\xbb\xbf"


def _skip_bom(handle: BinaryIO) -> None:
    """Reads past a byte-order mark at the start, if there is one: it is no text (editors on Windows write one)."""
    if handle.read(len(_BOM)) != _BOM:
        handle.seek(0)


def _decode(line: bytes) -> str | None:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _too_long(number: int, limit: int) -> str:
    return (f"line {number} is longer than {limit:,} bytes, more than a sample may be: raise --max-sample-chars "
            "to learn it")  # fmt: skip


def _txt_lines(path: Path, limit: int) -> Iterator[RawRecord]:
    for number, raw in enumerate(_lines(path, limit), start=1):
        if raw is TOO_LONG:
            yield _too_long(number, limit)
            continue
        assert isinstance(raw, bytes)
        text = _decode(raw.removesuffix(b"\r"))
        yield (text, {}) if text is not None else f"line {number} is not valid UTF-8"


def _txt_paragraphs(path: Path, limit: int) -> Iterator[RawRecord]:
    """Maximal runs of non-blank lines, joined with a newline (a blank line is one whose strip() is empty).
    A paragraph longer than ``limit`` bytes is not held: it fails, named by its first line."""
    lines: list[str] = []
    problem: str | None = None
    size = 0
    first = 0
    for number, raw in enumerate(_lines(path, limit), start=1):
        text = None if raw is TOO_LONG else _decode(raw)  # type: ignore[arg-type]
        if text is not None and not text.strip():
            if lines or problem is not None:
                yield ("\n".join(lines), {}) if problem is None else problem
            lines, problem, size = [], None, 0
            continue
        first = first if (lines or problem) else number
        if problem is not None:
            continue
        if raw is TOO_LONG or size + len(raw) > limit:  # type: ignore[arg-type]
            problem, lines = _too_long(first, limit).replace("line", "the paragraph at line", 1), []
        elif text is None:
            problem, lines = f"line {number} is not valid UTF-8", []
        else:
            lines.append(text)
            size += len(raw) + 1  # type: ignore[arg-type]
    if lines or problem is not None:
        yield ("\n".join(lines), {}) if problem is None else problem


def _line_contents(path: Path) -> Iterator[bool]:
    """For each line of a file, whether it holds more than whitespace; read in blocks, so that a line of any
    length costs a block of memory (the samples themselves are bounded by --max-sample-chars, this is not)."""
    content = False
    pending = False  # a last line without its newline
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            pieces = block.split(b"\n")
            for piece in pieces[:-1]:
                yield content or bool(piece.strip())
                content = False
            content = content or bool(pieces[-1].strip())
            pending = bool(pieces[-1])
    if pending:
        yield content


def _total(counts: Iterable[int | None]) -> int | None:
    total = 0
    for count in counts:
        if count is None:
            return None
        total += count
    return total


GLOB_CHARACTERS = frozenset("*?[")


def _local_files(source: str, path: Path) -> list[Path]:
    """The files a local source names: a file; a directory's files of the formats ingestd reads (below it too, by
    path, hidden ones left out); or a glob's matches (``**`` for any depth), in name order."""
    if GLOB_CHARACTERS & set(source) and not path.exists():
        matches = sorted(Path(match) for match in glob.glob(os.path.expanduser(source), recursive=True))
        files = [match for match in matches if match.is_file()]
        if not files:
            raise SourceError(f"no file matches {source!r}: check the pattern (relative paths start at {Path.cwd()})")
        return files
    if path.is_dir():
        files = sorted(file for file in path.rglob("*") if file.is_file() and file.suffix.lower() in LOCAL_FORMATS
                       and not any(part.startswith(".") for part in file.relative_to(path).parts))  # fmt: skip
        if not files:
            raise SourceError(f"{path} is a directory without .txt, .jsonl, .parquet or .csv files: give a file, a "
                              "directory of them, or a glob such as 'data/*.jsonl'")  # fmt: skip
        return files
    return [path]


def _count_lines(path: Path, *, non_blank: bool) -> int:
    """Lines of a file (a last line without its newline counts), or only those with more than whitespace."""
    if non_blank:
        return sum(_line_contents(path))
    count = 0
    last = b"\n"
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def _count_paragraphs(path: Path) -> int:
    """Maximal runs of non-blank lines, as :func:`_txt_paragraphs` reads them."""
    count = 0
    blank = True
    for content in _line_contents(path):
        count += blank and content
        blank = not content
    return count


def _file_key(path: Path) -> str:
    """What identifies a local file's content: its path, size, inode and times (ctime and inode too: an edit that
    keeps the size and sets the time back, as touch -r or cp -p do, changes them)."""
    stat = path.stat()
    return json.dumps([str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino])


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return int(pq.ParquetFile(path).metadata.num_rows)


def _card_rows(dataset: Any, split: str) -> int | None:
    splits = getattr(getattr(dataset, "info", None), "splits", None) or {}
    found = splits.get(split) if hasattr(splits, "get") else None
    examples = getattr(found, "num_examples", None)
    return int(examples) if examples else None


MAX_METADATA_DEPTH = 64
"""Lists and objects in a metadata field may nest this deep: far beyond real metadata, and well within what
JSON encoders and KATO take."""


def _nests_deeper(value: Any, limit: int) -> bool:
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            pending.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def _plain_value(value: Any) -> Any:
    """A metadata value as JSON carries it, the same in-process and over HTTP: dates and times in ISO 8601,
    decimals, durations and integers past 64 bits as their text, UTF-8 bytes decoded; raises ValueError for
    bytes that are not text."""
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        return str(value)  # past what JSON encoders take; KATO stores metadata as str() of the value: the same
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # nan, inf, -inf: as KATO stores them (JSON has no such numbers; orjson writes null)
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, dict):
        return {str(key): _plain_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain_value(item) for item in value]
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("holds bytes that are not UTF-8 text (metadata carries text and numbers)") from None
    return str(value)  # Decimal, timedelta, numpy scalars, ...


def _record_fields(record: dict[str, Any], text_field: str, wanted: tuple[str, ...]) -> RawRecord:
    if text_field not in record:
        return f"field {text_field!r} is missing"
    text = record[text_field]
    if not isinstance(text, str):
        return f"field {text_field!r} is {type(text).__name__}, not a string"
    fields = {name: record[name] for name in wanted if name in record}
    for name, value in fields.items():
        if _nests_deeper(value, MAX_METADATA_DEPTH):
            return f"field {name!r} nests lists or objects more than {MAX_METADATA_DEPTH} levels deep"
        try:
            fields[name] = _plain_value(value)
        except ValueError as error:
            return f"field {name!r} {error}"
    return text, fields


def _jsonl(path: Path, text_field: str, wanted: tuple[str, ...], limit: int) -> Iterator[RawRecord]:
    for number, raw in enumerate(_lines(path, limit), start=1):
        if raw is TOO_LONG:
            yield _too_long(number, limit)
            continue
        assert isinstance(raw, bytes)
        if not raw.strip():
            continue
        try:
            record = orjson.loads(raw)
            if wanted and _LONG_INTEGER.search(raw):  # orjson reads integers past 64 bits as floats; json keeps them
                record = json.loads(raw)
        except (orjson.JSONDecodeError, ValueError, RecursionError) as error:
            yield f"line {number} is not valid JSON ({error})"
            continue
        if not isinstance(record, dict):
            yield f"line {number} is a JSON {type(record).__name__}, not an object"
            continue
        yield _record_fields(record, text_field, wanted)


_LONG_INTEGER = re.compile(rb"\d{20}|-\d{19}")  # past orjson's [-2**63, 2**64)


def _starts_with_array(path: Path) -> bool:
    with path.open("rb") as handle:
        _skip_bom(handle)
        return handle.read(1 << 16).lstrip(b" \t\r\n")[:1] == b"["


def _first_jsonl_record(path: Path) -> dict[str, Any] | None:
    for raw in _lines(path, 1 << 24):
        if raw is TOO_LONG:
            return None
        assert isinstance(raw, bytes)
        if raw.strip():
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError:
                return None
            return record if isinstance(record, dict) else None
    return None


def _csv_rows(path: Path, limit: int) -> Iterator[tuple[int, list[str] | str]]:
    """(line number, row or why it fails) of a csv file. No more than ``limit`` bytes of a row are held: a longer
    row is read past without being kept (its quoting followed, so the rows after it read as csv reads them) and
    fails alone. Undecodable bytes stay as surrogates (the row then fails alone)."""
    csv.field_size_limit(limit + 1)
    track = _CsvTrack()
    reader = csv.reader(_csv_lines(path, limit, track))
    while True:
        try:
            row: list[str] | str = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            row = f"the row at line {track.line} is malformed csv ({error})"
        track.rows += 1
        if track.too_long is not None:
            row = _too_long(track.too_long, limit).replace("line", "the row at line", 1)
            track.too_long = None
        if row:  # blank lines are no records (as pandas reads csv)
            yield track.line, row


@dataclass
class _CsvTrack:
    rows: int = 0  # rows the reader has given: when it changes, the next line starts a row
    line: int = 0  # the last physical line given to the reader
    too_long: int | None = None  # the first line of a row skipped for its length


# Where csv's parser is within a row (the states of CPython's _csv that decide where a row ends).
_START, _IN_FIELD, _IN_QUOTED, _QUOTE_IN_QUOTED = range(4)
_FIELD_STOP = re.compile(rb"[,\n]")


def _csv_lines(path: Path, limit: int, track: _CsvTrack) -> Iterator[str]:
    """The file's lines for csv's reader, each row's held to ``limit`` bytes. A row that passes the limit is
    read on in pieces by :func:`_csv_skip` to its end, and the reader given one line that ends what it holds."""
    with path.open("rb") as handle:
        _skip_bom(handle)
        given_at, row_bytes, row_start = -1, 0, 1
        while True:
            if track.rows != given_at:  # the reader finished a row: the next line starts one
                row_bytes, row_start = 0, track.line + 1
            budget = limit - row_bytes
            line = handle.readline(budget + 1)
            if not line:
                return
            given_at = track.rows
            if len(line) <= budget:
                row_bytes += len(line)
                track.line += 1
                yield line.decode("utf-8", "surrogateescape")
                continue
            # Inside a row, the reader is in a quoted field (a line end outside one ends the row).
            track.line += _csv_skip(handle, line, _IN_QUOTED if row_bytes else _START)
            track.too_long = row_start
            yield '"\n' if row_bytes else "x\n"  # closes its quoted field, or is a row of its own: either fails


def _csv_skip(handle: Any, head: bytes, state: int) -> int:
    """Reads on from ``head`` (bytes of a row already read) to the end of the row, following csv's quoting
    in pieces of 1 MiB, and returns how many line ends it passed."""
    piece, lines = head, 0
    while piece:
        at = 0
        while at < len(piece):
            if state == _IN_QUOTED:
                quote = piece.find(b'"', at)
                if quote < 0:
                    break
                state, at = _QUOTE_IN_QUOTED, quote + 1
            elif state == _IN_FIELD:
                stop = _FIELD_STOP.search(piece, at)
                if stop is None:
                    break
                if piece[stop.start()] == ord("\n"):
                    return lines + 1
                state, at = _START, stop.end()
            else:  # at a field's start, or just after a quote inside a quoted field
                byte = piece[at]
                if byte == ord("\n"):
                    return lines + 1
                if byte == ord('"'):
                    state = _IN_QUOTED
                elif byte == ord(","):
                    state = _START
                else:
                    state = _IN_FIELD
                at += 1
        lines += piece.count(b"\n")
        piece = handle.readline(1 << 20)
    return lines


def _csv_header(rows: Iterator[tuple[int, list[str] | str]]) -> list[str]:
    """The first row of ``rows``, taken from it: the column names (none if that row is malformed)."""
    header = next((row for _, row in rows), [])
    return header if isinstance(header, list) else []


def _csv(path: Path, text_field: str, wanted: tuple[str, ...], limit: int) -> Iterator[RawRecord]:
    """Rows of a csv file read here, not with ``datasets``: one malformed row fails alone instead of the file."""
    rows = _csv_rows(path, limit)
    header = _csv_header(rows)
    for line, row in rows:
        if isinstance(row, str):
            yield row
        elif len(row) > len(header):
            yield f"the row at line {line} has {len(row)} fields where the header has {len(header)}"
        elif any(_has_surrogates(value) for value in row):
            yield f"the row at line {line} is not valid UTF-8"
        else:
            yield _record_fields(dict(zip(header, row + [None] * (len(header) - len(row)), strict=True)), text_field, wanted)


def _has_surrogates(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _datasets_records(dataset: Any, text_field: str, wanted: tuple[str, ...], what: str) -> Iterator[RawRecord]:
    """A ``datasets`` stream's records; a stream that breaks off stops the run with one line (it cannot go on)."""
    records = iter(dataset)
    while True:
        try:
            record = next(records)
        except StopIteration:
            return
        except Exception as error:  # noqa: BLE001 - pyarrow/datasets raise many kinds
            raise SourceError(f"{what} could not be read further ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}): check the file or dataset; "
                              "what was learned so far stays, and the same command resumes") from None  # fmt: skip
        yield _record_fields(record, text_field, wanted)


def _datasets() -> Any:
    """The ``datasets`` library, imported when first needed (it takes a second), its logging made ours."""
    import datasets

    from ingestd.logs import adopt_library_logging

    adopt_library_logging("datasets", "huggingface_hub")
    return datasets


def _require_fields(what: str, available: list[str], text_field: str, wanted: tuple[str, ...], hint: str) -> None:
    missing = [name for name in (text_field, *wanted) if name not in available]
    if missing:
        raise SourceError(
            f"{what} has no field {missing[0]!r} (its fields: {', '.join(available) or 'none'}): {hint}"
        )


class Source:
    """An opened, validated source. ``events()`` streams it; nothing is held in memory."""

    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec
        self.label = spec.source_label
        # Bytes a line (or paragraph) may have before it is skipped unread: the longest sample's UTF-8 (4 bytes a
        # character at most), plus room for a jsonl record's quoting and metadata fields.
        self._byte_limit = 4 * spec.max_chars + (1 << 20)
        self._records: Any = None
        self._count: Callable[[], int | None] = lambda: None
        self.files = []
        self._per_file: list[tuple[Callable[[], Iterator[RawRecord]], Callable[[], int | None]]] = []
        self._file_keys: list[Callable[[], str | None]] = []  # what identifies each file's content (None: not known)
        self.counts_dir: Path | None = None  # where a sharded read caches how many samples each file holds
        self._open()

    files: list[Path | str]  # the source's files in reading order: local paths, or a dataset's data files

    def count_records(self) -> int | None:
        """How many records the source holds, before filtering (for a progress total), or None if it cannot say
        cheaply. A scan of the file for text formats (run it in a thread; it reads the file once more), the
        file's metadata for parquet, the dataset's card for the hub. csv rows are counted as lines, so a quoted
        value with line breaks makes it an overestimate."""
        try:
            return self._count()
        except Exception:  # noqa: BLE001 - only a display depends on it
            return None

    def _open(self) -> None:
        spec = self.spec
        if spec.is_local and spec.repository:
            self._open_hub(str(Path(spec.shown).expanduser()))
        elif spec.is_local:
            self._open_local()
        elif spec.shown in HUB_DATASETS or self._looks_like_hub_name(spec.shown):
            self._open_hub()
        else:
            raise SourceError(
                f"unknown dataset {spec.shown!r}: give one of {', '.join(HUB_DATASETS)}, a hub dataset name such "
                "as 'allenai/c4' (with --hub-config, --split, --text-field as needed), or the path of a local "
                ".txt, .jsonl, .parquet or .csv file"
            )

    @staticmethod
    def _looks_like_hub_name(name: str) -> bool:
        parts = name.split("/")
        return len(parts) == 2 and all(parts)

    def _open_local(self) -> None:
        self.files = self.spec.local_files()
        alone = len(self.files) == 1 and self.files[0] == Path(self.spec.sources[0]).expanduser()
        opened = []
        for file in self.files:
            try:
                opened.append(self._check_local(file, LOCAL_FORMATS.get(file.suffix.lower()), alone=alone))
            except OSError as error:  # unreadable (permissions), an I/O error
                raise SourceError(f"{file} cannot be read ({error.strerror or error}): check that it is a readable "
                                  "file") from None  # fmt: skip
        # The files one after another, in name order: sample indices run on from one file to the next.
        self._per_file = opened
        self._file_keys = [functools.partial(_file_key, file) for file in self.files]
        self._records = lambda: itertools.chain.from_iterable(records() for records, _ in opened)
        self._count = lambda: _total(count() for _, count in opened)

    def _check_local(self, path: Path, local_format: str | None, *, alone: bool = True) -> tuple[Callable[[], Iterator[RawRecord]], Callable[[], int | None]]:
        """One local file, checked: how to read its records, and how to count them."""
        spec = self.spec
        if not path.exists():
            raise SourceError(f"file {path} does not exist: check the path (relative paths start at {Path.cwd()})")
        if not path.is_file():
            raise SourceError(f"{path} is not a file: give a .txt, .jsonl, .parquet or .csv file")
        if local_format is None:
            raise SourceError(f"{path} has an unknown extension: name it .txt, .jsonl, .parquet or .csv")
        if path.stat().st_size == 0:
            if not alone:  # one empty file among many (an empty part of a dataset) holds no samples
                return lambda: iter(()), lambda: 0
            raise SourceError(f"{path} is empty: there is nothing to learn; give a file with text")
        text_field = spec.text_field or "text"
        wanted = spec.metadata_fields
        if local_format in ("txt", "jsonl", "csv"):
            _check_utf8(path)
        if local_format == "txt":
            if wanted:
                raise SourceError(f"{path} is plain text and has no record fields: drop --metadata-fields "
                                  f"{','.join(wanted)} or use a jsonl, parquet or csv file")  # fmt: skip
            reader = _txt_lines if spec.txt_mode == "line" else _txt_paragraphs
            return (lambda: reader(path, self._byte_limit)), ((lambda: _count_lines(path, non_blank=False))
                                                              if spec.txt_mode == "line" else (lambda: _count_paragraphs(path)))
        elif local_format == "jsonl":
            if _starts_with_array(path):
                raise SourceError(f"{path} holds one JSON array, not JSON lines (one object per line): convert it "
                                  f"first, e.g. `jq -c '.[]' {path.name} > {path.stem}.jsonl`")  # fmt: skip
            first = _first_jsonl_record(path)
            if first is not None:
                _require_fields(f"{path} (first record)", list(first), text_field, wanted,
                                "name the text field with --text-field, and only existing --metadata-fields")  # fmt: skip
            return (lambda: _jsonl(path, text_field, wanted, self._byte_limit)), (lambda: _count_lines(path, non_blank=True))
        elif local_format == "csv":
            _require_fields(str(path), _csv_header(_csv_rows(path, self._byte_limit)), text_field, wanted,
                            "name the text column with --text-field, and only existing --metadata-fields")  # fmt: skip
            return ((lambda: _csv(path, text_field, wanted, self._byte_limit)),
                    (lambda: max(0, _count_lines(path, non_blank=True) - 1)))  # less the header
        else:
            datasets = _datasets()

            try:
                dataset = datasets.load_dataset(local_format, data_files=str(path), split="train", streaming=True)
                columns = list(dataset.features or {}) or list(next(iter(dataset), {}))
            except Exception as error:  # noqa: BLE001 - datasets/pyarrow raise many kinds
                raise SourceError(f"{path} cannot be read as {local_format} ({type(error).__name__}: "
                                  f"{str(error).splitlines()[0] if str(error) else ''}): check the file") from None  # fmt: skip
            _require_fields(str(path), columns, text_field, wanted,
                            "name the text column with --text-field, and only existing --metadata-fields")  # fmt: skip
            return ((lambda: _datasets_records(dataset, text_field, wanted, str(path))),
                    (lambda: _parquet_rows(path)) if local_format == "parquet" else (lambda: None))

    def _open_hub(self, folder: str | None = None) -> None:
        """A dataset repository, as ``datasets`` reads it: on the hub, or a local copy of one (``folder``)."""
        spec = self.spec
        known = HUB_DATASETS.get(spec.shown) if folder is None else None
        name = folder or (known.name if known else spec.shown)
        config = spec.hub_config if spec.hub_config is not None else (known.config if known else None)
        split = spec.split or (known.split if known else "train")
        text_field = spec.text_field or (known.text_field if known else "text")
        wanted = spec.metadata_fields
        what = f"dataset repository {name}" if folder else f"hub dataset {name!r}"
        datasets = _datasets()

        try:
            builder = datasets.load_dataset_builder(name, config)
            dataset = builder.as_streaming_dataset(split=split)
            first = next(iter(dataset))
        except Exception as error:  # noqa: BLE001 - network, auth, missing config: all end the same way
            raise SourceError(
                f"{what} (config {config!r}, split {split!r}) cannot be streamed "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}): check the name, "
                "--hub-config and --split" + ("" if folder else ", and that this machine can reach the Hugging Face hub")
            ) from None
        _require_fields(what, list(first), text_field, wanted,
                        "name the text field with --text-field, and only existing --metadata-fields")  # fmt: skip
        self._records = lambda: _datasets_records(dataset, text_field, wanted, what)
        self._count = lambda: _card_rows(dataset, split)
        # Its files (datasets' shards), each readable alone: a sharded run reads only its own run of them.
        data_files = list((builder.config.data_files or {}).get(split) or [])
        shards = dataset.n_shards
        if shards > 1:
            files = data_files if len(data_files) == shards else [f"{name}#{number}" for number in range(shards)]

            def part(number: int) -> tuple[Callable[[], Iterator[RawRecord]], Callable[[], int | None]]:
                records = dataset.shard(num_shards=shards, index=number)
                return (lambda: _datasets_records(records, text_field, wanted, f"{what}, file {files[number]}")), lambda: None

            self.files = list(files)
            self._per_file = [part(number) for number in range(shards)]
            # a file named with its revision (hf://datasets/<name>@<commit>/...) is that content for good; a local
            # copy's files by their size and times
            self._file_keys = [functools.partial(_file_key, Path(file)) if folder and Path(file).is_file()
                               else (lambda file=file: str(file) if "@" in str(file) else None) for file in files]  # fmt: skip

    def events(self, *, skip: int = 0, max_samples: int | None = None,
               shard: Shard | None = None) -> Iterator[SourceEvent]:  # fmt: skip
        """Every record as an event, indices counted over the filtered stream.

        ``skip`` passes over the first samples of the filtered stream (they are
        neither learned nor reported); ``max_samples`` stops after that many
        samples (good or bad) past the skipped ones. With a ``shard``, only its
        share; indices, ``skip`` and ``max_samples`` keep their meaning over the
        whole source, so the shards together are exactly the unsharded run. With
        at least as many files as shards, shard I reads only the I-th of N runs of
        consecutive files (and counts, once, the samples of the files before them:
        see :meth:`_samples_in`); otherwise the samples whose index modulo N is I,
        and the filtered records just before them.
        """
        try:
            if shard is None or shard.count == 1:
                yield from self._events(skip, max_samples)
            elif len(self.files) >= shard.count:
                yield from self._file_shard_events(skip, max_samples, shard)
            else:
                yield from self._shard_events(self._events(skip, max_samples), shard)
        except OSError as error:  # the file went away or the disk failed part-way: progress so far is kept
            raise SourceError(f"{self.spec.shown} could not be read to the end ({error.strerror or error}): check "
                              "the file, then run the same command to go on") from None  # fmt: skip

    @staticmethod
    def _shard_events(events: Iterator[SourceEvent], shard: Shard) -> Iterator[SourceEvent]:
        # Round robin over the sample index: shards get equal shares whatever the samples' order, without a count
        # first. A filtered record goes with the sample after it, so each is counted by exactly one shard.
        following = 0  # the index of the next sample
        for event in events:
            if isinstance(event, Filtered):
                if following % shard.count == shard.index:
                    yield event
                continue
            following = event.index + 1
            if event.index % shard.count == shard.index:
                yield event

    def _events(self, skip: int, max_samples: int | None, records: Iterable[RawRecord] | None = None,
                index: int = 0) -> Iterator[SourceEvent]:  # fmt: skip
        """Events of ``records`` (default: the whole source) whose first sample has index ``index``."""
        stop = None if max_samples is None else skip + max_samples
        for record in self._records() if records is None else records:
            if stop is not None and index >= stop:
                return
            if isinstance(record, str):
                if index >= skip:
                    yield BadRecord(index, record)
                index += 1
                continue
            text, fields = record
            if len(text) > self.spec.max_chars:
                if index >= skip:
                    yield BadRecord(index, f"the text has {len(text):,} characters, more than the limit of "
                                           f"{self.spec.max_chars:,}: raise --max-sample-chars to learn it")  # fmt: skip
                index += 1
                continue
            if len(text.strip()) < self.spec.min_chars:
                if index >= skip:
                    yield Filtered()
                continue
            if index >= skip:
                yield Sample(index, text, fields, sample_digest(text, fields))
            index += 1

    def _samples_in(self, number: int) -> int:
        """How many sample indices file ``number`` takes (its records but the filtered ones): a pass that reads
        and parses the file, without tokenizing; cached in the counts folder, by what identifies the file's
        content (a local file's path, size and times; a hub file's revision) and the source's options."""
        content = self._file_keys[number]()
        key = None if content is None else hashlib.sha1(json.dumps([content, self.spec.describe(),
                                                                    self.spec.max_chars]).encode()).hexdigest()  # fmt: skip
        cached = self.counts_dir / f"{key}.count" if self.counts_dir is not None and key is not None else None
        if cached is not None:
            with contextlib.suppress(OSError, ValueError):
                return int(cached.read_text(encoding="ascii"))
        count = 0
        for record in self._per_file[number][0]():
            if isinstance(record, str) or len(record[0]) > self.spec.max_chars or len(record[0].strip()) >= self.spec.min_chars:
                count += 1
        if cached is not None:
            with contextlib.suppress(OSError):
                cached.parent.mkdir(parents=True, exist_ok=True)
                partial = cached.with_name(f".{cached.name}.{os.getpid()}")
                partial.write_text(str(count), encoding="ascii")
                os.replace(partial, cached)
        return count

    def count_files(self, shard: Shard) -> int:
        """Count (into the counts folder) the samples of ``shard``'s own run of files, for the shards after it: an
        executor runs this for every shard at once before learning, so each file is counted once, by the shard
        that reads it anyway, instead of every later shard counting every file before its own. How many files
        it counted (0 when the source is not cut by file)."""
        if shard.count == 1 or len(self.files) < shard.count or shard.index == shard.count - 1:
            return 0
        first, last = self._file_run(shard)
        for number in range(first, last):
            self._samples_in(number)
        return last - first

    def _file_run(self, shard: Shard) -> tuple[int, int]:
        """The files of ``shard`` when the source is cut by file: the I-th of N runs of consecutive files."""
        return shard.index * len(self.files) // shard.count, (shard.index + 1) * len(self.files) // shard.count

    def _file_shard_events(self, skip: int, max_samples: int | None, shard: Shard) -> Iterator[SourceEvent]:
        # Shard I of N takes the I-th of N runs of consecutive files; its first index is the number of samples in
        # the files before its own, counted once (and cached) rather than learned.
        first, last = self._file_run(shard)
        index = sum(self._samples_in(number) for number in range(first))
        records = itertools.chain.from_iterable(self._per_file[number][0]() for number in range(first, last))
        yield from self._events(skip, max_samples, records, index)
