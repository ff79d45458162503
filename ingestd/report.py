"""Showing a run: a live progress bar on a terminal, periodic log lines otherwise, and the final summary."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any

import structlog
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from rich.table import Table

from ingestd.pipeline import RunStats

log = structlog.get_logger("ingestd.run")


class Terminal(Console):
    """rich's console, except that a reader of standard output that goes away (``ingestd run … | head -0``)
    costs the display only: the run goes on and exits with its own code (rich exits 1 there)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class _TwoLines(Progress):
    """The bar on one line, what it stands for on the next: each fits in 80 columns."""

    detail = Text("")

    def get_renderables(self):  # type: ignore[no-untyped-def]
        yield self.make_tasks_table(self.tasks)
        yield self.detail


class ProgressBar:
    """A live bar: samples read of the total (once known: from --max-samples, or counted in the source) with
    the time left; below it samples/s, tokens, patterns per level, failures. Log lines print above it."""

    def __init__(self, console: Console, total: int | None = None) -> None:
        self.progress = _TwoLines(
            SpinnerColumn(), TextColumn("[bold]learning"), BarColumn(bar_width=None), MofNCompleteColumn(),
            TaskProgressColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(compact=True),
            console=console, transient=False, expand=False,
        )  # fmt: skip
        self.task = self.progress.add_task("learning", total=total)
        self._terminal: list[Any] | None = None

    def __enter__(self) -> ProgressBar:
        self._quiet_control_keys()
        self.progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.stop()
        if self._terminal is not None:
            import termios

            with contextlib.suppress(OSError, termios.error):
                termios.tcsetattr(sys.stdin.fileno(), termios.TCSANOW, self._terminal)

    def _quiet_control_keys(self) -> None:
        """Ctrl-C stops a run gracefully, and says so in a log line; the terminal's own echo of it (``^C``) would
        land in the middle of the bar. So the terminal does not echo control keys while the bar is shown."""
        try:
            import termios

            if not sys.stdin.isatty():
                return
            attributes = termios.tcgetattr(sys.stdin.fileno())
            quiet = list(attributes)
            quiet[3] &= ~termios.ECHOCTL
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSANOW, quiet)
            self._terminal = attributes
        except (ImportError, OSError, ValueError, AttributeError):
            return

    def __call__(self, stats: RunStats) -> None:
        rate = stats.samples_learned / stats.elapsed if stats.elapsed else 0.0
        levels = "/".join(_short(count) for count in stats.patterns_per_level)
        detail = (f"  {rate:,.1f} samples/s · {_short(stats.tokens)} tokens · patterns {levels} · "
                  f"failed {stats.samples_failed:,}")  # fmt: skip
        self.progress.detail = Text(detail, no_wrap=True, overflow="ellipsis", style="dim")
        self.progress.update(self.task, completed=stats.samples_read, total=stats.samples_total)


class ProgressLog:
    """Structured progress lines every ``interval`` seconds (for logs, not terminals)."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.last = time.monotonic()

    def __call__(self, stats: RunStats) -> None:
        now = time.monotonic()
        if now - self.last < self.interval and stats.finished is None:
            return
        self.last = now
        log.info("progress", samples_read=stats.samples_read, samples_learned=stats.samples_learned,
                 samples_filtered=stats.samples_filtered, samples_failed=stats.samples_failed, tokens=stats.tokens,
                 patterns_per_level=stats.patterns_per_level, requests=stats.requests,
                 samples_per_second=round(stats.samples_learned / stats.elapsed, 2) if stats.elapsed else None)  # fmt: skip


def shard_table(summary: dict[str, Any]) -> Table:
    """A line per shard of a sharded run, and what the merge did."""
    merged = {row["source"]: row for row in summary.get("merged") or []}
    table = Table(title=f"{len(summary['shards'])} shards", title_justify="left")
    servers = len({shard.get("backend") for shard in summary["shards"]}) > 1  # several KATO servers: say whose
    for column in ("shard", "learned", "filtered", "failed", "skipped", "tokens", "seconds", "merged", *(("server",) if servers else ())):
        table.add_column(column, justify="right" if column not in ("shard", "merged", "server") else "left")
    for shard in summary["shards"]:
        samples = shard["samples"]
        row = next((row for source, row in merged.items() if source.endswith(shard["shard"].replace("/", "-of-"))), None)
        table.add_row(shard["shard"], f"{samples['learned']:,}", f"{samples['filtered']:,}", f"{samples['failed']:,}",
                      f"{samples['skipped']:,}", f"{shard['tokens']:,}", f"{shard['wall_seconds']:.1f}",
                      "" if row is None else "before" if row["already_merged"] else f"{int(row['patterns']):,} patterns",
                      *((str(shard.get("backend")),) if servers else ()))  # fmt: skip
    return table


def _short(count: int) -> str:
    """1234 → 1.2k, 4220000 → 4.2M: counts that fit a progress line."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= limit:
            return f"{count / limit:.1f}{suffix}"
    return str(count)


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"ingestd {summary.get('ingestd_version', '')} run".replace("  ", " "), show_header=False,
                  title_justify="left")  # fmt: skip
    table.add_column(style="bold")
    table.add_column(justify="right")
    samples = summary["samples"]
    rows = [
        ("samples read", f"{samples['read']:,}"),
        ("  learned", f"{samples['learned']:,}"),
        ("  filtered (too short)", f"{samples['filtered']:,}"),
        ("  failed (see failed.jsonl)", f"{samples['failed']:,}"),
        ("  skipped (done before)", f"{samples['skipped']:,}"),
        ("tokens", f"{summary['tokens']:,}"),
        *((f"patterns learned, level {level}", f"{count:,}") for level, count in enumerate(summary["patterns_per_level"])),
        *((f"already stored, level {level}", f"{count:,}")
          for level, count in enumerate(summary["replayed_per_level"]) if count),
        *((f"distinct patterns in node, level {level}", f"{count:,}")
          for level, count in enumerate(summary.get("distinct_patterns_per_level") or [])),
        ("requests", f"{summary['requests']:,}"),
        ("requests per sample", f"{summary['requests_per_sample'] or 0:.2f}"),
        ("wall time", f"{summary['wall_seconds']:.2f} s"),
        *((("started", summary["started_at"].replace("T", " ")), ("finished", (summary.get("finished_at") or "").replace("T", " ")))
          if summary.get("started_at") else ()),
        ("samples/s", f"{summary['samples_per_second'] or 0:,.1f}"),
        ("tokens/s", f"{summary['tokens_per_second'] or 0:,.0f}"),
    ]
    recovery = summary["recovery"]
    retries = sum(recovery["retries"].values())
    if retries or recovery["possible_duplicates"]:
        rows += [
            ("retries", ", ".join(f"{cause} {count}" for cause, count in sorted(recovery["retries"].items()))),
            ("sessions recreated", f"{recovery['session_recreations']:,}"),
            ("server outages", f"{recovery['server_outages']:,}"),
            ("possible duplicates", f"{recovery['possible_duplicates']:,}"),
        ]
    if summary["stopped_early"]:
        rows += [("  unfinished (stopped early)", f"{samples['unfinished']:,}"),
                 ("stopped early", "yes: run the same command again to resume")]  # fmt: skip
    for label, value in rows:
        table.add_row(label, value)
    return table
