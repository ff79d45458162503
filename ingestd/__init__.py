"""ingestd: stream text corpora into a KATO hierarchy, fast and exactly."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ingestd.api import build_config, run
    from ingestd.hierarchy import Hierarchy, Level
    from ingestd.kb import Deployment, KnowledgeBase
    from ingestd.pipeline import RunConfig, RunSummary, run_async
    from ingestd.source import SourceSpec

__version__ = "0.1.0"

__all__ = ["Deployment", "Hierarchy", "KnowledgeBase", "Level", "RunConfig", "RunSummary", "SourceSpec", "build_config", "run", "run_async"]

# Imported on first use: a process that needs one stage (a planner process tokenizing and planning) does
# not load the whole pipeline, the engine's HTTP server and their libraries.
_WHERE = {"build_config": "ingestd.api", "run": "ingestd.api", "Hierarchy": "ingestd.hierarchy",
          "Level": "ingestd.hierarchy", "KnowledgeBase": "ingestd.kb", "Deployment": "ingestd.kb", "RunConfig": "ingestd.pipeline", "RunSummary": "ingestd.pipeline",
          "run_async": "ingestd.pipeline", "SourceSpec": "ingestd.source"}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'ingestd' has no attribute {name!r}")
