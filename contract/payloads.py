"""Payload models. Every payload names its site and carries a unique id, so redelivery is harmless."""

from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, model_validator

from contract.arrays import ArrayPayload

SCHEMA_VERSION = 1


def _exact_int(value: object) -> object:
    # `true` and `1.0` compare equal to 1 in Python; the schema version is the integer itself.
    if type(value) is not int:
        raise ValueError(f"schema_version must be the integer {SCHEMA_VERSION}, got {value!r}")
    return value


SchemaVersion = Annotated[Literal[1], BeforeValidator(_exact_int), Field(description="Payload schema version.")]
# Counters and sizes: bounded so that no number on the wire can overflow SQLite's 64-bit integers.
MAX_COUNT = 10**12
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]

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
    counts: list[Annotated[int, Field(ge=1, le=MAX_COUNT)]] = Field(description="Samples averaged per prototype.")
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

    schema_version: SchemaVersion = SCHEMA_VERSION
    contribution_id: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")] = Field(
        description="Chosen by the site, never reused for other content (sites derive it from the content)."
    )
    site_id: SiteId
    encoder_id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    created_at: AwareDatetime
    supersedes: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")] | None = None
    k: int = Field(ge=1, le=MAX_PROTOTYPES_PER_LABEL, description="Prototypes asked per label.")
    min_group_size: int = Field(ge=1, le=MAX_COUNT, description="Smallest number of samples one prototype averages.")
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

    def content_sha256(self) -> str:
        """Digest of everything but `created_at`: the same upload sent again later has the same content."""
        body = self.model_dump(mode="json", exclude={"created_at"}, exclude_none=True)
        return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def to_json_bytes(self) -> bytes:
        """The exact bytes published on the wire."""
        return self.model_dump_json(exclude_none=True).encode("utf-8")


def now() -> datetime:
    """The current time, with its zone (every time on the wire has one)."""
    return datetime.now(UTC)


MessageId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
ModelVersionNumber = Annotated[int, Field(ge=1, le=MAX_COUNT)]


class Signature(BaseModel):
    """An Ed25519 signature over the payload's canonical encoding without this member (contract/signing.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alg: Literal["ed25519"]
    key_id: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")] = Field(
        description="First 16 hex digits of sha256 of the signer's raw 32-byte public key."
    )
    value: Annotated[str, StringConstraints(min_length=1, max_length=256)] = Field(
        description="Base64 of the 64-byte signature."
    )


class EncoderStatus(BaseModel):
    """Which encoder variant a site runs, and on which onnxruntime provider."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    encoder_id: str
    variant: str = Field(description="fp32 or int8")
    provider: str = Field(description="onnxruntime execution provider actually in use")


# A message kind in a site's byte counters: becomes a metric label at the hub, so it is short and plain.
MessageKind = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z_]{0,31}$")]


HeadName = Annotated[str, StringConstraints(pattern=r"^(logits|head_[a-z0-9_]{1,48})$")]
MAX_HEADS = 64
MAX_LABELS_CONFUSION = 256


class SiteStatus(BaseModel):
    """Retained on `site/<id>/status`: the site's state and counters. The broker's last-will sets `offline`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: SchemaVersion = SCHEMA_VERSION
    message_id: MessageId
    site_id: SiteId
    state: Literal["online", "offline", "stopped"]
    at: AwareDatetime
    encoder: EncoderStatus | None = None
    samples: Count | None = Field(default=None, description="Samples in the local index (training + held-out).")
    contribution_id: MessageId | None = Field(default=None, description="The site's latest contribution.")
    model_version: ModelVersionNumber | None = Field(
        default=None, description="Newest global model version the site installed (and evaluated)."
    )
    serving_version: ModelVersionNumber | None = Field(
        default=None, description="The version the site serves, as the hub's delivery gate decided."
    )
    serving_head: HeadName | None = Field(default=None, description="The head of that version it serves.")
    model_error: str | None = Field(
        default=None, description="Why the newest delivered or stored model is not the one running, if it is not."
    )
    unreadable_samples: Count = Field(default=0, description="Local files the site could not read (see its log).")
    skipped_labels: list[Label] = Field(
        default_factory=list, max_length=MAX_LABELS,
        description="Labels not contributed: fewer training samples than min_group_size.",
    )  # fmt: skip
    outbox_depth: Count | None = Field(default=None, description="Messages not yet acknowledged by the broker.")
    bytes_sent: dict[MessageKind, Count] = Field(
        default_factory=dict, max_length=32, description="Payload bytes published, by message kind."
    )
    bytes_received: dict[MessageKind, Count] = Field(
        default_factory=dict, max_length=32, description="Payload bytes received, by kind."
    )
    # The rest of the site's counters travel here too, so that the hub can re-export them with a `site`
    # label: a site behind a factory firewall is never scraped, yet shows up in the dashboard.
    local_accuracy: float | None = Field(
        default=None, ge=0.0, le=1.0, allow_inf_nan=False,
        description="Accuracy of the running model on the site's held-out samples.",
    )  # fmt: skip
    encoded_batches: Count = Field(default=0, description="Batches of samples encoded since the site started.")
    encode_seconds: float = Field(
        default=0.0, ge=0.0, le=1e12, allow_inf_nan=False, description="Seconds spent encoding those batches."
    )
    forget_requests: dict[Literal["accepted", "duplicate", "rejected"], Count] = Field(
        default_factory=dict, description="Forget requests since the site started, by outcome."
    )


class EncoderInfo(BaseModel):
    """An encoder the hub accepts embeddings from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    encoder_id: str
    dim: int = Field(ge=1, le=1 << 20, description="Embedding dimension.")


