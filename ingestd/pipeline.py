"""The pipeline: source → tokenize → plan → bounded queue → workers → KATO backend, in one task group.

Reading, tokenizing and planning run in a worker thread in batches (they block
or burn CPU); the queue between them and the workers is bounded, so memory
stays flat however large the corpus.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from pydantic import BaseModel, ConfigDict, Field

from ingestd.backend import EmbeddedKato, HttpKato, KatoBackend
from ingestd.engine import EngineSettings
from ingestd.errors import KatoRejected
from ingestd.hierarchy import Hierarchy
from ingestd.plan import SamplePlan, plan_levels
from ingestd.source import BadRecord, Filtered, Sample, Source, SourceEvent, SourceSpec
from ingestd.tokenize import Tokenizer, load_tokenizer
from ingestd.worker import Worker, level_setups

log = structlog.get_logger("ingestd.pipeline")


class RunConfig(BaseModel):
    """Everything one run needs; built once (CLI, file or Python API) and passed down."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    source: SourceSpec
    hierarchy: Hierarchy
    tokenizer: str = "gpt2"
    workers: int = Field(default=8, ge=1)
    batch_chunks: int = Field(default=64, ge=1, description="Chunks per observe-sequence call on batched levels.")
    batching: bool = True
    kato_url: str | None = Field(default=None, description="A KATO server; None = the embedded engine in-process.")
    data_dir: Path = Path("kato-data")
    durability: Literal["full", "normal"] = "full"
    run_id: str = ""
    fresh: bool = Field(default=False, description="clear-all every node of the hierarchy before learning.")
    skip: int = Field(default=0, ge=0)
    max_samples: int | None = Field(default=None, ge=0)
    read_batch: int = Field(default=64, ge=1, description="Samples read, tokenized and planned per thread hop.")
    queue_size: int | None = Field(default=None, ge=1, description="Planned samples waiting; default 4 per worker.")

    def node_ids(self) -> list[str]:
        return self.hierarchy.node_ids(self.run_id)


@dataclass
class RunStats:
    """What the run did, counted by the stage that knows it."""

    levels: int
    samples_read: int = 0
    samples_learned: int = 0
    samples_filtered: int = 0
    samples_failed: int = 0
    tokens: int = 0
    patterns_per_level: list[int] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0
    started: float = field(default_factory=time.perf_counter)
    finished: float | None = None

    def __post_init__(self) -> None:
        self.patterns_per_level = [0] * self.levels

    @property
    def elapsed(self) -> float:
        return (self.finished or time.perf_counter()) - self.started

    def fail(self, index: int, reason: str) -> None:
        self.samples_failed += 1
        if len(self.failures) < 1000:
            self.failures.append({"sample_index": index, "reason": reason})
        log.warning("sample failed", sample_index=index, reason=reason)


@dataclass
class RunSummary:
    config: dict[str, Any]
    stats: RunStats

    def as_dict(self) -> dict[str, Any]:
        stats = self.stats
        elapsed = stats.elapsed
        return {
            "samples": {"read": stats.samples_read, "learned": stats.samples_learned,
                        "filtered": stats.samples_filtered, "failed": stats.samples_failed},
            "tokens": stats.tokens,
            "patterns_per_level": stats.patterns_per_level,
            "requests": stats.requests,
            "requests_per_sample": round(stats.requests / stats.samples_learned, 3) if stats.samples_learned else None,
            "wall_seconds": round(elapsed, 3),
            "samples_per_second": round(stats.samples_learned / elapsed, 3) if elapsed else None,
            "tokens_per_second": round(stats.tokens / elapsed, 1) if elapsed else None,
            "failures": stats.failures,
            "config": self.config,
        }  # fmt: skip


def make_backend(config: RunConfig) -> KatoBackend:
    if config.kato_url:
        connections = config.workers * max(1, len(config.hierarchy.levels))
        return HttpKato(config.kato_url, connections=connections)
    return EmbeddedKato(EngineSettings(data_dir=config.data_dir, durability=config.durability))


def _take(events: Iterator[SourceEvent], count: int) -> list[SourceEvent]:
    taken = []
    for event in events:
        taken.append(event)
        if len(taken) >= count:
            break
    return taken


def _plan_batch(samples: list[Sample], tokenizer: Tokenizer, chunk_sizes: list[int], label: str) -> list[SamplePlan]:
    token_lists = tokenizer.tokenize_batch([sample.text for sample in samples])
    return [
        SamplePlan(sample.index, len(tokens), plan_levels(tokens, chunk_sizes),
                   {"source": label, "sample_index": sample.index, **sample.fields})
        for sample, tokens in zip(samples, token_lists, strict=True)
    ]  # fmt: skip


