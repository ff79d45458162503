"""Shards as Ray tasks (``ingestd run … --shards N --executor ray [--ray-address ADDR]``).

Each pending shard is one task (one CPU) running the same pipeline as a local run on its share. A task whose
worker dies (a node lost, ``kill -9``) is retried by Ray (``max_retries``) and resumes from its own progress; a
sample is learned once whatever happens, by the pipeline's own guarantees. Tasks report their counters to one
small actor, from which the driver shows one progress display for the whole run. When every shard is done, the
driver merges the shards' stores into the run's data directory (embedded engine; against a KATO server the shards
learned into it directly). Ray is an extra: ``pip install "ingestd[ray]"``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ingestd.errors import IngestError
from ingestd.executors.shards import ShardPlan
from ingestd.pipeline import RunStats

MAX_RETRIES = 3
REPORT_EVERY = 1.0  # seconds between a task's reports to the board


class RayUnavailable(IngestError):
    """Ray is not installed, or the cluster cannot be reached."""


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayUnavailable('the Ray executor needs Ray: pip install "ingestd[ray]"') from None
    return ray


def run_shards(plan: ShardPlan, *, address: str | None = None,
               on_progress: Callable[[RunStats], None] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Learn every shard of ``plan`` not done yet on Ray; returns each shard's summary, in shard order (a shard
    done by an earlier run: its samples counted as skipped)."""
    done = {index: _skipped(summary) for index in range(plan.count) if (summary := plan.done(index)) is not None}
    if len(done) == plan.count:  # nothing to learn: no cluster needed
        return [done[index] for index in range(plan.count)]
    ray = _ray()
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except Exception as error:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ...
            where = f"the Ray cluster at {address}" if address else "a local Ray"
            raise RayUnavailable(f"cannot start or reach {where} ({type(error).__name__}: {error}): check "
                                 "--ray-address (or leave it out for a local Ray)") from None  # fmt: skip
    try:
        return _run(ray, plan, done, on_progress)
    finally:
        if started_here:
            ray.shutdown()


def _skipped(summary: dict[str, Any]) -> dict[str, Any]:
    """A finished shard's summary as a rerun sees it: everything it learned, skipped."""
    samples = summary["samples"]
    levels = len(summary["patterns_per_level"])
    return {**summary, "samples": {"read": 0, "learned": 0, "filtered": 0, "failed": 0, "unfinished": 0,
                                   "skipped": samples["learned"] + samples["skipped"]},
            "tokens": 0, "requests": 0, "patterns_per_level": [0] * levels, "replayed_per_level": [0] * levels,
            "failures": [], "wall_seconds": 0.0, "stopped_early": False, "error": None}  # fmt: skip


def _run(ray: Any, plan: ShardPlan, done: dict[int, dict[str, Any]],
         on_progress: Callable[[RunStats], None] | None) -> list[dict[str, Any]]:  # fmt: skip
    summaries = dict(done)
    # A source cut by file: each shard first counts its own files (for the shards after it), all at once, so that
    # no shard counts every file before its own; then they learn.
    count = ray.remote(_count_shard).options(num_cpus=1, max_retries=MAX_RETRIES)
    for reference in [count.remote(plan, index) for index in range(plan.count) if index not in summaries]:
        _result(ray, reference)
    board = ray.remote(_Board).options(num_cpus=0).remote()
    task = ray.remote(_learn_shard).options(num_cpus=1, max_retries=MAX_RETRIES)
    pending = {task.remote(plan, index, board): index for index in range(plan.count) if index not in summaries}
    levels = len(plan.config.hierarchy.levels)
    started = time.perf_counter()
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
        for reference in ready:
            summaries[pending.pop(reference)] = _result(ray, reference)
        if on_progress is not None:
            on_progress(_total(ray.get(board.snapshot.remote()), summaries, levels, plan.count, started))
    if on_progress is not None:
        final = _total({}, summaries, levels, plan.count, started)
        final.finished = time.perf_counter()
        on_progress(final)
    return [summaries[index] for index in range(plan.count)]


def _result(ray: Any, reference: Any) -> Any:
    """A task's result; a task that failed on the input or the environment raises that error, as a local run does."""
    try:
        return ray.get(reference)
    except ray.exceptions.RayTaskError as error:
        cause = error.cause if isinstance(getattr(error, "cause", None), BaseException) else error
        if isinstance(cause, IngestError):
            raise cause from None
        raise


class _Board:
    """What each running shard last reported (an actor: tasks write, the driver reads)."""

    def __init__(self) -> None:
        self.stats: dict[int, dict[str, Any]] = {}

    def report(self, index: int, stats: dict[str, Any]) -> None:
        self.stats[index] = stats

    def snapshot(self) -> dict[int, dict[str, Any]]:
        return dict(self.stats)


def _count_shard(plan: ShardPlan, index: int) -> int:
    """Count the samples of one shard's own files into the run's counts cache (see ``Source.count_files``)."""
    from ingestd.source import Source

    config = plan.shard_config(index)
    assert config.shard is not None
    source = Source(config.source)
    source.counts_dir = config.counts_dir
    return source.count_files(config.shard)


def _learn_shard(plan: ShardPlan, index: int, board: Any) -> dict[str, Any]:
    """One shard, in a Ray worker: the same pipeline as a local run, on its share."""
    import anyio

    from ingestd.pipeline import Pipeline
    from ingestd.runtime import loop_options

    last = 0.0

    def report(stats: RunStats) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= REPORT_EVERY or stats.finished is not None:
            last = now
            board.report.remote(index, _counters(stats))

    async def learn() -> Any:
        return await Pipeline(plan.shard_config(index), on_progress=report).run()

    summary = anyio.run(learn, **loop_options()).as_dict()
    if not summary.get("stopped_early") and not summary.get("error"):
        plan.mark_done(index, summary)
    return summary


_COUNTERS = ("samples_read", "samples_learned", "samples_filtered", "samples_failed", "skipped", "tokens", "requests")


def _counters(stats: RunStats) -> dict[str, Any]:
    counters = {name: getattr(stats, name) for name in _COUNTERS}
    counters["patterns_per_level"] = list(stats.patterns_per_level)
    counters["samples_expected"] = stats.samples_expected
    return counters


def _total(running: dict[int, dict[str, Any]], finished: dict[int, dict[str, Any]], levels: int, count: int,
           started: float) -> RunStats:  # fmt: skip
    """One set of counters for the whole run: the finished shards' summaries and the running ones' last reports."""
    total = RunStats(levels=levels)
    total.started = started
    expected = 0
    known = True
    for index in range(count):
        if index in finished:
            summary = finished[index]
            samples = summary["samples"]
            counters = {"samples_read": samples["read"], "samples_learned": samples["learned"],
                        "samples_filtered": samples["filtered"], "samples_failed": samples["failed"],
                        "skipped": samples["skipped"], "tokens": summary["tokens"], "requests": summary["requests"],
                        "patterns_per_level": summary["patterns_per_level"], "samples_expected": samples["read"]}  # fmt: skip
        elif index in running:
            counters = running[index]
        else:
            known = False
            continue
        for name in _COUNTERS:
            setattr(total, name, getattr(total, name) + counters[name])
        total.patterns_per_level = [a + b for a, b in zip(total.patterns_per_level, counters["patterns_per_level"], strict=True)]
        if counters.get("samples_expected") is None:
            known = False
        else:
            expected += counters["samples_expected"]
    total.samples_expected = expected if known else None
    return total
