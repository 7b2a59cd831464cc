"""Payload models. Every payload names its site and carries a unique id, so redelivery is harmless."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from contract.arrays import ArrayPayload

SCHEMA_VERSION = 1

SITE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
SiteId = Annotated[str, StringConstraints(pattern=SITE_ID_PATTERN)]
# Labels are folder names in the local data layout; MQTT wildcards and path separators are refused.
Label = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[^/#+\x00]+$")]
# A contribution is a few KB; this bound keeps a malicious one from costing the hub memory.
MAX_LABELS = 1000
MAX_PROTOTYPES_PER_LABEL = 256


def new_id() -> str:
    """A fresh unique id for a payload."""
    return uuid.uuid4().hex


def valid_site_id(site_id: str) -> bool:
    """Whether `site_id` may appear in a topic."""
    return re.fullmatch(SITE_ID_PATTERN, site_id) is not None


class LabelPrototypes(BaseModel):
    """The prototypes of one label: k centroids of at least `min_group_size` samples each."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: Label
    vectors: ArrayPayload = Field(description="Prototype embeddings, shape [k, dim].")
    counts: list[Annotated[int, Field(ge=1)]] = Field(description="Samples averaged per prototype.")
    spreads: list[Annotated[float, Field(ge=0.0, le=1e3, allow_inf_nan=False)]] = Field(
        description="Root-mean-square distance of each group's samples to its prototype."
    )

    @model_validator(mode="after")
    def _check_lengths(self) -> LabelPrototypes:
        shape = self.vectors.shape
        if len(shape) != 2:
            raise ValueError(f"vectors of label {self.label!r} must be 2-D [k, dim], got shape {shape}")
        if not 1 <= shape[0] <= MAX_PROTOTYPES_PER_LABEL:
            raise ValueError(
                f"label {self.label!r} has {shape[0]} prototypes; 1 to {MAX_PROTOTYPES_PER_LABEL} are accepted"
            )
        if len(self.counts) != shape[0] or len(self.spreads) != shape[0]:
            raise ValueError(
                f"label {self.label!r} has {shape[0]} prototypes but {len(self.counts)} counts "
                f"and {len(self.spreads)} spreads"
            )
        return self


class Contribution(BaseModel):
    """One site's upload: per-label prototypes of its local embeddings. Immutable once sent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    contribution_id: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")] = Field(default_factory=new_id)
    site_id: SiteId
    encoder_id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    supersedes: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")] | None = None
    k: int = Field(ge=1, le=MAX_PROTOTYPES_PER_LABEL, description="Prototypes asked per label.")
    min_group_size: int = Field(ge=1, description="Smallest number of samples one prototype averages.")
    labels: list[LabelPrototypes] = Field(max_length=MAX_LABELS)

    @model_validator(mode="after")
    def _check_consistency(self) -> Contribution:
        dims = {lp.vectors.shape[1] for lp in self.labels}
        if len(dims) > 1:
            raise ValueError(f"all labels must share one embedding dimension, got {sorted(dims)}")
        names = [lp.label for lp in self.labels]
        if len(set(names)) != len(names):
            raise ValueError("a label appears more than once")
        for lp in self.labels:
            small = [c for c in lp.counts if c < self.min_group_size]
            if small:
                raise ValueError(
                    f"label {lp.label!r} has a prototype of {small[0]} samples, fewer than "
                    f"min_group_size={self.min_group_size}"
                )
        return self

    @property
    def dim(self) -> int | None:
        """Embedding dimension, or None for an empty contribution (a full retraction)."""
        return self.labels[0].vectors.shape[1] if self.labels else None

    @property
    def n_samples(self) -> int:
        """Samples summarised by this contribution."""
        return sum(sum(lp.counts) for lp in self.labels)

    def check_dim(self, expected: int) -> None:
        """Raise ValueError when the embedding dimension is not the encoder's."""
        if self.dim is not None and self.dim != expected:
            raise ValueError(f"embedding dimension {self.dim} does not match encoder {self.encoder_id!r} ({expected})")

    def to_json_bytes(self) -> bytes:
        """The exact bytes published on the wire."""
        return self.model_dump_json(exclude_none=True).encode("utf-8")


def _now() -> datetime:
    return datetime.now(UTC)


