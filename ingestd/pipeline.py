"""The pipeline: source → tokenize → plan → bounded queue → workers → KATO backend, in one task group.

Reading, tokenizing and planning run in a worker thread in batches (they block
or burn CPU); the queue between them and the workers is bounded, so memory
stays flat however large the corpus.
"""

from __future__ import annotations

import inspect
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ingestd import __version__, catalogue, metrics
from ingestd.backend import EmbeddedKato, HttpKato, KatoBackend, ReplicatedKato, check_kato_urls
from ingestd.engine import EngineSettings
from ingestd.errors import IngestError, KatoRejected, KatoUnavailable, Transient, find_ingest_error
from ingestd.hierarchy import Hierarchy
from ingestd.loader import LOAD_SAMPLES, LOAD_TOKENS, LOAD_TOKENS_SERVED, LOADS_IN_FLIGHT, Loader
from ingestd.nodes import NodeRegistry
from ingestd.plan import SamplePlan
from ingestd.planners import Planned, Planners, default_planners
from ingestd.progress import Progress, SourceChanged, fingerprint
from ingestd.resume import check_store_file, prepare
from ingestd.retry import RetryPolicy, ServerWatch, recovering
from ingestd.retry import send as send_call
from ingestd.source import MAX_COUNT, BadRecord, Filtered, Sample, Shard, Source, SourceEvent, SourceSpec
from ingestd.tokenize import Tokenizer, load_tokenizer
from ingestd.worker import SampleOutcome, Worker, level_setups

LOAD_WAIT = 2.0
"""Seconds planned samples wait for a load to fill before it is sent anyway (a slow source still shows progress)."""
PLAN_CHARS = 131_072
"""Characters read and planned per batch at most (about 32k GPT-2 tokens): long documents come in
smaller batches, so the plans held stay a few MB however long the samples."""

log = structlog.get_logger("ingestd.pipeline")
T = TypeVar("T")

MAX_WORKERS = 1024
"""Workers at most (each holds a session per level and a connection): beyond, memory grows for nothing."""
MAX_BATCH_CHUNKS = 4096
MAX_PARALLEL_BATCHES = 64


