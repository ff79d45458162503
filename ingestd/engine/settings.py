"""Settings of the embedded engine (KATO's process-wide settings, plus storage)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EngineSettings(BaseModel):
    """What KATO reads from its environment, and where and how the engine stores data."""

    model_config = ConfigDict(frozen=True)

    data_dir: Path = Field(default=Path("kato-data"), description="Directory of the SQLite knowledge store.")
    durability: Literal["full", "normal"] = Field(
        default="full",
        description=(
            "full: every commit is fsynced before its response (survives power loss). "
            "normal: committed to the OS before the response (survives kill -9 and restarts, "
            "not power loss); faster on slow disks."
        ),
    )
    service_name: str = Field(default="kato", description="KATO's SERVICE_NAME, the suffix of every kb id.")
    persistence: int = Field(default=5, ge=1, le=100, description="KATO's PERSISTENCE: emotives kept per pattern.")
    session_ttl: int = Field(default=3600, ge=1, description="KATO's SESSION_TTL in seconds.")
    sweep_interval: float = Field(default=60.0, gt=0, description="Seconds between purges of expired sessions.")
    shared_sessions: bool = Field(
        default=False,
        description="Other processes serve the same store (`ingestd kato serve --workers N`): a session is read "
        "back from the store whenever another process may have changed it, and written only if it did not.",
    )
    idempotency_ttl: float = Field(
        default=7 * 24 * 3600.0, gt=0,
        description="Seconds an Idempotency-Key is remembered (a call resent with it within that time is not re-applied).",
    )


class ServerSettings(EngineSettings):
    """The engine served over KATO's HTTP API (``ingestd kato serve``)."""

    workers: int = Field(default=1, ge=1, le=256, description="Server processes over the one store, as uvicorn's "
                         "--workers (KATO's image: one per core); each connection stays with the one that accepted it.")  # fmt: skip
    host: str = Field(default="127.0.0.1", description="Address to bind; loopback unless you mean it.")
    port: int = Field(default=8000, ge=0, le=65535)
    max_body_bytes: int = Field(default=64 * 1024 * 1024, gt=0, description="Largest request body accepted.")
    header_timeout: float = Field(default=10.0, gt=0, description="Seconds a connection may take to send a request's "
                                  "headers; slower ones are closed (half-open connections do not pile up).")  # fmt: skip
    body_timeout: float = Field(default=60.0, gt=0, description="Seconds a request's body may take to arrive after "
                                "its headers; slower connections are closed.")  # fmt: skip
    limit_concurrency: int | None = Field(default=None, ge=2, description="Connections and requests at once beyond "
                                          "which the server answers 503, as uvicorn's --limit-concurrency (KATO: 100 "
                                          "per worker); None: no limit.")  # fmt: skip
    cpu_per_request_ms: float = Field(default=0.0, ge=0, le=10_000, description="CPU time spent on every request "
                                      "before it is served (a real KATO 3.10.1: about 4 ms): a stand-in for a KATO's "
                                      "speed, to size a client or a benchmark without one.")  # fmt: skip
    cpu_per_symbol_ms: float = Field(default=0.0, ge=0, le=10_000, description="CPU time spent per observed symbol "
                                     "of a request (a real KATO 3.10.1: about 3 ms), with cpu_per_request_ms.")  # fmt: skip