MessageId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class EncoderStatus(BaseModel):
    """Which encoder variant a site runs, and on which onnxruntime provider."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    encoder_id: str
    variant: str = Field(description="fp32 or int8")
    provider: str = Field(description="onnxruntime execution provider actually in use")


class SiteStatus(BaseModel):
    """Retained on `site/<id>/status`: the site's state and counters. The broker's last-will sets `offline`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    message_id: MessageId = Field(default_factory=new_id)
    site_id: SiteId
    state: Literal["online", "offline", "stopped"]
    at: datetime = Field(default_factory=_now)
    encoder: EncoderStatus | None = None
    samples: int | None = Field(default=None, ge=0, description="Samples in the local index (training + held-out).")
    contribution_id: MessageId | None = Field(default=None, description="The site's latest contribution.")
    model_version: int | None = Field(default=None, ge=1, description="Global model version the site runs.")
    outbox_depth: int | None = Field(default=None, ge=0, description="Messages not yet acknowledged by the broker.")
    bytes_sent: dict[str, int] = Field(default_factory=dict, description="Payload bytes published, by message kind.")
    bytes_received: dict[str, int] = Field(default_factory=dict, description="Payload bytes received, by kind.")


class HubStatus(BaseModel):
    """Retained on `hub/status`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    message_id: MessageId = Field(default_factory=new_id)
    hub_id: SiteId
    session_id: MessageId = Field(
        description="New each time the hub connects; sites resend their latest contribution when it changes."
    )
    state: Literal["online", "offline", "stopped", "training"]
    at: datetime = Field(default_factory=_now)
    model_version: int | None = Field(default=None, ge=1)
    active_contributions: int | None = Field(default=None, ge=0)


class ChunkRef(BaseModel):
    """One chunk of a model artifact as the manifest lists it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int = Field(ge=0)
    size_bytes: int = Field(ge=0)
    sha256: Sha256


class ModelManifest(BaseModel):
    """Retained on `hub/model`: the current global model and how to fetch and check it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    message_id: MessageId = Field(default_factory=new_id)
    version: int = Field(ge=1)
    created_at: datetime
    format: Literal["onnx"] = "onnx"
    sha256: Sha256 = Field(description="sha256 of the whole artifact; a site runs nothing that does not match.")
    size_bytes: int = Field(ge=1)
    chunks: list[ChunkRef] = Field(min_length=1, description="Published retained on hub/model/<version>/<index>.")
    labels: list[Label] = Field(min_length=1, description="Class names, in logit order.")
    input_name: str = "image"
    input_shape: list[int] = Field(description="[-1, 1, S, S], pixels in [0, 1].")
    encoder_id: str = Field(description="Encoder whose embeddings sites must send for the next round.")
    contributions: list[MessageId] = Field(description="Contributions the model was trained on.")
    fedavg_round_bytes: int = Field(ge=0, description="What one FedAvg round of this model costs a site (up + down).")


class ModelChunk(BaseModel):
    """Retained on `hub/model/<version>/<index>`: one slice of the ONNX artifact."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    version: int = Field(ge=1)
    index: int = Field(ge=0)
    count: int = Field(ge=1)
    data: str = Field(description="Base64 (RFC 4648, with padding) of the chunk's bytes.")


class Evaluation(BaseModel):
    """On `site/<id>/eval`: how a delivered model does on the site's local held-out samples."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    eval_id: MessageId = Field(default_factory=new_id)
    site_id: SiteId
    model_version: int = Field(ge=1)
    at: datetime = Field(default_factory=_now)
    samples: int = Field(ge=0)
    accuracy: float | None = Field(default=None, ge=0.0, le=1.0, description="None when the site holds no samples.")


ErrorCode = Literal[
    "not_json",
    "schema_version",
    "invalid",
    "non_finite",
    "dimension",
    "dtype",
    "unknown_encoder",
    "oversize",
    "site_mismatch",
    "duplicate_id",
    "unknown_supersedes",
]


class ErrorReport(BaseModel):
    """On `site/<id>/errors`: why the hub rejected a message the site published. Nothing of it was applied."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    error_id: MessageId = Field(default_factory=new_id)
    site_id: SiteId
    at: datetime = Field(default_factory=_now)
    topic: str
    code: ErrorCode
    reason: str
    ref_id: str | None = Field(default=None, description="The rejected payload's own id, when it could be read.")
    payload_sha256: Sha256
    payload_bytes: int = Field(ge=0)
