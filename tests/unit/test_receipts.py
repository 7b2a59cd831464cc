"""Forget receipts at the hub: parsed defensively, signature against the site's pinned key, never an exception."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contract import signing
from hub.unlearning.receipts import parse_receipt
from runtime.outcomes import Rejected


def body(key, public_key: str) -> bytes:
    b = {
        "schema_version": 1, "receipt_id": "ab" * 16, "request_id": "cd" * 16, "site_id": "site-a",
        "request_issued_at": "2026-11-22T09:00:00+00:00", "received_at": "2026-11-22T09:00:00+00:00",
        "completed_at": "2026-11-22T09:00:01+00:00", "samples_deleted": 3, "labels_affected": ["7"],
        "superseded": "ef" * 16, "contribution_id": "01" * 16, "public_key": public_key,
    }  # fmt: skip
    return json.dumps(signing.sign(b, key)).encode()


def test_a_receipt_by_the_pinned_key_verifies_and_anything_else_is_refused_with_a_code(tmp_path: Path) -> None:
    key = signing.write_keypair(tmp_path / "site.pem")
    pem = signing.public_pem(key.public_key())
    receipt, kid = parse_receipt(body(key, pem), "site-a", pem)
    assert kid == signing.key_id(key.public_key()) and receipt.samples_deleted == 3
    # Found by bench/fuzz: signed by the pinned key, but carrying a public_key that is no key at all.
    for carried in ("not a key", "\u00e9\u00e9", pem.replace("MCow", "MCoX")):
        with pytest.raises(Rejected) as err:
            parse_receipt(body(key, carried), "site-a", pem)
        assert err.value.code in {"invalid", "unknown_key"}
    other = signing.write_keypair(tmp_path / "other.pem")
    with pytest.raises(Rejected) as err:
        parse_receipt(body(other, signing.public_pem(other.public_key())), "site-a", pem)
    assert err.value.code == "unknown_key"
    with pytest.raises(Rejected) as err:
        parse_receipt(body(key, pem), "site-b", pem)
    assert err.value.code == "site_mismatch"
