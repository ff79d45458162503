"""Which nodes of a knowledge store make one hierarchy, named as ``ingestd run`` names them.

A run directory (``--run-dir``, or ``--run-id`` under ``<data>/runs``) says it exactly: its hierarchy's node
ids. ``--node-ids`` gives the template ``ingestd run`` took; its levels are those the store knows. With
neither, the store's own record of what fed its nodes decides, when it holds one hierarchy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ingestd.engine.reader import StoreReader
from ingestd.engine.rules import kb_id
from ingestd.errors import IngestError
from ingestd.hierarchy import RUN_ID
from ingestd.progress import RunRecord, read_run

MAX_LEVELS = 64
SERVER_RUNS = Path("ingestd-runs")  # where runs against a server keep their directories (ingestd run --kato-url)


class NodesUnknown(IngestError):
    """The nodes asked for cannot be found in the knowledge store."""


@dataclass(frozen=True, slots=True)
class Node:
    """One level of a hierarchy: its KATO node id and the knowledge base KATO derives from it."""

    level: int
    node_id: str
    kb_id: str
    chunk_size: int | None = None
    capture_metadata: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"level": self.level, "node_id": self.node_id, "kb_id": self.kb_id, "chunk_size": self.chunk_size,
                "capture_metadata": self.capture_metadata}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Hierarchy:
    """The nodes found, lowest level first, and the tokenizer their level 0 was fed from."""

    nodes: list[Node]
    tokenizer: str
    run_dir: Path | None = None


def resolve(reader: StoreReader, data_dir: Path, *, node_ids: str | None = None, run_id: str | None = None,
            run_dir: Path | None = None) -> Hierarchy:  # fmt: skip
    """The hierarchy named by ``run_dir``, ``run_id`` or ``node_ids`` (in that order), else the one the store holds."""
    fed = {node.kb_id: node for node in reader.fed_nodes()}
    if run_dir is None and run_id and not node_ids:
        run_dir = find_run(reader, Path(data_dir), run_id)
    if run_dir is not None and not node_ids:
        return _from_run(reader, fed, Path(run_dir), Path(data_dir))
    if node_ids:
        return _from_template(reader, fed, node_ids, run_id or "")
    return _from_store(reader, fed, Path(data_dir))


def run_dirs(data_dir: Path, run_id: str) -> list[Path]:
    """Where a run called ``run_id`` may keep its directory: ``<data>/runs/<id>`` (in-process), or
    ``ingestd-runs/<store>/<id>`` (against a server, ingestd's own engine included)."""
    if not RUN_ID.fullmatch(run_id):
        raise NodesUnknown(f"--run-id {run_id!r}: a run id is letters, digits, '.', '_' and '-' (at most 128); give a "
                           "run directory with --run-dir")  # fmt: skip
    candidates = [Path(data_dir) / "runs" / run_id, *sorted(SERVER_RUNS.glob(f"*/{run_id}"))]
    return [candidate for candidate in candidates if (candidate / "progress.sqlite3").is_file()]


def find_run(reader: StoreReader, data_dir: Path, run_id: str) -> Path:
    """The directory of the run ``run_id`` that learned into this store."""
    found = run_dirs(data_dir, run_id)
    store_id = reader.store_id()
    ours = [run_dir for run_dir in found if _same_store(store_id, read_run(run_dir))]
    if len(ours) == 1 or (ours and len({path.resolve() for path in ours}) == 1):
        return ours[0]
    if len(ours) > 1:
        raise NodesUnknown(f"several runs are called {run_id!r} ({', '.join(map(str, ours))}): give one with --run-dir")
    if found:
        raise NodesUnknown(f"the run {run_id!r} ({found[0]}) learned into another knowledge store, not the one in "
                           f"{data_dir}: give that store with --data-dir")  # fmt: skip
    raise NodesUnknown(f"no run {run_id!r} in {Path(data_dir) / 'runs'} or {SERVER_RUNS}: list them with "
                       "`ingestd runs list`, or give a run directory with --run-dir")  # fmt: skip


def _same_store(store_id: str, record: RunRecord | None) -> bool:
    store = record.store if record is not None else None
    # A KATO server's address cannot be checked against a file; nor a run that had not started learning.
    return store is None or "://" in store or store == store_id


def _from_run(reader: StoreReader, fed: dict[str, Any], run_dir: Path, data_dir: Path,
              record: RunRecord | None = None) -> Hierarchy:  # fmt: skip
    """The hierarchy of the run in ``run_dir`` (``record``: its progress, when already read)."""
    record = record or read_run(run_dir)
    if record is None:
        raise NodesUnknown(f"{run_dir} holds no ingestd run: give a run directory (<data>/runs/<run id>), a run id "
                           "with --run-id, or the nodes with --node-ids")  # fmt: skip
    if not _same_store(reader.store_id(), record):
        raise NodesUnknown(f"the run in {run_dir} learned into another knowledge store (id {record.store}), not the "
                           f"one in {data_dir} (id {reader.store_id()}): give that run's store with --data-dir")  # fmt: skip
    nodes = []
    for level, entry in enumerate(record.identity["hierarchy"]):
        kb = kb_id(entry["node_id"])
        feeder = fed.get(kb)  # what fed it, when recorded, wins over what a run meant to feed it
        nodes.append(Node(level, entry["node_id"], kb, feeder.feeder.chunk_size if feeder else entry.get("chunk_size"),
                          entry.get("capture_metadata")))  # fmt: skip
    return Hierarchy(nodes, record.identity.get("tokenizer", "gpt2"), run_dir)


def _from_template(reader: StoreReader, fed: dict[str, Any], template: str, run_id: str) -> Hierarchy:
    if "{level}" not in template:
        ids = [part.strip() for part in template.split(",") if part.strip()]
        known = set(reader.kb_ids()) | set(fed)
        unknown = [node_id for node_id in ids if kb_id(node_id) not in known]
        if unknown:
            raise NodesUnknown(f"the knowledge store holds no node {', '.join(map(repr, unknown))} (--node-ids): it holds "
                               f"{_listing(reader, fed)}")  # fmt: skip
    else:
        stored = set(reader.kb_ids()) | set(fed)
        ids = []
        for level in range(MAX_LEVELS):
            try:
                node_id = template.format(level=level, run_id=run_id)
            except (KeyError, IndexError, ValueError) as error:
                raise NodesUnknown(f"--node-ids {template!r}: {error}: use {{level}} and {{run_id}}") from None
            if kb_id(node_id) not in stored:
                break
            ids.append(node_id)
    if not ids:
        raise NodesUnknown(f"the knowledge store holds no node named by --node-ids {template!r}: "
                           f"it holds {_listing(reader, fed)}")  # fmt: skip
    nodes = []
    for level, node_id in enumerate(ids):
        feeder = fed.get(kb_id(node_id))
        nodes.append(Node(level, node_id, kb_id(node_id), feeder.feeder.chunk_size if feeder else None))
    first = fed.get(nodes[0].kb_id)
    return Hierarchy(nodes, first.feeder.tokenizer if first else "gpt2")


def _from_store(reader: StoreReader, fed: dict[str, Any], data_dir: Path) -> Hierarchy:
    hierarchies: dict[tuple[str, ...], Hierarchy] = {}
    runs = data_dir / "runs"
    store_id = reader.store_id()
    own = [(run_dir, read_run(run_dir)) for run_dir in (sorted(runs.iterdir()) if runs.is_dir() else [])]
    # runs over HTTP into ingestd's engine serving this store
    served = [(run_dir, record) for run_dir in sorted(SERVER_RUNS.glob("*/*"))
              if (record := read_run(run_dir)) is not None and record.store == store_id]  # fmt: skip
    for run_dir, record in own + served:
        if record is None or not record.done:
            continue  # nothing learned (refused, say, for feeding nodes another way): it names no hierarchy here
        try:
            found = _from_run(reader, fed, run_dir, data_dir, record)
        except NodesUnknown:
            continue
        hierarchies.setdefault(tuple(node.node_id for node in found.nodes), found)
    if len(hierarchies) == 1:
        return next(iter(hierarchies.values()))
    by_level: dict[int, list[Any]] = {}
    for node in fed.values():
        by_level.setdefault(node.feeder.level, []).append(node)
    levels = sorted(by_level)
    if not hierarchies and levels and levels == list(range(len(levels))) and all(len(by_level[level]) == 1 for level in levels):
        nodes = [Node(level, by_level[level][0].node_id, by_level[level][0].kb_id, by_level[level][0].feeder.chunk_size)
                 for level in levels]  # fmt: skip
        return Hierarchy(nodes, by_level[0][0].feeder.tokenizer)
    if not hierarchies and not fed:
        if not reader.kb_ids():
            raise NodesUnknown(f"the knowledge store in {data_dir} is empty: learn something first (ingestd run ...)")
        raise NodesUnknown(f"the knowledge store in {data_dir} does not say which of its nodes make a hierarchy: "
                           f"give them with --node-ids (it holds {_listing(reader, fed)})")  # fmt: skip
    run_ids = sorted(found.run_dir.name for found in hierarchies.values() if found.run_dir is not None)
    by_run = f"--run-id ({', '.join(run_ids)}) or " if run_ids else ""
    raise NodesUnknown(f"the knowledge store in {data_dir} holds several hierarchies: choose one with {by_run}"
                       f"--node-ids (it holds {_listing(reader, fed)})")  # fmt: skip


def _listing(reader: StoreReader, fed: dict[str, Any]) -> str:
    names = sorted({node.node_id for node in fed.values()}) or reader.kb_ids()
    shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
    return shown or "nothing"
