"""The refinement round on a real Mosquitto: three edges (processes, onnxruntime only) send additive statistics of
the delivered model's features, the hub solves the head exactly and delivers it; one site forgets a label and the
certificate names the re-solved model and the statistics that left it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from contract import signing
from contract.payloads import RefinementRequest, RefinementStatistics, SiteStatus, UnlearningCertificate
from contract.topics import Topics
from hub import datasets
from hub.config import RoundPolicy
from hub.service import HubService
from hub.unlearning import audit
from runtime.mqtt import BrokerSettings
from tests.integration.helpers import Watcher, start_edge, stop_edges, wait_for
from tests.unit.test_edge_forget import request

pytestmark = pytest.mark.slow
TOPICS = Topics()
SITES = ("site-0", "site-1", "site-2")
KIB64 = 64 * 1024


def test_sites_refine_the_head_and_a_forget_request_re_solves_it_exactly(
    hub_factory: Callable[..., HubService], mosquitto: BrokerSettings, tmp_path: Path
) -> None:
    # The synthesis model only has to exist (its features are what the sites run): a cheap one.
    hub = hub_factory(
        rounds={"min_sites": 3, "poll_s": 0.2, "refine": True, "refine_wait_s": 600},
        synthesis={"samples_per_count": 0.25, "steps": 4, "epochs": 1},
    )
    watcher = Watcher(mosquitto, [TOPICS.hub_certificate, TOPICS.hub_refine, TOPICS.all_sites("refine"),
                                  TOPICS.all_sites("status"), TOPICS.all_sites("errors")])  # fmt: skip
    data = datasets.load("digits")
    operator = signing.write_keypair(tmp_path / "operator.pem")
    procs = {}
    try:
        for i, s in enumerate(SITES):
            datasets.write_folder(tmp_path / s / "data", data, np.arange(i * 120, (i + 1) * 120))
            procs[s] = start_edge(
                s, tmp_path / s / "data", tmp_path / s / "state", mosquitto.port, tmp_path / f"{s}.log", k="2",
                operator_public_key_files=json.dumps([str(tmp_path / "operator.pub.pem")]), prefer_cuda="false",
            )  # fmt: skip

        def refined_version() -> int | None:
            latest = hub.registry.latest()
            info = latest.manifest.get("refinement", {}) if latest else {}
            return latest.version if latest and info.get("sites") == list(SITES) else None

        wait_for(lambda: refined_version() is not None, 300, "a model refined from all three sites' statistics")
        v_refined = hub.registry.get(refined_version())
        # The delivery gate weighs every head the refined model carries on the sites' held-out samples.
        extra = [f"head_refined_{i}" for i in range(len(RoundPolicy().refine_lams))]
        assert list(v_refined.manifest["heads"]) == ["logits", *extra, "head_nearest_prototype"]
        wait_for(lambda: hub.ledger.gate_decision(v_refined.version) is not None, 300, "the gate's decision")
        gate = hub.ledger.gate_decision(v_refined.version)
        assert gate["state"] == "served" and set(gate["balanced_accuracy"]) == set(v_refined.manifest["heads"])
        assert gate["balanced_accuracy"][gate["serve"]] == max(gate["balanced_accuracy"].values())
        rounds = [(r.trigger, r.state, r.model_version) for r in hub.ledger.rounds()]
        assert [r[0] for r in rounds] == ["min_sites", "refine"], rounds
        first = hub.registry.get(1).manifest
        assert first["method"] == "closed_form_exact" and "sites" not in first["refinement"]
        request_ = RefinementRequest.model_validate_json(watcher.on(TOPICS.hub_refine)[0])
        assert request_.model_version == 1 and request_.dim == RoundPolicy().refine_dim
        stats = {s: RefinementStatistics.model_validate_json(watcher.on(TOPICS.site(s, "refine"))[0]) for s in SITES}
        assert sorted(v_refined.manifest["contributions"]) == sorted(st.statistics_id for st in stats.values())

        # Bytes per site and round, refinement included: at most 64 KiB (the sites' own counters, acknowledged).
        def sent(s: str) -> dict[str, int]:
            msgs = [SiteStatus.model_validate_json(p) for p in watcher.on(TOPICS.site(s, "status")) if p]
            return msgs[-1].bytes_sent if msgs else {}

        wait_for(lambda: all("refine" in sent(s) for s in SITES), 60, "the sites' byte counters")
        for s in SITES:
            up = sent(s)
            print(
                f"{s}: embeddings {up['embeddings']} B + refine {up['refine']} B = {up['embeddings'] + up['refine']} B"
            )
            assert up["embeddings"] + up["refine"] <= KIB64
        reg = hub.metrics.registry
        assert reg.get_sample_value("fedge_hub_received_bytes_total", {"kind": "refine"}) >= 3 * 20_000
        assert reg.get_sample_value("fedge_hub_sent_bytes_total", {"kind": "refine_request"}) > 0

        # site-0 forgets label "3": new contribution, receipt, and statistics of what is left.
        _, payload = request(operator, {"kind": "label", "label": "3"}, site_id="site-0")
        watcher.publish(TOPICS.site("site-0", "forget/request"), payload)
        wait_for(lambda: bool(watcher.on(TOPICS.hub_certificate)), 90, "the certificate")
        cert = UnlearningCertificate.model_validate_json(watcher.on(TOPICS.hub_certificate)[0])
        after = hub.registry.get(cert.model_version_after)
        rounds = [(r.trigger, r.state, r.model_version) for r in hub.ledger.rounds()]
        assert cert.model_version_before == v_refined.version and after.version > v_refined.version, rounds
        assert "sites" in after.manifest["refinement"]  # the re-solved refined model, not the synthesis one
        old = stats["site-0"]
        assert old.contribution_id in cert.removed_contributions and old.statistics_id in cert.removed_contributions
        assert not set(cert.removed_contributions) & set(cert.trained_on)
        assert cert.trained_on == sorted(after.manifest["contributions"])
        assert cert.model_sha256 == after.sha256 and cert.training_digest == after.manifest["training_digest"]
        assert cert.verification["refit_bit_identical"] == 1.0 and cert.verification["refit_max_abs_diff"] == 0.0
        # What was derived from the deleted data is purged from the ledger.
        row = hub.ledger._db.execute(
            "SELECT length(payload), purged_at FROM refinements WHERE statistics_id = ?", (old.statistics_id,)
        ).fetchone()
        assert row[0] == 0 and row[1] is not None
        # site-0 then sends statistics of what it kept, and the hub refines again from all three sites.
        wait_for(lambda: len(watcher.on(TOPICS.site("site-0", "refine"))) == 2, 60, "site-0's new statistics")
        new = RefinementStatistics.model_validate_json(watcher.on(TOPICS.site("site-0", "refine"))[1])
        assert "3" not in new.labels
        wait_for(lambda: new.statistics_id in (hub.registry.latest().manifest.get("contributions") or []), 60,
                 "a model refined with site-0's new statistics")  # fmt: skip
        assert not watcher.on(TOPICS.all_sites("errors"))
        # The audit trail verifies: certificate digests against the statistics, refinement payloads' sha256.
        pem = signing.public_pem(hub.signing_key.public_key())
        audit.export(hub.ledger, pem, tmp_path / "audit")
        report = audit.verify(tmp_path / "audit", pem)
        assert report["ok"], report["problems"]
        assert report["checked"]["certificates"] == 1 and report["checked"]["refinements"] == 4
    finally:
        stop_edges(procs)
        watcher.stop()
