"""ingestd's settings: built once (defaults, then ``INGESTD_*`` environment, then flags) and passed down."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from ingestd.engine.settings import ServerSettings


class Settings(BaseSettings):
    """Everything ingestd reads from its environment, in one place.

    Nested fields use ``__``: ``INGESTD_SERVER__PORT=8001``.
    """

    model_config = SettingsConfigDict(env_prefix="INGESTD_", env_nested_delimiter="__", extra="ignore")

    server: ServerSettings = Field(default_factory=ServerSettings)