class GateDecision(BaseModel):
    """The delivery gate's decision for one model version (docs/delivery-gate.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    state: Literal["pending", "served", "at_chance", "unchecked"] = Field(
        description="pending: sites evaluate every head and keep serving their previous model; served: `serve` "
        "won on the sites' pooled held-out samples; at_chance: no head beats chance, nothing new is served; "
        "unchecked: no site reported an evaluation in time, the candidate is served unchecked."
    )
    reason: str = Field(default="", max_length=2000)
    balanced_accuracy: dict[HeadName, float | None] = Field(
        default_factory=dict, max_length=MAX_HEADS, description="Pooled held-out balanced accuracy of each head."
    )
    samples: Count = Field(default=0, description="Pooled held-out samples the decision rests on.")
    confusion: list[list[Count]] | None = Field(
        default=None, max_length=MAX_LABELS_CONFUSION,
        description="The best head's pooled confusion matrix (rows: true label, columns: predicted, in label order).",
    )  # fmt: skip
    decided_at: AwareDatetime | None = None


class HubStatus(BaseModel):
    """Retained on `hub/status`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: SchemaVersion = SCHEMA_VERSION
    message_id: MessageId
    hub_id: SiteId
    session_id: MessageId = Field(
        description="New each time the hub connects; sites resend their latest contribution when it changes."
    )
    state: Literal["online", "offline", "stopped", "training"]
    at: AwareDatetime
    model_version: ModelVersionNumber | None = None
    active_contributions: Count | None = None
    waiting_for_sites: Count | None = Field(
        default=None, description="How many more sites must contribute before the hub starts a round on its own."
    )
    encoders: list[EncoderInfo] = Field(default_factory=list, description="Encoders whose embeddings the hub accepts.")
    min_group_size: int | None = Field(
        default=None, ge=1, le=MAX_COUNT, description="Fewest samples a prototype must average for this hub."
    )
    key_id: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")] | None = Field(
        default=None, description="Id of the key that signs manifests and certificates."
    )
    public_key: str | None = Field(
        default=None, max_length=4096, description="That key's public half, PEM (SubjectPublicKeyInfo)."
    )
    delivery: GateDecision | None = Field(
        default=None, description="The delivery gate's decision on the newest model (`model_version`)."
    )


class ChunkRef(BaseModel):
    """One chunk of a model artifact as the manifest lists it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int = Field(ge=0, le=MAX_COUNT)
    size_bytes: Count
    sha256: Sha256


class ModelManifest(BaseModel):
    """Retained on `hub/model`: the current global model and how to fetch and check it. Signed by the hub."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: SchemaVersion = SCHEMA_VERSION
    message_id: MessageId
    version: ModelVersionNumber
    created_at: AwareDatetime
    format: Literal["onnx"] = "onnx"
    sha256: Sha256 = Field(description="sha256 of the whole artifact; a site runs nothing that does not match.")
    size_bytes: int = Field(ge=1, le=MAX_COUNT)
    chunks: list[ChunkRef] = Field(min_length=1, description="Published retained on hub/model/<version>/<index>.")
    labels: list[Label] = Field(min_length=1, description="Class names, in logit order.")
    input_name: str = "image"
    input_shape: list[int] = Field(description="[-1, 1, S, S], pixels in [0, 1].")
    encoder_id: str = Field(description="Encoder whose embeddings sites must send for the next round.")
    contributions: list[MessageId] = Field(description="Contributions the model was trained on.")
    fedavg_round_bytes: Count = Field(description="What one FedAvg round of this model costs a site (up + down).")
    heads: dict[HeadName, str] = Field(
        default_factory=lambda: {"logits": "candidate"},
        max_length=MAX_HEADS,
        description="ONNX outputs of logits over `labels` and what each is: `logits` the round's candidate, "
        "`head_*` the baselines the same uploads allow (docs/delivery-gate.md). Sites evaluate every one.",
    )
    serve: HeadName | None = Field(
        default="logits", description="The head a site serves; null: keep serving the previous model."
    )
    gate: GateDecision | None = Field(
        default=None, description="The delivery gate; null: served as delivered (no gate)."
    )
    signature: Signature = Field(description="The hub's signature; a site installs nothing unsigned.")


