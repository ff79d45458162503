"""Process-level tuning shared by the long-running entry points (``ingestd run``, ``ingestd kato serve``).

* uvloop, where installed, for the event loop.
* The garbage collector: a training run allocates millions of short-lived
  containers (JSON bodies, observations, results), and with CPython's default
  thresholds (700, 10, 10) the resulting collections keep rescanning every
  long-lived object of the loaded libraries. Freezing what exists after start
  and collecting young objects less often cut the engine server's CPU per
  sample by about 40% (measured with ``benchmarks/pipeline_bench.py``).
  Reference cycles are still collected, just in larger batches.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
from collections.abc import Iterator
from typing import Any

THROUGHPUT_THRESHOLDS = (50_000, 20, 100)


def loop_options() -> dict[str, Any]:
    """``anyio.run`` keyword arguments: asyncio, on uvloop when it is installed."""
    if importlib.util.find_spec("uvloop") is not None:
        return {"backend": "asyncio", "backend_options": {"use_uvloop": True}}
    return {"backend": "asyncio"}


@contextlib.contextmanager
def throughput_gc() -> Iterator[None]:
    """Collector settings for a long, allocation-heavy run; the previous ones are restored after."""
    previous = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THROUGHPUT_THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*previous)
        gc.unfreeze()
