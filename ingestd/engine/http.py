"""KATO 3.10.1's HTTP API over the embedded engine (protocol §1–§3).

Starlette, not FastAPI: KATO's answers (validation bodies, error shapes, key
order) are pinned here explicitly instead of depending on whichever FastAPI
version is installed.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import orjson
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ingestd.engine import ledger
from ingestd.engine import load as load_rules
from ingestd.engine.engine import KATO_VERSION, Engine, KatoError, SessionNotFound
from ingestd.engine.feeders import Feeder
from ingestd.engine.ledger import Place
from ingestd.engine.load import LevelLoad, SampleLoad
from ingestd.engine.schemas import (
    ClaimNodesRequest,
    CreateSessionRequest,
    LedgerForgetRequest,
    LedgerStatusRequest,
    LoadRequest,
    NodeCountsRequest,
    ObservationData,
    ObservationSequenceRequest,
)
from ingestd.engine.session import Observation
from ingestd.engine.settings import EngineSettings

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024

# KATO endpoints that only serve inference or monitoring. The engine answers
# them with 501 and says so, rather than with numbers that would not be KATO's.
NOT_IMPLEMENTED: tuple[tuple[str, str], ...] = (
    ("GET", "/sessions/{session_id}/predictions"),
    ("POST", "/sessions/{session_id}/finalize-training"),
    ("GET", "/sessions/{session_id}/percept-data"),
    ("GET", "/sessions/{session_id}/cognition-data"),
    ("GET", "/symbols/stats"),
    ("GET", "/symbols/affinity"),
    ("GET", "/symbols/{symbol}/affinity"),
    ("GET", "/status"),
    ("GET", "/metrics"),
    ("GET", "/stats"),
    ("GET", "/metrics/{name}"),
    ("GET", "/concurrency"),
    ("GET", "/cache/stats"),
    ("POST", "/cache/invalidate"),
    ("GET", "/distributed-stm/stats"),
    ("GET", "/connection-pools"),
)


class RequestInvalid(Exception):
    """The request failed validation; ``errors`` is FastAPI's 422 ``detail`` list."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("request validation failed")
        self.errors = errors


def _located(errors: list[Any], prefix: tuple[Any, ...]) -> list[dict[str, Any]]:
    located = []
    for error in errors:
        entry: dict[str, Any] = {
            "type": error["type"],
            "loc": [*prefix, *error["loc"]],
            "msg": error["msg"],
            "input": error["input"],
        }
        if "ctx" in error:
            entry["ctx"] = {key: value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
                            for key, value in error["ctx"].items()}  # fmt: skip
        located.append(entry)
    return located


_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
"""A UTF-16 surrogate, escaped or encoded: in a valid pair it is one character, alone it is none."""


def _surrogate_in(raw: bytes) -> re.Match[bytes] | None:
    # Two substring scans first: 6x faster than the pattern on a training client's bodies, which have neither.
    return _SURROGATE.search(raw) if b"\\u" in raw or b"\xed" in raw else None


