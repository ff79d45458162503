"""The Python API a notebook user reaches for::

    from ingestd import Hierarchy, run

    hierarchy = Hierarchy().add_layer(chunk_size=8).add_layer(chunk_size=8, capture_metadata=True)
    summary = run("wikitext", hierarchy, max_samples=1000)          # embedded engine in ./kato-data
    summary = run("corpus.jsonl", hierarchy, kato_url="http://kato:8000", workers=16)

Inside a running event loop (Jupyter), use ``await run_async(...)`` instead of ``run``.
"""

from __future__ import annotations

from typing import Any

import anyio

from ingestd.hierarchy import Hierarchy
from ingestd.pipeline import RunConfig, RunSummary, run_async
from ingestd.runtime import loop_options, throughput_gc
from ingestd.source import SourceSpec

_SOURCE_OPTIONS = ("text_field", "hub_config", "split", "txt_mode", "metadata_fields", "label", "min_chars")


def build_config(source: str | SourceSpec, hierarchy: Hierarchy, **options: Any) -> RunConfig:
    """A :class:`RunConfig` from a source, a hierarchy and keyword options (source options included)."""
    if not isinstance(source, SourceSpec):
        source_options = {**hierarchy.run_options, **{key: options.pop(key) for key in _SOURCE_OPTIONS if key in options}}
        if "metadata_fields" in source_options:
            source_options["metadata_fields"] = tuple(source_options["metadata_fields"])
        source = SourceSpec(source=str(source), **source_options)
    return RunConfig(source=source, hierarchy=hierarchy, **options)


def run(source: str | SourceSpec, hierarchy: Hierarchy, **options: Any) -> RunSummary:
    """Learn every sample of ``source`` into ``hierarchy``; blocks until done and returns the summary."""
    config = build_config(source, hierarchy, **options)
    with throughput_gc():
        return anyio.run(run_async, config, **loop_options())
