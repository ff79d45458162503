"""The ``ingestd`` command: a thin layer over functions a notebook can call too."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ingestd import __version__
from ingestd.errors import IngestError, find_ingest_error
from ingestd.kb.cli import inspect_app
from ingestd.settings import Settings
from ingestd.source import MAX_COUNT

app = typer.Typer(
    help="ingestd streams text corpora into a KATO hierarchy, fast and exactly.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_show_locals=False,
)
kato_app = typer.Typer(
    help="The embedded KATO 3.10.1-compatible engine.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(kato_app, name="kato")
jobs_app = typer.Typer(help="Talk to a running daemon (`ingestd serve`): submit, list, show, cancel jobs.",
                       no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]})  # fmt: skip
app.add_typer(jobs_app, name="jobs")
app.add_typer(inspect_app, name="inspect")
runs_app = typer.Typer(help="The run catalogue: what each run was, and how it went (<run dir>/manifest.json).",
                       no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]})  # fmt: skip
app.add_typer(runs_app, name="runs")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ingestd {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = None,
) -> None:
    """ingestd streams text corpora into a KATO hierarchy, fast and exactly."""


def _overrides(**values: Any) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


@kato_app.command("serve")
def kato_serve(
    host: Annotated[Optional[str], typer.Option(help="Address to bind (default 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port to listen on (default 8000).")] = None,
    data: Annotated[
        Optional[Path], typer.Option("--data-dir", "--data", help="Directory of the knowledge store (default ./kato-data).")
    ] = None,
    durability: Annotated[
        Optional[str],
        typer.Option(help="full: fsync every commit (default). normal: survive kill -9 and restarts, not power loss."),
    ] = None,
    persistence: Annotated[Optional[int], typer.Option(help="KATO's PERSISTENCE, emotives kept per pattern (default 5).")] = None,
    session_ttl: Annotated[Optional[int], typer.Option(help="KATO's SESSION_TTL in seconds (default 3600).")] = None,
    workers: Annotated[Optional[int], typer.Option(min=1, max=256, help="Server processes over the one store, as uvicorn's --workers (KATO's image: one per core); exact under any concurrency. Default 1.")] = None,
    limit_concurrency: Annotated[Optional[int], typer.Option(min=2, help="Answer 503 beyond this many connections and requests at once (each request counts with its connection), per process, as uvicorn's --limit-concurrency (KATO's image: 100 per worker). Default: no limit.")] = None,
    cpu_per_request_ms: Annotated[Optional[float], typer.Option(min=0, max=10_000, help="Spend this much CPU on every request before serving it, as a stand-in for a real KATO's speed (KATO 3.10.1: about 4 ms). Default 0.", rich_help_panel="Standing in for a KATO")] = None,
    cpu_per_symbol_ms: Annotated[Optional[float], typer.Option(min=0, max=10_000, help="... and this much per observed symbol (KATO 3.10.1: about 3 ms). Default 0.", rich_help_panel="Standing in for a KATO")] = None,
) -> None:
    """Serve KATO 3.10.1's HTTP API from the embedded engine, storing knowledge bases in --data-dir.

    Sessions and knowledge bases are durable: a restart (even kill -9) loses no
    acknowledged learn, and sessions that have not expired survive it.
    """
    from ingestd.engine.serve import serve

    settings = Settings()
    server = settings.server.model_validate(
        {**settings.server.model_dump(), **_overrides(
            host=host, port=port, data_dir=data, durability=durability, persistence=persistence,
            session_ttl=session_ttl, limit_concurrency=limit_concurrency, workers=workers,
            cpu_per_request_ms=cpu_per_request_ms, cpu_per_symbol_ms=cpu_per_symbol_ms)}
    )  # fmt: skip
    serve(server)


_LOG_FORMAT = Annotated[Optional[str], typer.Option(help="json, console, or auto (JSON unless stderr is a terminal); INGESTD_LOG_FORMAT.", show_default=False)]
_LOG_LEVEL = Annotated[Optional[str], typer.Option(help="debug, info, warning or error (INGESTD_LOG_LEVEL, default info).", show_default=False)]


def _settings(**flags: Any) -> Settings:
    """Settings from the environment, overridden by the flags given; logging configured from them."""
    from pydantic import ValidationError

    from ingestd.logs import configure_logging

    try:
        settings = Settings(**_overrides(**flags))
    except ValidationError as error:
        problem = error.errors()[0]
        name = str(problem["loc"][0])
        raise typer.BadParameter(f"{problem['input']!r}: {problem['msg']}", param_hint=f"--{name.replace('_', '-')}") from None
    configure_logging(settings.log_format, settings.log_level)
    return settings


def _kato_url(url: str | None) -> str | None:
    from ingestd.backend import check_kato_url

    try:
        return None if url is None else check_kato_url(url)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--kato-url") from None


def _kato_urls(text: str | None) -> list[str]:
    """``--kato-url`` as ``ingestd run`` takes it: one server, or several separated by commas."""
    from ingestd.backend import check_kato_urls

    try:
        return [] if text is None else check_kato_urls(text)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--kato-url") from None


def _int_list(text: str | None, what: str) -> list[int]:
    """``8,8,8`` → [8, 8, 8]; an empty item (``8,,8``) or anything not a whole number is refused."""
    if not text:
        return []
    parts = [part.strip() for part in text.split(",")]
    if any(not part.isdigit() for part in parts):
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of whole numbers, e.g. 8,8,8,8",
                                 param_hint=what)  # fmt: skip
    if any(len(part) > 9 for part in parts):
        raise typer.BadParameter(f"{text!r} holds a number far too large (chunk sizes go up to 4096)", param_hint=what)
    return [int(part) for part in parts]


# Options of `ingestd run` that `ingestd jobs submit` takes too: one declaration, one name and one help text.
_TEXT_FIELD = Annotated[Optional[str], typer.Option(help="Field with the text (default: the dataset's, else 'text').", rich_help_panel="Source")]
_METADATA_FIELDS = Annotated[Optional[str], typer.Option(help="Record fields added to the metadata, e.g. url,timestamp.", rich_help_panel="Source")]
_SOURCE_LABEL = Annotated[Optional[str], typer.Option(help="metadata 'source' (default: dataset key or file name).", rich_help_panel="Source")]
_HUB_CONFIG = Annotated[Optional[str], typer.Option(help="Hub dataset config name.", rich_help_panel="Source")]
_SPLIT = Annotated[Optional[str], typer.Option(help="Hub dataset split (default train).", rich_help_panel="Source")]
_TXT_MODE = Annotated[str, typer.Option(help="For .txt files: one sample per 'paragraph' or per 'line'.", rich_help_panel="Source")]
_MAX_SAMPLES = Annotated[Optional[int], typer.Option(min=0, max=MAX_COUNT, help="Stop after this many samples.", rich_help_panel="Source")]
_SKIP = Annotated[int, typer.Option(min=0, max=MAX_COUNT, help="Skip this many samples of the filtered stream first.", rich_help_panel="Source")]
_MAX_SAMPLE_CHARS = Annotated[int, typer.Option(min=1, max=MAX_COUNT, help="Longer samples fail alone (to failed.jsonl) instead of being learned.", rich_help_panel="Source")]
_RUN_ID = Annotated[str, typer.Option(help="Run name, available to --node-ids as {run_id}.", rich_help_panel="Hierarchy")]
_ALLOW_MIXED_KB = Annotated[bool, typer.Option("--allow-mixed-kb", help="Feed nodes that another level, chunk size or tokenizer fed (refused otherwise).", rich_help_panel="Hierarchy")]
_WORKERS = Annotated[int, typer.Option(min=1, max=1024, help="Samples learned at once through KATO's calls, each worker with its own sessions; with bulk loads (ingestd's engine), loads in flight: at most 4 served, 1 in-process.", rich_help_panel="Backend")]
_BATCH_CHUNKS = Annotated[int, typer.Option(min=1, max=4096, help="Chunks per observe-sequence on batched levels.", rich_help_panel="Backend")]
_PARALLEL_BATCHES = Annotated[int, typer.Option(min=1, max=64, help="Calls of one long sample at one level in flight at once, each on its own session, so one document keeps several KATO workers busy (levels without metadata; 1: one after another).", rich_help_panel="Backend")]
_BATCHING = Annotated[bool, typer.Option("--batching/--no-batching", help="Batch levels without metadata through KATO's auto-learn.", rich_help_panel="Backend")]
_BULK_LOAD = Annotated[bool, typer.Option("--bulk-load/--no-bulk-load", help="Store many samples per transaction (and per request) where KATO is ingestd's engine, in-process or served by `ingestd kato serve`; --no-bulk-load sends it KATO's calls, as to a KATO server.", rich_help_panel="Backend")]
_DURABILITY = Annotated[str, typer.Option(help="Embedded engine: full (fsync) or normal.", rich_help_panel="Backend")]
_PATIENCE = Annotated[float, typer.Option(min=0.1, help="Seconds to wait for a KATO that is down, per outage.", rich_help_panel="Backend")]
_REQUEST_TIMEOUT = Annotated[float, typer.Option(min=0.1, help="Seconds to wait for one answer before resending.", rich_help_panel="Backend")]
_METADATA_LEVELS = Annotated[Optional[str], typer.Option(help="Levels whose patterns get the sample's metadata, e.g. 2,3.", rich_help_panel="Hierarchy")]


@app.command("run")
def run_command(
    source: Annotated[list[str], typer.Argument(help="A dataset key (wikitext, c4, refinedweb, openwebtext, redpajama_sample, pile, dolma, bookcorpus, simple_wiki), a hub dataset name, or local .txt/.jsonl/.parquet/.csv files: a file, a directory, a glob ('data/*.parquet'), or several of them, read in the order given.")],
    text_field: _TEXT_FIELD = None,
    metadata_fields: _METADATA_FIELDS = None,
    source_label: _SOURCE_LABEL = None,
    hub_config: _HUB_CONFIG = None,
    split: _SPLIT = None,
    txt_mode: _TXT_MODE = "paragraph",
    max_samples: _MAX_SAMPLES = None,
    skip: _SKIP = 0,
    max_sample_chars: _MAX_SAMPLE_CHARS = 1_000_000,
    min_chars: Annotated[Optional[int], typer.Option(min=0, max=MAX_COUNT, help="Samples whose stripped text is shorter are filtered (counted, not learned); 0 keeps every sample. Default 11, or the hierarchy file's [run] min_chars.", show_default=False, rich_help_panel="Source")] = None,
    tokenizer: Annotated[str, typer.Option(help="'gpt2' (bundled) or a tokenizer transformers can load offline.", rich_help_panel="Source")] = "gpt2",
    hierarchy_file: Annotated[Optional[Path], typer.Option("--hierarchy", help="TOML or YAML file with the levels (overrides --chunk-sizes).", rich_help_panel="Hierarchy")] = None,
    chunk_sizes: Annotated[str, typer.Option(help="Chunk size per level, node0 first.", rich_help_panel="Hierarchy")] = "8,8,8,8",
    metadata_levels: _METADATA_LEVELS = None,
    node_ids: Annotated[str, typer.Option(help="Node id template; {level} and {run_id} are filled in.", rich_help_panel="Hierarchy")] = "node{level}",
    run_id: _RUN_ID = "",
    allow_mixed_kb: _ALLOW_MIXED_KB = False,
    patience: _PATIENCE = 600.0,
    request_timeout: _REQUEST_TIMEOUT = 120.0,
    workers: _WORKERS = 16,
    planners: Annotated[Optional[int], typer.Option(min=0, max=64, help="Processes that tokenize and plan beside learning (default: one per core beyond the first; 0: in this process).", show_default=False, rich_help_panel="Backend")] = None,
    batch_chunks: _BATCH_CHUNKS = 64,
    parallel_batches: _PARALLEL_BATCHES = 4,
    batching: _BATCHING = True,
    bulk_load: _BULK_LOAD = True,
    kato: Annotated[Optional[str], typer.Option("--kato-url", "--kato", help="A KATO server, http://host:port; several of one deployment, comma-separated, are used together (a run spreads its sessions over them; with --shards, shard I learns through the (I mod count)-th). Default: the embedded engine in-process.", rich_help_panel="Backend")] = None,
    data: Annotated[Path, typer.Option("--data-dir", "--data", help="Directory of the embedded engine's knowledge store.", rich_help_panel="Backend")] = Path("kato-data"),
    durability: _DURABILITY = "full",
    fresh: Annotated[bool, typer.Option("--fresh", help="clear-all every node's knowledge base and the run's progress first.", rich_help_panel="Run control")] = False,
    run_dir: Annotated[Optional[Path], typer.Option(help="Progress and failed.jsonl (default: <data>/runs/<run id>, or ingestd-runs/<store>/<run id> with --kato-url). A run resumes from it.", rich_help_panel="Run control")] = None,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Only redo the samples this run recorded as failed (failed.jsonl).", rich_help_panel="Run control")] = False,
    shards: Annotated[int, typer.Option(min=1, max=100_000, help="Cut the run into this many shards, run by --executor; on the embedded engine each learns into a store of its own under <data-dir>/shards, merged into --data-dir at the end.", rich_help_panel="Run control")] = 1,
    executor: Annotated[Optional[str], typer.Option(help="Where --shards run: ray (pip install \"ingestd[ray]\").", rich_help_panel="Run control")] = None,
    ray_address: Annotated[Optional[str], typer.Option(help="A Ray cluster (ray://host:10001, or auto); default: a local Ray on this machine.", rich_help_panel="Run control")] = None,
    shard: Annotated[Optional[str], typer.Option(help="Learn only this share of the source, I/N (0-based): the samples whose index modulo N is I. Give each shard its own --data-dir, then `ingestd merge` them (Slurm: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT).", rich_help_panel="Run control")] = None,
    drain_timeout: Annotated[float, typer.Option(min=0.1, help="After SIGINT/SIGTERM, seconds for in-flight samples.", rich_help_panel="Run control")] = 30.0,
    metrics_port: Annotated[Optional[int], typer.Option(min=0, max=65535, help="Serve Prometheus metrics on this port (loopback) during the run.", rich_help_panel="Output")] = None,
    summary_json: Annotated[Optional[Path], typer.Option(help="Also write the summary here as JSON.", rich_help_panel="Output")] = None,
    progress: Annotated[Optional[bool], typer.Option("--progress/--no-progress", help="Live progress bar (default: when on a terminal).", rich_help_panel="Output")] = None,
    log_format: Annotated[Optional[str], typer.Option(help="json, console, or auto (JSON unless stderr is a terminal); INGESTD_LOG_FORMAT.", show_default=False, rich_help_panel="Output")] = None,
    log_level: Annotated[Optional[str], typer.Option(help="debug, info, warning or error (INGESTD_LOG_LEVEL, default info).", show_default=False, rich_help_panel="Output")] = None,
) -> None:
    """Learn every sample of SOURCE into a KATO hierarchy, and print a summary."""
    import json
    import sys

    import anyio
    from ingestd.errors import EXIT_SAMPLES_FAILED
    from ingestd.hierarchy import Hierarchy
    from ingestd.pipeline import Pipeline, RunConfig
    from ingestd.report import ProgressBar, ProgressLog, Terminal, shard_table, summary_table
    from ingestd.retry import RetryPolicy
    from ingestd.runtime import loop_options, throughput_gc
    from ingestd.source import MIN_CHARS, SourceSpec

    _settings(log_format=log_format, log_level=log_level)
    console = Terminal()
    if txt_mode not in ("paragraph", "line"):
        raise typer.BadParameter(f"{txt_mode!r}: use 'paragraph' or 'line'", param_hint="--txt-mode")
    if durability not in ("full", "normal"):
        raise typer.BadParameter(f"{durability!r}: use 'full' or 'normal'", param_hint="--durability")
    kato_urls = _kato_urls(kato)
    # several servers of one deployment: a run's sessions are spread over them; with --shards, the shards
    kato = (",".join(kato_urls) if shards == 1 else kato_urls[0]) if kato_urls else None
    pipeline: Pipeline | None = None

    def report(result: dict[str, Any]) -> None:
        """The summary, in --summary-json and on the terminal: after a run, and after an error too."""
        if summary_json is not None:
            try:
                summary_json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            except OSError as error:
                typer.echo(f"ingestd: warning: cannot write --summary-json {summary_json} ({error.strerror})", err=True)
        if result.get("samples") is not None and (result["samples"]["read"] or result.get("error") is None):
            console.print(summary_table(result))

    try:
        if hierarchy_file is not None:
            hierarchy = Hierarchy.from_file(hierarchy_file)
        else:
            hierarchy = Hierarchy.from_chunk_sizes(_int_list(chunk_sizes, "--chunk-sizes"),
                                                   set(_int_list(metadata_levels, "--metadata-levels")), node_ids)
        spec = SourceSpec(source=tuple(source), text_field=text_field, hub_config=hub_config, split=split,
                          txt_mode=txt_mode,  # type: ignore[arg-type]
                          metadata_fields=tuple(f.strip() for f in (metadata_fields or "").split(",") if f.strip()),
                          label=source_label, max_chars=max_sample_chars,
                          min_chars=min_chars if min_chars is not None else hierarchy.run_options.get("min_chars", MIN_CHARS))
        config = RunConfig(source=spec, hierarchy=hierarchy, tokenizer=tokenizer, workers=workers, planners=planners,
                           batch_chunks=batch_chunks, batching=batching, kato_url=kato, data_dir=data,
                           parallel_batches=parallel_batches, bulk_load=bulk_load,
                           durability=durability, run_id=run_id, fresh=fresh, skip=skip,  # type: ignore[arg-type]
                           max_samples=max_samples, run_dir=run_dir, retry_failed=retry_failed,
                           drain_timeout=drain_timeout, allow_mixed_kb=allow_mixed_kb, shard=shard,
                           retry=RetryPolicy(patience=patience, request_timeout=request_timeout))
        show_bar = sys.stdout.isatty() if progress is None else progress
        if metrics_port is not None:
            from prometheus_client import start_http_server

            try:
                start_http_server(metrics_port, addr="127.0.0.1")
            except OSError as error:
                raise IngestError(f"--metrics-port {metrics_port} cannot be served ({error.strerror}): give a free "
                                  "port, or leave --metrics-port out") from None  # fmt: skip
        async def learn(on_progress: Callable[[Any], None]) -> Any:
            nonlocal pipeline
            pipeline = Pipeline(config, on_progress=on_progress, handle_signals=True)
            return await pipeline.run()

        if shards > 1 or executor is not None:
            from ingestd.executors.sharded import run_sharded

            def sharded(on_progress: Callable[[Any], None]) -> dict[str, Any]:
                return run_sharded(config, shards, executor=executor or "ray", address=ray_address, kato_urls=kato_urls,
                                   on_progress=on_progress)  # fmt: skip

            try:
                if show_bar:
                    with ProgressBar(console) as bar:
                        combined = sharded(bar)
                else:
                    combined = sharded(ProgressLog())
            except KeyboardInterrupt:  # the shards stop with Ray; each resumes from its own progress next time
                typer.echo("ingestd: stopped: run the same command again to resume (finished shards are kept)", err=True)
                raise typer.Exit(0) from None  # as a local run stopped by a signal (see ingestd.errors)
            report(combined)
            console.print(shard_table(combined))
            if combined["samples"]["failed"]:
                raise typer.Exit(EXIT_SAMPLES_FAILED)
            return
        with throughput_gc():
            if show_bar:
                with ProgressBar(console) as bar:
                    summary = anyio.run(learn, bar, **loop_options())
            else:
                summary = anyio.run(learn, ProgressLog(), **loop_options())
    except BaseException as error:  # noqa: BLE001 - unwrap task-group errors to the user's problem
        found = find_ingest_error(error)
        if found is None:
            raise
        failed = {"kind": type(found).__name__, "message": str(found), "exit_code": found.exit_code}
        report({**pipeline.summary().as_dict(), "error": failed} if pipeline is not None else {"error": failed})
        typer.echo(f"ingestd: error: {found}", err=True)
        raise typer.Exit(found.exit_code) from None
    result = summary.as_dict()
    report(result)
    samples = result["samples"]
    if samples["read"] and samples["filtered"] == samples["read"]:
        typer.echo(f"ingestd: warning: every record of {spec.shown} was shorter than {spec.min_chars} characters after stripping, "
                   "so nothing was learned: check --text-field, --txt-mode and --min-chars", err=True)  # fmt: skip
    if samples["failed"]:
        import structlog

        structlog.get_logger("ingestd.run").warning(
            "samples failed: the dead letters say which and why; fix the cause and run the same command with "
            "--retry-failed", samples_failed=samples["failed"], dead_letters=f"{result['config']['run_dir']}/failed.jsonl",
            exit_code=EXIT_SAMPLES_FAILED)  # fmt: skip
        raise typer.Exit(EXIT_SAMPLES_FAILED)


@app.command("merge")
def merge_command(
    shards: Annotated[list[Path], typer.Argument(help="Data directories of the shards (each a --data-dir a shard learned into).")],
    into: Annotated[Path, typer.Option("--into", help="The data directory to merge them into (made if missing).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Merge shards' knowledge stores into one: frequencies summed, metadata united, exactly what one process
    would have learned. A shard is merged once (running it again skips it), also across a crash."""
    from rich.console import Console
    from rich.table import Table

    from ingestd.kb.merge import merge_stores

    try:
        frame = merge_stores(shards, into)
    except IngestError as error:
        typer.echo(f"ingestd: error: {error}", err=True)
        raise typer.Exit(error.exit_code) from None
    rows = frame.to_dict(orient="records")
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=lambda value: value.item()))
        return
    table = Table(title=f"merged into {into}", title_justify="left")
    for column in ("shard", "store id", "patterns", "merged"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["source"], row["store_id"], f"{int(row['patterns']):,}",
                      "before (skipped)" if row["already_merged"] else "now")  # fmt: skip
    Console().print(table)


