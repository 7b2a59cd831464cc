"""Unlearning certificates: the hub's signed statement that a delivered model no longer carries contributions."""

from __future__ import annotations

import json
from datetime import datetime

from contract import signing
from contract.payloads import UnlearningCertificate, new_id, now


def make_certificate(
    key: signing.Ed25519PrivateKey,
    hub_id: str,
    reason: str,
    request_ids: list[str],
    removed: list[str],
    version_before: int | None,
    version_after: int,
    model_sha256: str,
    trained_on: list[str],
    training_digest: str,
    method: str,
    verification: dict[str, float],
    requested_at: datetime | None,
) -> tuple[UnlearningCertificate, bytes]:
    """A signed certificate, as a model and as the exact bytes to publish and keep."""
    body = {
        "schema_version": 1, "certificate_id": new_id(), "hub_id": hub_id, "issued_at": now().isoformat(),
        "reason": reason, "request_ids": sorted(request_ids), "removed_contributions": sorted(removed),
        "model_version_before": version_before, "model_version_after": version_after, "model_sha256": model_sha256,
        "trained_on": sorted(trained_on), "training_digest": training_digest, "method": method,
        "verification": {k: float(v) for k, v in sorted(verification.items())},
        "requested_at": requested_at.isoformat() if requested_at else None,
    }  # fmt: skip
    signed = signing.sign(body, key)
    return UnlearningCertificate.model_validate(signed), json.dumps(signed, separators=(",", ":")).encode()
