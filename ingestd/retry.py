"""How a worker gets a KATO call through failures, by cause (see :mod:`ingestd.errors`).

* **overloaded** (503: the server at its concurrency limit): nothing was applied. Back-pressure: the backend
  sends fewer requests at once (:mod:`ingestd.adaptive`) and the call is resent with backoff; not an outage.
* **server down** (refused, 502/504): nothing was applied. Wait for ``GET /health`` with backoff, at
  most ``patience`` seconds per outage (one worker polls, the others wait for it), then resend.
* however a call fails, it is resent for at most ``patience`` seconds; then the run stops
  (:class:`~ingestd.errors.KatoUnavailable`, exit 6), progress saved.
* **session lost** (404 ``SESSION_NOT_FOUND``): recreate that session with the same node id and
  config, then resend. Safe because every call ingestd makes starts from an empty STM and carries whole
  chunks (and, on metadata levels, the sample's metadata on its first observation), so a new session
  gives exactly the effect the old one would have.
* **ambiguous** (timeout, connection lost after sending, 500): the call may have been applied. Resend
  with the same ``Idempotency-Key``: a server that honours it (the embedded engine) applies it once.
  Against one that does not (KATO 3.10.1), the resend may double some frequencies; each such sample
  is counted as a possible duplicate and logged with its index.
* any other 4xx: not retried; the sample fails with the server's message.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import structlog
from pydantic import BaseModel, Field
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential, wait_random

from ingestd.errors import Ambiguous, KatoUnavailable, ServerDown, Transient

T = TypeVar("T")
log = structlog.get_logger("ingestd.retry")


class RetryPolicy(BaseModel):
    patience: float = Field(default=600.0, gt=0, description="Seconds a KATO may stay unusable (down, refusing, "
                            "hanging) before the run stops; per outage, and per call.")  # fmt: skip
    backoff_initial: float = Field(default=0.05, gt=0)
    backoff_max: float = Field(default=5.0, gt=0)
    request_timeout: float = Field(default=120.0, gt=0, description="Seconds to wait for one answer.")

    def retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            retry=retry_if_exception_type(Transient),
            stop=stop_after_delay(self.patience),
            wait=wait_exponential(multiplier=self.backoff_initial, max=self.backoff_max) + wait_random(0, self.backoff_initial),
            reraise=True,
        )


class ServerWatch:
    """Shared by a run's workers: one polls ``/health`` during an outage, the others wait for it."""

    def __init__(self, healthy: Callable[[], Awaitable[bool]], description: str, policy: RetryPolicy,
                 on_outage: Callable[[], None]) -> None:  # fmt: skip
        self._healthy = healthy
        self.description = description
        self._policy = policy
        self._on_outage = on_outage
        self._recovered: anyio.Event | None = None

    async def wait_until_up(self, cause: str) -> None:
        if self._recovered is not None:
            await self._recovered.wait()
            return
        self._recovered = anyio.Event()
        self._on_outage()
        log.warning("KATO unreachable; waiting for it", server=self.description, cause=cause,
                    patience_seconds=self._policy.patience)  # fmt: skip
        try:
            await self._poll()
            log.warning("KATO is back; resending", server=self.description, cause=cause)
        finally:
            self._recovered.set()
            self._recovered = None

    async def _poll(self) -> None:
        deadline = time.monotonic() + self._policy.patience
        delay = self._policy.backoff_initial
        while not await self._healthy():
            if time.monotonic() >= deadline:
                raise KatoUnavailable(
                    f"{self.description} has not answered GET /health for {self._policy.patience:g} s "
                    "(--patience): progress is saved; start the server and run the same command again to resume"
                )
            await anyio.sleep(delay)
            delay = min(delay * 2, self._policy.backoff_max)


def recovering(watch: ServerWatch | None, retried: Callable[[str, str], None]) -> Callable[[Transient], Awaitable[None]]:
    """The ``on_retry`` of a call that needs no session put back: the retry is counted (``retried(cause, detail)``)
    and, through an outage, waited out with the run's other callers (``watch``)."""

    async def on_retry(failure: Transient) -> None:
        retried(failure.cause, str(failure))
        if isinstance(failure, ServerDown) and watch is not None:
            await watch.wait_until_up(str(failure))

    return on_retry


async def send(call: Callable[[], Awaitable[T]], policy: RetryPolicy, *, on_retry: Callable[[Transient], Awaitable[None]],
               server: str = "the KATO server") -> tuple[T, bool]:  # fmt: skip
    """``call()`` until it succeeds (``on_retry`` recovers before each resend), for at most ``patience``
    seconds: a server that stays unusable, however it fails (refused, 503 with a healthy /health, no answer),
    is an outage, and past ``patience`` it stops the run with :class:`KatoUnavailable`.

    Returns the result and whether an ambiguous failure came before it (the call may have run twice).
    """
    ambiguous = False
    try:
        async for attempt in policy.retrying():
            with attempt:
                try:
                    return await call(), ambiguous
                except Transient as failure:
                    ambiguous = ambiguous or isinstance(failure, Ambiguous)
                    await on_retry(failure)
                    raise
    except Transient as failure:
        raise KatoUnavailable(
            f"{server} did not serve a call for {policy.patience:g} s (--patience); the last attempt: {failure}. "
            "Progress is saved: run the same command again once the server works"
        ) from None
    raise AssertionError("unreachable: tenacity re-raises the last failure")  # pragma: no cover

