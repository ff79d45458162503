"""``ingestd inspect``: look at what a hierarchy learned, from a terminal (tables) or a script (``--json``).

Each command is a thin layer over :class:`ingestd.kb.KnowledgeBase`; the Python API gives the same answers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from ingestd.errors import IngestError

if TYPE_CHECKING:
    from ingestd.kb.knowledge_base import KnowledgeBase

inspect_app = typer.Typer(
    help="Look at what was learned: statistics, top patterns, patterns unravelled to text, sampling, export.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_DATA = Annotated[Optional[Path], typer.Option("--data-dir", "--data", help="Directory of the knowledge store (as `ingestd "
                                              "run --data-dir`; default ./kato-data, or the store of --run-dir's run).",
                                              show_default=False)]  # fmt: skip
_NODE_IDS = Annotated[Optional[str], typer.Option("--node-ids", help="The nodes: a template with {level} (as "
                                                  "`ingestd run --node-ids`) or ids separated by commas.")]  # fmt: skip
_RUN_ID = Annotated[Optional[str], typer.Option("--run-id", help="The nodes of this run (<data>/runs/<run id>).")]
_RUN_DIR = Annotated[Optional[Path], typer.Option("--run-dir", help="The nodes of the run in this directory.")]
_TOKENIZER = Annotated[Optional[str], typer.Option("--tokenizer", help="Decode with this tokenizer (default: the "
                                                   "one the run used).")]  # fmt: skip
_JSON = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
_LEVELS = Annotated[Optional[str], typer.Option("--levels", help="Only these levels (or node ids), comma-separated.")]
_LEVEL = Annotated[str, typer.Option("--level", "-l", help="The node: a level or a node id.")]


@inspect_app.callback()
def _where(
    redis_url: Annotated[Optional[str], typer.Option("--redis-url", help="Read a KATO deployment instead of a store: its Redis (as `ingestd publish --redis-url`; password: INGESTD_REDIS_PASSWORD or _FILE).")] = None,
    clickhouse_url: Annotated[Optional[str], typer.Option("--clickhouse-url", help="...and its ClickHouse HTTP interface (INGESTD_CLICKHOUSE_USER, INGESTD_CLICKHOUSE_PASSWORD or _FILE); name the nodes with --node-ids.")] = None,
) -> None:
    """Where the knowledge bases are: a store (--data-dir on each command), or a KATO deployment."""
    if (redis_url is None) != (clickhouse_url is None):
        raise typer.BadParameter("give both --redis-url and --clickhouse-url to read a KATO deployment", param_hint="--redis-url")
    _WHERE.clear()
    _WHERE.update(redis_url=redis_url, clickhouse_url=clickhouse_url)


_WHERE: dict[str, str | None] = {}  # this invocation's deployment, if any (set by the group's options)


def _deployment() -> Any:
    """The KATO deployment ``ingestd inspect --redis-url … --clickhouse-url …`` names, or None."""
    where = _WHERE
    if not where.get("redis_url"):
        return None
    from ingestd.kb.deployment import Credentials, Deployment
    from ingestd.settings import Settings

    return Deployment(where["redis_url"], where["clickhouse_url"], Credentials(*Settings().storage_credentials()))


@contextmanager
def _opened(data: Path, node_ids: str | None, run_id: str | None, run_dir: Path | None,
            tokenizer: str | None = None) -> Iterator[KnowledgeBase]:  # fmt: skip
    """The knowledge base, with every problem of input or environment reported as one line and exit 2."""
    from ingestd.kb.knowledge_base import KnowledgeBase

    try:
        with KnowledgeBase(data, node_ids=node_ids, run_id=run_id, run_dir=run_dir, tokenizer=tokenizer,
                           deployment=_deployment()) as kb:  # fmt: skip
            yield kb
    except IngestError as error:
        typer.echo(f"ingestd: error: {error}", err=True)
        raise typer.Exit(error.exit_code) from None
    except (OSError, ImportError) as error:
        typer.echo(f"ingestd: error: {error}", err=True)
        raise typer.Exit(2) from None
    except Exception as error:
        import sqlite3

        if type(error).__module__.startswith("redis"):  # a KATO deployment's Redis failed or went away
            typer.echo(f"ingestd: error: the deployment's Redis failed ({type(error).__name__}: {error}): check "
                       "--redis-url and that it runs", err=True)  # fmt: skip
            raise typer.Exit(2) from None
        if isinstance(error, sqlite3.DatabaseError):
            typer.echo(f"ingestd: error: cannot read the knowledge store in {data} ({error}): is it an ingestd "
                       "data directory?", err=True)  # fmt: skip
            raise typer.Exit(2) from None
        raise


def _levels(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def _echo_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False, default=_plain))


def _plain(value: Any) -> Any:
    """numpy scalars and the like, as JSON numbers."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _records(frame: Any) -> list[dict[str, Any]]:
    return [{key: _finite(item) for key, item in row.items()} for row in frame.to_dict(orient="records")]


