"""Validation of what sites publish: a payload is accepted whole or rejected with a code and a reason.

Pure functions over bytes; the hub service turns a `Rejected` into an `ErrorReport` on the sender's
`errors` topic, a ledger row and a metric, and applies nothing of the payload.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from contract import decode
from contract.payloads import SCHEMA_VERSION, Contribution, Evaluation, SiteStatus
from runtime.outcomes import Rejected

__all__ = ["Rejected", "parse_contribution", "parse_evaluation", "parse_site_status"]

# A contribution is a few KB (16 prototypes x 10 labels x 32 dims in float16 is about 14 KB of JSON).
DEFAULT_MAX_PAYLOAD_BYTES = 256 * 1024
DEFAULT_MIN_GROUP_SIZE = 5
M = TypeVar("M", bound=BaseModel)


def _decode(payload: bytes, max_bytes: int, id_field: str) -> dict[str, Any]:
    try:
        body = decode.loads(payload, max_bytes)
    except decode.PayloadError as err:
        raise Rejected(err.code, err.reason) from None
    ref = body.get(id_field) if isinstance(body.get(id_field), str) else None
    version = body.get("schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise Rejected(
            "schema_version", f"schema_version {version!r} is not supported; this hub reads {SCHEMA_VERSION}", ref
        )
    return body


def _classify(err: ValidationError, ref: str | None) -> Rejected:
    """The first validation error as a rejection, with the field path in the reason."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "payload"
    msg = first["msg"].removeprefix("Value error, ")
    kind = first["type"]
    if kind == "missing":
        return Rejected("invalid", f"missing field {where}", ref)
    if kind == "finite_number" or "NaN or infinite" in msg:
        return Rejected("non_finite", f"{where}: {msg}", ref)
    if where.endswith("dtype"):
        return Rejected("dtype", f"{where}: {msg} (float16 or float32, little-endian)", ref)
    return Rejected("invalid", f"{where}: {msg}", ref)


def parse_site_message(payload: bytes, topic_site: str, model: type[M], id_field: str, max_bytes: int) -> M:
    """Decode, check the schema version, validate against `model`, and check the body's site against the topic's."""
    body = _decode(payload, max_bytes, id_field)
    ref = body.get(id_field) if isinstance(body.get(id_field), str) else None
    try:
        obj = model.model_validate(body)
    except ValidationError as err:
        raise _classify(err, ref) from None
    if obj.site_id != topic_site:  # type: ignore[attr-defined]
        raise Rejected("site_mismatch", f"body names site {obj.site_id!r} but was published by {topic_site!r}", ref)  # type: ignore[attr-defined]
    return obj


def parse_contribution(
    payload: bytes,
    topic_site: str,
    encoders: dict[str, int],
    max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    min_group_size: int = DEFAULT_MIN_GROUP_SIZE,
) -> Contribution:
    """Validate an `embeddings` payload from `topic_site` against the encoders this hub accepts (id -> dim).

    The hub enforces its own `min_group_size` whatever the upload declares: a prototype of fewer
    samples is close to a raw embedding, which an embedding-conditioned generator can invert.
    """
    c = parse_site_message(payload, topic_site, Contribution, "contribution_id", max_bytes)
    ref = c.contribution_id
    smallest = min((n for lp in c.labels for n in lp.counts), default=None)
    if c.min_group_size < min_group_size or (smallest is not None and smallest < min_group_size):
        raise Rejected(
            "group_size",
            f"every prototype must average at least {min_group_size} samples for this hub; the upload declares "
            f"min_group_size={c.min_group_size} and its smallest prototype averages {smallest}",
            ref,
        )
    if c.encoder_id not in encoders:
        known = ", ".join(sorted(encoders)) or "none"
        raise Rejected("unknown_encoder", f"encoder {c.encoder_id!r} is not served by this hub (known: {known})", ref)
    if c.dim is not None and c.dim != encoders[c.encoder_id]:
        raise Rejected(
            "dimension",
            f"embeddings have dimension {c.dim}; encoder {c.encoder_id} gives {encoders[c.encoder_id]}",
            ref,
        )
    return c


def parse_evaluation(
    payload: bytes, topic_site: str, model_versions: set[int] | None = None, max_bytes: int = 16 * 1024
) -> Evaluation:
    """Validate an `eval` payload from `topic_site`; with `model_versions`, the version must be one of them."""
    e = parse_site_message(payload, topic_site, Evaluation, "eval_id", max_bytes)
    if model_versions is not None and e.model_version not in model_versions:
        newest = max(model_versions, default=None)
        raise Rejected(
            "unknown_model", f"model version {e.model_version} was never published here (newest: {newest})", e.eval_id
        )
    return e


def parse_site_status(payload: bytes, topic_site: str, max_bytes: int = 16 * 1024) -> SiteStatus:
    """Validate a site's (retained) `status` payload from `topic_site`."""
    return parse_site_message(payload, topic_site, SiteStatus, "message_id", max_bytes)
