"""``ingestd serve``: the daemon. A job API, probes and Prometheus metrics, with the pipelines in the same loop.

* ``POST /jobs`` (a :class:`~ingestd.jobs.JobSpec`) → 201 with the job; ``GET /jobs``; ``GET /jobs/{id}``;
  ``POST /jobs/{id}/cancel``; ``POST /jobs/{id}/resume``; ``POST /jobs/{id}/retry-failed``. These need
  ``Authorization: Bearer <token>``.
* ``GET /healthz`` (the process answers and its job runner is alive; always open), ``GET /readyz`` (the job
  store works and every KATO a job needs answers ``/health``; open unless ``open_readyz`` is off),
  ``GET /metrics`` (open unless ``open_metrics`` is off).

If the job runner itself fails (not a job: a job's failure or crash ends only that job), the daemon
stops with exit status 1 so that its supervisor restarts it, and the jobs resume.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from types import FrameType
from typing import Any

import anyio
import httpx
import structlog
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ingestd.jobs import JobManager, JobSpec
from ingestd.settings import Settings

log = structlog.get_logger("ingestd.service")


class BearerAuth:
    """401 without the right bearer token, except on the paths left open."""

    def __init__(self, app: ASGIApp, token: str, open_paths: frozenset[str]) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._allowed(scope):
            response = JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401,
                                    headers={"www-authenticate": "Bearer"})  # fmt: skip
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        if scope["path"] in self.open_paths:
            return True
        given = dict(scope["headers"]).get(b"authorization", b"")
        return secrets.compare_digest(given, self.expected)


def build_app(settings: Settings, *, on_fatal: Callable[[], None] = lambda: None) -> Starlette:
    """The daemon's ASGI app; ``on_fatal`` is called if the job runner fails (``serve`` then exits 1)."""
    manager = JobManager(settings.state_dir, max_jobs=settings.max_jobs, drain_timeout=settings.drain_timeout,
                         on_fatal=on_fatal)  # fmt: skip
    token = settings.api_token()

    async def healthz(request: Request) -> Response:
        if manager.failed:
            return JSONResponse({"status": "job runner failed; the daemon is stopping"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        ready, reason = manager.ready()
        problems = [] if ready else [reason]
        async with httpx.AsyncClient(timeout=3.0) as client:
            for url in sorted(manager.kato_urls()):
                try:
                    answer = await client.get(url.rstrip("/") + "/health")
                    if answer.status_code != 200:
                        problems.append(f"KATO at {url} answered {answer.status_code}")
                except (httpx.HTTPError, httpx.InvalidURL) as error:
                    problems.append(f"KATO at {url} unreachable ({type(error).__name__})")
        body = {"status": "ready" if not problems else "not ready", "problems": problems}
        return JSONResponse(body, status_code=200 if not problems else 503)

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    async def submit(request: Request) -> Response:
        try:
            spec = JobSpec.model_validate_json(await request.body())
        except ValidationError as error:
            return JSONResponse({"detail": error.errors(include_url=False, include_context=False)}, status_code=422)
        return JSONResponse(manager.submit(spec), status_code=201)

    async def list_jobs(request: Request) -> Response:
        return JSONResponse({"jobs": manager.all()})

    def one(operation: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            job = operation(request.path_params["job_id"])
            if job is None:
                return JSONResponse({"detail": f"no job {request.path_params['job_id']}"}, status_code=404)
            return JSONResponse(job)

        return endpoint

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        manager.open()
        async with anyio.create_task_group() as group:
            group.start_soon(manager.run)
            log.info("ingestd daemon ready", host=settings.host, port=settings.port, max_jobs=settings.max_jobs,
                     state_dir=str(settings.state_dir), token="set" if token else "none")  # fmt: skip
            try:
                yield
            finally:
                log.warning("stopping: draining running jobs; they resume at the next start")
                await manager.shutdown()
                group.cancel_scope.cancel()

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
        Route("/jobs", submit, methods=["POST"]),
        Route("/jobs", list_jobs, methods=["GET"]),
        Route("/jobs/{job_id}", one(manager.get), methods=["GET"]),
        Route("/jobs/{job_id}/cancel", one(manager.cancel), methods=["POST"]),
        Route("/jobs/{job_id}/resume", one(manager.resume), methods=["POST"]),
        Route("/jobs/{job_id}/retry-failed", one(manager.retry_failed), methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.jobs = manager
    open_paths = {"/healthz"} | ({"/readyz"} if settings.open_readyz else set()) | (
        {"/metrics"} if settings.open_metrics else set())  # fmt: skip
    app.add_middleware(BearerAuth, token=token, open_paths=frozenset(open_paths))
    return app


class _DrainingServer(uvicorn.Server):
    """uvicorn, except that a drained shutdown exits 0 instead of re-raising the signal that asked for it,
    and a second SIGINT/SIGTERM stops draining (``on_second_signal``)."""

    def __init__(self, config: uvicorn.Config, on_second_signal: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_second_signal = on_second_signal
        self.fatal = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            self.force_exit = True
            self._on_second_signal()
        super().handle_exit(sig, frame)

    def stop_fatally(self) -> None:
        self.fatal = True
        self.should_exit = True

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve(settings: Settings) -> None:
    """Run the daemon until SIGINT/SIGTERM, draining running jobs; a second signal stops them at once.

    Exits 1 if the job runner failed (the jobs resume at the next start).
    """
    import importlib.util

    from ingestd.runtime import http_protocol, throughput_gc

    server: _DrainingServer | None = None

    def fatal() -> None:
        assert server is not None
        server.stop_fatally()

    app = build_app(settings, on_fatal=fatal)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", log_config=None,
                            loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
                            http=http_protocol(settings.header_timeout),
                            timeout_graceful_shutdown=int(settings.drain_timeout) + 10)  # fmt: skip
    server = _DrainingServer(config, on_second_signal=app.state.jobs.abort)
    with throughput_gc():
        server.run()
    if server.fatal:
        sys.exit(1)