class RunConfig(BaseModel):
    """Everything one run needs; built once (CLI, file or Python API) and passed down."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    source: SourceSpec
    hierarchy: Hierarchy
    tokenizer: str = "gpt2"
    workers: int = Field(default=16, ge=1, le=MAX_WORKERS)
    batch_chunks: int = Field(default=64, ge=1, le=MAX_BATCH_CHUNKS,
                              description="Chunks per observe-sequence call on batched levels.")  # fmt: skip
    batching: bool = True
    bulk_load: bool = Field(default=True, description="Store many samples per transaction where the backend is "
                            "ingestd's engine (in-process, or served by `ingestd kato serve`); False: send it KATO's calls "
                            "(sessions, observe-sequence), as to a KATO server.")  # fmt: skip
    parallel_batches: int = Field(default=4, ge=1, le=MAX_PARALLEL_BATCHES, description="Calls of one sample at one "
                                  "level in flight at once, each on its own session (over HTTP; levels without metadata).")  # fmt: skip
    kato_url: str | None = Field(default=None, description="A KATO server, or several of one deployment separated "
                                 "by commas (used together); None = the embedded engine in-process.")  # fmt: skip
    data_dir: Path = Path("kato-data")
    durability: Literal["full", "normal"] = "full"
    run_id: str = ""
    fresh: bool = Field(default=False, description="clear-all every node of the hierarchy before learning.")
    skip: int = Field(default=0, ge=0, le=MAX_COUNT)
    max_samples: int | None = Field(default=None, ge=0, le=MAX_COUNT)
    read_batch: int = Field(default=64, ge=1, le=100_000, description="Samples read, tokenized and planned per thread hop.")
    planners: int | None = Field(default=None, ge=0, le=64, description="Processes that tokenize and plan beside "
                                 "learning (default: one per core beyond the first; 0: a thread of this process).")  # fmt: skip
    queue_size: int | None = Field(default=None, ge=1, le=1_000_000, description="Batches waiting: default 4 samples per worker; with bulk loads, a load per loader.")
    retry: RetryPolicy = RetryPolicy()
    run_dir: Path | None = Field(default=None, description="Progress and dead letters; default under runs/.")
    retry_failed: bool = Field(default=False, description="Only redo the samples this run recorded as failed.")
    drain_timeout: float = Field(default=30.0, gt=0, description="After SIGINT/SIGTERM, seconds for in-flight samples.")
    allow_mixed_kb: bool = Field(default=False, description="Feed nodes that another level, chunk size or "
                                 "tokenizer fed (refused otherwise).")  # fmt: skip
    node_registry: Path | None = Field(default=None, description="Where ingestd records what fed a KATO server's "
                                       "nodes; default ingestd-runs/kato-nodes.sqlite3.")  # fmt: skip
    shard: Shard | None = Field(default=None, description="Learn only this share of the source, I/N: the I-th of N "
                                "runs of its files, or with fewer files the samples whose index modulo N is I (learn "
                                "each into its own --data-dir, then ingestd merge).")  # fmt: skip
    counts_dir: Path | None = Field(default=None, description="Where a shard caches how many samples each file "
                                    "before its own holds (default: <data dir>/file-counts, or the run directory's).")  # fmt: skip

    @field_validator("shard", mode="before")
    @classmethod
    def _shard(cls, shard: Any) -> Any:
        if isinstance(shard, str):
            return Shard.parse(shard)
        if isinstance(shard, tuple | list):
            return Shard(*shard)
        return shard

    @field_validator("kato_url")
    @classmethod
    def _kato_url(cls, url: str | None) -> str | None:
        """One server, or several of one deployment separated by commas (used together)."""
        return None if url is None else ",".join(check_kato_urls(url))

    @field_validator("source")
    @classmethod
    def _source(cls, source: SourceSpec) -> SourceSpec:
        return source.resolved()  # the same file is the same run, however its path is spelled

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer(cls, tokenizer: str) -> str:
        path = Path(tokenizer).expanduser()
        return str(path.resolve()) if tokenizer != "gpt2" and path.exists() else tokenizer

    def node_ids(self) -> list[str]:
        return self.hierarchy.node_ids(self.run_id)

    def identity(self) -> dict[str, Any]:
        """What decides the knowledge base; fingerprinted so a run directory never mixes two configurations."""
        identity = {"source": self.source.describe(), "tokenizer": self.tokenizer,
                    "hierarchy": self.hierarchy.describe(self.run_id)}  # fmt: skip
        if self.shard is not None and self.shard.count > 1:  # (unsharded runs keep the identity they always had)
            # what the shards of one run must share beyond the rest: the window and the list of files
            identity["shard"] = str(self.shard)
            identity["window"] = [self.skip, self.max_samples]
            identity["files"] = self.source.file_list()
        return identity

    def backend_record(self, store: str | None = None) -> dict[str, Any]:
        """The backend as the run catalogue records it (``store``: its store id or address, once known)."""
        if self.kato_url is None:
            return {"kind": "embedded", "data_dir": str(Path(self.data_dir).resolve()), "store_id": store or None}
        return {"kind": "kato", "url": self.kato_url, "store": store or None}

    def run_name(self) -> str:
        """The run's id: ``run_id``, or else a hash of what decides its knowledge base."""
        return self.run_id or fingerprint(self.identity())[:16]

    def resolved_run_dir(self, store: str | None = None) -> Path:
        """``run_dir``, or by default ``<data>/runs/<run id>`` in-process, and with a server
        ``ingestd-runs/<its store>/<run id>``: the same command against another store is another run, and
        against the same engine under another address the same run (``store`` is known once it answers)."""
        if self.run_dir is not None:
            return self.run_dir
        run_id = self.run_name()
        if self.kato_url is None:
            return self.data_dir / "runs" / run_id
        where = store or self.kato_url
        folder = re.sub(r"[^A-Za-z0-9.-]+", "_", where.split("://", 1)[1]).strip("_") if "://" in where else f"engine-{where}"
        return Path("ingestd-runs") / folder / run_id


