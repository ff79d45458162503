"""ingestd: stream text corpora into a KATO hierarchy, fast and exactly."""

from ingestd.api import build_config, run
from ingestd.hierarchy import Hierarchy, Level
from ingestd.pipeline import RunConfig, RunSummary, run_async
from ingestd.source import SourceSpec

__version__ = "0.1.0"

__all__ = ["Hierarchy", "Level", "RunConfig", "RunSummary", "SourceSpec", "build_config", "run", "run_async"]
