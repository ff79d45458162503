"""ingestd's errors. An :class:`IngestError` stops a run before (or instead of) learning, with a
one-line message that names the input and says what to do, and its own exit code:

====  ==========================================================================================
0     done: every sample learned, filtered or skipped (also when a signal stopped it early)
1     ingestd crashed: a bug (the traceback says where); please report it
2     the input, an option or the environment is unusable: the message names it
3     the server named a pattern otherwise than KATO 3.10.1 does
4     the run conflicts with what is stored: run directory, nodes, knowledge base or source
6     the KATO server is unreachable, or stayed unusable past ``--patience``: run again when it is back
7     the run went through, but samples failed: ``failed.jsonl`` says which and why (``--retry-failed``)
====  ==========================================================================================
"""

from __future__ import annotations


class IngestError(Exception):
    """A problem with what the user asked for; the message is shown as is."""

    exit_code = 2


def find_ingest_error(error: BaseException) -> IngestError | None:
    """The user's problem inside ``error``, however deep in task groups' exception groups it was raised."""
    if isinstance(error, IngestError):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = find_ingest_error(inner)
            if found is not None:
                return found
    return None


def first_cause(error: BaseException) -> BaseException:
    """The exception that started a failure of task groups: the first leaf that is not the consequence of
    another task's (a stream whose other end closed when that task died)."""
    import anyio

    leaves: list[BaseException] = []
    pending = [error]
    while pending:
        item = pending.pop(0)
        if isinstance(item, BaseExceptionGroup):
            pending[:0] = list(item.exceptions)
        else:
            leaves.append(item)
    consequences = (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream)
    return next((leaf for leaf in leaves if not isinstance(leaf, consequences)), leaves[0] if leaves else error)


EXIT_SAMPLES_FAILED = 7


class KatoUnavailable(IngestError):
    """The KATO server cannot be reached, is not a KATO server, or stayed unusable past ``--patience``."""

    exit_code = 6


class StoreUnusable(IngestError):
    """The embedded engine's knowledge store cannot be opened (damaged, locked, not a file, not writable)."""


class PlanMismatch(IngestError):
    """The server learned a pattern under another name than KATO 3.10.1's rule gives."""

    exit_code = 3


class KatoRejected(Exception):
    """The server refused a request with a 4xx: the sample fails with the server's message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"KATO answered {status}: {message}")
        self.status = status


class LedgerOutOfStep(KatoRejected):
    """409 LEDGER_CONFLICT: the run ledger holds some of the call's chunks already (a killed run's last request
    was applied late, or a run resumed with another batch size). Nothing was stored; ``stored`` chunks from the
    first on and the ``ahead`` ranges (first, end) beyond them are: send the rest."""

    def __init__(self, stored: int, message: str, ahead: list[tuple[int, int]] | None = None) -> None:
        super().__init__(409, message)
        self.stored = stored
        self.ahead = ahead or []

    def missing(self, first: int, end: int) -> list[tuple[int, int]]:
        """The ranges of chunks ``first`` to ``end`` the ledger does not hold, in order."""
        from ingestd.engine import ledger  # the ledger's own rule (and no engine import for every error)

        return ledger.missing(self.stored, self.ahead, first, end)


def ledger_out_of_step(detail: object) -> LedgerOutOfStep | None:
    """The conflict a 409's ``detail`` describes, if it is the run ledger's."""
    if isinstance(detail, dict) and detail.get("error") == "LEDGER_CONFLICT" and isinstance(detail.get("stored_chunks"), int):
        spans = detail.get("ahead")
        ahead = [(int(span[0]), int(span[1])) for span in spans if isinstance(span, list) and len(span) == 2
                 and all(isinstance(bound, int) for bound in span)] if isinstance(spans, list) else []  # fmt: skip
        return LedgerOutOfStep(detail["stored_chunks"], str(detail.get("message", "")), ahead)
    return None


class Transient(Exception):
    """A failed KATO call that is worth sending again; ``cause`` names the kind for metrics and logs."""

    cause = "transient"


class ServerDown(Transient):
    """The server refused the connection or answered 502/504: the request was not applied."""

    cause = "server_down"


class Overloaded(Transient):
    """503: the server is at its concurrency limit (uvicorn's ``--limit-concurrency``; KATO's 100 per worker) or
    otherwise unavailable. Nothing was applied. Back-pressure, not an outage: the client sends fewer requests at
    once and resends; one that lasts past ``--patience`` stops the run like an outage."""

    cause = "overloaded"


class SessionLost(Transient):
    """404 SESSION_NOT_FOUND: the session expired or the server lost it; nothing was applied."""

    cause = "session_lost"

    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id} not found or expired")
        self.session_id = session_id


class Ambiguous(Transient):
    """The request may have been applied (timeout, connection dropped after sending, 500)."""

    cause = "ambiguous"