def _walk(value: Any, loc: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """Every value inside a decoded JSON ``value``, with where it is; an object's keys are given as values too.
    Iterative: bodies nest as deep as Python's parser takes, past what recursion could follow."""
    pending: list[tuple[Any, tuple[Any, ...]]] = [(value, loc)]
    while pending:
        item, where = pending.pop()
        yield where, item
        if isinstance(item, dict):
            pending.extend((key, where) for key in item)
            pending.extend((child, (*where, key)) for key, child in item.items())
        elif isinstance(item, list):
            pending.extend((child, (*where, index)) for index, child in enumerate(item))


def _lone_surrogate(value: Any) -> bool:
    for _, item in _walk(value):
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False


async def _json_body(request: Request) -> Any:
    """The body as FastAPI hands it to a body parameter: ``None`` if empty, else decoded JSON."""
    raw = await request.body()
    if not raw:
        return None
    if not _is_json(request.headers.get("content-type")):
        return raw.decode("utf-8", "replace")
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as error:
        raise RequestInvalid(
            [{"type": "json_invalid", "loc": ["body", error.pos], "msg": "JSON decode error", "input": {},
              "ctx": {"error": error.msg}}]
        ) from None  # fmt: skip
    except (RecursionError, ValueError):
        # FastAPI's answer to any other failure of json.loads: bytes that are not UTF-8 (UnicodeDecodeError),
        # an integer past Python's 4,300 digits, nesting deeper than Python's parser goes.
        raise KatoError(400, "There was an error parsing the body") from None
    found = _surrogate_in(raw)
    if found is not None and _lone_surrogate(body):
        # KATO takes the body, and then cannot store or answer it (a lone surrogate is not UTF-8): refused here,
        # in the shape of its other JSON errors, before anything is applied.
        raise RequestInvalid(
            [{"type": "json_invalid", "loc": ["body", found.start()], "msg": "JSON decode error", "input": {},
              "ctx": {"error": "Lone surrogate: not a Unicode character"}}]
        )  # fmt: skip
    return body


def _missing_body() -> RequestInvalid:
    return RequestInvalid([{"type": "missing", "loc": ["body"], "msg": "Field required", "input": None}])


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return True
    main_type, _, subtype = content_type.partition(";")[0].strip().lower().partition("/")
    return main_type == "application" and (subtype == "json" or subtype.endswith("+json"))


async def _body_model(request: Request, model: type[BaseModel]) -> Any:
    """The body validated as FastAPI does (json.loads, then the model), with KATO's exact 422 bodies."""
    body = await _json_body(request)
    if body is None:
        raise _missing_body()
    try:
        return model.model_validate(body, from_attributes=True)  # as FastAPI validates bodies
    except ValidationError as error:
        raise RequestInvalid(_located(error.errors(include_url=False), ("body",))) from None


_DICT_BODY = TypeAdapter(dict[str, Any])
_LOAD = TypeAdapter(LoadRequest)
_INT = TypeAdapter(int)


def _query_int(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        return _INT.validate_python(raw)
    except ValidationError as error:
        raise RequestInvalid(_located(error.errors(include_url=False), ("query", name))) from None


def _check_finite(value: Any, loc: tuple[str, ...]) -> None:
    """A 422 for NaN or an infinity anywhere in ``value``: Python's json reads them, JSON cannot write them back
    (KATO answers 500 after creating the session)."""
    for where, item in _walk(value, loc):
        if isinstance(item, float) and not math.isfinite(item):
            raise RequestInvalid([{"type": "finite_number", "loc": list(where), "msg": "Input should be a finite "
                                   "number", "input": item}])  # fmt: skip


def _check_ttl(ttl: int, loc: tuple[str, str], *, lowest: int | None) -> None:
    """A session lifetime the engine can keep. KATO answers 500 where Redis refuses one (not positive, at
    creation) or its clock overflows (past the year 9999); these are client input, so a 422 here."""
    if lowest is not None and ttl < lowest:
        raise RequestInvalid([{"type": "greater_than_equal", "loc": list(loc), "msg": f"Input should be greater "
                               f"than or equal to {lowest}", "input": ttl, "ctx": {"ge": lowest}}])  # fmt: skip
    try:
        datetime.datetime.fromtimestamp(time.time() + ttl, tz=datetime.UTC)
    except (OverflowError, ValueError, OSError):
        raise RequestInvalid([{"type": "value_error", "loc": list(loc), "msg": "Value error, the session would "
                               "expire after the year 9999", "input": ttl}]) from None  # fmt: skip


class FloatFreeJSONResponse(Response):
    """KATO's bytes for bodies that hold no floats, rendered by orjson.

    For strings, ints, bools and null, orjson's compact output equals
    ``json.dumps(ensure_ascii=False, separators=(",", ":"))`` byte for byte;
    only float formatting differs (``1e16`` vs ``1e+16``), so bodies with floats
    keep Starlette's ``JSONResponse``.
    """

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


_FLAGS = ("learn_after_each", "learn_at_end", "clear_stm_between")
_OBSERVATION_KEYS = frozenset({"strings", "vectors", "emotives", "metadata", "unique_id"})
_SEQUENCE_KEYS = frozenset({"observations", *_FLAGS})
_PLAIN_DEPTH = 64


def _plain(value: Any, depth: int = 0) -> bool:
    """True if ``json.loads`` gives what orjson gave: no floats (orjson reads integers past 64 bits as floats)
    and shallow nesting (orjson parses deeper than Python's parser, whose limit FastAPI's 400 follows)."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return True
    if depth >= _PLAIN_DEPTH:
        return False
    if kind is dict:
        return all(_plain(item, depth + 1) for item in value.values())
    if kind is list:
        return all(_plain(item, depth + 1) for item in value)
    return False


def _quick_observation(item: Any) -> Observation | None:
    """An observation in the shape clients send (strings, maybe metadata and unique_id), or None.

    Accepts only inputs that pydantic accepts as they are (no coercion involved) and that Python's
    parser reads as orjson did, so the result equals the validated model's; anything else takes the
    full validation path.
    """
    if type(item) is not dict or not _OBSERVATION_KEYS.issuperset(item):
        return None
    strings = item.get("strings", [])
    metadata = item.get("metadata", {})
    unique_id = item.get("unique_id")
    if (type(strings) is not list or type(metadata) is not dict or item.get("vectors") or item.get("emotives")
            or (unique_id is not None and type(unique_id) is not str)
            or ("vectors" in item and type(item["vectors"]) is not list)
            or ("emotives" in item and type(item["emotives"]) is not dict)):  # fmt: skip
        return None
    for symbol in strings:
        if type(symbol) is not str:
            return None
    if metadata and not _plain(metadata):
        return None
    return Observation(strings, {}, metadata, unique_id)


def _quick_sequence(body: Any) -> tuple[list[Observation], dict[str, bool]] | None:
    """An observe-sequence body in the usual shape, without pydantic; None sends it the full way."""
    if type(body) is not dict or type(body.get("observations")) is not list or not _SEQUENCE_KEYS.issuperset(body):
        return None
    flags = {flag: body.get(flag, False) for flag in _FLAGS}
    if any(type(value) is not bool for value in flags.values()):
        return None
    observations = []
    append = observations.append
    for item in body["observations"]:
        # The shape a training client sends, {"strings": [...]} and nothing else, checked inline;
        # any other item goes through the general check.
        if type(item) is dict and len(item) == 1:
            strings = item.get("strings")
            if type(strings) is list and len(strings) == 1 and type(strings[0]) is str:
                append(Observation(strings, {}, {}, None))
                continue
        observation = _quick_observation(item)
        if observation is None:
            return None
        append(observation)
    return observations, flags


async def _quick_body(request: Request) -> Any:
    return _quick_json(await request.body(), request.headers.get("content-type"))


def _quick_json(raw: bytes, content_type: str | None) -> Any:
    """The body decoded by orjson for the fast paths, or None for the full way: not JSON, or holding a
    surrogate (whose refusal the full way words)."""
    if not raw or not _is_json(content_type) or _surrogate_in(raw):
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _ledger_place(raw: str | None) -> Place | None:
    """The ``ingestd-ledger`` header as a place, or None; a malformed one is a 400."""
    if raw is None:
        return None
    try:
        return Place.from_header(raw)
    except ValueError as error:
        raise KatoError(400, str(error)) from None


def _observation(item: ObservationData) -> Observation:
    if item.vectors:
        raise KatoError(501, "Vector observations are not supported by the embedded ingestd engine.")
    return Observation(item.strings, item.emotives, item.metadata, getattr(item, "unique_id", None))


def build_app(engine: Engine, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, manage_engine: bool = True,
              bulk_loads: bool = True) -> Starlette:  # fmt: skip
    """The KATO HTTP API over ``engine``. With ``manage_engine`` the app starts and closes it."""

    async def health(request: Request) -> Response:
        return JSONResponse(engine.health())

    async def root(request: Request) -> Response:
        return JSONResponse(engine.root())

    async def create_session(request: Request) -> Response:
        body: CreateSessionRequest = await _body_model(request, CreateSessionRequest)
        for field in ("metadata", "config"):  # echoed in the answer, which JSON could not then carry
            _check_finite(getattr(body, field), ("body", field))
        if body.ttl_seconds:
            _check_ttl(body.ttl_seconds, ("body", "ttl_seconds"), lowest=1)
        key = request.headers.get("idempotency-key")
        return JSONResponse(
            await engine.create_session(body.node_id, body.config, body.metadata, body.ttl_seconds, idempotency_key=key),
            headers=None if key is None else {"idempotency-key": key},
        )

    async def count_sessions(request: Request) -> Response:
        return JSONResponse({"active_session_count": engine.session_count()})

    async def get_session(request: Request) -> Response:
        session_id = request.path_params["session_id"]
        try:
            return JSONResponse(await engine.get_session(session_id))
        except SessionNotFound as missing:
            raise KatoError(404, str(missing)) from None

    async def delete_session(request: Request) -> Response:
        return JSONResponse(await engine.delete_session(request.path_params["session_id"]))

    async def exists(request: Request) -> Response:
        return JSONResponse(await engine.exists(request.path_params["session_id"]))

    async def extend(request: Request) -> Response:
        ttl_seconds = _query_int(request, "ttl_seconds", 3600)
        _check_ttl(ttl_seconds, ("query", "ttl_seconds"), lowest=None)
        return JSONResponse(await engine.extend_session(request.path_params["session_id"], ttl_seconds))

    async def get_config(request: Request) -> Response:
        return JSONResponse(await engine.get_config(request.path_params["session_id"]))

    async def update_config(request: Request) -> Response:
        body = await _json_body(request)
        if body is None:
            raise _missing_body()
        try:
            updates = _DICT_BODY.validate_python(body, from_attributes=True)
        except ValidationError as error:
            raise RequestInvalid(_located(error.errors(include_url=False), ("body",))) from None
        return JSONResponse(await engine.update_config(request.path_params["session_id"], updates))

    async def observe(request: Request) -> Response:
        observation = _quick_observation(await _quick_body(request))
        if observation is None:
            observation = _observation(await _body_model(request, ObservationData))
        return FloatFreeJSONResponse(await engine.observe(request.path_params["session_id"], observation))

    async def observe_sequence(request: Request) -> Response:
        quick = _quick_sequence(await _quick_body(request))
        if quick is not None:
            observations, flags = quick
        else:
            body: ObservationSequenceRequest = await _body_model(request, ObservationSequenceRequest)
            observations = [_observation(item) for item in body.observations]
            flags = {flag: getattr(body, flag) for flag in _FLAGS}
        key = request.headers.get("idempotency-key")
        place = _ledger_place(request.headers.get(ledger.HEADER))
        answer = await engine.observe_sequence(request.path_params["session_id"], observations, **flags,
                                               idempotency_key=key, place=place)  # fmt: skip
        return FloatFreeJSONResponse(answer, headers=_echo(key, place))  # says: keys and places are honoured here

    async def learn(request: Request) -> Response:
        return JSONResponse(await engine.learn(request.path_params["session_id"]))

    async def stm(request: Request) -> Response:
        return JSONResponse(await engine.get_stm(request.path_params["session_id"]))

    async def clear_stm(request: Request) -> Response:
        return JSONResponse(await engine.clear_stm(request.path_params["session_id"]))

    async def clear_all(request: Request) -> Response:
        return JSONResponse(await engine.clear_all(request.path_params["session_id"]))

    async def get_pattern(request: Request) -> Response:
        node_id = request.query_params.get("node_id")
        if node_id is None:
            test_id = request.headers.get("x-test-id")
            if test_id is not None:
                node_id = test_id if test_id.startswith("test_") else f"test_{test_id}"
            else:
                node_id = request.headers.get("x-node-id", "default_node")
        return JSONResponse(await engine.get_pattern(request.path_params["pattern_id"], node_id))

    # -- ingestd's extensions (KATO answers 404 to all of these) --------------------------------------------
    async def extensions(request: Request) -> Response:
        return JSONResponse({"service": "ingestd engine", "kato_version": KATO_VERSION, "store_id": engine.store_id,
                             "extensions": {"ledger": 2, "feeders": 1, **({"load": 1} if bulk_loads else {})}})  # fmt: skip

    async def ledger_status(request: Request) -> Response:
        body: LedgerStatusRequest = await _body_model(request, LedgerStatusRequest)
        found = await engine.ledger_status(_run_key(request), body.node_ids, body.samples)
        return JSONResponse({"totals": found["totals"],
                             "samples": {str(sample): stored for sample, stored in found["samples"].items()},
                             "ahead": {str(sample): ranges for sample, ranges in found["ahead"].items()}})  # fmt: skip

    async def ledger_forget(request: Request) -> Response:
        body: LedgerForgetRequest = await _body_model(request, LedgerForgetRequest)
        forgotten = await engine.ledger_forget(_run_key(request), samples=body.samples, keep=body.keep,
                                               everything=body.everything)  # fmt: skip
        return JSONResponse({"forgotten": forgotten})

    async def load(request: Request) -> Response:
        """Many samples of a run stored in one transaction (the bulk loader, served): what a run's KATO calls for
        them would store, with the run ledger deciding what is new (see :mod:`ingestd.engine.load`)."""
        run_key = _run_key(request)
        raw = _quick_json(await request.body(), request.headers.get("content-type"))
        try:
            body = _LOAD.validate_python(raw) if raw is not None else None
        except ValidationError:
            body = None
        if body is None or not all(_plain(level.metadata) for sample in body.samples for level in sample.levels):
            body = await _body_model(request, LoadRequest)  # the full way: Python's parser, as observe's metadata
        samples = [SampleLoad(sample.index, [LevelLoad(level.node_id, level.chunks, level.names, level.metadata, level.first)
                                             for level in sample.levels]) for sample in body.samples]  # fmt: skip
        problem = load_rules.check(samples, engine.kb_of)
        if problem is not None:
            raise KatoError(422, f"cannot load: {problem}")
        return JSONResponse({"held": await engine.load(run_key, samples)})

    async def claim_nodes(request: Request) -> Response:
        body: ClaimNodesRequest = await _body_model(request, ClaimNodesRequest)
        conflicts = await engine.claim_nodes(
            [(claim.node_id, Feeder(claim.tokenizer, claim.level, claim.chunk_size)) for claim in body.claims],
            allow_mixed=body.allow_mixed)  # fmt: skip
        return JSONResponse({"conflicts": {node_id: [feeder.as_dict() for feeder in others]
                                           for node_id, others in conflicts.items()}})  # fmt: skip

    async def node_counts(request: Request) -> Response:
        body: NodeCountsRequest = await _body_model(request, NodeCountsRequest)
        return JSONResponse({"patterns": engine.pattern_counts(body.node_ids)})

    def not_implemented(method: str, path: str) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            return JSONResponse(
                {"detail": f"{method} {path} is not implemented by the embedded ingestd engine: it serves "
                           "KATO's training API (sessions, observe, learn, patterns), not inference or "
                           "KATO's monitoring. Use a real KATO server for it."},
                status_code=501,
            )  # fmt: skip

        return endpoint

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/", root, methods=["GET"]),
        Route("/sessions", create_session, methods=["POST"]),
        Route("/sessions/count", count_sessions, methods=["GET"]),
        Route("/sessions/{session_id}", get_session, methods=["GET"]),
        Route("/sessions/{session_id}", delete_session, methods=["DELETE"]),
        Route("/sessions/{session_id}/exists", exists, methods=["GET"]),
        Route("/sessions/{session_id}/config", get_config, methods=["GET"]),
        Route("/sessions/{session_id}/config", update_config, methods=["POST"]),
        Route("/sessions/{session_id}/extend", extend, methods=["POST"]),
        Route("/sessions/{session_id}/observe", observe, methods=["POST"]),
        Route("/sessions/{session_id}/observe-sequence", observe_sequence, methods=["POST"]),
        Route("/sessions/{session_id}/learn", learn, methods=["POST"]),
        Route("/sessions/{session_id}/stm", stm, methods=["GET"]),
        Route("/sessions/{session_id}/clear-stm", clear_stm, methods=["POST"]),
        Route("/sessions/{session_id}/clear-all", clear_all, methods=["POST"]),
        Route("/pattern/{pattern_id}", get_pattern, methods=["GET"]),
        Route("/ingestd", extensions, methods=["GET"]),
        Route("/ingestd/ledger/{run_key}", ledger_status, methods=["POST"]),
        Route("/ingestd/ledger/{run_key}/forget", ledger_forget, methods=["POST"]),
        *([Route("/ingestd/load/{run_key}", load, methods=["POST"])] if bulk_loads else []),
        Route("/ingestd/nodes/claim", claim_nodes, methods=["POST"]),
        Route("/ingestd/nodes/counts", node_counts, methods=["POST"]),
        *(Route(path, not_implemented(method, path), methods=[method]) for method, path in NOT_IMPLEMENTED),
    ]

    async def on_invalid(request: Request, error: Exception) -> Response:
        assert isinstance(error, RequestInvalid)
        try:
            return JSONResponse({"detail": error.errors}, status_code=422)
        except ValueError:  # the input echoed holds NaN or Infinity, which JSON has not: written as Python's json does
            return Response(json.dumps({"detail": error.errors}, ensure_ascii=False, separators=(",", ":")),
                            status_code=422, media_type="application/json")  # fmt: skip

    async def on_kato_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, KatoError)
        return JSONResponse({"detail": error.detail}, status_code=error.status)

    async def on_session_not_found(request: Request, error: Exception) -> Response:
        assert isinstance(error, SessionNotFound)
        return session_not_found_response(error.session_id)

    async def on_http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        return JSONResponse({"detail": error.detail}, status_code=error.status_code, headers=error.headers)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if not manage_engine:
            yield
            return
        await engine.start()
        try:
            yield
        finally:
            await engine.aclose()

    return Starlette(
        routes=routes,
        middleware=[
            Middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"]),
            Middleware(KatoSessionMiddleware, engine=engine, max_body_bytes=max_body_bytes),
        ],
        exception_handlers={
            RequestInvalid: on_invalid,
            KatoError: on_kato_error,
            SessionNotFound: on_session_not_found,
            HTTPException: on_http_error,
        },
        lifespan=lifespan,
    )


def _run_key(request: Request) -> str:
    run_key: str = request.path_params["run_key"]
    try:
        Place(run_key, 0, 0, 1)
    except ValueError as error:
        raise KatoError(400, str(error)) from None
    return run_key


def _echo(key: str | None, place: Place | None) -> dict[str, str] | None:
    """Response headers saying which of ingestd's request headers were honoured."""
    headers = {}
    if key is not None:
        headers["idempotency-key"] = key
    if place is not None:
        headers[ledger.HEADER] = place.header()
    return headers or None


def session_not_found_response(session_id: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": "SESSION_NOT_FOUND", "message": f"Session {session_id} not found or expired",
                   "session_id": session_id}},
        status_code=404,
    )  # fmt: skip