def _finite(value: Any) -> Any:
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _one_line(text: str, width: int = 80) -> str:
    flat = text.replace("\r", "␍").replace("\n", "↵")
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*("" if cell is None else f"{cell:,}" if isinstance(cell, int) else str(cell) for cell in row))
    Console().print(table)


@inspect_app.command("stats")
def stats_command(data: _DATA = None, node_ids: _NODE_IDS = None, run_id: _RUN_ID = None,
                  run_dir: _RUN_DIR = None, levels: _LEVELS = None, as_json: _JSON = False) -> None:  # fmt: skip
    """Per node: distinct patterns, total frequency (= learns), lengths, frequency quantiles, singletons."""
    with _opened(data, node_ids, run_id, run_dir) as kb:
        records = _records(kb.stats(_levels(levels)))
    if as_json:
        _echo_json(records)
        return
    _table(f"{data}: {len(records)} node(s)",
           ["level", "node", "chunk", "patterns", "total freq", "singletons", "freq p50/p90/p99/max", "length min/mean/max"],
           [[r["level"], r["node_id"], r["chunk_size"], r["patterns"], r["total_frequency"],
             f"{r['singletons']:,} ({r['singleton_share']:.1%})",
             f"{r['frequency_p50']:g} / {r['frequency_p90']:g} / {r['frequency_p99']:g} / {r['frequency_max']:,}",
             f"{r['length_min']} / {r['length_mean']:.2f} / {r['length_max']}"] for r in records])  # fmt: skip


@inspect_app.command("top")
def top_command(data: _DATA = None, node_ids: _NODE_IDS = None, run_id: _RUN_ID = None,
                run_dir: _RUN_DIR = None, tokenizer: _TOKENIZER = None, level: _LEVEL = "0",
                n: Annotated[int, typer.Option("-n", "--n", min=1, max=1_000_000, help="How many.")] = 10,
                as_json: _JSON = False) -> None:  # fmt: skip
    """The N most frequent patterns of a node, each decoded to the text it stands for."""
    with _opened(data, node_ids, run_id, run_dir, tokenizer) as kb:
        node = kb.node(level)
        records = _records(kb.top(node.level, n))
    if as_json:
        _echo_json(records)
        return
    _table(f"top {n} of {node.node_id} (level {node.level})", ["#", "frequency", "name", "text"],
           [[r["rank"], r["frequency"], r["name"][:17] + "…", _one_line(r["text"])] for r in records])  # fmt: skip


