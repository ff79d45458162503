"""Request bodies of KATO 3.10.1's HTTP API (``kato/api/schemas``).

The class names matter: pydantic puts them in some validation messages, and
the engine must answer exactly as KATO does.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field


class ObservationData(BaseModel):
    strings: list[str] = Field(default_factory=list)
    vectors: list[list[float]] = Field(default_factory=list)
    emotives: dict[str, float] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)


class ObservationDataItem(ObservationData):
    unique_id: str | None = None


class ObservationSequenceRequest(BaseModel):
    observations: list[ObservationDataItem]
    learn_after_each: bool = False
    learn_at_end: bool = False
    clear_stm_between: bool = False


class CreateSessionRequest(BaseModel):
    # KATO's field order (kato/api/schemas/session.py, config added last): it orders the 422's errors.
    node_id: str
    metadata: dict[str, Any] | None = Field(default_factory=dict)
    ttl_seconds: int | None = None
    config: dict[str, Any] | None = None


# -- ingestd's extensions (under /ingestd; KATO has none of these) ---------------------------------------
SampleIndex = Annotated[int, Field(ge=0, le=2**63 - 1)]  # what SQLite's integers hold


class LedgerStatusRequest(BaseModel):
    node_ids: list[str] = Field(min_length=1, max_length=64)
    samples: list[SampleIndex] = Field(default_factory=list, max_length=10_000)


class NodeCountsRequest(BaseModel):
    node_ids: list[str] = Field(min_length=1, max_length=64)


class LedgerForgetRequest(BaseModel):
    samples: list[SampleIndex] | None = Field(default=None, max_length=100_000)
    keep: list[SampleIndex] = Field(default_factory=list, max_length=1_000_000)
    everything: bool = False


class NodeClaim(BaseModel):
    node_id: str
    tokenizer: str
    level: int = Field(ge=0, le=2**31 - 1)
    chunk_size: int = Field(ge=2, le=2**31 - 1)


class ClaimNodesRequest(BaseModel):
    claims: list[NodeClaim] = Field(min_length=1, max_length=64)
    allow_mixed: bool = False


class LoadLevel(BaseModel):
    """One level of a sample: its chunks, one symbol per event, their names, and the metadata its learns carry."""

    model_config = ConfigDict(extra="forbid")  # a field this server does not know is refused, not ignored

    node_id: str
    chunks: list[list[str]] = Field(max_length=1_000_000)
    names: list[str] = Field(max_length=1_000_000)
    metadata: dict[str, Any] | None = None
    first: SampleIndex = 0  # the position of chunks[0] in the level: a piece of a long sample


class LoadSample(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: SampleIndex
    levels: list[LoadLevel] = Field(min_length=1, max_length=64)


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    samples: list[LoadSample] = Field(min_length=1, max_length=100_000)