@dataclass
class RunStats:
    """What the run did, counted by the stage that knows it."""

    levels: int
    samples_read: int = 0
    samples_learned: int = 0
    samples_filtered: int = 0
    samples_failed: int = 0
    tokens: int = 0
    patterns_per_level: list[int] = field(default_factory=list)  # learns this run applied
    replayed_per_level: list[int] = field(default_factory=list)  # chunks found stored already (resent, resumed)
    failures: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0
    skipped: int = 0  # learned by an earlier run (or, with --retry-failed, not among its failures)
    retries: dict[str, int] = field(default_factory=dict)
    session_recreations: int = 0
    server_outages: int = 0
    possible_duplicates: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False
    error: dict[str, Any] | None = None  # what stopped the run, if something did: message, exit code, kind
    started: float = field(default_factory=time.perf_counter)
    finished: float | None = None
    started_at: str = field(default_factory=catalogue.now)
    finished_at: str | None = None
    distinct_patterns_per_level: list[int] | None = None  # stored in each node at the end (None: the server cannot say)
    samples_expected: int | None = None  # how many samples the run will read, once known (for a progress total)

    def __post_init__(self) -> None:
        self.patterns_per_level = [0] * self.levels
        self.replayed_per_level = [0] * self.levels

    def learned(self, outcome: SampleOutcome) -> None:
        """Count what one sample stored (also when it failed part-way)."""
        for level, (applied, replayed) in enumerate(zip(outcome.applied, outcome.replayed, strict=True)):
            self.patterns_per_level[level] += applied
            self.replayed_per_level[level] += replayed
            if applied:
                metrics.PATTERNS.labels(str(level)).inc(applied)

    @property
    def unfinished(self) -> int:
        """Read, but neither learned nor failed because the run stopped early; the next run does them."""
        return self.samples_read - self.samples_learned - self.samples_filtered - self.samples_failed - self.skipped

    @property
    def elapsed(self) -> float:
        return (self.finished or time.perf_counter()) - self.started

    @property
    def samples_total(self) -> int | None:
        """A progress display's total: the samples expected while the run goes on (None: not known yet), and once it
        has gone through, what was read (filtered samples and a --max-samples cut make the estimate inexact); never
        less than what was read."""
        done = self.finished is not None and not self.stopped_early and self.error is None
        total = self.samples_read if done else self.samples_expected
        return None if total is None else max(total, self.samples_read)

    def fail(self, index: int, reason: str) -> None:
        self.samples_failed += 1
        metrics.SAMPLES_FAILED.inc()
        if len(self.failures) < 1000:
            self.failures.append({"sample_index": index, "reason": reason})
        log.warning("sample failed", sample_index=index, reason=reason)

    # -- what workers report while getting calls through (see ingestd.retry) --
    def retried(self, cause: str, detail: str) -> None:
        self.retries[cause] = self.retries.get(cause, 0) + 1
        metrics.RETRIES.labels(cause).inc()
        log.warning("retrying a KATO call", cause=cause, detail=detail)  # worker, level, sample: see ingestd.logs

    def session_recreated(self, node_id: str) -> None:
        self.session_recreations += 1
        metrics.SESSION_RECREATIONS.inc()
        log.warning("session recreated", cause="session_lost", node_id=node_id)

    def server_outage(self) -> None:
        self.server_outages += 1
        metrics.SERVER_OUTAGES.inc()

    def possible_duplicate(self, sample_index: int, node_id: str) -> None:
        self.possible_duplicates.append({"sample_index": sample_index, "node_id": node_id})
        metrics.POSSIBLE_DUPLICATES.inc()
        log.warning("possible duplicate: a resent call may have been applied twice by a server without "
                    "idempotency keys", cause="ambiguous", sample_index=sample_index, node_id=node_id)  # fmt: skip