class KatoSessionMiddleware:
    """KATO's request middleware, as pure ASGI.

    * every response carries ``X-Trace-ID`` (echoed, or ``kato-<hex>``);
    * a session addressed under ``/sessions/{id}/...`` (any method) or by a
      non-GET ``/sessions/{id}`` must exist, checked before routing, else 404
      ``SESSION_NOT_FOUND``; validated requests get ``X-Session-ID``;
    * bodies larger than ``max_body_bytes`` get 413 instead of filling memory.
    """

    def __init__(self, app: ASGIApp, engine: Engine, max_body_bytes: int) -> None:
        self.app = app
        self.engine = engine
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        trace_id = headers.get(b"x-trace-id") or f"kato-{uuid.uuid4().hex}".encode()
        extra_headers = [(b"x-trace-id", trace_id)]

        path: str = scope["path"]
        parts = path.split("/")
        session_id = None
        if len(parts) >= 3 and parts[1] == "sessions" and parts[2]:
            nested = len(parts) > 3
            method = scope["method"]
            exempt = (parts[2] == "count" and not nested) or (nested and parts[3:] == ["exists"]) or (
                not nested and method == "GET"
            )
            if not exempt:
                if not self.engine.session_exists(parts[2]):
                    await self._respond(session_not_found_response(parts[2]), extra_headers, scope, receive, send)
                    return
                session_id = parts[2]
        else:
            echoed = headers.get(b"x-session-id")
            if echoed is not None:
                extra_headers.append((b"x-session-id", echoed))
        if session_id is not None:
            extra_headers.append((b"x-session-id", session_id.encode()))

        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._respond(self._too_large(), extra_headers, scope, receive, send)
            return

        received = 0
        limit = self.max_body_bytes

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, "Request body too large")
            return message

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra_headers]}
            await send(message)

        await self.app(scope, limited_receive, send_with_headers)

    def _too_large(self) -> Response:
        return JSONResponse(
            {"detail": f"Request body too large: the limit is {self.max_body_bytes} bytes."}, status_code=413
        )

    @staticmethod
    async def _respond(
        response: Response, extra_headers: list[tuple[bytes, bytes]], scope: Scope, receive: Receive, send: Send
    ) -> None:
        response.raw_headers.extend(extra_headers)
        await response(scope, receive, send)


