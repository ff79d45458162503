"""ingestd's embedded KATO-compatible engine.

The pipeline reaches it only through KATO's protocol: over HTTP
(:func:`create_app`, served by ``ingestd kato serve``) or in-process through
:class:`Engine`, whose coroutines are KATO's operations one for one.
"""

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
    "KatoError",
    "Feeder",
    "Learned",
    "Observation",
    "Place",
    "SessionNotFound",
    "build_app",
    "create_app",
]
