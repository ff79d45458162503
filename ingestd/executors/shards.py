"""A sharded run's layout, whatever runs it: where each shard learns, and how a finished shard says so.

On the embedded engine, shard ``I`` of ``N`` learns into ``<data dir>/shards/<run id>/<I>-of-<N>`` (its own
store, with its own run directory inside, so a shard that dies resumes from its own progress), and leaves
``done.json`` there (its summary) once it has learned its whole share: a rerun skips the shards that have one.
Against a KATO server every shard learns into the server itself; given several servers of one deployment
(replicas over one storage), shard ``I`` learns through the ``I mod count``-th. The shards' directories must be reachable from
wherever the merge runs: on one machine they are; on a cluster the data directory has to be on storage every node
mounts at the same path (NFS, a parallel file system), which is what the Ray executor assumes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ingestd.pipeline import RunConfig
from ingestd.source import Shard

DONE = "done.json"


@dataclass(frozen=True)
class ShardPlan:
    """The shards of one run: for each, the configuration it runs with."""

    config: RunConfig  # the whole run's
    count: int
    root: Path | None  # where shards keep their stores (None: they learn into a KATO server)
    kato_urls: tuple[str, ...] = ()  # the servers the shards learn through, in turn

    def shard_config(self, index: int) -> RunConfig:
        update: dict[str, Any] = {"shard": Shard(index, self.count)}
        if self.kato_urls:
            update["kato_url"] = self.kato_urls[index % len(self.kato_urls)]
        if self.root is not None:
            # counted once for all shards: how many samples each file holds (the shards after it need it)
            update.update(data_dir=self.directory(index), run_dir=None, counts_dir=self.root / "file-counts")
        else:  # each shard's progress of its own, below the whole run's record (a --run-id alone would share one)
            update.update(run_dir=self.record_dir() / f"{index}-of-{self.count}", counts_dir=self.record_dir() / "file-counts")
        # One core per shard: the executor gives each task one, so a shard plans in its own process.
        update["planners"] = 0 if self.config.planners is None else self.config.planners
        return self.config.model_copy(update=update)

    def record_dir(self) -> Path:
        """Where the whole run keeps its manifest: ``<data>/runs/<run id>-of-N`` (its shards keep their progress in
        their own stores); against a server ``--run-dir``, or ``ingestd-runs/sharded/<run id>-of-N``, with each
        shard's progress below it."""
        if self.root is None and self.config.run_dir is not None:
            return Path(self.config.run_dir)
        base = Path(self.config.data_dir) / "runs" if self.root is not None else Path("ingestd-runs") / "sharded"
        return base / f"{self.config.run_name()}-of-{self.count}"

    def directory(self, index: int) -> Path:
        assert self.root is not None
        return self.root / f"{index}-of-{self.count}"

    def done(self, index: int) -> dict[str, Any] | None:
        """The summary a finished shard left, or None."""
        if self.root is None:
            return None
        try:
            return json.loads((self.directory(index) / DONE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def mark_done(self, index: int, summary: dict[str, Any]) -> None:
        if self.root is None:
            return
        path = self.directory(index) / DONE
        partial = path.with_name(f".{DONE}.partial")
        partial.write_text(json.dumps(summary, default=str), encoding="utf-8")
        os.replace(partial, path)

    def stores(self) -> list[Path]:
        return [self.directory(index) for index in range(self.count)] if self.root is not None else []


def shard_plan(config: RunConfig, count: int, kato_urls: tuple[str, ...] | list[str] = ()) -> ShardPlan:
    """The layout of ``config`` learned in ``count`` shards (through ``kato_urls`` in turn, if given: servers of one
    KATO deployment, the first of them ``config.kato_url``)."""
    if config.shard is not None:
        raise ValueError("a sharded run is cut into shards by the executor: leave --shard out")
    if kato_urls and config.kato_url != kato_urls[0]:
        raise ValueError("the run's KATO server must be the first of kato_urls")
    root = None
    if config.kato_url is None:
        root = Path(config.data_dir).resolve() / "shards" / config.run_name()
    return ShardPlan(config, count, root, tuple(kato_urls))
