"""A run cut into shards from start to end: the executor runs them, then (embedded engine) their stores are merged
into the run's data directory, and one summary covers the whole run, with a line per shard."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ingestd import __version__, catalogue
from ingestd.engine.reader import StoreReader
from ingestd.engine.rules import kb_id
from ingestd.errors import IngestError
from ingestd.executors.shards import shard_plan
from ingestd.pipeline import RunConfig, RunStats

EXECUTORS = ("ray",)


def run_sharded(config: RunConfig, shards: int, *, executor: str = "ray", address: str | None = None,
                on_progress: Callable[[RunStats], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Learn ``config``'s source in ``shards`` shards on ``executor``; the whole run's summary (``shards``: each one's)."""
    if executor not in EXECUTORS:
        raise IngestError(f"--executor {executor!r}: give one of {', '.join(EXECUTORS)} (or run each shard with "
                          "--shard I/N, e.g. in a Slurm job array, then ingestd merge)")  # fmt: skip
    if config.shard is not None:
        raise IngestError("--shards cuts the run into shards itself: leave --shard out")
    plan = shard_plan(config, shards)
    started, moment = time.perf_counter(), catalogue.now()
    from ingestd.executors.ray import run_shards

    # The whole run in the catalogue (each shard's own run is there too, in its store): <data>/runs/<id>-of-N
    record = catalogue_dir(config, shards)
    identity = {**config.identity(), "shards": shards}
    catalogue.attempt(lambda: catalogue.started(record, run_id=record.name, identity=identity,
                                                backend=config.backend_record(), version=__version__))  # fmt: skip
    failure: dict[str, Any] | None = None
    try:
        summaries = run_shards(plan, address=address, on_progress=on_progress)
        merged: list[dict[str, Any]] = []
        if plan.root is not None:
            from ingestd.kb.merge import merge_stores

            merged = merge_stores(plan.stores(), config.data_dir).to_dict(orient="records")
        combined = _combined(config, summaries, merged, time.perf_counter() - started, moment)
    except BaseException as error:
        failure = {"samples": {}, "stopped_early": isinstance(error, KeyboardInterrupt),
                   "error": None if isinstance(error, KeyboardInterrupt) else {"kind": type(error).__name__, "message": str(error)}}  # fmt: skip
        raise
    finally:
        if failure is not None:
            catalogue.attempt(lambda: catalogue.finished(record, failure))
    catalogue.attempt(lambda: catalogue.finished(record, combined))
    return combined


def catalogue_dir(config: RunConfig, shards: int) -> Path:
    """Where a sharded run keeps its manifest (its shards keep their progress in their own stores)."""
    base = Path(config.data_dir) / "runs" if config.kato_url is None else Path("ingestd-runs") / "sharded"
    return base / f"{config.run_name()}-of-{shards}"


def _combined(config: RunConfig, summaries: list[dict[str, Any]], merged: list[dict[str, Any]], elapsed: float,
              started_at: str) -> dict[str, Any]:  # fmt: skip
    samples = {key: sum(summary["samples"][key] for summary in summaries)
               for key in ("read", "learned", "filtered", "failed", "skipped", "unfinished")}  # fmt: skip
    levels = len(config.hierarchy.levels)
    tokens = sum(summary["tokens"] for summary in summaries)
    requests = sum(summary["requests"] for summary in summaries)
    recovery = {"retries": {}, "session_recreations": 0, "server_outages": 0, "possible_duplicates": 0,
                "possible_duplicate_samples": []}  # fmt: skip
    for summary in summaries:
        for cause, count in summary["recovery"]["retries"].items():
            recovery["retries"][cause] = recovery["retries"].get(cause, 0) + count
        for key in ("session_recreations", "server_outages", "possible_duplicates"):
            recovery[key] += summary["recovery"][key]
    distinct = None
    if config.kato_url is None:
        with StoreReader(config.data_dir) as reader:
            distinct = [reader.count(kb_id(node_id)) for node_id in config.node_ids()]
    return {
        "ingestd_version": __version__, "started_at": started_at, "finished_at": catalogue.now(),
        "samples": samples, "stopped_early": any(summary["stopped_early"] for summary in summaries),
        "error": next((summary["error"] for summary in summaries if summary.get("error")), None),
        "recovery": recovery, "tokens": tokens,
        "patterns_per_level": [sum(summary["patterns_per_level"][level] for summary in summaries) for level in range(levels)],
        "replayed_per_level": [sum(summary["replayed_per_level"][level] for summary in summaries) for level in range(levels)],
        "distinct_patterns_per_level": distinct, "requests": requests,
        "requests_per_sample": round(requests / samples["learned"], 3) if samples["learned"] else None,
        "wall_seconds": round(elapsed, 3),
        "samples_per_second": round(samples["learned"] / elapsed, 3) if elapsed else None,
        "tokens_per_second": round(tokens / elapsed, 1) if elapsed else None,
        "failures": [failure for summary in summaries for failure in summary["failures"]][:1000],
        "shards": [{"shard": summary["config"]["shard"], "samples": summary["samples"], "tokens": summary["tokens"],
                    "wall_seconds": summary["wall_seconds"], "run_dir": summary["config"]["run_dir"]}
                   for summary in summaries],
        "merged": merged,
        "config": {**summaries[0]["config"], "shard": None, "shards": len(summaries),
                   "backend": config.kato_url or f"embedded:{config.data_dir}"},
    }  # fmt: skip
