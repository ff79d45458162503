"""The Python API a notebook user reaches for::

    from ingestd import Hierarchy, KnowledgeBase, run

    summary = run("corpus.txt", chunk_sizes=[8, 8, 8], metadata_levels=[2])     # embedded engine in ./kato-data
    summary = run("wikitext", Hierarchy.from_file("h.toml"), max_samples=1000, kato_url="http://kato:8000")
    KnowledgeBase("kato-data").top(level=1)

Options have the names of ``ingestd run``'s flags (``kato_url`` is ``--kato-url``, ``data_dir`` is
``--data-dir``); an unknown or misspelled one is refused, naming the closest. ``run`` works in a script and
inside a running event loop (Jupyter): there it learns on a thread of its own, and an interrupt stops it as
Ctrl-C stops the CLI (in-flight samples finish, progress is kept). A progress bar shows in notebooks
(``progress=False`` hides it, ``progress=True`` shows it anywhere); ``on_progress`` is called with the run's
:class:`~ingestd.pipeline.RunStats` about twice a second.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import difflib
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio

from ingestd.errors import IngestError
from ingestd.hierarchy import Hierarchy
from ingestd.pipeline import Pipeline, RunConfig, RunStats, RunSummary
from ingestd.retry import RetryPolicy
from ingestd.runtime import loop_options, throughput_gc
from ingestd.source import MIN_CHARS, SourceSpec

Sources = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
"""A source as ``run()`` takes it: a dataset key, a hub name, a path (file, directory, glob), or a list of paths."""

# Source options, by their ``ingestd run`` names, and the SourceSpec field each sets.
_SOURCE_OPTIONS = {"text_field": "text_field", "hub_config": "hub_config", "split": "split", "txt_mode": "txt_mode",
                   "metadata_fields": "metadata_fields", "source_label": "label", "min_chars": "min_chars",
                   "max_sample_chars": "max_chars"}  # fmt: skip
_HIERARCHY_OPTIONS = ("chunk_sizes", "metadata_levels", "node_ids")
_RETRY_OPTIONS = ("patience", "request_timeout")
_ALIASES = {"label": "source_label", "max_chars": "max_sample_chars"}  # earlier Python spellings, still taken
_RUN_OPTIONS = tuple(name for name in RunConfig.model_fields if name not in ("source", "hierarchy"))


class UnknownOption(IngestError, TypeError):
    """A keyword ``run`` does not take (a misspelling must not run with the default instead)."""


def option_names() -> list[str]:
    """Every keyword option of :func:`run` and :func:`build_config`."""
    return sorted({*_RUN_OPTIONS, *_SOURCE_OPTIONS, *_HIERARCHY_OPTIONS, *_RETRY_OPTIONS})


def _check_names(options: dict[str, Any]) -> None:
    known = {*option_names(), *_ALIASES}
    for name in options:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known - set(_ALIASES)), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"the options are: {', '.join(option_names())}"
            raise UnknownOption(f"run() got an unknown option {name!r}: {hint}")


def build_config(source: Sources | SourceSpec, hierarchy: Hierarchy | None = None, **options: Any) -> RunConfig:
    """A :class:`RunConfig` from a source, a hierarchy (or ``chunk_sizes``/``metadata_levels``/``node_ids``) and
    keyword options named as ``ingestd run``'s flags."""
    _check_names(options)
    for old, new in _ALIASES.items():
        if old in options:
            if new in options:
                raise UnknownOption(f"give {new!r} or its older spelling {old!r}, not both")
            options[new] = options.pop(old)
    shape = {name: options.pop(name) for name in _HIERARCHY_OPTIONS if name in options}
    if hierarchy is None:
        hierarchy = Hierarchy.from_chunk_sizes(list(shape.get("chunk_sizes", [8, 8, 8, 8])),
                                               set(shape.get("metadata_levels", ())), shape.get("node_ids", "node{level}"))  # fmt: skip
    elif shape:
        raise UnknownOption(f"give a hierarchy or {', '.join(shape)}, not both: {', '.join(shape)} build a hierarchy")
    retry = {name: options.pop(name) for name in _RETRY_OPTIONS if name in options}
    if retry:
        if "retry" in options:
            raise UnknownOption("give retry=RetryPolicy(...) or patience/request_timeout, not both")
        options["retry"] = RetryPolicy(**retry)
    source_options = {field: options.pop(name) for name, field in _SOURCE_OPTIONS.items() if name in options}
    if isinstance(source, SourceSpec):
        if source_options:
            raise UnknownOption(f"the source is a SourceSpec: set {', '.join(source_options)} on it")
    else:
        source_options.setdefault("min_chars", hierarchy.run_options.get("min_chars", MIN_CHARS))
        if "metadata_fields" in source_options:
            fields = source_options["metadata_fields"]
            source_options["metadata_fields"] = tuple(fields.split(",") if isinstance(fields, str) else fields)
        entries = (str(source),) if isinstance(source, (str, os.PathLike)) else tuple(map(str, source))
        source = SourceSpec(source=entries, **source_options)
    return RunConfig(source=source, hierarchy=hierarchy, **options)


