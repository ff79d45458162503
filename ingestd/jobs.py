"""The daemon's jobs: submitted runs, stored durably, run a few at a time, resumed after a restart.

A job is a :class:`JobSpec` (what to learn, into which hierarchy, on which KATO) plus its state. Each job
has its own run directory under ``<state dir>/runs/<job id>``, so a job interrupted by a restart (or a
crash) resumes from its recorded progress like ``ingestd run`` does.
"""

from __future__ import annotations

import contextlib
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import anyio
import orjson
import structlog
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ingestd import metrics
from ingestd.backend import check_kato_url
from ingestd.errors import IngestError, find_ingest_error, first_cause
from ingestd.hierarchy import MAX_LEVELS, Hierarchy, HierarchyError
from ingestd.pipeline import MAX_BATCH_CHUNKS, MAX_PARALLEL_BATCHES, MAX_WORKERS, Pipeline, RunConfig
from ingestd.retry import RetryPolicy
from ingestd.source import MAX_COUNT, MAX_TEXT_CHARS, MIN_CHARS, SourceError, SourceSpec

log = structlog.get_logger("ingestd.jobs")


class JobRefused(IngestError):
    """The job reaches outside what this daemon lets jobs touch."""


State = Literal["queued", "running", "succeeded", "failed", "cancelled"]
STATES: tuple[State, ...] = ("queued", "running", "succeeded", "failed", "cancelled")

