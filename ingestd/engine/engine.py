"""The embedded KATO-compatible engine: KATO 3.10.1's operations, callable in-process.

Every public coroutine is one KATO HTTP operation and returns the body KATO
sends, as a dict in KATO's key order. The HTTP server (:mod:`ingestd.engine.http`)
is a thin layer over these, so a client gets the same results in-process and
over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime, timezone
from typing import Any, NamedTuple, TypeVar

from ingestd.engine import config as session_config
from ingestd.engine import feeders, ledger, load, rules
from ingestd.engine.feeders import Claim, Feeder
from ingestd.engine.ledger import LedgerConflict, Place
from ingestd.engine.load import SampleLoad
from ingestd.engine.session import Learn, Observation, Session, new_session_id
from ingestd.engine.settings import EngineSettings
from ingestd.engine.store import KnowledgeStore, load_document

T = TypeVar("T")

KATO_VERSION = "3.10.1"


class SessionNotFound(Exception):
    """The session does not exist or has expired (KATO answers 404)."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"Session {session_id} not found or expired")
        self.session_id = session_id


class StaleSession(Exception):
    """Another process changed the session since this one read it: the call is made again from its new state."""


class AlreadyApplied(Exception):
    """Another process applied a call with this idempotency key meanwhile: its outcome is the answer."""

    def __init__(self, outcome: Any) -> None:
        super().__init__("already applied")
        self.outcome = outcome


_STALE_RETRIES = 20
_KB_IDS_KEPT = 4096  # node ids whose knowledge-base id is kept at hand


