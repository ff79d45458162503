"""The hierarchy: levels with chunk size, node id, metadata capture and KATO session config."""

from __future__ import annotations

import difflib
import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from ingestd.engine.rules import kb_id
from ingestd.errors import IngestError


MAX_CHUNK_SIZE = 4096
"""Symbols per pattern at most: far above any useful chunk, and it keeps one chunk's call a sane size."""
MAX_LEVELS = 16
RUN_ID = re.compile(r"(?!\.)[\w.-]{1,128}")
"""What a run id may be: it names the run's directory."""


class HierarchyError(IngestError):
    """The hierarchy configuration is invalid; the message names the input."""


class Level(BaseModel):
    """One node of the hierarchy."""

    model_config = ConfigDict(extra="forbid")

    chunk_size: int = Field(ge=2, le=MAX_CHUNK_SIZE, description="Symbols per pattern; a pattern needs at least 2.")
    node_id: str | None = Field(default=None, description="KATO node id; default from the hierarchy's template.")
    capture_metadata: bool = Field(default=False, description="Give this level's patterns the sample's metadata.")
    session_config: dict[str, Any] = Field(default_factory=dict, description="Extra KATO session config.")


class FileRunOptions(BaseModel):
    """Run options a hierarchy file may carry in its ``[run]`` table, by the names of ``ingestd run``'s options
    (flags given on the command line win)."""

    model_config = ConfigDict(extra="forbid")

    min_chars: int | None = Field(default=None, ge=0, description="Shorter samples (stripped) are filtered.")


