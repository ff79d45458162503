"""Knowledge bases after learning: read them back (statistics, top patterns, unravelling to text, sampling),
compare and export them.

Each module is usable alone: :mod:`ingestd.kb.nodes` finds a hierarchy's nodes in a store,
:mod:`ingestd.kb.knowledge_base` reads it, :mod:`ingestd.kb.storage` computes what KATO stores for it,
:mod:`ingestd.kb.publish` writes that into a KATO deployment (:mod:`ingestd.kb.deployment`), which
:class:`~ingestd.kb.KnowledgeBase` reads back too. The store is reached only through the engine's read-only
:class:`ingestd.engine.reader.StoreReader`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ingestd.kb.deployment import Deployment
    from ingestd.kb.knowledge_base import KnowledgeBase, Missing, PatternNotFound, PatternView, Unravelled
    from ingestd.kb.nodes import Hierarchy, Node, NodesUnknown

__all__ = ["Deployment", "Hierarchy", "KnowledgeBase", "Missing", "Node", "NodesUnknown", "PatternNotFound", "PatternView",
           "Unravelled"]

# Imported on first use: every ``ingestd`` command builds the CLI, ``inspect`` included, and must not pay for
# the deployment's clients and numpy to learn or serve.
_WHERE = {"Deployment": "deployment", "KnowledgeBase": "knowledge_base", "Missing": "knowledge_base",
          "PatternNotFound": "knowledge_base", "PatternView": "knowledge_base", "Unravelled": "knowledge_base",
          "Hierarchy": "nodes", "Node": "nodes", "NodesUnknown": "nodes"}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"ingestd.kb.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'ingestd.kb' has no attribute {name!r}")
