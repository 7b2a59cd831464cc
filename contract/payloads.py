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