@app.command("publish")
def publish_command(
    redis_url: Annotated[str, typer.Option("--redis-url", help="The KATO deployment's Redis, redis://host:port[/db] (password: INGESTD_REDIS_PASSWORD or INGESTD_REDIS_PASSWORD_FILE).", rich_help_panel="Deployment")],
    clickhouse_url: Annotated[str, typer.Option("--clickhouse-url", help="Its ClickHouse HTTP interface, http://host:8123 (INGESTD_CLICKHOUSE_USER, INGESTD_CLICKHOUSE_PASSWORD or _FILE).", rich_help_panel="Deployment")],
    data: Annotated[Optional[Path], typer.Option("--data-dir", "--data", help="The knowledge store to publish (as `ingestd run --data-dir`, or a merged sharded run's; default ./kato-data).", show_default=False, rich_help_panel="Source")] = None,
    node_ids: Annotated[Optional[str], typer.Option("--node-ids", help="Its nodes: a template with {level} or ids separated by commas (default: the hierarchy the store holds).", rich_help_panel="Source")] = None,
    run_id: Annotated[Optional[str], typer.Option("--run-id", help="The nodes of this run.", rich_help_panel="Source")] = None,
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="The nodes of the run in this directory.", rich_help_panel="Source")] = None,
    rename: Annotated[Optional[str], typer.Option("--as", help="Publish under other node ids: a template with {level}, e.g. 'prod-node{level}'.", rich_help_panel="Deployment")] = None,
    replace: Annotated[bool, typer.Option("--replace", help="Clear target kbs that hold anything first (as KATO's clear-all); then restart every KATO worker.", rich_help_panel="Deployment")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Read the deployment back and compare it with the source, pattern for pattern and counter for counter.", rich_help_panel="Deployment")] = False,
    without_affinity: Annotated[bool, typer.Option("--without-affinity", help="Publish nodes whose patterns carry emotives, without KATO's per-symbol affinity (it cannot be derived from a knowledge base).", rich_help_panel="Deployment")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    log_format: _LOG_FORMAT = None,
    log_level: _LOG_LEVEL = None,
) -> None:
    """Write a knowledge base into a KATO deployment's Redis and ClickHouse, exactly as KATO 3.10.1 stores what it
    learns; refuses target nodes that hold anything (unless --replace). Running it again after it was stopped
    finishes it; after it finished, does nothing."""
    from rich.console import Console
    from rich.table import Table

    from ingestd.kb.deployment import Credentials, Deployment
    from ingestd.kb.knowledge_base import KnowledgeBase
    from ingestd.kb.publish import RESTART_NOTE, publish

    settings = _settings(log_format=log_format, log_level=log_level)
    if rename is not None and "{level}" in rename and node_ids is not None and "{level}" not in node_ids:
        raise typer.BadParameter("with a list of node ids, a node's {level} is its place in the list, not the level "
                                 "it was learned at: name the targets with {node_id} (e.g. 'prod-{node_id}'), or give "
                                 "--node-ids as a template with {level}", param_hint="--as")  # fmt: skip
    try:
        redis_password, clickhouse_user, clickhouse_password = settings.storage_credentials()
        with KnowledgeBase(data, node_ids=node_ids, run_id=run_id, run_dir=run_dir) as kb:
            nodes, store = list(kb.nodes), kb.data_dir
        credentials = Credentials(redis_password, clickhouse_user, clickhouse_password)
        with Deployment(redis_url, clickhouse_url, credentials) as deployment:
            started = time.perf_counter()
            results = publish(store, nodes, deployment, rename=rename, replace=replace, verify=verify,
                              without_affinity=without_affinity)  # fmt: skip
            seconds = time.perf_counter() - started
    except IngestError as error:
        typer.echo(f"ingestd: error: {error}", err=True)
        raise typer.Exit(error.exit_code) from None
    failed = [result for result in results if result.get("verified") and not result["verified"]["ok"]]
    if as_json:
        typer.echo(json.dumps({"nodes": results, "seconds": round(seconds, 3), "note": RESTART_NOTE}, indent=2))
    else:
        table = Table(title=f"published into {redis_url} + {clickhouse_url} in {seconds:.1f} s", title_justify="left")
        for column in ("level", "node", "patterns", "rows", "keys", "done", *(("verified",) if verify else ())):
            table.add_column(column, justify="right" if column in ("level", "patterns", "rows", "keys") else "left",
                             overflow="fold")  # fmt: skip
        for result in results:
            check = result.get("verified")
            table.add_row(str(result["level"]), result["target_node_id"], f"{result['patterns']:,}",
                          f"{result['rows']:,}", f"{result['keys']:,}", result["action"],
                          *(() if check is None else ("ok" if check["ok"] else "DIFFERS: " + "; ".join(
                              check["rows"]["examples"] + check["keys"]["examples"]),)))  # fmt: skip
        Console().print(table)
        typer.echo(RESTART_NOTE)
    if failed:
        typer.echo(f"ingestd: error: {len(failed)} node(s) of the deployment differ from the source (see above): "
                   "publish them again with --replace", err=True)  # fmt: skip
        raise typer.Exit(1)


@app.command("serve")
def serve_command(
    host: Annotated[Optional[str], typer.Option(help="Address to bind (default 127.0.0.1, or INGESTD_HOST).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (default 8080, or INGESTD_PORT).")] = None,
    state_dir: Annotated[Optional[Path], typer.Option(help="Jobs, progress, embedded engine (INGESTD_STATE_DIR).")] = None,
    max_jobs: Annotated[Optional[int], typer.Option(min=1, help="Jobs at once (INGESTD_MAX_JOBS, default 2).")] = None,
    log_format: _LOG_FORMAT = None,
    log_level: _LOG_LEVEL = None,
) -> None:
    """Run the daemon: a job API (bearer token from INGESTD_TOKEN or INGESTD_TOKEN_FILE), /healthz, /readyz, /metrics."""
    from ingestd.service import serve

    settings = _settings(host=host, port=port, state_dir=state_dir, max_jobs=max_jobs, log_format=log_format,
                         log_level=log_level)  # fmt: skip
    from ingestd.jobs import check_job_store
    from ingestd.runtime import listen_problem

    try:
        settings.api_token()  # refuse a bad token setup before binding
        check_job_store(settings.state_dir)
        problem = listen_problem(settings.host, settings.port)
        if problem is not None:
            raise IngestError(f"{problem}: give another --port or --host (INGESTD_PORT, INGESTD_HOST)")
    except IngestError as error:
        typer.echo(f"ingestd: error: {error}", err=True)
        raise typer.Exit(error.exit_code) from None
    serve(settings)


def _request(url: str, token: str | None, method: str, path: str, body: Any = None, *, show: bool = True) -> Any:
    """One call to a running daemon; its JSON answer (printed with ``show``). 401 → exit 5, other errors → exit 2."""
    import httpx

    if token is None:
        try:
            token = Settings().api_token()
        except IngestError:
            token = None  # the daemon will answer 401, and the message below says what to set
    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=30.0) as client:
            response = client.request(method, path, json=body)
    except httpx.HTTPError as error:
        typer.echo(f"ingestd: error: cannot reach the daemon at {url} ({type(error).__name__}): is `ingestd serve` "
                   "running there? (--url or INGESTD_URL)", err=True)  # fmt: skip
        raise typer.Exit(2) from None
    if response.status_code == 401:
        typer.echo("ingestd: error: the daemon answered 401: give its token with --token, INGESTD_TOKEN or "
                   "INGESTD_TOKEN_FILE", err=True)  # fmt: skip
        raise typer.Exit(5)
    if response.status_code >= 400:
        typer.echo(f"ingestd: error: the daemon answered {response.status_code}: {response.text[:500]}", err=True)
        raise typer.Exit(2)
    answer = response.json()
    if show:
        typer.echo(json.dumps(answer, indent=2, ensure_ascii=False))
    return answer