class ModelChunk(BaseModel):
    """Retained on `hub/model/<version>/<index>`: one slice of the ONNX artifact."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: SchemaVersion = SCHEMA_VERSION
    version: ModelVersionNumber
    index: int = Field(ge=0, le=MAX_COUNT)
    count: int = Field(ge=1, le=MAX_COUNT)
    data: str = Field(description="Base64 (RFC 4648, with padding) of the chunk's bytes.")


class Evaluation(BaseModel):
    """On `site/<id>/eval`: how a delivered model does on the site's local held-out samples."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: SchemaVersion = SCHEMA_VERSION
    eval_id: MessageId
    site_id: SiteId
    model_version: ModelVersionNumber
    at: AwareDatetime
    samples: Count
    accuracy: float | None = Field(
        default=None, ge=0.0, le=1.0, allow_inf_nan=False, description="None when the site holds no samples."
    )
    balanced_accuracy: float | None = Field(
        default=None, ge=0.0, le=1.0, allow_inf_nan=False,
        description="Mean recall over the labels the held-out samples have (of the head `accuracy` is of).",
    )  # fmt: skip
    heads: dict[HeadName, list[list[Count]]] = Field(
        default_factory=dict,
        max_length=MAX_HEADS,
        description="Each head's confusion matrix on the held-out samples (rows: true label, columns: predicted, "
        "in the manifest's label order; samples of labels the model lacks are left out).",
    )

    @model_validator(mode="after")
    def _square(self) -> Evaluation:
        for name, m in self.heads.items():
            if len(m) > MAX_LABELS_CONFUSION or any(len(row) != len(m) for row in m):
                raise ValueError(f"head {name}: a confusion matrix must be square, at most {MAX_LABELS_CONFUSION}")
            if sum(map(sum, m)) > self.samples:
                raise ValueError(f"head {name}: its confusion matrix counts more than the {self.samples} samples")
        return self


SampleId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^/\\\x00]+$")]
MAX_FORGET_SAMPLE_IDS = 10_000


class ForgetSelector(BaseModel):
    """Which local samples a forget request covers: listed ids, one label, a time window, or everything."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["samples", "label", "time_window", "all"]
    sample_ids: list[SampleId] | None = Field(
        default=None, max_length=MAX_FORGET_SAMPLE_IDS, description="kind samples: the sample ids (file stems)."
    )
    label: Label | None = Field(default=None, description="kind label: every sample of this label.")
    since: AwareDatetime | None = Field(default=None, description="kind time_window: samples with timestamp >= since.")
    until: AwareDatetime | None = Field(default=None, description="kind time_window: samples with timestamp < until.")

    @model_validator(mode="after")
    def _fields_of_kind(self) -> ForgetSelector:
        given = {f for f in ("sample_ids", "label", "since", "until") if getattr(self, f) is not None}
        needed = {"samples": {"sample_ids"}, "label": {"label"}, "all": set()}.get(self.kind)
        if self.kind == "time_window":
            if not given or given - {"since", "until"}:
                raise ValueError("a time_window selector takes since and/or until, nothing else")
            if self.since and self.until and self.since >= self.until:
                raise ValueError("since must be before until")
        elif given != needed:
            raise ValueError(
                f"a {self.kind} selector takes exactly {sorted(needed) or 'no other field'}, got {sorted(given)}"
            )
        if self.kind == "samples" and not self.sample_ids:
            raise ValueError("a samples selector needs at least one sample id")
        return self


class ForgetRequest(BaseModel):
    """On `site/<id>/forget/request` (never retained): delete data at a site; signed by the site's operator key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: SchemaVersion = SCHEMA_VERSION
    request_id: MessageId = Field(description="Chosen by the issuer; a request with a seen id is not executed twice.")
    site_id: SiteId
    selector: ForgetSelector
    reason: Annotated[str, StringConstraints(min_length=1, max_length=500)] = Field(
        description="Why, in words (kept in the site's and the hub's audit trail)."
    )
    issued_at: AwareDatetime = Field(description="Refused when older than the site's forget_max_age_s (a replay).")
    issuer: Annotated[str, StringConstraints(min_length=1, max_length=128)] = Field(
        description="Who asks: an operator, a data-protection tool, an MES."
    )
    signature: Signature = Field(description="By an operator key the site trusts (operator_public_key_files).")


