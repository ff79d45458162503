"""Run the engine's HTTP app under uvicorn (``ingestd kato serve``)."""

from __future__ import annotations

import importlib.util
import sys

import uvicorn

from ingestd.engine.http import create_app
from ingestd.engine.settings import ServerSettings


def serve(settings: ServerSettings) -> None:
    app = create_app(settings, max_body_bytes=settings.max_body_bytes)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        log_level="warning",
        access_log=False,
        timeout_keep_alive=5,  # as KATO's image
    )
    server = uvicorn.Server(config)
    print(
        f"ingestd kato: KATO 3.10.1 API on http://{settings.host}:{settings.port} "
        f"(data: {settings.data_dir.resolve()}, durability: {settings.durability})",
        file=sys.stderr,
        flush=True,
    )
    server.run()