CHECKPOINT_SECONDS = 2.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    spec BLOB NOT NULL,
    state TEXT NOT NULL,
    retry_failed INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    summary BLOB,
    error TEXT
);
"""


class JobSpec(BaseModel):
    """What a client submits (``POST /jobs``); the same choices as ``ingestd run``'s flags. A field this version
    does not know is refused, not ignored: a misspelled option must not run a job with its default."""

    model_config = ConfigDict(extra="forbid")

    source: str | list[str] = Field(description="A dataset key, a hub name, or local paths (a file, directory or "
                                    "glob, or a list of them) as the daemon sees them.")  # fmt: skip
    text_field: str | None = None
    metadata_fields: list[str] = []
    source_label: str | None = Field(default=None, validation_alias=AliasChoices("source_label", "label"),
                                     description="metadata 'source' (default: dataset key or file name).")  # fmt: skip
    txt_mode: Literal["line", "paragraph"] = "paragraph"
    hub_config: str | None = None
    split: str | None = None
    hierarchy: dict[str, Any] | None = Field(default=None, description="A hierarchy file's content (levels, "
                                             "node_id_template, [run]); instead of chunk_sizes/metadata_levels/node_ids.")  # fmt: skip
    # Without a hierarchy: 8,8,8,8, no metadata, node{level} (None, so that a stored job says what was given).
    chunk_sizes: list[int] | None = Field(default=None, min_length=1, max_length=MAX_LEVELS)
    metadata_levels: list[int] | None = None
    node_ids: str | None = None
    run_id: str = ""
    kato_url: str | None = Field(default=None, description="A KATO server; None = the daemon's embedded engine.")
    workers: int = Field(default=16, ge=1, le=MAX_WORKERS)
    planners: int | None = Field(default=None, ge=0, le=64, description="Processes that tokenize and plan "
                                 "(default: one per core beyond the first).")  # fmt: skip
    tokenizer: str = "gpt2"
    skip: int = Field(default=0, ge=0, le=MAX_COUNT)
    max_samples: int | None = Field(default=None, ge=0, le=MAX_COUNT)
    min_chars: int | None = Field(default=None, ge=0, le=MAX_COUNT, description="Shorter samples (stripped) are "
                                  "filtered; 0 keeps all (default 11, or the hierarchy's [run] min_chars).")  # fmt: skip
    max_sample_chars: int = Field(default=MAX_TEXT_CHARS, ge=1, le=MAX_COUNT, description="Longer samples fail alone.")
    allow_mixed_kb: bool = Field(default=False, description="Feed nodes another level, chunk size or tokenizer fed.")
    fresh: bool = Field(default=False, description="clear-all the job's nodes before its first start (never on a resume).")
    batch_chunks: int = Field(default=64, ge=1, le=MAX_BATCH_CHUNKS)
    parallel_batches: int = Field(default=4, ge=1, le=MAX_PARALLEL_BATCHES)
    batching: bool = True
    bulk_load: bool = True
    durability: Literal["full", "normal"] = "full"
    patience: float = Field(default=600.0, gt=0, description="Seconds a KATO may stay unusable before the job fails.")
    request_timeout: float = Field(default=120.0, gt=0, description="Seconds to wait for one answer before resending.")

    @field_validator("kato_url")
    @classmethod
    def _kato_url(cls, url: str | None) -> str | None:
        return None if url is None else check_kato_url(url)

    @model_validator(mode="after")
    def _hierarchy_is_valid(self) -> JobSpec:
        self.built_hierarchy()  # refused at submission (422), not when the job starts
        return self

    def built_hierarchy(self) -> Hierarchy:
        shape = {name for name in ("chunk_sizes", "metadata_levels", "node_ids") if getattr(self, name) is not None}
        try:
            if self.hierarchy is not None:
                if shape:
                    raise HierarchyError(f"give hierarchy or {', '.join(sorted(shape))}, not both")
                hierarchy = Hierarchy.from_mapping(self.hierarchy)
            else:
                hierarchy = Hierarchy.from_chunk_sizes(self.chunk_sizes or [8, 8, 8, 8], set(self.metadata_levels or ()),
                                                       self.node_ids or "node{level}")  # fmt: skip
            hierarchy.validate_usable(self.run_id)
        except HierarchyError as error:
            raise ValueError(str(error)) from None
        return hierarchy

    def run_config(self, state_dir: Path, job_id: str, *, retry_failed: bool, drain_timeout: float) -> RunConfig:
        hierarchy = self.built_hierarchy()
        min_chars = self.min_chars if self.min_chars is not None else hierarchy.run_options.get("min_chars", MIN_CHARS)
        source = SourceSpec(source=self.source if isinstance(self.source, str) else tuple(self.source), text_field=self.text_field, hub_config=self.hub_config,
                            split=self.split, txt_mode=self.txt_mode, metadata_fields=tuple(self.metadata_fields),
                            label=self.source_label, min_chars=min_chars, max_chars=self.max_sample_chars)  # fmt: skip
        run_dir = state_dir / "runs" / job_id
        # --fresh clears the nodes when the job first starts; a resumed job goes on from its progress
        fresh = self.fresh and not (run_dir / "progress.sqlite3").exists()
        return RunConfig(source=source, hierarchy=hierarchy, tokenizer=self.tokenizer, workers=self.workers,
                         planners=self.planners, batch_chunks=self.batch_chunks, batching=self.batching,
                         parallel_batches=self.parallel_batches, bulk_load=self.bulk_load,
                         durability=self.durability, fresh=fresh,
                         retry=RetryPolicy(patience=self.patience, request_timeout=self.request_timeout),
                         kato_url=self.kato_url, data_dir=state_dir / "kato-data", run_id=self.run_id,
                         skip=self.skip, max_samples=self.max_samples, run_dir=run_dir,
                         retry_failed=retry_failed, drain_timeout=drain_timeout, allow_mixed_kb=self.allow_mixed_kb,
                         node_registry=state_dir / "kato-nodes.sqlite3")  # fmt: skip


class JobPolicy:
    """What a job may touch: sources under the configured folders (or on the hub), and the configured KATO servers.

    A job's source is read by the daemon and its text sent to its KATO: without this, a token holder could
    have the daemon read any file it can read and send it to any address it can reach.
    """

    def __init__(self, source_roots: list[Path], kato_urls: list[str]) -> None:
        self.source_roots = [root.resolve() for root in source_roots]
        self.kato_urls = {check_kato_url(url) for url in kato_urls}

    def refusal(self, spec: JobSpec) -> tuple[str, str] | None:
        """(field, why) if the job reaches outside what it may; None if it may run."""
        try:
            source = SourceSpec(source=spec.source if isinstance(spec.source, str) else tuple(spec.source))
            if source.is_local:
                # each entry first (so that nothing is looked up outside the folders: no oracle for the host's
                # files), then each file it names now (a symlink in a folder may point out of it)
                outside = self._outside((entry, Path(entry).expanduser().resolve()) for entry in source.sources)
                if outside is None:
                    outside = self._outside((str(file), file.resolve()) for file in source.local_files())
                if outside is not None:
                    roots = ":".join(str(root) for root in self.source_roots) or "none: hub datasets only"
                    return "source", (f"the source {outside!r} is outside the folders jobs may read ({roots}): put "
                                      "it there, or widen INGESTD_SOURCE_ROOTS")  # fmt: skip
        except (SourceError, OSError, RuntimeError) as error:
            return "source", str(error)
        tokenizer = self._local_tokenizer(spec.tokenizer)
        if tokenizer is not None and not self._readable(tokenizer):
            return "tokenizer", (f"the tokenizer {spec.tokenizer!r} is a folder outside the folders jobs may read: "
                                 "put it under INGESTD_SOURCE_ROOTS, or give 'gpt2' or a cached model's name")  # fmt: skip
        if spec.kato_url is not None and spec.kato_url not in self.kato_urls:
            allowed = ", ".join(sorted(self.kato_urls)) or "none"
            return "kato_url", (f"{spec.kato_url} is not a KATO server this daemon may use (INGESTD_KATO_URLS: "
                                f"{allowed}): add it there, or leave kato_url out for the embedded engine")  # fmt: skip
        return None

    def _outside(self, paths: Iterable[tuple[str, Path]]) -> str | None:
        """The first of (name, resolved path) that lies outside the folders jobs may read, or None."""
        return next((name for name, path in paths if not self._readable(path)), None)

    def _readable(self, path: Path) -> bool:
        """``path`` (resolved) lies under one of the folders jobs may read."""
        return any(path.is_relative_to(root) for root in self.source_roots)

    @staticmethod
    def _local_tokenizer(name: str) -> Path | None:
        """The folder a tokenizer name points at, if it is a path (not 'gpt2' nor a model name in the cache)."""
        try:
            path = Path(name).expanduser()
            if name.startswith(("/", ".", "~")) or "\0" in name or path.exists():
                return path.resolve()
        except (OSError, RuntimeError, ValueError):
            return Path("/")  # not a name: judged as a path outside every root
        return None


def check_job_store(state_dir: Path) -> None:
    """Refuse, with one line, a state directory whose job store cannot be used (before the daemon starts)."""
    path = state_dir / "jobs.sqlite3"
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(sqlite3.connect(path, timeout=5.0)) as connection:
            connection.executescript(_SCHEMA)
            connection.execute("SELECT count(*) FROM jobs").fetchone()
    except (OSError, sqlite3.Error) as error:
        raise IngestError(
            f"the job store {path} cannot be used ({error}): move it away (its jobs are then forgotten; their run "
            "directories stay) or give another --state-dir"
        ) from None


class JobManager:
    """Jobs in ``<state dir>/jobs.sqlite3``; at most ``max_jobs`` run at once in this event loop."""

    def __init__(self, state_dir: Path, *, max_jobs: int, drain_timeout: float, policy: JobPolicy,
                 on_fatal: Callable[[], None] = lambda: None) -> None:  # fmt: skip
        self.state_dir = Path(state_dir)
        self.policy = policy
        self.max_jobs = max_jobs
        self.drain_timeout = drain_timeout
        self.failed = False  # the runner itself failed: the daemon must restart
        self._on_fatal = on_fatal
        self._aborting = False
        self._db: sqlite3.Connection | None = None
        self._running: dict[str, tuple[Pipeline, anyio.CancelScope]] = {}
        self._live: dict[str, Pipeline] = {}
        self._cancelled: set[str] = set()
        self._wake = anyio.Event()
        self._shutting_down = False

    # -- lifecycle ---------------------------------------------------------------------------
    def open(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.state_dir / "jobs.sqlite3", isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        resumed = self._db.execute("UPDATE jobs SET state = 'queued' WHERE state = 'running'").rowcount
        if resumed:
            log.warning("resuming jobs interrupted by the last stop", jobs=resumed)
        self._update_gauges()

    async def run(self) -> None:
        """Start queued jobs whenever a slot is free, until cancelled.

        A job's failure or crash ends only that job (see :meth:`_run_job`); anything escaping it (the job
        store failing) stops the runner, marks it failed and calls ``on_fatal``: the jobs resume at the next start.
        """
        try:
            async with anyio.create_task_group() as group:
                while True:
                    while len(self._running) < self.max_jobs and not self._shutting_down:
                        job_id = self._next_queued()
                        if job_id is None:
                            break
                        scope = anyio.CancelScope()
                        self._running[job_id] = (None, scope)  # type: ignore[assignment] - filled in by _run_job
                        group.start_soon(self._run_job, job_id, scope)
                    self._wake = anyio.Event()
                    await self._wake.wait()
        except Exception:  # noqa: BLE001 - reported, and the daemon stops so that its supervisor restarts it
            self.failed = True
            log.exception("the job runner failed; stopping the daemon (jobs resume at the next start)")
            self._on_fatal()

    def abort(self) -> None:
        """A second signal: stop waiting for in-flight samples (called from a signal handler: only sets a flag)."""
        self._aborting = True

    async def shutdown(self) -> None:
        """Drain running jobs (SIGTERM): they stop reading, finish in-flight samples, and resume next start."""
        self._shutting_down = True
        for pipeline, _ in list(self._running.values()):
            if pipeline is not None:
                pipeline.stop()
        with anyio.move_on_after(self.drain_timeout + 5):
            while self._running and not self._aborting:
                await anyio.sleep(0.05)
        for _, scope in list(self._running.values()):
            scope.cancel()
        with anyio.move_on_after(15):  # cancelled jobs record their state before the store closes
            while self._running:
                await anyio.sleep(0.05)
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- the API's operations ----------------------------------------------------------------
    def submit(self, spec: JobSpec) -> dict[str, Any]:
        job_id = secrets.token_hex(6)
        self._execute("INSERT INTO jobs (id, spec, state, created_at) VALUES (?, ?, 'queued', ?)",
                      (job_id, spec.model_dump_json().encode(), time.time()))  # fmt: skip
        log.info("job submitted", job_id=job_id, source=spec.source)
        self._changed()
        return self.get(job_id)  # type: ignore[return-value]

    def all(self, *, offset: int = 0, limit: int = 100) -> tuple[list[dict[str, Any]], int]:
        """A page of jobs, oldest first, and how many there are in all."""
        total = self._query("SELECT count(*) FROM jobs")[0][0]
        rows = self._query("SELECT id FROM jobs ORDER BY created_at, id LIMIT ? OFFSET ?", (limit, offset))
        return [job for (job_id,) in rows if (job := self.get(job_id)) is not None], total

    def get(self, job_id: str) -> dict[str, Any] | None:
        rows = self._query("SELECT id, spec, state, retry_failed, created_at, started_at, finished_at, summary, error "
                           "FROM jobs WHERE id = ?", (job_id,))  # fmt: skip
        if not rows:
            return None
        job_id, spec, state, retry_failed, created, started, finished, summary, error = rows[0]
        live = self._live.get(job_id)
        if live is not None:
            summary = live.summary().as_dict()
        elif summary is not None:
            summary = orjson.loads(summary)
        return {"id": job_id, "state": state, "spec": orjson.loads(spec), "retry_failed": bool(retry_failed),
                "created_at": created, "started_at": started, "finished_at": finished, "progress": summary,
                "error": error}  # fmt: skip

    def cancel(self, job_id: str) -> dict[str, Any] | None:
        job = self.get(job_id)
        if job is None:
            return None
        if job["state"] == "queued":
            self._set_state(job_id, "cancelled", finished_at=time.time())
        elif job["state"] == "running":
            self._cancelled.add(job_id)
            pipeline, scope = self._running[job_id]
            if pipeline is not None:
                pipeline.stop()  # in-flight samples finish (bounded); progress stays for a retry
            else:
                scope.cancel()
        return self.get(job_id)

    def resume(self, job_id: str) -> dict[str, Any] | None:
        """Queue a failed or cancelled job again; it continues from its progress (learned samples are skipped)."""
        return self._requeue(job_id, from_states=("failed", "cancelled"), retry_failed=False)

    def retry_failed(self, job_id: str) -> dict[str, Any] | None:
        """Queue a finished job again to redo only the samples it recorded as failed."""
        return self._requeue(job_id, from_states=("succeeded", "failed", "cancelled"), retry_failed=True)

    def _requeue(self, job_id: str, *, from_states: tuple[State, ...], retry_failed: bool) -> dict[str, Any] | None:
        job = self.get(job_id)
        if job is None or job["state"] not in from_states:
            return job
        self._execute("UPDATE jobs SET state = 'queued', retry_failed = ?, error = NULL WHERE id = ?",
                      (int(retry_failed), job_id))  # fmt: skip
        self._changed()
        return self.get(job_id)

    def ready(self) -> tuple[bool, str]:
        try:
            self._query("SELECT 1")
        except (sqlite3.Error, AssertionError) as error:
            return False, f"job store unusable: {error}"
        return True, "ok"

    def kato_urls(self) -> set[str]:
        """The KATO servers of queued and running jobs (for readiness)."""
        rows = self._query("SELECT spec FROM jobs WHERE state IN ('queued', 'running')")
        return {url for (spec,) in rows if (url := orjson.loads(spec).get("kato_url"))}

    # -- running one job ---------------------------------------------------------------------
    async def _run_job(self, job_id: str, scope: anyio.CancelScope) -> None:
        """Run one job to its end state. Nothing a job does, not even a bug, stops the others or the daemon."""
        pipeline: Pipeline | None = None
        state: State = "failed"
        error: str | None = None
        with structlog.contextvars.bound_contextvars(job_id=job_id):
            try:
                job = self.get(job_id)
                assert job is not None
                spec = JobSpec.model_validate(job["spec"])
                refusal = self.policy.refusal(spec)  # again: a symlink or a setting may have changed since
                if refusal is not None:
                    raise JobRefused(refusal[1])
                config = spec.run_config(self.state_dir, job_id, retry_failed=job["retry_failed"],
                                         drain_timeout=self.drain_timeout)  # fmt: skip
                pipeline = Pipeline(config)
                self._running[job_id] = (pipeline, scope)
                self._live[job_id] = pipeline
                self._set_state(job_id, "running", started_at=time.time())
                log.info("job started", source=spec.source, kato=spec.kato_url or "embedded")
                with scope:
                    async with anyio.create_task_group() as group:
                        group.start_soon(self._checkpoint, job_id, pipeline)
                        await pipeline.run()
                        group.cancel_scope.cancel()
                if self._shutting_down and job_id not in self._cancelled:
                    state = "queued"  # drained by a stop: resumes at the next start
                elif job_id in self._cancelled or scope.cancelled_caught:
                    state = "cancelled"
                elif pipeline.stats.samples_failed:
                    state, error = "succeeded", f"{pipeline.stats.samples_failed} samples failed (retry-failed redoes them)"
                else:
                    state = "succeeded"
            except ValidationError as invalid:  # stored by an older ingestd, or edited: not a job this one can run
                error = f"the stored job is not valid for this ingestd: {invalid.errors()[0]['msg']}; submit it again"
                log.error("job cannot run", error=error)
            except Exception as failure:  # noqa: BLE001 - a job's crash must not take the daemon down
                found = find_ingest_error(failure)
                if found is not None:
                    error = f"{found} [`ingestd jobs resume {job_id}` continues the job from its progress]"
                else:
                    leaf = first_cause(failure)
                    error = f"ingestd crashed on this job ({type(leaf).__name__}: {leaf}); the daemon's log has the traceback"
                    log.exception("job crashed")
            finally:
                summary = None if pipeline is None else orjson.dumps(pipeline.summary().as_dict())
                self._live.pop(job_id, None)
                self._running.pop(job_id, None)
                self._cancelled.discard(job_id)
                if self._db is not None:
                    finished = None if state == "queued" else time.time()
                    self._execute("UPDATE jobs SET state = ?, finished_at = ?, summary = ?, error = ? WHERE id = ?",
                                  (state, finished, summary, error, job_id))  # fmt: skip
                    self._changed()
                log.info("job ended", state=state, error=error)

    async def _checkpoint(self, job_id: str, pipeline: Pipeline) -> None:
        """Store a running job's progress every few seconds, so even a killed daemon shows where it was."""
        while True:
            await anyio.sleep(CHECKPOINT_SECONDS)
            try:
                self._execute("UPDATE jobs SET summary = ? WHERE id = ?",
                              (orjson.dumps(pipeline.summary().as_dict()), job_id))  # fmt: skip
            except sqlite3.Error as error:  # the job goes on; its end state is written when it ends
                log.warning("could not store the job's progress", error=str(error))

    # -- storage -----------------------------------------------------------------------------
    def _next_queued(self) -> str | None:
        rows = self._query("SELECT id FROM jobs WHERE state = 'queued' ORDER BY created_at")
        return next((job_id for (job_id,) in rows if job_id not in self._running), None)

    def _set_state(self, job_id: str, state: State, **times: float) -> None:
        assignments = "".join(f", {column} = ?" for column in times)
        self._execute(f"UPDATE jobs SET state = ?{assignments} WHERE id = ?", (state, *times.values(), job_id))
        self._changed()

    def _changed(self) -> None:
        self._update_gauges()
        self._wake.set()

    def _update_gauges(self) -> None:
        counts = dict(self._query("SELECT state, count(*) FROM jobs GROUP BY state"))
        for state in STATES:
            metrics.JOBS.labels(state).set(counts.get(state, 0))

    def _execute(self, sql: str, parameters: tuple[Any, ...] = ()) -> None:
        assert self._db is not None, "the job store is closed"
        self._db.execute(sql, parameters)

    def _query(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        assert self._db is not None, "the job store is closed"
        return self._db.execute(sql, parameters).fetchall()