class ForgetReceipt(BaseModel):
    """On `site/<id>/forget/receipt` (never retained): what the site deleted and what replaced its contribution."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: SchemaVersion = SCHEMA_VERSION
    receipt_id: MessageId
    request_id: MessageId
    site_id: SiteId
    request_issued_at: AwareDatetime = Field(description="The request's issued_at, for request-to-receipt latency.")
    received_at: AwareDatetime = Field(description="When the site persisted the request.")
    completed_at: AwareDatetime = Field(description="When the deletion and the superseding contribution were done.")
    samples_deleted: Count = Field(description="Samples deleted: files, index rows, embeddings, held-out samples.")
    labels_affected: list[Label] = Field(max_length=MAX_LABELS, description="Labels that lost samples.")
    superseded: MessageId | None = Field(
        default=None, description="The contribution that carried the deleted data; no model may be trained on it."
    )
    contribution_id: MessageId | None = Field(
        default=None,
        description="The superseding contribution (a retraction when nothing is left); None if the site "
        "had contributed nothing.",
    )
    public_key: str = Field(max_length=4096, description="The site's public key (PEM); the hub pins it per site.")
    signature: Signature = Field(description="By the site's own key.")


class UnlearningCertificate(BaseModel):
    """On `hub/certificate`: the hub's signed statement that a model no longer carries some contributions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: SchemaVersion = SCHEMA_VERSION
    certificate_id: MessageId
    hub_id: SiteId
    issued_at: AwareDatetime
    reason: Literal["forget_request", "outdated", "irrelevant"]
    request_ids: list[MessageId] = Field(description="Forget requests honoured (empty for automatic unlearning).")
    removed_contributions: list[MessageId] = Field(min_length=1, description="Contributions no longer trained on.")
    model_version_before: ModelVersionNumber | None
    model_version_after: ModelVersionNumber
    model_sha256: Sha256 = Field(description="sha256 of the model_version_after artifact.")
    trained_on: list[MessageId] = Field(description="Every contribution the new model was trained on.")
    training_digest: Sha256 = Field(
        description="sha256 of the canonical list of [contribution_id, statistics sha256] the new model was solved from."
    )
    method: Literal["closed_form_exact", "retrain_exact"] = Field(
        description="closed_form_exact: re-solved from the remaining contributions' additive statistics; "
        "retrain_exact: retrained from scratch on the remaining synthesis."
    )
    verification: dict[str, float] = Field(description="Figures behind the claim (see docs/unlearning.md).")
    requested_at: AwareDatetime | None = Field(default=None, description="Earliest issued_at of the requests.")
    signature: Signature = Field(description="By the hub's key, the one that signs model manifests.")


MAX_REFINE_DIM = 512
FeatureKey = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]


RefinementPart = Literal["train", "held_out"]


