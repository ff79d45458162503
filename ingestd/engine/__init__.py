"""ingestd's embedded KATO-compatible engine.

The pipeline reaches it only through KATO's protocol: over HTTP
(:func:`create_app`, served by ``ingestd kato serve``) or in-process through
:class:`Engine`, whose coroutines are KATO's operations one for one.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ingestd.engine.engine import KATO_VERSION, Engine, KatoError, Learned, SessionNotFound
    from ingestd.engine.feeders import Feeder
    from ingestd.engine.http import build_app, create_app
    from ingestd.engine.ledger import Place
    from ingestd.engine.session import Observation
    from ingestd.engine.settings import EngineSettings

__all__ = [
    "KATO_VERSION",
    "Engine",
    "EngineSettings",
    "Feeder",
    "KatoError",
    "Learned",
    "Observation",
    "Place",
    "SessionNotFound",
    "build_app",
    "create_app",
]

# Imported on first use: the learning rules (ingestd.engine.rules) are used without the engine, by the
# planner, and must not bring the HTTP server and its libraries with them.
_WHERE = {"KATO_VERSION": "engine", "Engine": "engine", "KatoError": "engine", "Learned": "engine",
          "SessionNotFound": "engine", "Feeder": "feeders", "build_app": "http", "create_app": "http",
          "Place": "ledger", "Observation": "session", "EngineSettings": "settings"}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"ingestd.engine.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'ingestd.engine' has no attribute {name!r}")