class Pipeline:
    def __init__(self, config: RunConfig, *, on_progress: Callable[[RunStats], None] | None = None,
                 progress_interval: float = 0.5) -> None:  # fmt: skip
        config.hierarchy.validate_usable()
        self.config = config
        self.stats = RunStats(levels=len(config.hierarchy.levels))
        self.on_progress = on_progress
        self.progress_interval = progress_interval

    def describe(self) -> dict[str, Any]:
        config = self.config
        return {"source": config.source.describe(), "tokenizer": config.tokenizer,
                "hierarchy": config.hierarchy.describe(config.run_id), "workers": config.workers,
                "batching": config.batching, "batch_chunks": config.batch_chunks,
                "backend": config.kato_url or f"embedded:{config.data_dir}"}  # fmt: skip

    async def run(self) -> RunSummary:
        """Validate everything that can be checked up front, then learn the whole source."""
        config = self.config
        source = await anyio.to_thread.run_sync(Source, config.source)
        tokenizer = await anyio.to_thread.run_sync(load_tokenizer, config.tokenizer)
        backend = make_backend(config)
        await backend.start()
        try:
            node_ids = config.node_ids()
            if config.fresh:
                for node_id in node_ids:
                    await backend.clear_all(node_id)
            setups = level_setups(config.hierarchy, node_ids, batching=config.batching)
            queue_size = config.queue_size or 4 * config.workers
            send, receive = anyio.create_memory_object_stream[SamplePlan](max_buffer_size=queue_size)
            async with anyio.create_task_group() as group:
                if self.on_progress is not None:
                    group.start_soon(self._report, backend)
                async with anyio.create_task_group() as pipeline:
                    pipeline.start_soon(self._produce, source, tokenizer, send)
                    for _ in range(config.workers):
                        pipeline.start_soon(self._work, Worker(backend, setups, config.batch_chunks), receive.clone())
                    receive.close()
                group.cancel_scope.cancel()
        finally:
            self.stats.requests = backend.requests
            self.stats.finished = time.perf_counter()
            await backend.aclose()
        if self.on_progress is not None:
            self.on_progress(self.stats)
        return RunSummary(self.describe(), self.stats)

    async def _report(self, backend: KatoBackend) -> None:
        assert self.on_progress is not None
        while True:
            self.stats.requests = backend.requests
            self.on_progress(self.stats)
            await anyio.sleep(self.progress_interval)

    async def _produce(self, source: Source, tokenizer: Tokenizer, send: MemoryObjectSendStream[SamplePlan]) -> None:
        config = self.config
        stats = self.stats
        chunk_sizes = config.hierarchy.chunk_sizes
        events = source.events(skip=config.skip, max_samples=config.max_samples)
        async with send:
            while True:
                batch = await anyio.to_thread.run_sync(_take, events, config.read_batch)
                if not batch:
                    return
                samples = []
                for event in batch:
                    stats.samples_read += 1
                    if isinstance(event, Sample):
                        samples.append(event)
                    elif isinstance(event, Filtered):
                        stats.samples_filtered += 1
                    elif isinstance(event, BadRecord):
                        stats.fail(event.index, event.reason)
                plans = await anyio.to_thread.run_sync(_plan_batch, samples, tokenizer, chunk_sizes, source.label)
                for plan in plans:
                    await send.send(plan)

    async def _work(self, worker: Worker, receive: MemoryObjectReceiveStream[SamplePlan]) -> None:
        stats = self.stats
        await worker.open()
        try:
            async with receive:
                async for plan in receive:
                    rejection = None
                    try:
                        await worker.learn(plan)
                    except* KatoRejected as rejected:
                        rejection = str(rejected.exceptions[0])
                    if rejection is not None:
                        stats.fail(plan.index, rejection)
                        continue
                    stats.samples_learned += 1
                    stats.tokens += plan.token_count
                    for level, level_plan in enumerate(plan.levels):
                        stats.patterns_per_level[level] += len(level_plan.names)
        finally:
            with anyio.CancelScope(shield=True):
                await worker.close()


async def run_async(config: RunConfig, *, on_progress: Callable[[RunStats], None] | None = None) -> RunSummary:
    """Run the pipeline in the current event loop (for notebooks: ``await ingestd.run_async(...)``)."""
    return await Pipeline(config, on_progress=on_progress).run()
