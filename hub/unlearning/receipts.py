"""Forget receipts from sites: decoded defensively, signature checked against the site's key, then validated.

A site's key is the one in the hub's `site_keys_dir` (`<site_id>.pub.pem`) when the operator put it
there, else the key pinned from that site's first receipt (trust on first use, recorded in the
ledger). A receipt signed by any other key is refused.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from contract import decode, signing
from contract.payloads import SCHEMA_VERSION, ForgetReceipt
from runtime.outcomes import Rejected

MAX_RECEIPT_BYTES = 16 * 1024


def configured_site_key(site_keys_dir: Path | None, site_id: str) -> str | None:
    """The PEM an operator installed for `site_id`, if any."""
    if site_keys_dir is None:
        return None
    path = Path(site_keys_dir) / f"{site_id}.pub.pem"
    return path.read_text() if path.is_file() else None


def parse_receipt(payload: bytes, topic_site: str, trusted_pem: str | None) -> tuple[ForgetReceipt, str]:
    """(receipt, signer's key id) of a `forget/receipt` payload from `topic_site`, or Rejected.

    `trusted_pem` is the key the site must have signed with; None trusts the receipt's own key (first use).
    """
    try:
        body = decode.loads(payload, MAX_RECEIPT_BYTES, schema_version=SCHEMA_VERSION)
    except decode.PayloadError as err:
        raise Rejected(err.code, err.reason) from None
    ref = body.get("request_id") if isinstance(body.get("request_id"), str) else None
    pem = trusted_pem if trusted_pem is not None else body.get("public_key")
    try:
        key = signing.parse_public_pem(str(pem))
    except ValueError as err:
        raise Rejected("invalid", f"public_key is not an Ed25519 public key: {err}", ref) from None
    kid = signing.key_id(key)
    try:
        signing.verify(body, {kid: key})
    except signing.SignatureError as err:
        code = "unknown_key" if "not trusted" in str(err) else "signature"
        raise Rejected(code, f"receipt refused: {err}", ref) from None
    try:
        receipt = ForgetReceipt.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "payload"
        raise Rejected("invalid", f"{where}: {first['msg']}", ref) from None
    if receipt.site_id != topic_site:
        raise Rejected("site_mismatch", f"receipt names site {receipt.site_id!r} but came from {topic_site!r}", ref)
    try:
        carried = signing.key_id(signing.parse_public_pem(receipt.public_key))
    except ValueError as err:  # found by bench/fuzz: a receipt signed by the pinned key but carrying a bad PEM
        raise Rejected("invalid", f"public_key is not an Ed25519 public key: {err}", ref) from None
    if carried != kid:
        raise Rejected("unknown_key", f"receipt carries key {carried}, not the site's pinned key {kid}", ref)
    return receipt, kid
