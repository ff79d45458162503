"""A run cut into shards from start to end: the executor runs them, then (embedded engine) their stores are merged
into the run's data directory, and one summary covers the whole run, with a line per shard."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ingestd import __version__, catalogue
from ingestd.engine.reader import StoreReader
from ingestd.engine.rules import kb_id
from ingestd.errors import IngestError
from ingestd.executors.shards import shard_plan
from ingestd.pipeline import RunConfig, RunStats, RunSummary

EXECUTORS = ("ray",)


def run_sharded(config: RunConfig, shards: int, *, executor: str = "ray", address: str | None = None,
                kato_urls: list[str] | None = None,
                on_progress: Callable[[RunStats], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Learn ``config``'s source in ``shards`` shards on ``executor``; the whole run's summary (``shards``: each one's).
    ``kato_urls``: KATO servers of one deployment (replicas), spread over the shards in turn."""
    if executor not in EXECUTORS:
        raise IngestError(f"--executor {executor!r}: give one of {', '.join(EXECUTORS)} (or run each shard with "
                          "--shard I/N, e.g. in a Slurm job array, then ingestd merge)")  # fmt: skip
    if config.shard is not None:
        raise IngestError("--shards cuts the run into shards itself: leave --shard out")
    plan = shard_plan(config, shards, kato_urls or ())
    started, moment = time.perf_counter(), catalogue.now()
    from ingestd.executors.ray import run_shards

    # The whole run in the catalogue (each shard's own run is there too, in its store): <data>/runs/<id>-of-N
    record = plan.record_dir()
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


def _combined(config: RunConfig, summaries: list[dict[str, Any]], merged: list[dict[str, Any]], elapsed: float,
              started_at: str) -> dict[str, Any]:  # fmt: skip
    """The whole run's summary, in the shape of one run's (:meth:`RunSummary.as_dict`), from its shards' summaries;
    and a line per shard, and what the merge did."""
    stats = RunStats(levels=len(config.hierarchy.levels))
    stats.started, stats.finished = 0.0, elapsed
    stats.started_at, stats.finished_at = started_at, catalogue.now()
    for summary in summaries:
        samples = summary["samples"]
        stats.samples_read += samples["read"]
        stats.samples_learned += samples["learned"]
        stats.samples_filtered += samples["filtered"]
        stats.samples_failed += samples["failed"]
        stats.skipped += samples["skipped"]
        stats.tokens += summary["tokens"]
        stats.requests += summary["requests"]
        stats.patterns_per_level = [a + b for a, b in zip(stats.patterns_per_level, summary["patterns_per_level"], strict=True)]
        stats.replayed_per_level = [a + b for a, b in zip(stats.replayed_per_level, summary["replayed_per_level"], strict=True)]
        recovery = summary["recovery"]
        for cause, count in recovery["retries"].items():
            stats.retries[cause] = stats.retries.get(cause, 0) + count
        stats.session_recreations += recovery["session_recreations"]
        stats.server_outages += recovery["server_outages"]
        stats.possible_duplicates += recovery["possible_duplicate_samples"]
        stats.failures += summary["failures"]
        stats.stopped_early = stats.stopped_early or summary["stopped_early"]
        stats.error = stats.error or summary.get("error")
    stats.failures = stats.failures[:1000]
    if config.kato_url is None:
        with StoreReader(config.data_dir) as reader:
            stats.distinct_patterns_per_level = [reader.count(kb_id(node_id)) for node_id in config.node_ids()]
    backends = list(dict.fromkeys(summary["config"]["backend"] for summary in summaries))
    whole = {**summaries[0]["config"], "shard": None, "shards": len(summaries),
             "backend": backends[0] if len(backends) == 1 else backends}  # fmt: skip
    combined = RunSummary(whole, stats).as_dict()
    # (each shard lists at most 1,000 possible duplicates; their counts are exact)
    combined["recovery"]["possible_duplicates"] = sum(summary["recovery"]["possible_duplicates"] for summary in summaries)
    return {**combined,
            "shards": [{"shard": summary["config"]["shard"], "backend": summary["config"]["backend"],
                        "samples": summary["samples"], "tokens": summary["tokens"],
                        "wall_seconds": summary["wall_seconds"], "run_dir": summary["config"]["run_dir"]}
                       for summary in summaries],
            "merged": merged}  # fmt: skip
