"""Executors: where the shards of a run learn (Ray's tasks), never what they do.

Every shard runs :class:`ingestd.pipeline.Pipeline` on its share of the source (``RunConfig.shard``), exactly
as ``ingestd run --shard I/N`` does by hand; on the embedded engine each shard learns into a store of its own,
merged at the end (:mod:`ingestd.kb.merge`) into the one a single process would have learned.
"""

from __future__ import annotations

from ingestd.executors.shards import ShardPlan, shard_plan

__all__ = ["ShardPlan", "shard_plan"]