def _clock(epoch: float | None) -> str:
    """An epoch time as people read it: local time, to the second."""
    import datetime

    return datetime.datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S") if epoch else "-"


def _print_jobs(jobs: list[dict[str, Any]], *, title: str = "") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title or None, title_justify="left")
    table.add_column("job id", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("created", no_wrap=True)
    table.add_column("learned", justify="right")
    table.add_column("failed", justify="right")
    table.add_column("source", overflow="fold")
    for job in jobs:
        samples = (job.get("progress") or {}).get("samples") or {}
        table.add_row(job["id"], job["state"] + (" (retry failed)" if job.get("retry_failed") else ""),
                      _clock(job.get("created_at")), f"{samples.get('learned', 0):,}", f"{samples.get('failed', 0):,}",
                      _source_name(job.get("spec", {}).get("source")))  # fmt: skip
    Console().print(table)


def _print_job(job: dict[str, Any]) -> None:
    progress = job.get("progress") or {}
    samples = progress.get("samples") or {}
    spec = job.get("spec") or {}
    lines = [f"job {job['id']}: {job['state']}" + (" (retrying failed samples)" if job.get("retry_failed") else ""),
             f"created {_clock(job.get('created_at'))}, started {_clock(job.get('started_at'))}, "
             f"finished {_clock(job.get('finished_at'))}",
             f"source: {_source_shown(spec.get('source'))}"]  # fmt: skip
    if samples:
        lines.append(f"samples: {samples.get('read', 0):,} read, {samples.get('learned', 0):,} learned, "
                     f"{samples.get('filtered', 0):,} filtered, {samples.get('failed', 0):,} failed, "
                     f"{samples.get('skipped', 0):,} skipped; {progress.get('tokens', 0):,} tokens")  # fmt: skip
        lines.append(f"patterns learned per level: {progress.get('patterns_per_level')}")
        if progress.get("samples_per_second") is not None:
            lines.append(f"rate: {progress['samples_per_second']:,} samples/s")
    if job.get("error"):
        lines.append(f"error: {job['error']}")
    typer.echo("\n".join(lines))


_URL = Annotated[str, typer.Option(envvar="INGESTD_URL", help="The daemon's address.")]
_TOKEN = Annotated[Optional[str], typer.Option(help="Bearer token (default: INGESTD_TOKEN / INGESTD_TOKEN_FILE).", show_default=False)]
_DAEMON = "http://127.0.0.1:8080"


def _source_shown(source: Any) -> str:
    """A recorded source (a name, a path or a list of paths) as one line."""
    return " ".join(map(str, source)) if isinstance(source, list) else str(source if source is not None else "?")


def _source_name(source: Any) -> str:
    """A recorded source in a table's cell: a file's name; a list's first name and how many more."""
    if isinstance(source, list) and source:
        return Path(str(source[0])).name + (f" +{len(source) - 1}" if len(source) > 1 else "")
    return Path(_source_shown(source)).name


@jobs_app.command("submit")
def jobs_submit(
    source: Annotated[list[str], typer.Argument(help="Dataset key, hub name, or file paths (files, directories, globs) as the daemon sees them.")],
    text_field: _TEXT_FIELD = None,
    metadata_fields: _METADATA_FIELDS = None,
    source_label: _SOURCE_LABEL = None,
    hub_config: _HUB_CONFIG = None,
    split: _SPLIT = None,
    txt_mode: _TXT_MODE = "paragraph",
    max_samples: _MAX_SAMPLES = None,
    skip: _SKIP = 0,
    max_sample_chars: _MAX_SAMPLE_CHARS = 1_000_000,
    min_chars: Annotated[Optional[int], typer.Option(min=0, max=MAX_COUNT, help="Samples whose stripped text is shorter are filtered; 0 keeps every sample (default 11, or the hierarchy file's).", show_default=False, rich_help_panel="Source")] = None,
    tokenizer: Annotated[str, typer.Option(help="'gpt2' (bundled) or a tokenizer the daemon can load offline.", rich_help_panel="Source")] = "gpt2",
    hierarchy_file: Annotated[Optional[Path], typer.Option("--hierarchy", help="TOML or YAML file with the levels, read here and sent with the job (instead of --chunk-sizes).", rich_help_panel="Hierarchy")] = None,
    chunk_sizes: Annotated[Optional[str], typer.Option(help="Chunk size per level, node0 first (default 8,8,8,8).", show_default=False, rich_help_panel="Hierarchy")] = None,
    metadata_levels: _METADATA_LEVELS = None,
    node_ids: Annotated[Optional[str], typer.Option(help="Node id template (default node{level}).", show_default=False, rich_help_panel="Hierarchy")] = None,
    run_id: _RUN_ID = "",
    allow_mixed_kb: _ALLOW_MIXED_KB = False,
    kato: Annotated[Optional[str], typer.Option("--kato-url", "--kato", help="KATO server for this job (default: the daemon's embedded engine).", rich_help_panel="Backend")] = None,
    workers: _WORKERS = 16,
    planners: Annotated[Optional[int], typer.Option(min=0, max=64, help="Processes that tokenize and plan (default: one per core beyond the first).", show_default=False, rich_help_panel="Backend")] = None,
    batch_chunks: _BATCH_CHUNKS = 64,
    parallel_batches: _PARALLEL_BATCHES = 4,
    batching: _BATCHING = True,
    bulk_load: _BULK_LOAD = True,
    durability: _DURABILITY = "full",
    patience: _PATIENCE = 600.0,
    request_timeout: _REQUEST_TIMEOUT = 120.0,
    fresh: Annotated[bool, typer.Option("--fresh", help="clear-all the job's nodes when it first starts (never on a resume).", rich_help_panel="Run control")] = False,
    url: _URL = _DAEMON,
    token: _TOKEN = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the daemon's JSON answer.")] = False,
) -> None:
    """Submit a job: every choice of `ingestd run` that a job can make; prints it, with its id."""
    from ingestd.hierarchy import HierarchyError, read_file

    spec: dict[str, Any] = {
        "source": source[0] if len(source) == 1 else source, "text_field": text_field, "source_label": source_label, "hub_config": hub_config,
        "split": split, "txt_mode": txt_mode, "max_samples": max_samples, "skip": skip,
        "max_sample_chars": max_sample_chars, "min_chars": min_chars, "tokenizer": tokenizer, "run_id": run_id,
        "allow_mixed_kb": allow_mixed_kb, "kato_url": _kato_url(kato), "workers": workers, "planners": planners,
        "batch_chunks": batch_chunks, "parallel_batches": parallel_batches, "batching": batching,
        "bulk_load": bulk_load,
        "durability": durability, "patience": patience,
        "request_timeout": request_timeout, "fresh": fresh,
        "metadata_fields": [f.strip() for f in (metadata_fields or "").split(",") if f.strip()],
    }  # fmt: skip
    if hierarchy_file is not None:
        if chunk_sizes or metadata_levels or node_ids:
            typer.echo("ingestd: error: give --hierarchy or --chunk-sizes/--metadata-levels/--node-ids, not both", err=True)
            raise typer.Exit(2)
        try:
            spec["hierarchy"] = read_file(hierarchy_file)
        except HierarchyError as error:
            typer.echo(f"ingestd: error: {error}", err=True)
            raise typer.Exit(2) from None
    else:
        spec.update({"chunk_sizes": _int_list(chunk_sizes or "8,8,8,8", "--chunk-sizes"),
                     "metadata_levels": _int_list(metadata_levels, "--metadata-levels"), "node_ids": node_ids or "node{level}"})  # fmt: skip
    job = _request(url, token, "POST", "/jobs", {key: value for key, value in spec.items() if value is not None}, show=as_json)
    if not as_json:
        _print_jobs([job])


_AS_JSON = Annotated[bool, typer.Option("--json", help="Print the daemon's JSON answer.")]


@jobs_app.command("list")
def jobs_list(url: _URL = _DAEMON, token: _TOKEN = None, as_json: _AS_JSON = False,
              limit: Annotated[int, typer.Option(min=1, max=1000, help="At most this many jobs.")] = 100,
              offset: Annotated[int, typer.Option(min=0, help="Skip this many first.")] = 0) -> None:  # fmt: skip
    """Every job with its state and progress."""
    answer = _request(url, token, "GET", f"/jobs?limit={limit}&offset={offset}", show=as_json)
    if not as_json:
        more = f" (more: --offset {answer['next_offset']})" if answer.get("next_offset") is not None else ""
        _print_jobs(answer["jobs"], title=f"{answer['total']} job(s){more}")


def _job_command(method: str, path: str, job_id: str, url: str, token: str | None, as_json: bool) -> None:
    job = _request(url, token, method, path.format(job_id=job_id), show=as_json)
    if not as_json:
        _print_job(job)


@jobs_app.command("show")
def jobs_show(job_id: str, url: _URL = _DAEMON, token: _TOKEN = None, as_json: _AS_JSON = False) -> None:
    """One job: state, progress counts, rates, errors, possible duplicates."""
    _job_command("GET", "/jobs/{job_id}", job_id, url, token, as_json)


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, url: _URL = _DAEMON, token: _TOKEN = None, as_json: _AS_JSON = False) -> None:
    """Cancel a job: queued ones never start, running ones finish their in-flight samples and stop."""
    _job_command("POST", "/jobs/{job_id}/cancel", job_id, url, token, as_json)


