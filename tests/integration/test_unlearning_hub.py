"""The hub's unlearning path on a real Mosquitto: a signed receipt, a round without the forgotten contribution,
an exact model, a signed certificate, the removed data purged, and receipts by other keys refused."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from contract import signing
from contract.payloads import ErrorReport, UnlearningCertificate, new_id, now
from contract.topics import Topics
from edge.contribution import make_contribution
from hub.service import HubService
from runtime.mqtt import BrokerSettings
from tests.integration.helpers import Watcher, good_contribution, wait_for

pytestmark = pytest.mark.slow
TOPICS = Topics()


def receipt(key, site: str, superseded: str | None, contribution_id: str | None, deleted: int = 20) -> bytes:
    """A site's signed forget receipt, built as a third-party site would from docs/mqtt.md."""
    t = now()
    body = {
        "schema_version": 1, "receipt_id": new_id(), "request_id": new_id(), "site_id": site,
        "request_issued_at": t.isoformat(), "received_at": t.isoformat(), "completed_at": t.isoformat(),
        "samples_deleted": deleted, "labels_affected": ["1"], "superseded": superseded,
        "contribution_id": contribution_id, "public_key": signing.public_pem(key.public_key()),
    }  # fmt: skip
    return json.dumps(signing.sign(body, key)).encode()


def test_a_forget_receipt_yields_an_exact_model_and_a_signed_certificate(
    hub_factory: Callable[..., HubService], mosquitto: BrokerSettings, tmp_path: Path
) -> None:
    hub = hub_factory(rounds={"min_sites": 3, "poll_s": 0.2})
    watcher = Watcher(mosquitto, [TOPICS.hub_model, TOPICS.hub_certificate, TOPICS.all_sites("errors")])
    sites = [good_contribution(hub, f"site-{i}", seed=i) for i in range(3)]
    for c in sites:
        watcher.publish(TOPICS.site(c.site_id, "embeddings"), c.to_json_bytes())
    wait_for(lambda: [r.state for r in hub.ledger.rounds()] == ["done"], 120, "the first round")
    v1 = hub.registry.latest()
    assert v1.manifest["method"] == "closed_form_exact"

    # site-0 forgets label "1": it re-encodes what is left and sends the superseding contribution, then the receipt.
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(20, hub.foundation.dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    old = sites[0]
    new = make_contribution("site-0", hub.foundation.encoder_id, emb, ["0"] * 20, k=2, supersedes=old.contribution_id)
    site_key = signing.write_keypair(tmp_path / "site-0.pem")
    watcher.publish(TOPICS.site("site-0", "embeddings"), new.to_json_bytes())
    watcher.publish(
        TOPICS.site("site-0", "forget/receipt"), receipt(site_key, "site-0", old.contribution_id, new.contribution_id)
    )

    wait_for(lambda: bool(watcher.on(TOPICS.hub_certificate)), 120, "the certificate")
    body = json.loads(watcher.on(TOPICS.hub_certificate)[0])
    hub_key = signing.load_public_key(hub.settings.signing_key_path().with_suffix(".pub.pem"))
    assert signing.verify(body, {signing.key_id(hub_key): hub_key})
    cert = UnlearningCertificate.model_validate(body)
    v2 = hub.registry.latest()
    assert cert.model_version_before == v1.version and cert.model_version_after == v2.version
    assert cert.model_sha256 == v2.sha256 and cert.removed_contributions == [old.contribution_id]
    assert old.contribution_id not in cert.trained_on and new.contribution_id in cert.trained_on
    assert cert.method == "closed_form_exact" and cert.training_digest == v2.manifest["training_digest"]
    # Exact: a refit with every statistic recomputed from the synthetic images gives the same bits.
    assert cert.verification["refit_max_abs_diff"] == 0.0 and cert.verification["refit_bit_identical"] == 1.0
    assert cert.verification["removed_in_training_set"] == 0.0
    assert [r.trigger for r in hub.ledger.rounds()] == ["min_sites", "forget"]
    manifest = json.loads(watcher.on(TOPICS.hub_model)[-1])
    assert manifest["version"] == v2.version and old.contribution_id not in manifest["contributions"]

    # What was derived from the deleted data is gone: prototypes in the ledger, synthesis and statistics caches.
    row = hub.ledger._db.execute(
        "SELECT length(payload), purged_at FROM contributions WHERE contribution_id = ?", (old.contribution_id,)
    ).fetchone()
    assert row[0] == 0 and row[1] is not None
    assert not list((hub.settings.state_dir).rglob(f"{old.contribution_id}.npz"))
    reg = hub.metrics.registry
    assert reg.get_sample_value("fedge_hub_certificates_total", {"reason": "forget_request"}) == 1
    assert reg.get_sample_value("fedge_hub_forget_request_to_certificate_seconds_count") == 1

    # The site's key is pinned: a receipt signed by another key is refused with a reason.
    other = signing.write_keypair(tmp_path / "other.pem")
    watcher.publish(TOPICS.site("site-0", "forget/receipt"), receipt(other, "site-0", new.contribution_id, None))
    wait_for(lambda: bool(watcher.on(TOPICS.site("site-0", "errors"))), 30, "the refusal")
    report = ErrorReport.model_validate_json(watcher.on(TOPICS.site("site-0", "errors"))[-1])
    assert report.code == "unknown_key"
    watcher.stop()

    # The data-protection officer's view: export the trail, verify every signature and digest in it.
    conf = tmp_path / "hub.yaml"
    conf.write_text(json.dumps({"state_dir": str(hub.settings.state_dir)}))
    out = tmp_path / "audit"
    cli = [sys.executable, "-m", "hub.cli", "audit"]
    done = subprocess.run([*cli, "export", "--config", str(conf), "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rows"]["certificates"] == 1
    pub = str(hub.settings.signing_key_path().with_suffix(".pub.pem"))
    check = subprocess.run([*cli, "verify", str(out), "--hub-key", pub], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert json.loads(check.stdout)["checked"] == {"certificates": 1, "receipts": 1, "contributions": 4}
    # A tampered certificate (one contribution fewer removed) no longer verifies.
    lines = (out / "audit.jsonl").read_text().splitlines()
    for i, line in enumerate(lines):
        rec = json.loads(line)
        if rec["table"] == "certificates":
            cert_body = json.loads(rec["row"]["payload"])
            cert_body["model_version_before"] = 99
            rec["row"]["payload"] = json.dumps(cert_body)
            lines[i] = json.dumps(rec)
    (out / "audit.jsonl").write_text("\n".join(lines) + "\n")
    bad = subprocess.run([*cli, "verify", str(out), "--hub-key", pub], capture_output=True, text=True)
    assert bad.returncode == 1 and "does not verify" in bad.stdout