class Hierarchy(BaseModel):
    """Levels from node0 up. Build it in code, from a TOML/YAML file, or from chunk sizes::

        Hierarchy().add_layer(chunk_size=8).add_layer(chunk_size=8, capture_metadata=True)
    """

    model_config = ConfigDict(extra="forbid")

    levels: list[Level] = Field(default_factory=list, max_length=MAX_LEVELS)
    # ``node_ids`` in a file, as the flag (--node-ids), the job field and run()'s keyword name it; the field's
    # own name is taken too, as earlier files spell it.
    node_id_template: str = Field(
        default="node{level}", validation_alias=AliasChoices("node_ids", "node_id_template"),
        description="Node ids of levels without one; {level} and {run_id} are filled in.",
    )

    _run_options: FileRunOptions = PrivateAttr(default_factory=FileRunOptions)

    @property
    def run_options(self) -> dict[str, Any]:
        """The options of its file's ``[run]`` table that were set."""
        return self._run_options.model_dump(exclude_none=True)

    @field_validator("node_id_template")
    @classmethod
    def _template_has_level(cls, template: str) -> str:
        if "{level}" not in template:
            raise ValueError("must contain {level}, or the levels would share one knowledge base")
        try:
            template.format(level=0, run_id="run")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"only {{level}} and {{run_id}} can be filled in ({type(error).__name__}: {error}); "
                             "write a literal brace as {{ or }}") from None  # fmt: skip
        return template

    def add_layer(self, chunk_size: int, *, node_id: str | None = None, capture_metadata: bool = False,
                  **session_config: Any) -> Hierarchy:  # fmt: skip
        """Append a level on top; returns the hierarchy so calls chain."""
        try:
            self.levels.append(Level(chunk_size=chunk_size, node_id=node_id, capture_metadata=capture_metadata,
                                     session_config=session_config))  # fmt: skip
        except ValidationError as error:
            raise HierarchyError(f"level {len(self.levels)}: {_first_error(error)}") from None
        return self

    def node_ids(self, run_id: str = "") -> list[str]:
        return [level.node_id or self.node_id_template.format(level=index, run_id=run_id)
                for index, level in enumerate(self.levels)]  # fmt: skip

    @property
    def chunk_sizes(self) -> list[int]:
        return [level.chunk_size for level in self.levels]

    def validate_usable(self, run_id: str = "") -> None:
        if run_id and not RUN_ID.fullmatch(run_id):
            shown = run_id if len(run_id) <= 60 else run_id[:50] + "…"
            raise HierarchyError(f"run id {shown!r} is not a name (it also names the run's directory): give letters, "
                                 "digits, '.', '_' or '-', at most 128, not starting with '.'")  # fmt: skip
        if not self.levels:
            raise HierarchyError("the hierarchy has no levels: give --chunk-sizes (e.g. 8,8,8,8) or a hierarchy file")
        ids = self.node_ids(run_id)
        if len(set(ids)) != len(ids):
            raise HierarchyError(f"two levels share a node id ({', '.join(ids)}): give each level its own")
        # KATO keeps one knowledge base per kb id, and several node ids map to one (protocol §5.10).
        seen: dict[str, tuple[int, str]] = {}
        for level, node_id in enumerate(ids):
            kb = kb_id(node_id)
            if kb in seen:
                other_level, other = seen[kb]
                raise HierarchyError(
                    f"node ids {other!r} (level {other_level}) and {node_id!r} (level {level}) are one knowledge base "
                    f"for KATO ({kb!r}: it turns / \\ . \" $ * < > : | ? - and spaces into _): give the levels node ids "
                    "that differ in letters or digits"
                )
            seen[kb] = (level, node_id)

    @classmethod
    def from_chunk_sizes(cls, chunk_sizes: list[int], metadata_levels: set[int] = frozenset(),  # type: ignore[assignment]
                         node_id_template: str = "node{level}") -> Hierarchy:  # fmt: skip
        for level in metadata_levels:
            if not 0 <= level < len(chunk_sizes):
                raise HierarchyError(f"metadata level {level} does not exist: levels are 0..{len(chunk_sizes) - 1}")
        if len(chunk_sizes) > MAX_LEVELS:
            raise HierarchyError(f"{len(chunk_sizes)} levels: a hierarchy has at most {MAX_LEVELS}")
        for index, size in enumerate(chunk_sizes):
            if size < 2:
                raise HierarchyError(f"chunk size {size} of level {index} is below 2: a KATO pattern needs "
                                     "at least 2 symbols, so give sizes of 2 or more")  # fmt: skip
            if size > MAX_CHUNK_SIZE:
                raise HierarchyError(f"chunk size {size} of level {index} is above {MAX_CHUNK_SIZE}: give a size "
                                     f"from 2 to {MAX_CHUNK_SIZE}")  # fmt: skip
        try:
            hierarchy = cls(node_id_template=node_id_template)
        except ValidationError as error:
            raise HierarchyError(f"node id template {node_id_template!r}: {_first_error(error)}") from None
        for index, size in enumerate(chunk_sizes):
            hierarchy.add_layer(size, capture_metadata=index in metadata_levels)
        return hierarchy

    @classmethod
    def from_file(cls, path: Path) -> Hierarchy:
        """A hierarchy file: TOML or YAML with ``levels = [{chunk_size = 8, ...}, ...]``."""
        return cls.from_mapping(read_file(path), f"hierarchy file {path}")

    @classmethod
    def from_mapping(cls, data: Any, where: str = "hierarchy") -> Hierarchy:
        """A hierarchy file's content, already parsed (a job's ``hierarchy`` field is one)."""
        if not isinstance(data, dict):
            raise HierarchyError(f"{where} must hold a table with a 'levels' list")
        data = dict(data)
        run = data.pop("run", None) or {}
        data = data.get("hierarchy", data)
        try:
            hierarchy = cls.model_validate(data)
            hierarchy._run_options = FileRunOptions.model_validate(run)
        except ValidationError as error:
            raise HierarchyError(f"{where}: {_first_error(error)}") from None
        hierarchy.validate_usable()
        return hierarchy

    def describe(self, run_id: str = "") -> list[dict[str, Any]]:
        return [{"chunk_size": level.chunk_size, "node_id": node_id, "capture_metadata": level.capture_metadata,
                 "session_config": level.session_config}
                for level, node_id in zip(self.levels, self.node_ids(run_id), strict=True)]  # fmt: skip



def read_file(path: Path) -> Any:
    """A hierarchy file's content (TOML, or YAML by its suffix), parsed but not yet checked."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise HierarchyError(f"hierarchy file {path} cannot be read ({error.strerror}): check the path") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(raw.decode("utf-8"))
        else:
            data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, ValueError) as error:
        raise HierarchyError(f"hierarchy file {path} is not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'TOML'}: "
                             f"{str(error).splitlines()[0]}") from None  # fmt: skip
    except Exception as error:  # noqa: BLE001 - yaml.YAMLError without importing yaml up front
        raise HierarchyError(f"hierarchy file {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    return data


_TOP_KEYS = ("levels", "node_ids", "node_id_template", "run", "min_chars")  # the file's, and its [run] table's
_LEVEL_KEYS = ("chunk_size", "node_id", "capture_metadata", "session_config")


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"]
    if first["type"] == "extra_forbidden" and first["loc"]:
        keys = _LEVEL_KEYS if first["loc"][0] == "levels" else _TOP_KEYS
        close = difflib.get_close_matches(str(first["loc"][-1]), keys, n=1, cutoff=0.6)
        message = f"unknown key{f': did you mean {close[0]!r}?' if close else ''}"
    return f"{where}: {message}" if where else message