@inspect_app.command("show")
def show_command(name: Annotated[str, typer.Argument(help="A pattern name, PTRN|<sha1> or the bare sha1.")],
                 data: _DATA = None, node_ids: _NODE_IDS = None, run_id: _RUN_ID = None,
                 run_dir: _RUN_DIR = None, tokenizer: _TOKENIZER = None,
                 level: Annotated[Optional[str], typer.Option("--level", "-l", help="The node holding it (default: "
                                                              "found).")] = None,
                 as_json: _JSON = False) -> None:  # fmt: skip
    """One pattern: its frequency, metadata, and its unravelling down to node0's tokens and text."""
    with _opened(data, node_ids, run_id, run_dir, tokenizer) as kb:
        view = kb.show(name, level)
    if as_json:
        _echo_json(view.as_dict())
        return
    typer.echo(f"{view.name}  node {view.node} (level {view.level})  frequency {view.frequency:,}  length {view.length}")
    if view.metadata:
        typer.echo(f"metadata: {json.dumps(view.metadata, ensure_ascii=False)}")
    for depth, names in enumerate(view.below):
        typer.echo(f"level {view.level - 1 - depth}: {len(names)} names")
    typer.echo(f"tokens ({len(view.tokens)}): {' '.join(view.tokens[:64])}{' …' if len(view.tokens) > 64 else ''}")
    if view.missing:
        typer.echo(f"missing below it (pruned or cleared): {len(view.missing)}")
    typer.echo("text:")
    typer.echo(view.text)


@inspect_app.command("sample")
def sample_command(data: _DATA = None, node_ids: _NODE_IDS = None, run_id: _RUN_ID = None,
                   run_dir: _RUN_DIR = None, tokenizer: _TOKENIZER = None, level: _LEVEL = "0",
                   n: Annotated[int, typer.Option("-n", "--n", min=1, max=100_000, help="How many draws.")] = 5,
                   seed: Annotated[int, typer.Option(min=0, help="Random seed: the same seed draws the same.")] = 0,
                   as_json: _JSON = False) -> None:  # fmt: skip
    """Patterns drawn with probability proportional to their frequency, unravelled to text."""
    with _opened(data, node_ids, run_id, run_dir, tokenizer) as kb:
        node = kb.node(level)
        records = _records(kb.sample(node.level, n, seed=seed))
    if as_json:
        _echo_json(records)
        return
    for record in records:
        typer.echo(f"--- {record['name']} (frequency {record['frequency']:,})")
        typer.echo(record["text"])


@inspect_app.command("histogram")
def histogram_command(data: _DATA = None, node_ids: _NODE_IDS = None, run_id: _RUN_ID = None,
                      run_dir: _RUN_DIR = None, levels: _LEVELS = None,
                      plot: Annotated[Optional[Path], typer.Option("--plot", help="Also draw it to this PNG (log-log, "
                                                                   "a panel per node).")] = None,
                      as_json: _JSON = False) -> None:  # fmt: skip
    """How many patterns have each frequency, per node (the notebooks' main picture)."""
    with _opened(data, node_ids, run_id, run_dir) as kb:
        frame = kb.histogram(_levels(levels))
        if plot is not None:
            from ingestd.kb.plots import plot_histogram

            try:
                plot_histogram(frame, plot)
            except OSError as error:
                raise IngestError(f"cannot write the plot to {plot} ({error.strerror or error}): give a writable path") from None
    records = _records(frame)
    if as_json:
        _echo_json(records)
        return
    _table("patterns per frequency", ["level", "node", "frequency", "patterns"],
           [[r["level"], r["node_id"], r["frequency"], r["patterns"]] for r in records])  # fmt: skip
    if plot is not None:
        typer.echo(f"plot: {plot}")


@inspect_app.command("export")
def export_command(out: Annotated[Path, typer.Option("--out", "-o", help="The parquet file to write.")],
                   data: _DATA = None, node_ids: _NODE_IDS = None, run_id: _RUN_ID = None,
                   run_dir: _RUN_DIR = None, level: _LEVEL = "0") -> None:  # fmt: skip
    """A node's patterns to parquet: name, length, frequency, pattern_data, metadata."""
    from ingestd.kb.export import export_parquet

    with _opened(data, node_ids, run_id, run_dir) as kb:
        node = kb.node(level)
        try:
            rows = export_parquet(kb, node.level, out)
        except OSError as error:
            raise IngestError(f"cannot write {out} ({error.strerror or error}): give a writable path") from None
    typer.echo(f"{rows:,} patterns of {node.node_id} written to {out}")


