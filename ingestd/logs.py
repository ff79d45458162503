"""structlog setup: JSON lines in production, readable output on a terminal. Configured once, by the CLI.

Every event carries a timestamp and its severity (``level``); events of a run also carry what is bound on
the task that logs them: ``job_id`` (a daemon job), ``worker``, ``hierarchy_level``, ``node_id`` and
``sample_index``. Other
libraries' logging (uvicorn, datasets) goes through the same renderer, warnings and worse only unless the
level is debug, so a log shipper sees one format.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import orjson
import structlog

LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]


class _CurrentStderr:
    """Whatever ``sys.stderr`` is when a line is written: a live progress bar puts a proxy there that prints log
    lines above the bar; a stream taken once, before the bar started, would write through it and break it."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


_STDERR = _CurrentStderr()


def configure_logging(log_format: LogFormat = "auto", level: LogLevel = "info") -> None:
    """Log to stderr; ``auto`` is JSON unless stderr is a terminal."""
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    renderers: list[structlog.typing.Processor] = (
        [structlog.processors.format_exc_info,  # a traceback as one "exception" string
         structlog.processors.JSONRenderer(serializer=lambda event, **_: orjson.dumps(event, default=str).decode())]
        if use_json
        else [structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    )  # fmt: skip
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    threshold = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level, stamp, *renderers],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.PrintLoggerFactory(file=_STDERR),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(_STDERR)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.contextvars.merge_contextvars, structlog.stdlib.add_log_level,
                           structlog.stdlib.add_logger_name, stamp],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderers],
    ))  # fmt: skip
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(threshold if threshold <= logging.DEBUG else max(threshold, logging.WARNING))


def adopt_library_logging(*names: str) -> None:
    """Drop the handlers libraries add to their own loggers at import (datasets, huggingface_hub print to stderr
    themselves and propagate too): their records then reach only the handler configured above, in its format."""
    for name in names:
        logging.getLogger(name).handlers = []