def fresh(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """A call on a session, made again from the session's new state when another process wrote it in between
    (``shared_sessions``): each try reads the session, works on a copy, and writes only over what it read."""

    @functools.wraps(method)
    async def call(self: Engine, session_id: str, *args: Any, **kwargs: Any) -> T:
        for _ in range(_STALE_RETRIES):
            try:
                return await method(self, session_id, *args, **kwargs)
            except (StaleSession, AlreadyApplied):  # the next try reads the session back, or replays the outcome
                await asyncio.sleep(0)
        raise KatoError(503, f"session {session_id} is being changed by another server process: try again")

    return call


def _still(connection: Any, session_id: str, version: float) -> None:
    """Raise :class:`StaleSession` unless the store still holds ``version`` of the session (its expiry, which every
    write sets anew): another process wrote or deleted it since this one read it."""
    row = connection.execute("SELECT expires_at FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
    if row is None or row[0] != version:
        raise StaleSession(session_id)


class Learned(NamedTuple):
    """What :meth:`Engine.learn_chunks` did: every name, in order, and whether it was a replay (stored before)."""

    names: list[str]
    replayed: bool


class KatoError(Exception):
    """An error KATO reports as ``{"detail": ...}`` with this HTTP status."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def iso_utc(epoch: float) -> str:
    """A timestamp as pydantic writes KATO's datetimes: ISO-8601 with microseconds and ``Z``."""
    moment = datetime.fromtimestamp(epoch, tz=timezone.utc)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}"
    return text + "Z"


class Engine:
    """KATO's sessions, STM and knowledge bases over a durable SQLite store."""

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.store = KnowledgeStore(
            settings.data_dir,
            synchronous="FULL" if settings.durability == "full" else "NORMAL",
            persistence=settings.persistence,
            # several server processes take turns at the one writer lock: a long write of one must not fail the others
            busy_timeout=120.0 if settings.shared_sessions else 10.0,
        )
        self._sessions: dict[str, Session] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._keys_running: dict[str, asyncio.Event] = {}
        self._started_at = time.time()
        self._sweeper: asyncio.Task[None] | None = None
        self._kb_ids: dict[str, str] = {}

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        """Open the store and load the sessions that have not expired (they survive restarts)."""
        self.store.open()
        now = time.time()

        def load(connection: Any) -> list[bytes]:
            rows = connection.execute("SELECT document FROM sessions WHERE expires_at >= ?", (now,))
            return [row[0] for row in rows]

        for document in await self._run(load):
            session = Session.from_document(load_document(document))
            self._sessions[session.session_id] = session
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="kato-session-sweeper")

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        await self.store.aclose()

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            now = time.time()
            for session_id in [sid for sid, s in self._sessions.items() if s.expires_at < now]:
                self._forget(session_id)
            await self._run(lambda connection, now=now: KnowledgeStore.delete_expired_sessions(connection, now))
            before = now - self.settings.idempotency_ttl
            await self._run(lambda connection, before=before: KnowledgeStore.forget_applied(connection, before))

    async def _run(self, job: Any) -> Any:
        return await self.store.run(job)

    # -- sessions ----------------------------------------------------------------
    def _forget(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)
        self._locks.pop(session_id, None)

    def live_session(self, session_id: str) -> Session:
        """The session, or :class:`SessionNotFound` if it is unknown or expired."""
        session = self._sessions.get(session_id)
        if self.settings.shared_sessions:
            session = self._current(session_id, session)
        if session is None:
            raise SessionNotFound(session_id)
        if session.expires_at < time.time():
            self._forget(session_id)
            raise SessionNotFound(session_id)
        return session

    def _current(self, session_id: str, cached: Session | None) -> Session | None:
        """The session as the store holds it now (another process may have written it): the cached one while the
        store's version of it (its expiry, set anew by every write) is the cached one's."""
        version = cached.expires_at if cached is not None else None
        row = self.store.read(lambda connection: connection.execute(
            "SELECT CASE WHEN expires_at = ? THEN NULL ELSE document END FROM sessions WHERE session_id = ?",
            (version, session_id)).fetchone())  # fmt: skip
        if row is None:  # deleted (or expired and swept) by another process
            self._forget(session_id)
            return None
        if row[0] is None:
            return cached
        session = self._sessions[session_id] = Session.from_document(load_document(row[0]))
        return session

    def session_exists(self, session_id: str) -> bool:
        try:
            self.live_session(session_id)
        except SessionNotFound:
            return False
        return True

    @contextlib.asynccontextmanager
    async def _once(self, key: str | None) -> AsyncIterator[Any]:
        """Run a keyed call at most once: yields the outcome recorded for ``key`` (replay), or None.

        Calls with the same key are serialised (a retry that arrives while the original is still
        being applied waits for it), whichever session they use.
        """
        if key is None:
            yield None
            return
        while (running := self._keys_running.get(key)) is not None:
            await running.wait()
        done = self._keys_running[key] = asyncio.Event()
        try:
            # A primary-key read of committed state: a same-key call still being applied holds the event.
            yield self.store.read(lambda connection: KnowledgeStore.applied_outcome(connection, key))
        finally:
            del self._keys_running[key]
            done.set()

    def _lock(self, session_id: str) -> asyncio.Lock:
        lock = self._locks.get(session_id)
        if lock is None:
            lock = self._locks[session_id] = asyncio.Lock()
        return lock

    async def _write(self, draft: Session, learns: Sequence[Learn] = (), *, clear_kb: bool = False,
                     applied: tuple[str, Any] | None = None, place: Place | None = None, new: bool = False) -> bool:  # fmt: skip
        """Persist a session's new state with its learns in one transaction, then make it current.

        ``applied`` = (idempotency key, outcome) is recorded in the same transaction, so a call is
        either applied and remembered, or neither. With a ledger ``place``, the call is applied only if
        the run ledger says it was not yet (:mod:`ingestd.engine.ledger`); returns False for a replay, which
        stores nothing and leaves the session as it was.
        """
        shared = self.settings.shared_sessions
        base = draft.expires_at if shared and not new else None
        draft.expires_at = time.time() + draft.ttl_seconds
        draft.enforce_limits()
        document = draft.to_document()
        store = self.store

        def job(connection: Any) -> bool:
            if shared and applied is not None:  # another process may have applied this key since we looked
                outcome = KnowledgeStore.applied_outcome(connection, applied[0])
                if outcome is not None:
                    raise AlreadyApplied(outcome)
            if base is not None:  # another process may serve this session too: write only over what we read
                _still(connection, draft.session_id, base)
            if place is not None and not ledger.record(connection, place, draft.kb_id):
                return False
            if clear_kb:
                store.clear_kb(connection, draft.kb_id)
            if learns:
                store.apply_learns(connection, learns)
            store.save_session(connection, document)
            if applied is not None:
                store.record_applied(connection, applied[0], applied[1], time.time())
            return True

        try:
            stored: bool = await self._run(job)
        except LedgerConflict as conflict:
            raise KatoError(409, conflict.body()) from None
        if stored and draft.session_id in self._sessions:  # not deleted while we were writing
            self._sessions[draft.session_id] = draft
        return stored

    def _session_body(self, session: Session, ttl_seconds: int) -> dict[str, Any]:
        return {
            "session_id": session.session_id,
            "node_id": session.node_id,
            "created_at": iso_utc(session.created_at),
            "expires_at": iso_utc(session.expires_at),
            "ttl_seconds": ttl_seconds,
            "metadata": session.metadata,
            "session_config": session_config.effective_config(session.config),
        }

    async def create_session(
        self,
        node_id: str,
        config: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        ttl_seconds: int | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """KATO's ``POST /sessions``. With an ``idempotency_key`` (ingestd's extension), a resent
        creation whose first answer was lost returns the session it created, instead of a second one."""
        ttl = ttl_seconds or self.settings.session_ttl
        if ttl <= 0:
            raise ValueError(f"invalid expire time {ttl}")  # Redis SETEX refuses it: KATO answers 500
        async with self._once(idempotency_key) as replay:
            if replay is not None:
                return dict(replay)
            overrides = (session_config.apply_config({}, config) or {}) if config else {}
            now = time.time()
            session = Session(
                session_id=new_session_id(),
                node_id=node_id,
                kb_id=rules.kb_id(node_id, self.settings.service_name),
                created_at=now,
                expires_at=now + ttl,
                ttl_seconds=ttl,
                metadata=metadata or {},
                config=overrides,
            )
            # KATO echoes the requested TTL (or 3600), not the one it applied.
            body = self._session_body(session, ttl_seconds or 3600)
            self._sessions[session.session_id] = session
            try:
                await self._write(session, applied=None if idempotency_key is None else (idempotency_key, body), new=True)
            except AlreadyApplied as done:  # another server process created it for this key meanwhile
                self._forget(session.session_id)
                return dict(done.outcome)
            except BaseException:
                self._forget(session.session_id)
                raise
        return body

    async def get_session(self, session_id: str) -> dict[str, Any]:
        session = self.live_session(session_id)
        remaining = max(0, int(session.expires_at - time.time()))
        return self._session_body(session, remaining)

    async def delete_session(self, session_id: str) -> dict[str, Any]:
        async with self._lock(session_id):
            self.live_session(session_id)
            self._forget(session_id)
            await self._run(lambda connection: KnowledgeStore.delete_session(connection, session_id))
        return {"status": "deleted", "session_id": session_id}

    async def exists(self, session_id: str) -> dict[str, Any]:
        return {"exists": self.session_exists(session_id), "expired": False, "session_id": session_id}

    def session_count(self) -> int:
        now = time.time()
        if self.settings.shared_sessions:  # other processes' sessions too
            return int(self.store.read(lambda connection: KnowledgeStore.count_sessions(connection, now)))
        return sum(1 for session in self._sessions.values() if session.expires_at >= now)

    @fresh
    async def extend_session(self, session_id: str, ttl_seconds: int) -> dict[str, Any]:
        async with self._lock(session_id):
            session = self.live_session(session_id)
            # /extend moves only the current expiry; the next write slides it back to the session's TTL.
            draft = session.copy()
            base = session.expires_at if self.settings.shared_sessions else None
            draft.expires_at = time.time() + ttl_seconds
            document = draft.to_document()

            def job(connection: Any) -> None:
                if base is not None:  # write only over what we read (another process may have changed or deleted it)
                    _still(connection, session_id, base)
                KnowledgeStore.save_session(connection, document)

            await self._run(job)
            if session_id in self._sessions:
                self._sessions[session_id] = draft
        return {"status": "extended", "session_id": session_id, "ttl_seconds": ttl_seconds}

    async def get_config(self, session_id: str) -> dict[str, Any]:
        session = self.live_session(session_id)
        return {"session_id": session_id, "config": session_config.effective_config(session.config)}

    @fresh
    async def update_config(self, session_id: str, body: dict[str, Any]) -> dict[str, Any]:
        updates = body["config"] if isinstance(body.get("config"), dict) else body
        updates = dict(updates)
        async with self._lock(session_id):
            session = self.live_session(session_id)
            errors = session_config.validate_update(updates)
            if errors:
                raise KatoError(400, {"error": "Configuration validation failed", "validation_errors": errors})
            if "use_token_matching" in updates and "sort_symbols" not in updates:
                updates["sort_symbols"] = updates["use_token_matching"]
            overrides = session_config.apply_config(session.config, updates)
            if overrides is None:
                raise KatoError(400, "Failed to update session configuration")
            draft = session.copy()
            draft.config = overrides
            await self._write(draft)
        return {"status": "okay", "message": "Configuration updated", "session_id": session_id}

    # -- observing and learning -----------------------------------------------------
    @fresh
    async def observe(self, session_id: str, observation: Observation) -> dict[str, Any]:
        async with self._lock(session_id):
            draft = self.live_session(session_id).copy()
            learns: list[Learn] = []
            auto_learned = draft.observe(observation, learns)
            stm_length = len(draft.stm)
            await self._write(draft, learns)
        return {
            "status": "okay",
            "session_id": session_id,
            "processor_id": draft.node_id,
            "stm_length": stm_length,
            "time": draft.time,
            "unique_id": f"obs-{secrets.token_hex(16)}",
            "auto_learned_pattern": auto_learned,
        }

    @fresh
    async def observe_sequence(
        self,
        session_id: str,
        observations: Sequence[Observation],
        *,
        learn_after_each: bool = False,
        learn_at_end: bool = False,
        clear_stm_between: bool = False,
        idempotency_key: str | None = None,
        place: Place | None = None,
    ) -> dict[str, Any]:
        """KATO's observe-sequence (§5.9), applied atomically: all of it is stored, or nothing.

        With an ``idempotency_key`` (an ingestd extension; KATO ignores the header), a call whose
        key was already applied is not applied again: the answer then says
        ``"idempotent_replay": true`` and carries the names learned the first time, with no
        per-observation results. With a ledger ``place`` (:mod:`ingestd.engine.ledger`), a call the run
        ledger records as stored is not applied again: the answer is the one this call gives on the
        session as it is, with ``"idempotent_replay": true``.
        """
        async with self._once(idempotency_key) as replay, self._lock(session_id):
            session = self.live_session(session_id)
            initial_length = len(session.stm)
            if replay is not None:
                return {
                    "status": "completed", "processor_id": session.node_id,
                    "observations_processed": len(observations), "initial_stm_length": initial_length,
                    "final_stm_length": initial_length, "results": [],
                    "auto_learned_patterns": replay["auto_learned_patterns"],
                    "final_learned_pattern": replay["final_learned_pattern"], "isolated": clear_stm_between,
                    "idempotent_replay": True,
                }  # fmt: skip
            if not observations:
                return {
                    "status": "completed", "processor_id": session.node_id, "observations_processed": 0,
                    "initial_stm_length": initial_length, "final_stm_length": initial_length, "results": [],
                    "auto_learned_patterns": [], "final_learned_pattern": None, "isolated": clear_stm_between,
                }  # fmt: skip
            draft = session.copy()
            learns: list[Learn] = []
            auto_learned_patterns: list[str] = []
            results: list[dict[str, Any]] = []
            random_hex = os.urandom(16 * len(observations)).hex()  # one syscall for every generated id
            for position, observation in enumerate(observations):
                if clear_stm_between and position > 0:
                    draft.stm = []
                auto_learned = draft.observe(observation, learns)
                if learn_after_each and draft.stm:
                    auto_learned_patterns.append(draft.learn(learns))
                if auto_learned:
                    auto_learned_patterns.append(auto_learned)
                results.append(
                    {
                        "status": "okay",
                        "sequence_position": position,
                        "stm_length": len(draft.stm),
                        "time": draft.time,
                        "unique_id": observation.unique_id or "seq-obs-" + random_hex[32 * position : 32 * position + 32],
                        "auto_learned_pattern": auto_learned,
                    }
                )
            final_learned = None
            if learn_at_end and draft.stm:
                final_learned = draft.learn(learns)
                auto_learned_patterns.append(final_learned)
            final_length = len(draft.stm)  # reported before the 1000-event trim, as KATO does
            outcome = {"auto_learned_patterns": auto_learned_patterns, "final_learned_pattern": final_learned}
            stored = await self._write(draft, learns, applied=None if idempotency_key is None else (idempotency_key, outcome),
                                       place=place)  # fmt: skip
        answer = {
            "status": "completed",
            "processor_id": draft.node_id,
            "observations_processed": len(observations),
            "initial_stm_length": initial_length,
            "final_stm_length": final_length,
            "results": results,
            "auto_learned_patterns": auto_learned_patterns,
            "final_learned_pattern": final_learned,
            "isolated": clear_stm_between,
        }
        if not stored:
            answer["idempotent_replay"] = True
        return answer

    @fresh
    async def learn_chunks(
        self, session_id: str, chunks: Sequence[Sequence[str]], metadata: dict[str, Any] | None = None,
        *, idempotency_key: str | None = None, place: Place | None = None,
    ) -> Learned:  # fmt: skip
        """In-process shortcut (not a KATO endpoint) with exactly the effect of, per chunk, one
        ``observe-sequence`` of its symbols, one per event (``metadata`` on the first), with
        ``learn_at_end``: every name learned, in order (``""`` where a learn stored nothing).
        It skips building KATO's per-observation response, and stores everything in one transaction.
        A call whose ``idempotency_key`` was already applied returns the names of that time, applying
        nothing; so does a call whose ledger ``place`` is recorded as stored (:mod:`ingestd.engine.ledger`).
        """
        async with self._once(idempotency_key) as replay, self._lock(session_id):
            if replay is not None:
                self.live_session(session_id)
                return Learned(list(replay), True)
            draft = self.live_session(session_id).copy()
            learns: list[Learn] = []
            names: list[str] = []
            plain: dict[str, Any] = {}
            for chunk in chunks:
                for position, symbol in enumerate(chunk):
                    observation = Observation([symbol], {}, metadata if position == 0 and metadata else plain)
                    auto_learned = draft.observe(observation, learns)
                    if auto_learned:
                        names.append(auto_learned)
                if draft.stm:
                    names.append(draft.learn(learns))
            stored = await self._write(draft, learns, applied=None if idempotency_key is None else (idempotency_key, names),
                                       place=place)  # fmt: skip
        return Learned(names, not stored)

    async def load(self, run_key: str, samples: Sequence[SampleLoad]) -> list[list[int]]:
        """Bulk loading (an ingestd extension, not a KATO endpoint): store every chunk of ``samples`` the run
        ledger of ``run_key`` does not hold yet, in one transaction, exactly as KATO would learn them one
        by one (see :mod:`ingestd.engine.load`). Returns, per sample and level, the chunks held before."""
        ledger.check_run_key(run_key)
        return await self._run(lambda connection: load.load(connection, run_key, samples, self.kb_of))

    def kb_of(self, node_id: str) -> str:
        """The knowledge-base id of a node (cached: a load asks for it per sample and level)."""
        kb = self._kb_ids.get(node_id)
        if kb is None:
            if len(self._kb_ids) >= _KB_IDS_KEPT:  # node ids come from clients too: keep a bounded few
                self._kb_ids.clear()
            kb = self._kb_ids[node_id] = rules.kb_id(node_id, self.settings.service_name)
        return kb

    @fresh
    async def learn(self, session_id: str) -> dict[str, Any]:
        async with self._lock(session_id):
            draft = self.live_session(session_id).copy()
            if not draft.stm:
                raise KatoError(400, "Cannot learn from empty STM")
            learns: list[Learn] = []
            name = draft.learn(learns)
            await self._write(draft, learns)
        return {
            "status": "learned",
            "pattern_name": name,
            "session_id": session_id,
            "processor_id": None,
            # KATO builds the message after emptying STM, so it always says 0 events.
            "message": f"Learned pattern {name} from 0 events",
        }

    async def get_stm(self, session_id: str) -> dict[str, Any]:
        stm = self.live_session(session_id).stm
        return {"stm": stm, "session_id": session_id, "length": len(stm)}

    @fresh
    async def clear_stm(self, session_id: str) -> dict[str, Any]:
        async with self._lock(session_id):
            draft = self.live_session(session_id).copy()
            draft.clear()
            await self._write(draft)
        return {"status": "cleared", "session_id": session_id}

    @fresh
    async def clear_all(self, session_id: str) -> dict[str, Any]:
        """Reset the session and delete the whole knowledge base of its node."""
        async with self._lock(session_id):
            draft = self.live_session(session_id).copy()
            draft.clear()
            await self._write(draft, clear_kb=True)
        return {"status": "cleared", "session_id": session_id, "scope": "all"}

    # -- reading the knowledge base -------------------------------------------------
    async def get_pattern(self, pattern_id: str, node_id: str) -> dict[str, Any]:
        kb = rules.kb_id(node_id, self.settings.service_name)
        digest = rules.strip_prefix(pattern_id)
        pattern = await self._run(lambda connection: KnowledgeStore.get_pattern(connection, kb, digest))
        if pattern is None:
            return {"pattern": {"status": "error", "message": f"Pattern {pattern_id} not found"}, "node_id": kb}
        return {"pattern": {"status": "okay", "pattern": pattern}, "node_id": kb}

    # -- ingestd's extensions: the run ledger and what fed each knowledge base -------------------------
    @property
    def store_id(self) -> str:
        """A random id made with the data directory's store (once started): the same store in-process and served."""
        return self.store.store_id

    async def ledger_status(self, run_key: str, node_ids: Sequence[str], samples: Sequence[int] = ()) -> dict[str, Any]:
        """Per node id, the chunks a run stored in its knowledge base; per asked sample, per node id, how many
        of that sample's chunks are stored from the first on, and (``ahead``, where there are any) the ranges
        stored beyond (see :mod:`ingestd.engine.ledger`)."""
        kbs = {node_id: rules.kb_id(node_id, self.settings.service_name) for node_id in node_ids}
        found = await self._run(lambda connection: ledger.status(connection, run_key, sorted(set(kbs.values())), samples))
        return {"totals": {node_id: found["totals"][kb] for node_id, kb in kbs.items()},
                "samples": {sample: {node_id: stored[kb] for node_id, kb in kbs.items()}
                            for sample, stored in found["samples"].items()},
                "ahead": {sample: {node_id: ranges[kb] for node_id, kb in kbs.items() if kb in ranges}
                          for sample, ranges in found["ahead"].items()}}  # fmt: skip

    async def ledger_forget(self, run_key: str, *, samples: Sequence[int] | None = None, keep: Sequence[int] = (),
                            everything: bool = False) -> int:  # fmt: skip
        """Drop a run's ledger records: of ``samples``; of every sample but ``keep``; or all, with totals."""
        return await self._run(lambda connection: ledger.forget(connection, run_key, samples=samples, keep=keep,
                                                                everything=everything))  # fmt: skip

    async def claim_nodes(self, claims: Sequence[tuple[str, Feeder]], *, allow_mixed: bool = False) -> dict[str, list[Feeder]]:
        """Record what will feed each node; per node id, the other feeders of its non-empty knowledge base
        (then, without ``allow_mixed``, nothing is recorded). See :mod:`ingestd.engine.feeders`."""
        resolved = [Claim(node_id, rules.kb_id(node_id, self.settings.service_name), feeder) for node_id, feeder in claims]
        return await self._run(lambda connection: feeders.claim(connection, resolved, allow_mixed=allow_mixed))

    def pattern_counts(self, node_ids: Sequence[str]) -> dict[str, int]:
        """Per node id, the distinct patterns its knowledge base holds (committed; not a KATO endpoint)."""
        kbs = {node_id: rules.kb_id(node_id, self.settings.service_name) for node_id in node_ids}
        return self.store.read(lambda connection: {node_id: connection.execute(
            "SELECT count(*) FROM patterns WHERE kb_id = ?", (kb,)).fetchone()[0] for node_id, kb in kbs.items()})  # fmt: skip

    async def patterns(self, node_id: str) -> list[dict[str, Any]]:
        """Every pattern stored for a node (not a KATO endpoint; for exports and checks)."""
        kb = rules.kb_id(node_id, self.settings.service_name)
        return await self._run(lambda connection: KnowledgeStore.iter_patterns(connection, kb))

    # -- service ------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        now = time.time()
        return {
            "status": "healthy",
            "processor_status": "healthy",
            "service_name": self.settings.service_name,
            "uptime_seconds": now - self._started_at,
            "issues": [],
            "metrics_collected": 0,
            "last_collection": now,
            "active_sessions": self.session_count(),
            "timestamp": datetime.now(timezone.utc).isoformat(),
        }

    def root(self) -> dict[str, Any]:
        return {
            "service": "KATO API",
            "version": KATO_VERSION,
            "description": "Knowledge Abstraction for Traceable Outcomes with Multi-User Support",
            "docs": "/docs",
            "health": "/health",
            "status": "running",
            "uptime_seconds": time.time() - self._started_at,
            "architecture": "modular",
            "session_support": True,
        }