@inspect_app.command("report")
def report_command(out: Annotated[Path, typer.Option("--out", "-o", help="The HTML file to write.")] = Path("report.html"),
                   data: _DATA = None, node_ids: _NODE_IDS = None, run_id: _RUN_ID = None,
                   run_dir: _RUN_DIR = None, tokenizer: _TOKENIZER = None,
                   top: Annotated[int, typer.Option(min=1, max=1000, help="Top patterns per level.")] = 10,
                   samples: Annotated[int, typer.Option(min=0, max=1000, help="Patterns drawn per level.")] = 3,
                   seed: Annotated[int, typer.Option(min=0, help="Seed of the draws.")] = 0) -> None:  # fmt: skip
    """A self-contained HTML page: statistics, histograms, top and sampled patterns as text, per level."""
    from ingestd.kb.report import write_report

    with _opened(data, node_ids, run_id, run_dir, tokenizer) as kb:
        try:
            write_report(kb, out, top=top, samples=samples, seed=seed)
        except OSError as error:
            raise IngestError(f"cannot write {out} ({error.strerror or error}): give a writable path") from None
    typer.echo(f"report: {out}")


@inspect_app.command("prune")
def prune_command(below: Annotated[int, typer.Option("--below", min=1, help="Remove patterns whose frequency is "
                                                     "below this.")],
                  data: _DATA = None, node_ids: _NODE_IDS = None, run_id: _RUN_ID = None,
                  run_dir: _RUN_DIR = None, levels: _LEVELS = None,
                  dry_run: Annotated[bool, typer.Option("--dry-run", help="Only count what would go.")] = False,
                  as_json: _JSON = False) -> None:  # fmt: skip
    """Remove rare patterns from nodes (all, or --levels); refused while a run or server learns into the store.
    Higher patterns that contained a removed one unravel with a gap there."""
    with _opened(data, node_ids, run_id, run_dir) as kb:
        records = _records(kb.prune(below, _levels(levels), dry_run=dry_run))
    if as_json:
        _echo_json(records)
        return
    verb = "would remove" if dry_run else "removed"
    _table(f"patterns with frequency < {below}: {'dry run, nothing changed' if dry_run else 'pruned'}",
           ["level", "node", "patterns", verb, "remaining", "learns they stood for"],
           [[r["level"], r["node_id"], r["patterns"], r["removed"], r["remaining"], r["frequency_removed"]]
            for r in records])  # fmt: skip


@inspect_app.command("diff")
def diff_command(run_a: Annotated[str, typer.Argument(help="A run: its run id under --data-dir, or its run directory.")],
                 run_b: Annotated[str, typer.Argument(help="The other run, the same way.")],
                 data: _DATA = None, as_json: _JSON = False) -> None:  # fmt: skip
    """Per level, patterns only in A, only in B, in both, and frequencies that differ."""
    from ingestd.kb.compare import diff

    with _opened(data, None, *_run(run_a)) as a, _opened(data, None, *_run(run_b)) as b:
        records = _records(diff(a, b))
    if as_json:
        _echo_json(records)
        return
    _table(f"{run_a} → {run_b}", ["level", "A", "B", "only A", "only B", "both", "freq changed", "total freq A → B"],
           [[r["level"], r["node_a"] or "-", r["node_b"] or "-", r["only_a"], r["only_b"], r["both"], r["frequency_changed"],
             f"{r['total_frequency_a']:,} → {r['total_frequency_b']:,}"] for r in records])  # fmt: skip
    same = [str(r["level"]) for r in records if r["same_kb"]]
    if same:
        typer.echo(f"note: at level(s) {', '.join(same)} both runs learned into the same knowledge base, so it compares "
                   "with itself: give runs their own nodes (ingestd run --node-ids '{run_id}-node{level}')", err=True)  # fmt: skip


def _run(text: str) -> tuple[str | None, Path | None]:
    """(run id, run dir) for a run named on the command line: a directory holding a run, else a run id."""
    path = Path(text).expanduser()
    if path.is_dir() and (path / "progress.sqlite3").exists():
        return None, path
    return text, None
