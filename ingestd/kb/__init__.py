"""Knowledge bases after learning: read them back (statistics, top patterns, unravelling to text, sampling),
compare and export them.

Each module is usable alone: :mod:`ingestd.kb.nodes` finds a hierarchy's nodes in a store,
:mod:`ingestd.kb.knowledge_base` reads it, :mod:`ingestd.kb.storage` computes what KATO stores for it,
:mod:`ingestd.kb.publish` writes that into a KATO deployment (:mod:`ingestd.kb.deployment`), which
:class:`~ingestd.kb.KnowledgeBase` reads back too. The store is reached only through the engine's read-only
:class:`ingestd.engine.reader.StoreReader`.
"""

from __future__ import annotations

from ingestd.kb.deployment import Deployment
from ingestd.kb.knowledge_base import KnowledgeBase, Missing, PatternNotFound, PatternView, Unravelled
from ingestd.kb.nodes import Hierarchy, Node, NodesUnknown

__all__ = ["Deployment", "Hierarchy", "KnowledgeBase", "Missing", "Node", "NodesUnknown", "PatternNotFound", "PatternView",
           "Unravelled"]
