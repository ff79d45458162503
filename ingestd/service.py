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
import time
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

from ingestd.jobs import JobManager, JobPolicy, JobSpec
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
    policy = JobPolicy(settings.job_source_roots(), settings.job_kato_urls())
    manager = JobManager(settings.state_dir, max_jobs=settings.max_jobs, drain_timeout=settings.drain_timeout,
                         policy=policy, on_fatal=on_fatal)  # fmt: skip
    token = settings.api_token()
    expected_authorization = f"Bearer {token}".encode()
    readiness = _Readiness(manager)

    async def healthz(request: Request) -> Response:
        if manager.failed:
            return JSONResponse({"status": "job runner failed; the daemon is stopping"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        problems = await readiness.problems()
        # KATO addresses are shown to token holders only (/readyz may be open to anyone).
        given = request.headers.get("authorization", "").encode()
        if not secrets.compare_digest(given, expected_authorization):
            problems = [problem.split(": ", 1)[0] for problem in problems]
        body = {"status": "ready" if not problems else "not ready", "problems": problems}
        return JSONResponse(body, status_code=200 if not problems else 503)

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    async def submit(request: Request) -> Response:
        body = await _limited_body(request, settings.max_body_bytes)
        if body is None:
            return JSONResponse({"detail": f"the body is larger than {settings.max_body_bytes} bytes "
                                           "(INGESTD_MAX_BODY_BYTES)"}, status_code=413)  # fmt: skip
        try:
            spec = JobSpec.model_validate_json(body)
        except ValidationError as error:  # the input is not echoed back: it may be large, or not text
            errors = error.errors(include_url=False, include_context=False, include_input=False)
            return JSONResponse({"detail": [{**item, "loc": ["body", *item["loc"]]} for item in errors]}, status_code=422)
        refusal = policy.refusal(spec)
        if refusal is not None:
            return JSONResponse({"detail": [{"type": "value_error", "loc": ["body", refusal[0]], "msg": refusal[1]}]},
                                status_code=422)  # fmt: skip
        return JSONResponse(manager.submit(spec), status_code=201)

    async def list_jobs(request: Request) -> Response:
        try:
            offset = min(2**62, max(0, int(request.query_params.get("offset", 0))))
            limit = min(1000, max(1, int(request.query_params.get("limit", 100))))
        except ValueError:
            return JSONResponse({"detail": "offset and limit are whole numbers (limit at most 1000)"}, status_code=422)
        jobs, total = manager.all(offset=offset, limit=limit)
        following = offset + len(jobs)
        return JSONResponse({"jobs": jobs, "total": total, "next_offset": following if following < total else None})

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


async def _limited_body(request: Request, limit: int) -> bytes | None:
    """The request body, or None if it is longer than ``limit`` bytes (read no further than that)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


class _Readiness:
    """/readyz's answer: the job store, and every KATO a queued or running job needs, checked at once with a
    bounded wait, and kept for a few seconds so that probes cannot make the daemon hammer them."""

    TIMEOUT = 2.0
    KEEP = 5.0

    def __init__(self, manager: JobManager) -> None:
        self.manager = manager
        self._answer: tuple[float, list[str]] | None = None
        self._lock = anyio.Lock()

    async def problems(self) -> list[str]:
        async with self._lock:
            if self._answer is not None and time.monotonic() - self._answer[0] < self.KEEP:
                return self._answer[1]
            ready, reason = self.manager.ready()
            problems = [] if ready else [reason]
            urls = sorted(self.manager.kato_urls())
            found: dict[str, str | None] = {url: f"no answer within {self.TIMEOUT:g} s" for url in urls}
            async with httpx.AsyncClient(timeout=self.TIMEOUT) as client:
                with anyio.move_on_after(self.TIMEOUT + 0.5):
                    async with anyio.create_task_group() as group:
                        for url in urls:
                            group.start_soon(self._check, client, url, found)
            problems += [f"a KATO server is not ready: {url} {why}" for url, why in found.items() if why is not None]
            self._answer = (time.monotonic(), problems)
            return problems

    @staticmethod
    async def _check(client: httpx.AsyncClient, url: str, found: dict[str, str | None]) -> None:
        try:
            answer = await client.get(url + "/health")
            found[url] = None if answer.status_code == 200 else f"answered {answer.status_code}"
        except httpx.TimeoutException:
            found[url] = f"no answer within {_Readiness.TIMEOUT:g} s"
        except (httpx.HTTPError, httpx.InvalidURL) as error:
            found[url] = f"unreachable ({type(error).__name__})"


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
                            http=http_protocol(settings.header_timeout, settings.body_timeout),
                            timeout_graceful_shutdown=int(settings.drain_timeout) + 10)  # fmt: skip
    server = _DrainingServer(config, on_second_signal=app.state.jobs.abort)
    with throughput_gc():
        server.run()
    if server.fatal:
        sys.exit(1)
