"""ingestd's errors. An :class:`IngestError` stops a run before (or instead of) learning, with a
one-line message that names the input and says what to do."""

from __future__ import annotations


class IngestError(Exception):
    """A problem with what the user asked for; the message is shown as is."""

    exit_code = 2


class KatoUnavailable(IngestError):
    """The KATO server cannot be reached, or is not a KATO server."""


class PlanMismatch(IngestError):
    """The server learned a pattern under another name than KATO 3.10.1's rule gives."""

    exit_code = 3


class KatoRejected(Exception):
    """The server refused a request with a 4xx: the sample fails with the server's message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"KATO answered {status}: {message}")
        self.status = status
