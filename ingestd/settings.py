"""ingestd's settings: built once (defaults, then ``INGESTD_*`` environment, then flags) and passed down."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from ingestd.engine.settings import ServerSettings
from ingestd.errors import IngestError
from ingestd.logs import LogFormat, LogLevel


class Settings(BaseSettings):
    """Everything ingestd reads from its environment, in one place.

    Nested fields use ``__``: ``INGESTD_SERVER__PORT=8001``.
    """

    model_config = SettingsConfigDict(env_prefix="INGESTD_", env_nested_delimiter="__", extra="ignore")

    server: ServerSettings = Field(default_factory=ServerSettings)

    log_format: LogFormat = Field(default="auto", description="json, console, or auto: JSON unless on a terminal.")
    log_level: LogLevel = "info"

    # -- the daemon (`ingestd serve`) --
    host: str = Field(default="127.0.0.1", description="Address the daemon binds; loopback unless you mean it.")
    port: int = Field(default=8080, ge=0, le=65535)
    state_dir: Path = Field(default=Path("ingestd-state"), description="Jobs, their progress, the embedded engine.")
    token: SecretStr | None = Field(default=None, description="Bearer token of the job API (or token_file).")
    token_file: Path | None = Field(default=None, description="File holding the bearer token (Docker secrets).")
    max_jobs: int = Field(default=2, ge=1, description="Jobs running at once; the others queue.")
    drain_timeout: float = Field(default=30.0, gt=0, description="On SIGTERM, seconds for in-flight samples.")
    open_readyz: bool = Field(default=True, description="/readyz without the token (/healthz is always open).")
    open_metrics: bool = Field(default=True, description="/metrics without the token.")
    header_timeout: float = Field(default=10.0, gt=0, description="Seconds a connection may take to send a "
                                  "request's headers; slower ones are closed.")  # fmt: skip
    body_timeout: float = Field(default=60.0, gt=0, description="Seconds a request's body may take to arrive after "
                                "its headers; slower connections are closed.")  # fmt: skip
    source_roots: str | None = Field(default=None, description="Folders job sources may be read from, ':'-separated "
                                     "(default: <state dir>/corpora); hub datasets are always allowed.")  # fmt: skip
    kato_urls: str = Field(default="", description="KATO servers jobs may use, comma-separated (default: none: "
                           "jobs use the daemon's embedded engine).")  # fmt: skip
    # -- a KATO deployment's storage (`ingestd publish`, `ingestd inspect --redis-url`): credentials only here --
    redis_password: SecretStr | None = Field(default=None, description="Password of the deployment's Redis.")
    redis_password_file: Path | None = Field(default=None, description="File holding the Redis password.")
    clickhouse_user: str | None = Field(default=None, description="User of the deployment's ClickHouse.")
    clickhouse_password: SecretStr | None = Field(default=None, description="Password of that ClickHouse user.")
    clickhouse_password_file: Path | None = Field(default=None, description="File holding the ClickHouse password.")
    max_body_bytes: int = Field(default=65536, ge=1024, le=16 * 1024 * 1024, description="Largest POST /jobs body (413 above).")

    def job_source_roots(self) -> list[Path]:
        if self.source_roots is None:
            return [self.state_dir / "corpora"]
        return [Path(root.strip()).expanduser() for root in self.source_roots.split(":") if root.strip()]

    def job_kato_urls(self) -> list[str]:
        return [url.strip().rstrip("/") for url in self.kato_urls.split(",") if url.strip()]

    def storage_credentials(self) -> tuple[str | None, str | None, str | None]:
        """(Redis password, ClickHouse user, ClickHouse password) for a KATO deployment's storage (never logged)."""
        return (self._secret(self.redis_password, self.redis_password_file, "INGESTD_REDIS_PASSWORD"), self.clickhouse_user,
                self._secret(self.clickhouse_password, self.clickhouse_password_file, "INGESTD_CLICKHOUSE_PASSWORD"))  # fmt: skip

    @staticmethod
    def _secret(value: SecretStr | None, path: Path | None, name: str) -> str | None:
        if value is not None:
            return value.get_secret_value()
        if path is None:
            return None
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as error:
            raise IngestError(f"cannot read {name}_FILE ({path}): {error.strerror}: check the path and its permissions") from None

    def api_token(self) -> str:
        """The job API's token, from INGESTD_TOKEN or the file INGESTD_TOKEN_FILE names (never logged).

        The daemon does not run without one: an absent or empty token is refused with what to set.
        """
        if self.token is not None:
            token = self.token.get_secret_value().strip()
            where = "INGESTD_TOKEN"
        elif self.token_file is not None:
            where = f"INGESTD_TOKEN_FILE ({self.token_file})"
            try:
                token = self.token_file.read_text(encoding="utf-8").strip()
            except OSError as error:
                raise IngestError(f"cannot read {where}: {error.strerror}: check the path and its permissions") from None
        else:
            raise IngestError("the job API needs a bearer token: set INGESTD_TOKEN (e.g. export "
                              "INGESTD_TOKEN=$(openssl rand -hex 16)) or INGESTD_TOKEN_FILE")  # fmt: skip
        if not token:
            raise IngestError(f"{where} is empty: set a token, e.g. `openssl rand -hex 16`")
        return token