class RefinementRequest(BaseModel):
    """Retained on `hub/refine`: run a delivered model's feature output on your labelled data, send statistics."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: SchemaVersion = SCHEMA_VERSION
    request_id: MessageId = Field(description="New for each model version the request names.")
    created_at: AwareDatetime
    feature_key: FeatureKey = Field(
        description="Names the feature part (encoder, random features, projection); statistics must echo it."
    )
    model_version: ModelVersionNumber = Field(description="The delivered model whose output to run.")
    model_sha256: Sha256 = Field(description="sha256 of that model's artifact.")
    output_name: Annotated[str, StringConstraints(min_length=1, max_length=64)] = Field(
        description="ONNX output holding the projected features [N, dim]."
    )
    dim: int = Field(ge=1, le=MAX_REFINE_DIM, description="Width of that output.")
    min_group_size: int = Field(ge=1, le=MAX_COUNT, description="Labels with fewer training samples are left out.")
    part: RefinementPart = Field(
        default="train",
        description="Which of the site's labelled samples to sum: `train` (what its prototypes came from), or "
        "`held_out` (what it evaluates models on), asked for once the delivery gate has chosen a refined head, so "
        "that the hub solves that head again from every sample (hub/refinement/engine.py).",
    )
    signature: Signature = Field(description="The hub's signature, by the key that signs model manifests.")


class RefinementStatistics(BaseModel):
    """On `site/<id>/refine`: additive statistics of a site's projected features (sums per label, a square root of the
    scatter from which the hub rebuilds the Gram matrix)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: SchemaVersion = SCHEMA_VERSION
    statistics_id: MessageId = Field(description="Chosen by the site from the content; never reused for other content.")
    site_id: SiteId
    created_at: AwareDatetime
    feature_key: FeatureKey = Field(description="The request's feature_key.")
    model_version: ModelVersionNumber = Field(description="The model whose feature output was run.")
    contribution_id: MessageId = Field(
        description="The site's contribution these statistics go with; they leave the model when it is superseded."
    )
    min_group_size: int = Field(ge=1, le=MAX_COUNT, description="Fewest training samples a label needed to be counted.")
    part: RefinementPart = Field(default="train", description="The request's part: which samples were summed.")
    labels: list[Label] = Field(min_length=1, max_length=MAX_LABELS, description="Labels summed, in row order.")
    counts: list[Annotated[int, Field(ge=1, le=MAX_COUNT)]] = Field(description="Samples per label.")
    sums: ArrayPayload = Field(description="Per-label sums of the features divided by sums_scale, shape [L, dim].")
    sums_scale: float = Field(
        default=1.0, ge=2.0**-64, le=2.0**64,
        description="A power of two: the sums on the wire are the sums divided by it, so that float16 holds them (the "
        "hub multiplies back; dividing by a power of two loses nothing).",
    )  # fmt: skip
    root: ArrayPayload = Field(
        description="The upper-triangular R [root_rows, dim] of a QR decomposition of the counted features minus their "
        "mean (R^T R is their scatter), its upper triangle row by row (numpy triu_indices(root_rows, m=dim)), "
        "divided by root_scale; the hub's Gram matrix is R^T R + s s^T / n, s the sum of the sums, n of the counts.",
    )
    root_rows: int = Field(ge=1, le=MAX_REFINE_DIM, description="Rows of R: min(samples counted, dim).")
    root_scale: float = Field(
        default=1.0, ge=2.0**-64, le=2.0**64, description="A power of two: root on the wire is R divided by it."
    )

    @model_validator(mode="after")
    def _check_shapes(self) -> RefinementStatistics:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("a label appears more than once")
        shape = self.sums.shape
        if len(shape) != 2 or shape[0] != len(self.labels) or not 1 <= shape[1] <= MAX_REFINE_DIM:
            raise ValueError(f"sums must be [{len(self.labels)}, dim] with 1 <= dim <= {MAX_REFINE_DIM}, got {shape}")
        if len(self.counts) != len(self.labels):
            raise ValueError(f"{len(self.labels)} labels but {len(self.counts)} counts")
        d, r = shape[1], self.root_rows
        if r > min(d, sum(self.counts)):
            raise ValueError(f"root_rows {r} is more than min(dim, samples counted) = {min(d, sum(self.counts))}")
        if self.root.shape != [r * d - r * (r - 1) // 2]:
            raise ValueError(
                f"root must be the upper triangle of a {r} x {d} matrix, shape [{r * d - r * (r - 1) // 2}]"
            )
        for name in ("sums_scale", "root_scale"):
            if math.frexp(getattr(self, name))[0] != 0.5:
                raise ValueError(f"{name} must be a power of two, got {getattr(self, name)!r}")
        small = [n for n in self.counts if n < self.min_group_size]
        if small:
            raise ValueError(f"a label counts {small[0]} samples, fewer than min_group_size={self.min_group_size}")
        return self

    @property
    def dim(self) -> int:
        """Width of the projected features."""
        return self.sums.shape[1]

    @property
    def n_samples(self) -> int:
        """Samples summed."""
        return sum(self.counts)


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
    "group_size",
    "unknown_model",
    "retained",
    "signature",
    "replay",
    "unknown_key",
    "internal",
    "unlearned",
    "stale",
]


class ErrorReport(BaseModel):
    """On `site/<id>/errors`: why the hub rejected a message the site published. Nothing of it was applied."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: SchemaVersion = SCHEMA_VERSION
    error_id: MessageId
    site_id: SiteId
    at: AwareDatetime
    topic: str
    code: ErrorCode
    reason: str
    ref_id: str | None = Field(default=None, description="The rejected payload's own id, when it could be read.")
    payload_sha256: Sha256
    payload_bytes: Count


# Every model that travels on a topic, in the order docs/mqtt.md documents them.
WIRE_MODELS = (
    "SiteStatus", "Contribution", "Evaluation", "ErrorReport", "HubStatus", "ModelManifest", "ModelChunk",
    "ForgetRequest", "ForgetReceipt", "UnlearningCertificate", "RefinementRequest", "RefinementStatistics",
)  # fmt: skip
