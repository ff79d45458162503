"""The run catalogue: every run directory holds a ``manifest.json`` saying what the run was and how it went.

Written when a run starts and again when it ends (whole, by rename: a reader never sees half a file), by the
CLI, the Python API and the daemon's jobs alike, since they all run :class:`ingestd.pipeline.Pipeline`. It
names the ingestd version, the times, the source, tokenizer, hierarchy and node ids, the backend, and the
final summary (distinct patterns per level included); ``history`` keeps one line per time the directory was
run (resumes, retries). A manifest left ``running`` by a process that is gone reads as ``interrupted``.

``ingestd runs list`` and ``ingestd runs show`` read them.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import structlog

from ingestd.progress import read_run
from ingestd.runtime import process_alive

log = structlog.get_logger("ingestd.catalogue")

MANIFEST = "manifest.json"
PROGRESS = "progress.sqlite3"
HISTORY = 100  # lines of history kept


def attempt(write: Callable[[], None]) -> bool:
    """Run ``write`` (a manifest update); the catalogue is a record for people, so failing to write it never
    fails a run: it is logged. Whether it was written."""
    try:
        write()
    except OSError as error:
        log.warning("could not write the run's manifest (the run itself is unaffected)", reason=str(error))
        return False
    return True


def now() -> str:
    """The time, as the catalogue writes it: ISO 8601, UTC, to the second."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def read(run_dir: Path) -> dict[str, Any] | None:
    """A run directory's manifest (None if it has none or it cannot be read), its status checked."""
    try:
        manifest = json.loads((Path(run_dir) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    if manifest.get("status") == "running" and not process_alive(manifest.get("host"), manifest.get("pid")):
        manifest["status"] = "interrupted"  # killed, or its machine went down
        history = manifest.get("history") or []
        if history and isinstance(history[-1], dict) and history[-1].get("status") == "running":
            history[-1]["status"] = "interrupted"
    manifest["run_dir"] = str(Path(run_dir))
    return manifest


def describe(run_dir: Path) -> dict[str, Any] | None:
    """What is known of the run in ``run_dir``: its manifest, and how many samples its progress says are done
    (``done``: exact, also for a run that was killed); for a directory whose manifest is missing (a run made by
    an ingestd without catalogue, or refused before it began) or unreadable, what its progress says. None if the
    directory holds no run at all."""
    manifest = read(run_dir)
    record = read_run(run_dir)
    if manifest is None:
        if record is None:
            return None
        unreadable = (Path(run_dir) / MANIFEST).exists()
        hierarchy = record.identity.get("hierarchy", [])
        manifest = {"run_id": Path(run_dir).name, "status": "manifest unreadable" if unreadable else "no manifest",
                    "run_dir": str(Path(run_dir)), "source": record.identity.get("source"),
                    "tokenizer": record.identity.get("tokenizer"), "hierarchy": hierarchy,
                    "node_ids": [level.get("node_id") for level in hierarchy], "history": []}  # fmt: skip
    samples = (manifest.get("summary") or {}).get("samples") or {}
    if record is not None:
        manifest["done"] = record.done
    else:  # a sharded run's own directory: its shards keep the progress, its summary says what they did
        manifest["done"] = samples["learned"] + samples.get("skipped", 0) if "learned" in samples else None
    return manifest


def started(run_dir: Path, *, run_id: str, identity: dict[str, Any], backend: dict[str, Any], version: str) -> None:
    """Record that a run of ``run_dir`` started (a new manifest, or the next invocation of an existing one)."""
    earlier = read(run_dir) or {}
    history = list(earlier.get("history", []))
    if earlier.get("status") == "interrupted" and history and history[-1].get("status") == "running":
        history[-1]["status"] = "interrupted"
    moment = now()
    history.append({"started_at": moment, "finished_at": None, "status": "running", "version": version})
    _write(run_dir, {
        "run_id": run_id, "status": "running", "ingestd_version": version,
        "created_at": earlier.get("created_at", moment), "started_at": moment, "finished_at": None,
        "host": socket.gethostname(), "pid": os.getpid(),
        "source": identity["source"], "tokenizer": identity["tokenizer"], "hierarchy": identity["hierarchy"],
        "node_ids": [level["node_id"] for level in identity["hierarchy"]], "backend": backend,
        "summary": earlier.get("summary"), "history": history[-HISTORY:],
    })  # fmt: skip


def finished(run_dir: Path, summary: dict[str, Any], backend: dict[str, Any] | None = None) -> None:
    """Record how the run ended: its status, its end time and its summary (and its backend, now known whole)."""
    manifest = read(run_dir)
    if manifest is None:
        return
    manifest.pop("run_dir", None)
    if backend is not None:
        manifest["backend"] = backend
    status = status_of(summary)
    moment = now()
    compact = {key: summary.get(key) for key in ("samples", "tokens", "patterns_per_level", "distinct_patterns_per_level",
                                                 "wall_seconds")}  # fmt: skip
    if manifest["history"]:
        manifest["history"][-1].update({"finished_at": moment, "status": status, **compact})
    manifest.update({"status": status, "finished_at": moment,
                     "summary": {key: value for key, value in summary.items() if key != "config"}})  # fmt: skip
    _write(run_dir, manifest)


def status_of(summary: dict[str, Any]) -> str:
    """``failed`` (an error stopped it), ``stopped`` (a signal did), ``finished with failures`` (samples failed)
    or ``finished``."""
    if summary.get("error"):
        return "failed"
    if summary.get("stopped_early"):
        return "stopped"
    if summary.get("samples", {}).get("failed"):
        return "finished with failures"
    return "finished"


def find(roots: Iterable[Path], depth: int = 3) -> list[dict[str, Any]]:
    """Every run below these folders (a run directory, a data directory's ``runs``, ``ingestd-runs``), newest first."""
    seen: set[Path] = set()
    found = []
    for root in roots:
        root = Path(root)
        candidates = [root / name for name in (MANIFEST, PROGRESS) if (root / name).exists()]
        for level in range(1, depth + 1):
            for name in (MANIFEST, PROGRESS):
                candidates += root.glob("*/" * level + name)
        for candidate in candidates:
            run_dir = candidate.parent
            key = run_dir.resolve()
            if key in seen:
                continue
            seen.add(key)
            manifest = describe(run_dir)
            if manifest is not None:
                found.append(manifest)
    return sorted(found, key=lambda manifest: manifest.get("started_at") or "", reverse=True)


def _write(run_dir: Path, manifest: dict[str, Any]) -> None:
    path = Path(run_dir) / MANIFEST
    partial = path.with_name(f".{MANIFEST}.partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        partial.write_text(json.dumps(manifest, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