@jobs_app.command("resume")
def jobs_resume(job_id: str, url: _URL = _DAEMON, token: _TOKEN = None, as_json: _AS_JSON = False) -> None:
    """Queue a failed or cancelled job again: it continues from its progress (learned samples are not redone)."""
    _job_command("POST", "/jobs/{job_id}/resume", job_id, url, token, as_json)


@jobs_app.command("retry-failed")
def jobs_retry_failed(job_id: str, url: _URL = _DAEMON, token: _TOKEN = None, as_json: _AS_JSON = False) -> None:
    """Queue a finished job again for the samples it recorded as failed."""
    _job_command("POST", "/jobs/{job_id}/retry-failed", job_id, url, token, as_json)


@kato_app.command("demo")
def kato_demo(
    corpus: Annotated[Path, typer.Argument(help="A text file; paragraphs are runs of non-blank lines.")],
    paragraphs: Annotated[int, typer.Option(min=1, help="How many paragraphs to learn.")] = 300,
    chunk_size: Annotated[int, typer.Option(min=2, help="Tokens per node0 pattern.")] = 8,
) -> None:
    """Start the embedded server, learn paragraphs of CORPUS through its HTTP API, and show what was learned."""
    from rich.console import Console

    from ingestd.demo import run_demo

    if not corpus.is_file():
        raise typer.BadParameter(f"{corpus} is not a readable file: give the path of a UTF-8 text file", param_hint="CORPUS")
    run_demo(corpus, paragraphs, chunk_size, Console())