class HotPaths:
    """A short way in for the calls a training client makes thousands of times a second.

    ``POST /sessions/{id}/observe-sequence``, ``/observe`` and ``/clear-stm`` on
    a live session, with a well-formed body and no ``Origin`` header (so CORS
    adds nothing), are answered here, without the middleware and routing layers.
    Each layer is cheap, but together they cost about as much server CPU as a
    whole 300-token observe-sequence. The response is built by the same
    response classes with the same headers (``x-trace-id``, ``x-session-id``)
    as the full app's. Anything else, including every error, goes to the full
    app with the body replayed, so error answers have one source.
    """

    _HOT = frozenset({"observe-sequence", "observe", "clear-stm"})

    def __init__(self, app: ASGIApp, engine: Engine, max_body_bytes: int) -> None:
        self.app = app
        self.engine = engine
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        parts = scope["path"].split("/")
        if len(parts) != 4 or parts[1] != "sessions" or parts[3] not in self._HOT or scope.get("root_path"):
            await self.app(scope, receive, send)
            return
        trace_id = content_type = idempotency_key = None
        place: Place | None = None
        for name, value in scope["headers"]:
            if name == b"origin" or (name == b"content-length" and (not value.isdigit() or int(value) > self.max_body_bytes)):
                await self.app(scope, receive, send)
                return
            if name == b"x-trace-id":
                trace_id = value
            elif name == b"content-type" and content_type is None:  # the first one, as Starlette reads it
                content_type = value
            elif name == b"idempotency-key":
                idempotency_key = value.decode("latin-1")
            elif name == b"ingestd-ledger":
                try:
                    place = Place.from_header(value.decode("latin-1"))
                except ValueError:  # the full app answers 400
                    await self.app(scope, receive, send)
                    return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client went away
                return
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                await self.app(scope, _replay(bytes(body), receive, more=True), send)
                return
            if not message.get("more_body", False):
                break
        response = await self._answer(parts[2], parts[3], bytes(body), content_type, idempotency_key, place)
        if response is None:
            await self.app(scope, _replay(bytes(body), receive), send)
            return
        if parts[3] == "observe-sequence":
            response.raw_headers += [(name.encode("latin-1"), value.encode("latin-1"))
                                     for name, value in (_echo(idempotency_key, place) or {}).items()]  # fmt: skip
        response.raw_headers += [(b"x-trace-id", trace_id or f"kato-{uuid.uuid4().hex}".encode()),
                                 (b"x-session-id", parts[2].encode())]  # fmt: skip
        await response(scope, receive, send)

    async def _answer(self, session_id: str, action: str, raw: bytes, content_type: bytes | None,
                      idempotency_key: str | None, place: Place | None) -> Response | None:  # fmt: skip
        engine = self.engine
        if not engine.session_exists(session_id):
            return None
        if action == "clear-stm":
            try:
                return JSONResponse(await engine.clear_stm(session_id))
            except (SessionNotFound, KatoError):  # expired in between, or busy: the full app gives the answer
                return None
        body = _quick_json(raw, content_type.decode("latin-1") if content_type else None)
        try:
            if action == "observe":
                observation = _quick_observation(body)
                if observation is None:
                    return None
                return FloatFreeJSONResponse(await engine.observe(session_id, observation))
            quick = _quick_sequence(body)
            if quick is None:
                return None
            return FloatFreeJSONResponse(
                await engine.observe_sequence(session_id, quick[0], **quick[1], idempotency_key=idempotency_key,
                                              place=place)  # fmt: skip
            )
        except (SessionNotFound, KatoError):  # nothing was applied; the full app gives the error answer
            return None


def _replay(body: bytes, receive: Receive, *, more: bool = False) -> Receive:
    """A ``receive`` that first hands back the body already read, then the real one."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": more}
        return await receive()

    return replayed


def create_app(settings: EngineSettings, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, bulk_loads: bool = True) -> ASGIApp:
    """A KATO-compatible server app over a new engine on ``settings.data_dir`` (``bulk_loads``: with
    ``POST /ingestd/load``)."""
    engine = Engine(settings)
    return HotPaths(build_app(engine, max_body_bytes=max_body_bytes, bulk_loads=bulk_loads), engine, max_body_bytes)