@dataclass
class RunSummary:
    config: dict[str, Any]
    stats: RunStats

    def as_dict(self) -> dict[str, Any]:
        stats = self.stats
        elapsed = stats.elapsed
        return {
            "ingestd_version": __version__,
            "started_at": stats.started_at,
            "finished_at": stats.finished_at,
            "samples": {"read": stats.samples_read, "learned": stats.samples_learned,
                        "filtered": stats.samples_filtered, "failed": stats.samples_failed,
                        "skipped": stats.skipped, "unfinished": stats.unfinished},
            "stopped_early": stats.stopped_early,
            "error": stats.error,
            "recovery": {"retries": stats.retries, "session_recreations": stats.session_recreations,
                         "server_outages": stats.server_outages,
                         "possible_duplicates": len(stats.possible_duplicates),
                         "possible_duplicate_samples": stats.possible_duplicates[:1000]},
            "tokens": stats.tokens,
            "patterns_per_level": stats.patterns_per_level,
            "replayed_per_level": stats.replayed_per_level,
            "distinct_patterns_per_level": stats.distinct_patterns_per_level,
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
        # as many as the run's sessions can have in flight: one per level and worker, or on levels without metadata
        # up to --parallel-batches (a long sample's calls at once)
        sessions = sum(1 if level.capture_metadata else config.parallel_batches for level in config.hierarchy.levels)
        connections = config.workers * max(1, sessions)
        registry = NodeRegistry(config.node_registry or Path("ingestd-runs") / "kato-nodes.sqlite3")
        urls = config.kato_url.split(",")
        servers = [HttpKato(url, connections=connections, timeout=config.retry.request_timeout, registry=registry)
                   for url in urls]  # fmt: skip
        return servers[0] if len(servers) == 1 else ReplicatedKato(servers)
    return EmbeddedKato(EngineSettings(data_dir=config.data_dir, durability=config.durability))


class RunOptionsError(IngestError):
    """Options of a run that cannot go together."""


_FORGET_BATCH = 1024  # done samples whose ledger records are dropped in one call


def _take(events: Iterator[SourceEvent], count: int, chars: int = PLAN_CHARS) -> list[SourceEvent]:
    """The next ``count`` events, fewer if their texts reach ``chars`` characters (long documents)."""
    taken: list[SourceEvent] = []
    for event in events:
        taken.append(event)
        if isinstance(event, Sample):
            chars -= len(event.text)
        if len(taken) >= count or chars <= 0:
            break
    return taken


def _cut(plans: list[SamplePlan], load_tokens: int) -> tuple[int, int]:
    """How many of ``plans`` (at least one) make one load, and their tokens."""
    count = tokens = 0
    for plan in plans:
        if count and (tokens + plan.token_count > load_tokens or count == LOAD_SAMPLES):
            break
        count += 1
        tokens += plan.token_count
    return count, tokens


def _check_unchanged(batch: list[SourceEvent], seen: Callable[[int], bool], progress: Progress, label: str) -> None:
    """Samples this run learned, was learning, or stored part of before failing must be the same records at
    the same indices: an edit that adds, removes or changes records before them shifts every later index,
    and resuming would then learn some texts twice and others never (a failed sample's stored part cannot
    be taken back either, so its record must not change)."""
    indices = [event.index for event in batch if not isinstance(event, Filtered) and seen(event.index)]
    if not indices:
        return
    recorded = progress.digests(indices)
    for event in batch:
        if isinstance(event, Filtered) or event.index not in recorded:
            continue
        now = event.digest if isinstance(event, Sample) else None
        if recorded[event.index] is None or now == recorded[event.index]:
            continue
        if event.index in progress.failed:
            raise SourceChanged(
                f"sample {event.index} of {label} failed after storing part of it, and its record has changed since "
                "(edited, or records added or removed before it): what it stored cannot be taken back. Restore the "
                "record, or learn the source as a new run (another --run-id, or --fresh to start this one over)"
            )
        raise SourceChanged(
            f"sample {event.index} of {label} is not the record this run learned as sample {event.index}: the "
            f"source changed since (records added, removed or edited before a sample shift its index). Learn it "
            f"as a new run (another --run-id, or --fresh to start this one over), or restore the source"
        )


class Pipeline:
    def __init__(self, config: RunConfig, *, on_progress: Callable[[RunStats], None] | None = None,
                 progress_interval: float = 0.5, handle_signals: bool = False) -> None:  # fmt: skip
        config.hierarchy.validate_usable(config.run_id)
        if config.retry_failed and config.fresh:
            raise RunOptionsError("--retry-failed redoes the failed samples of a run, and --fresh starts the run over "
                                  "(clearing its nodes): give one of them")  # fmt: skip
        self.config = config
        self.stats = RunStats(levels=len(config.hierarchy.levels))
        self.on_progress = on_progress
        self.progress_interval = progress_interval
        self.handle_signals = handle_signals
        self.stopping = False
        self._intake = anyio.CancelScope()  # the producer: cancelled when a signal says stop
        self._workers = anyio.CancelScope()  # the workers: cancelled after the drain timeout
        self._queued = 0  # plans in the queue, for the queue-depth gauge
        self._settled: list[int] = []  # done samples whose ledger records can go
        self._watch: ServerWatch | None = None
        self._run_dir: Path | None = None
        self._catalogued = False
        self._server_unusable = False  # the run is stopping because the server did not serve for --patience

    def describe(self) -> dict[str, Any]:
        config = self.config
        return {"source": config.source.describe(), "tokenizer": config.tokenizer,
                "hierarchy": config.hierarchy.describe(config.run_id), "workers": config.workers,
                "batching": config.batching, "batch_chunks": config.batch_chunks,
                "parallel_batches": config.parallel_batches, "bulk_load": config.bulk_load,
                "backend": config.kato_url or f"embedded:{config.data_dir}",
                "run_dir": str(self._run_dir or config.resolved_run_dir()),
                "shard": str(config.shard) if config.shard is not None else None}  # fmt: skip

    async def run(self) -> RunSummary:
        """Validate everything that can be checked up front, then learn the whole source."""
        config = self.config
        backend = make_backend(config)
        progress: Progress | None = None
        try:
            source = await anyio.to_thread.run_sync(Source, config.source)
            self._expect(source)
            tokenizer = await anyio.to_thread.run_sync(load_tokenizer, config.tokenizer)
            if config.kato_url is None:
                progress = self._open_progress(source, config.resolved_run_dir())
                self._catalogue_start(progress, backend)  # before anything can refuse the run: it is recorded too
                check_store_file(config, progress)  # before the engine would make an empty store
                await backend.start()
            else:  # a server's default run directory is named by its store, known once it answers
                await backend.start()
                progress = self._open_progress(source, config.resolved_run_dir(backend.store))
                self._catalogue_start(progress, backend)
            await self._learn(source, tokenizer, progress, backend)
        except BaseException as failure:
            found = find_ingest_error(failure)
            if found is not None:
                self.stats.error = {"kind": type(found).__name__, "message": str(found), "exit_code": found.exit_code}
            raise
        finally:
            self.stats.finished = self.stats.finished or time.perf_counter()
            self.stats.finished_at = catalogue.now()
            if progress is not None:
                progress.close()
                if self._catalogued:
                    catalogue.attempt(lambda: catalogue.finished(progress.run_dir, self.summary().as_dict(),
                                                                 self.config.backend_record(backend.store)))  # fmt: skip
            with anyio.CancelScope(shield=True):
                await backend.aclose()
        if self.on_progress is not None:
            self.on_progress(self.stats)
        return self.summary()

    def _expect(self, source: Source) -> None:
        """Count the source's records on a thread of their own (a scan of a text file: it must not delay the run,
        and the run does not wait for it), for a progress display's total and time left."""
        config = self.config
        share = config.shard.count if config.shard is not None else 1  # a shard reads about 1/N of them
        limit = None if config.max_samples is None else -(-config.max_samples // share)
        if limit is not None:
            self.stats.samples_expected = limit

        def count() -> None:
            records = source.count_records()
            if records is not None:
                expected = -(-max(0, records - config.skip) // share)
                self.stats.samples_expected = expected if limit is None else min(expected, limit)

        threading.Thread(target=count, name="ingestd-count", daemon=True).start()

    def _catalogue_start(self, progress: Progress, backend: KatoBackend) -> None:
        config = self.config
        self._catalogued = catalogue.attempt(lambda: catalogue.started(progress.run_dir, run_id=config.run_name(),
                                                                       identity=config.identity(),
                                                                       backend=config.backend_record(backend.store),
                                                                       version=__version__))  # fmt: skip

    def _open_progress(self, source: Source, run_dir: Path) -> Progress:
        self._run_dir = run_dir
        progress = Progress(run_dir, self.config.identity(), source.label)
        progress.open(fresh=self.config.fresh)
        return progress

    async def _learn(self, source: Source, tokenizer: Tokenizer, progress: Progress, backend: KatoBackend) -> None:
        config = self.config
        finished = False
        try:
            node_ids = config.node_ids()
            watch = self._watch = ServerWatch(backend.healthy, backend.description, config.retry, self.stats.server_outage)
            resume_points = await prepare(config, progress, backend, node_ids, self.stats, self._reliably)
            setups = level_setups(config.hierarchy, node_ids, batching=config.batching)
            # Batches of planned samples: one sample each for workers; for ingestd's engine, loads of many samples.
            bulk = config.bulk_load and backend.loads
            served = not isinstance(backend, EmbeddedKato)
            loaders = min(config.workers, LOADS_IN_FLIGHT) if served else 1
            load_tokens = (LOAD_TOKENS_SERVED if served else LOAD_TOKENS) if bulk else 0
            queue_size = config.queue_size or (loaders if bulk else 4 * config.workers)  # a load waiting per loader
            send, receive = anyio.create_memory_object_stream[list[SamplePlan]](max_buffer_size=queue_size)
            async with anyio.create_task_group() as group:
                if self.on_progress is not None:
                    group.start_soon(self._report, backend)
                if self.handle_signals:
                    group.start_soon(self._watch_signals)
                with self._workers:
                    async with anyio.create_task_group() as pipeline:
                        pipeline.start_soon(self._produce, source, tokenizer, progress, resume_points, send, load_tokens)
                        if bulk:
                            retrying = {"policy": config.retry, "on_retry": recovering(watch, self.stats.retried),
                                        "pieces_in_flight": loaders} if served else {}  # fmt: skip
                            loader = Loader(backend, setups, progress.run_key, **retrying)
                            for _ in range(loaders):
                                pipeline.start_soon(self._load, loader, progress, backend, receive.clone())
                        else:
                            for number in range(config.workers):
                                worker = Worker(number, backend, setups, config.batch_chunks, policy=config.retry,
                                                watch=watch, recovery=self.stats, run_key=progress.run_key,
                                                parallel_batches=config.parallel_batches)  # fmt: skip
                                pipeline.start_soon(self._work, worker, progress, backend, receive.clone())
                        receive.close()
                group.cancel_scope.cancel()
            finished = True
        finally:
            metrics.QUEUE_DEPTH.dec(self._queued)  # left in the queue by an early stop
            self._queued = 0
            with anyio.CancelScope(shield=True):
                if finished and backend.ledger:
                    await self._forget_settled(backend, progress)
                await self._count_patterns(backend)
                self.stats.requests = backend.requests
                self.stats.finished = time.perf_counter()

    async def _reliably(self, call: Callable[[], Awaitable[T]]) -> T:
        """A call outside the workers (before learning), through outages and resends as theirs are."""

        server = self._watch.description if self._watch is not None else "the KATO server"
        result, _ = await send_call(call, self.config.retry, on_retry=recovering(self._watch, self.stats.retried),
                                    server=server)  # fmt: skip
        return result

    async def _forget_settled(self, backend: KatoBackend, progress: Progress) -> None:
        """Drop the ledger records of every sample of this run but the ones in flight or failed: a later run
        may need those, and only those."""
        try:
            with anyio.fail_after(60):
                await backend.ledger_forget(progress.run_key, keep=progress.unsettled())
        except (Transient, KatoRejected, TimeoutError) as failure:
            log.warning("could not drop the run's ledger records (they only take space; the next run of this "
                        "directory drops them)", reason=str(failure) or type(failure).__name__)  # fmt: skip

    async def _count_patterns(self, backend: KatoBackend) -> None:
        """The distinct patterns in each node at the end, for the summary; where a server cannot say, none."""
        node_ids = self.config.node_ids()
        try:
            with anyio.fail_after(30):
                counts = await backend.pattern_counts(node_ids)
        except (Transient, KatoRejected, TimeoutError, OSError) as failure:
            log.warning("could not count the patterns stored (the summary leaves them out)",
                        reason=str(failure) or type(failure).__name__)  # fmt: skip
            return
        if counts is not None:
            self.stats.distinct_patterns_per_level = [counts[node_id] for node_id in node_ids]

    def summary(self) -> RunSummary:
        """What the run has done so far (the final summary once ``run`` returned)."""
        return RunSummary(self.describe(), self.stats)

    def stop(self) -> None:
        """Stop reading; samples already being learned finish (bounded by the drain timeout)."""
        if not self.stopping:
            self.stopping = True
            self.stats.stopped_early = True
            self._intake.cancel()
            self._workers.deadline = anyio.current_time() + self.config.drain_timeout

    def cancel(self) -> None:
        """Stop now: samples being learned are cut off (their progress is kept, and the next run redoes them)."""
        self.stop()
        self._workers.cancel()

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for received in signals:
                if self.stopping:
                    log.warning("second signal: stopping now", signal=received.name)
                    self._workers.cancel()
                    return
                log.warning("stopping: no new samples; in-flight samples finish, progress is saved",
                            signal=received.name, drain_timeout_seconds=self.config.drain_timeout)  # fmt: skip
                self.stop()

    async def _report(self, backend: KatoBackend) -> None:
        assert self.on_progress is not None
        while True:
            self.stats.requests = backend.requests
            self.on_progress(self.stats)
            await anyio.sleep(self.progress_interval)

    async def _produce(self, source: Source, tokenizer: Tokenizer, progress: Progress, resume_points: dict[int, list[int]],
                       send: MemoryObjectSendStream[list[SamplePlan]], load_tokens: int) -> None:  # fmt: skip
        """Reads, screens and plans samples, and queues them: one at a time, or (``load_tokens``) as loads of up to
        that many tokens."""
        config = self.config
        source.counts_dir = config.counts_dir or (Path(config.data_dir) if config.kato_url is None else progress.run_dir) / "file-counts"
        events = source.events(skip=config.skip, max_samples=config.max_samples, shard=config.shard)
        planners = Planners(tokenizer, config.hierarchy.chunk_sizes,
                            default_planners() if config.planners is None else config.planners)
        wanted = set(progress.failed) if config.retry_failed else None  # with --retry-failed, the samples to redo
        interrupted, partly_stored = set(progress.interrupted), progress.partly_stored()

        def seen(index: int) -> bool:  # its record must be unchanged (see _check_unchanged)
            return index in progress.done or index in interrupted or index in partly_stored

        planning: deque[tuple[list[Sample], Awaitable[list[Planned]]]] = deque()  # read, being planned
        pending: list[SamplePlan] = []  # planned, not yet sent as a load
        oldest = 0.0  # when the first of them was planned
        exhausted = False
        try:
            with self._intake:
                async with send:
                    while planning or not exhausted:
                        if not exhausted and len(planning) < planners.ahead:
                            batch = await anyio.to_thread.run_sync(_take, events, config.read_batch * planners.scale)
                            exhausted = not batch
                            samples = self._screen(batch, progress, source.label, seen, wanted)
                            if samples:
                                planning.append((samples, planners.plan([sample.text for sample in samples])))
                            continue
                        samples, planned = planning.popleft()
                        plans = [SamplePlan(sample.index, tokens, levels, {"source": source.label, "sample_index": sample.index,
                                                                           **sample.fields},
                                            start=resume_points.get(sample.index, []), digest=sample.digest)
                                 for sample, (tokens, levels) in zip(samples, await planned, strict=True)]  # fmt: skip
                        if not load_tokens:
                            for plan in plans:
                                await self._enqueue(send, [plan])
                            continue
                        if not pending:
                            oldest = time.monotonic()
                        pending += plans
                        while pending:
                            count, tokens = _cut(pending, load_tokens)
                            # A load is sent when full (small loads cost far more per token), or when what is
                            # pending has waited LOAD_WAIT seconds (a slow source still shows progress).
                            if count == len(pending) and tokens < load_tokens and time.monotonic() - oldest < LOAD_WAIT:
                                break
                            await self._enqueue(send, pending[:count])
                            del pending[:count]
                            oldest = time.monotonic()
                    if pending:  # the source ended with a load not full
                        await self._enqueue(send, pending)
        finally:
            for _, planned in planning:
                if inspect.iscoroutine(planned):
                    planned.close()  # never started (a stop or an error): nothing to wait for
            planners.close()

    def _screen(self, batch: list[SourceEvent], progress: Progress, label: str, seen: Callable[[int], bool],
                wanted: set[int] | None) -> list[Sample]:  # fmt: skip
        """Count what was read and record what failed or is skipped; the samples left to learn."""
        stats = self.stats
        _check_unchanged(batch, seen, progress, label)
        samples = []
        metrics.SAMPLES_READ.inc(len(batch))
        for event in batch:
            stats.samples_read += 1
            if isinstance(event, Filtered):
                stats.samples_filtered += 1
                metrics.SAMPLES_FILTERED.inc()
            elif event.index in progress.done or (wanted is not None and event.index not in wanted):
                stats.skipped += 1
                metrics.SAMPLES_SKIPPED.inc()
            elif isinstance(event, Sample):
                samples.append(event)
            elif isinstance(event, BadRecord):
                stats.fail(event.index, event.reason)
                progress.fail(event.index, event.reason)
        return samples

    async def _enqueue(self, send: MemoryObjectSendStream[list[SamplePlan]], plans: list[SamplePlan]) -> None:
        await send.send(plans)
        self._queued += len(plans)
        metrics.QUEUE_DEPTH.inc(len(plans))

    def _dequeued(self, plans: list[SamplePlan]) -> None:
        self._queued -= len(plans)
        metrics.QUEUE_DEPTH.dec(len(plans))

    async def _work(self, worker: Worker, progress: Progress, backend: KatoBackend,
                    receive: MemoryObjectReceiveStream[list[SamplePlan]]) -> None:  # fmt: skip
        structlog.contextvars.bind_contextvars(worker=worker.number)  # this task's events, and its level tasks'
        try:
            await worker.open()
            async with receive:
                async for plans in receive:
                    self._dequeued(plans)
                    for plan in plans:
                        if self.stopping:
                            return  # queued, not started: left for the next run
                        progress.started([(plan.index, plan.digest)])
                        started = time.perf_counter()
                        with metrics.IN_FLIGHT.track_inprogress(), metrics.WORKERS_BUSY.track_inprogress():
                            outcome = await worker.learn(plan)
                        await self._settle([plan], [outcome], progress, backend, time.perf_counter() - started)
        except BaseException as error:
            if isinstance(find_ingest_error(error), KatoUnavailable):
                self._server_unusable = True  # (the other workers are cancelled after this one's cleanup)
            raise
        finally:
            # Sessions are deleted as a courtesy (they would expire with their TTL): briefly if the server was just
            # found unusable for --patience, so that the run's exit does not wait on it once more per session.
            with anyio.CancelScope(shield=True), anyio.move_on_after(2 if self._server_unusable else 10):
                await worker.close()

    async def _load(self, loader: Loader, progress: Progress, backend: KatoBackend,
                    receive: MemoryObjectReceiveStream[list[SamplePlan]]) -> None:  # fmt: skip
        async with receive:
            async for plans in receive:
                self._dequeued(plans)
                if self.stopping:
                    return  # queued, not started: left for the next run
                progress.started([(plan.index, plan.digest) for plan in plans])
                started = time.perf_counter()
                metrics.IN_FLIGHT.inc(len(plans))
                try:
                    with metrics.WORKERS_BUSY.track_inprogress():
                        outcomes = await loader.learn(plans)
                finally:
                    metrics.IN_FLIGHT.dec(len(plans))
                await self._settle(plans, outcomes, progress, backend, time.perf_counter() - started)

    async def _settle(self, plans: list[SamplePlan], outcomes: list[SampleOutcome], progress: Progress,
                      backend: KatoBackend, seconds: float) -> None:  # fmt: skip
        """Record what learning these samples did: progress first (one commit), then the run's counts."""
        stats = self.stats
        finished: list[tuple[int, int, list[int]]] = []
        learned: list[SamplePlan] = []
        for plan, outcome in zip(plans, outcomes, strict=True):
            stats.learned(outcome)
            # Chunks progress learns of now: all stored, but what an earlier failure of it recorded.
            earlier = progress.failed[plan.index].stored if plan.index in progress.failed else []
            confirmed = [max(0, stored - (earlier[level] if level < len(earlier) else 0))
                         for level, stored in enumerate(outcome.stored)]  # fmt: skip
            if outcome.rejection is not None:
                stats.fail(plan.index, outcome.rejection)
                progress.fail(plan.index, outcome.rejection, outcome.stored, confirmed, plan.digest)
                continue
            finished.append((plan.index, plan.digest, confirmed))
            learned.append(plan)
        if not learned:
            return
        progress.finished(finished)
        tokens = sum(plan.token_count for plan in learned)
        for _ in learned:
            metrics.SAMPLE_SECONDS.observe(seconds)
        stats.samples_learned += len(learned)
        stats.tokens += tokens
        metrics.SAMPLES_LEARNED.inc(len(learned))
        metrics.TOKENS.inc(tokens)
        if backend.ledger:
            self._settled += [plan.index for plan in learned]
            if len(self._settled) >= _FORGET_BATCH:
                await self._forget_done(backend, progress.run_key)

    async def _forget_done(self, backend: KatoBackend, run_key: str) -> None:
        """Drop the ledger records of samples recorded as done (they are never sent again); keeps a long
        run's ledger small. A failure only leaves them for the end of the run."""
        settled, self._settled = self._settled, []
        try:
            await backend.ledger_forget(run_key, samples=settled)
        except (Transient, KatoRejected) as failure:
            log.warning("could not drop ledger records; retried at the end of the run", reason=str(failure))


async def run_async(config: RunConfig, *, on_progress: Callable[[RunStats], None] | None = None,
                    handle_signals: bool = False) -> RunSummary:  # fmt: skip
    """Run the pipeline in the current event loop (for notebooks: ``await ingestd.run_async(...)``).

    With ``handle_signals`` (the CLI), SIGINT/SIGTERM stop reading and let in-flight samples finish;
    a second signal stops at once. Either way progress is saved and the next run resumes.
    """
    return await Pipeline(config, on_progress=on_progress, handle_signals=handle_signals).run()