def run(source: Sources | SourceSpec, hierarchy: Hierarchy | None = None, *, progress: bool | None = None,
        on_progress: Callable[[RunStats], None] | None = None, **options: Any) -> RunSummary:  # fmt: skip
    """Learn every sample of ``source`` into the hierarchy; blocks until done and returns the summary.

    ``progress``: a bar (tqdm's, as a widget in notebooks); default shown in notebooks only.
    """
    config = build_config(source, hierarchy, **options)  # (which refuses unknown options)
    show = _in_notebook() if progress is None else progress
    bar = _Bar(config) if show else None
    callbacks = [callback for callback in (bar, on_progress) if callback is not None]

    def report(stats: RunStats) -> None:
        for callback in callbacks:
            callback(stats)

    pipelines: list[Pipeline] = []  # made in the loop that runs it (its cancel scopes belong to that loop)

    async def learn() -> RunSummary:
        pipelines.append(Pipeline(config, on_progress=report if callbacks else None))
        return await pipelines[0].run()

    try:
        with throughput_gc():
            if _loop_running():
                return _run_beside_the_loop(learn, pipelines)
            return anyio.run(learn, **loop_options())
    finally:
        if bar is not None:
            bar.close()


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _run_beside_the_loop(learn: Callable[[], Awaitable[RunSummary]], pipelines: list[Pipeline]) -> RunSummary:
    """This thread's loop is busy (a notebook cell is running in it): learn in a loop on a thread of its own,
    and turn an interrupt of this thread (Jupyter's ■) into the CLI's Ctrl-C: stop reading, let in-flight
    samples finish, keep progress."""
    with anyio.from_thread.start_blocking_portal(**_portal_options()) as portal:
        future = portal.start_task_soon(learn)
        while True:
            try:
                # Waited for in short steps: an interrupt reaches this thread between them, at once.
                return future.result(timeout=0.1)
            except concurrent.futures.TimeoutError:
                continue
            except KeyboardInterrupt:
                if not pipelines:
                    future.cancel()
                elif pipelines[0].stopping:  # a second interrupt: stop at once
                    portal.call(pipelines[0].cancel)
                else:
                    portal.call(pipelines[0].stop)


def _portal_options() -> dict[str, Any]:
    options = loop_options()
    return {"backend": options["backend"], "backend_options": options.get("backend_options")}


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    try:
        ipython = shell.get_ipython()  # type: ignore[attr-defined]
    except AttributeError:
        return False
    return ipython is not None and "IPKernelApp" in getattr(ipython, "config", {})


class _Bar:
    """tqdm's bar (a widget in notebooks, text elsewhere) over samples, with the sample total when it is known."""

    def __init__(self, config: RunConfig) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=config.max_samples, unit="samples", desc="learning", dynamic_ncols=True)

    def __call__(self, stats: RunStats) -> None:
        if stats.samples_total is not None:
            self._bar.total = stats.samples_total
        self._bar.n = stats.samples_read
        self._bar.set_postfix(tokens=f"{stats.tokens:,}", patterns="/".join(map(str, stats.patterns_per_level)),
                              failed=stats.samples_failed, refresh=False)  # fmt: skip
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()