if __name__ == "__main__":
    app()


_RUN_ROOTS = Annotated[Optional[list[Path]], typer.Option("--in", help="Also look for runs below this folder (repeat).")]


def _run_roots(data: Path, extra: list[Path] | None) -> list[Path]:
    return [data / "runs", Path("ingestd-runs"), *(extra or [])]


def _when(moment: str | None) -> str:
    return moment.replace("T", " ").replace("Z", " UTC") if moment else ""


@runs_app.command("list")
def runs_list(data: Annotated[Path, typer.Option("--data-dir", "--data", help="A data directory whose runs to list.")] = Path("kato-data"),
              roots: _RUN_ROOTS = None,
              as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False) -> None:  # fmt: skip
    """Every run under <data>/runs and ./ingestd-runs (and --in folders), newest first."""
    from rich.console import Console
    from rich.table import Table

    from ingestd import catalogue

    manifests = catalogue.find(_run_roots(data, roots))
    if as_json:
        typer.echo(json.dumps(manifests, indent=2, ensure_ascii=False))
        return
    if not manifests:
        typer.echo(f"no runs under {', '.join(str(root) for root in _run_roots(data, roots))}")
        return
    table = Table(title=f"{len(manifests)} run(s)", title_justify="left")
    table.add_column("run id", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("started (UTC)", no_wrap=True)
    table.add_column("done", justify="right", no_wrap=True)
    for column in ("source", "backend"):
        table.add_column(column, overflow="fold")
    for manifest in manifests:
        backend = manifest.get("backend") or {}
        table.add_row(manifest.get("run_id", "?"), manifest.get("status", "?"), _when(manifest.get("started_at"))[:16],
                      "?" if manifest.get("done") is None else f"{manifest['done']:,}",
                      _source_name((manifest.get("source") or {}).get("source")),
                      backend.get("url") or "embedded")  # fmt: skip
    Console().print(table)


@runs_app.command("show")
def runs_show(run: Annotated[str, typer.Argument(help="A run directory, or a run id under --data-dir or ./ingestd-runs.")],
              data: Annotated[Path, typer.Option("--data-dir", "--data", help="The data directory of the run.")] = Path("kato-data"),
              roots: _RUN_ROOTS = None,
              as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False) -> None:  # fmt: skip
    """One run: what it learned from, into which nodes, how it went, and each time it was run."""
    from ingestd import catalogue

    manifest = catalogue.describe(Path(run).expanduser())
    if manifest is None:
        matches = [found for found in catalogue.find(_run_roots(data, roots))
                   if run in (found.get("run_id"), Path(found["run_dir"]).name)]  # fmt: skip
        if len(matches) > 1:
            typer.echo(f"ingestd: error: {len(matches)} runs are called {run!r}: give its directory "
                       f"({', '.join(found['run_dir'] for found in matches)})", err=True)  # fmt: skip
            raise typer.Exit(2)
        manifest = matches[0] if matches else None
    if manifest is None:
        typer.echo(f"ingestd: error: no run {run!r}: give a run directory, or a run id listed by `ingestd runs list`", err=True)
        raise typer.Exit(2)
    if as_json:
        typer.echo(json.dumps(manifest, indent=2, ensure_ascii=False))
        return
    summary = manifest.get("summary") or {}
    samples = summary.get("samples") or {}
    lines = [
        f"run {manifest.get('run_id')}: {manifest.get('status')}  ({manifest['run_dir']})",
        f"samples done: {manifest['done']:,}" if manifest.get("done") is not None else "samples done: unknown",
        f"ingestd {manifest.get('ingestd_version')}; started {_when(manifest.get('started_at'))}, "
        f"finished {_when(manifest.get('finished_at')) or '-'}; first run {_when(manifest.get('created_at'))}",
        f"source: {_source_shown((manifest.get('source') or {}).get('source'))}   tokenizer: {manifest.get('tokenizer')}",
        "hierarchy: " + ", ".join(f"{level['node_id']} (chunk {level['chunk_size']}{', metadata' if level.get('capture_metadata') else ''})"
                                  for level in manifest.get("hierarchy") or []),
        f"backend: {json.dumps(manifest.get('backend'))}",
    ]  # fmt: skip
    if summary:
        lines += [
            f"samples: {samples.get('learned', 0):,} learned, {samples.get('filtered', 0):,} filtered, "
            f"{samples.get('failed', 0):,} failed, {samples.get('skipped', 0):,} skipped; {summary.get('tokens', 0):,} tokens",
            f"patterns learned per level: {summary.get('patterns_per_level')}",
            f"distinct patterns per level: {summary.get('distinct_patterns_per_level')}",
        ]  # fmt: skip
    lines.append("history:")
    for entry in manifest.get("history") or []:
        learned = (entry.get("samples") or {}).get("learned")
        lines.append(f"  {_when(entry.get('started_at'))} → {_when(entry.get('finished_at')) or '-'}: {entry.get('status')}"
                     + (f", {learned:,} learned" if learned is not None else ""))  # fmt: skip
    typer.echo("\n".join(lines))
