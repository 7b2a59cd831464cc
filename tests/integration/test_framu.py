"""FRAMU through the services on a real Mosquitto, mode auto: scenario (a) of bench/framu.

Four real edge processes on digits; one of them has its labels flipped (every digit filed under the
next one). The hub weighs the contributions by attention, learns from the sites' evaluations, and
unlearns the corrupted contribution through the exact path: a signed certificate with reason
`irrelevant` and the figures behind it, the site told why on its errors topic, every site running
the model version the certificate names, and the decision in the audit export.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from contract import signing
from contract.payloads import ErrorReport, SiteStatus, UnlearningCertificate
from contract.topics import Topics
from hub import datasets
from hub.framu.agent import RECOMMENDED
from hub.service import HubService
from hub.unlearning import audit
from runtime.mqtt import BrokerSettings
from tests.integration.helpers import Watcher, start_edge, stop_edges, wait_for

pytestmark = pytest.mark.slow
TOPICS = Topics()
SITES = ["site-1", "site-2", "site-3", "site-4"]
BAD = "site-4"


def test_auto_mode_unlearns_a_site_with_flipped_labels_and_tells_it_why(
    hub_factory: Callable[..., HubService], mosquitto: BrokerSettings, tmp_path: Path
) -> None:
    hub = hub_factory(
        rounds={"min_sites": 4, "poll_s": 0.2},
        framu={"mode": "auto", "patience": 2, "eval_wait_s": 120, "max_rounds": 4},
    )
    data = datasets.load("digits")
    flipped = dataclasses.replace(data, labels=(data.labels + 1) % len(data.label_names))
    for i, s in enumerate(SITES):
        datasets.write_folder(tmp_path / s / "data", flipped if s == BAD else data, np.arange(i * 180, (i + 1) * 180))
    watcher = Watcher(mosquitto, [TOPICS.hub_certificate, TOPICS.all_sites("errors"), TOPICS.all_sites("status")])
    procs = {}
    try:
        for s in SITES:
            procs[s] = start_edge(
                s, tmp_path / s / "data", tmp_path / s / "state", mosquitto.port, tmp_path / f"{s}.log"
            )

        def certified() -> bool:
            return any(json.loads(b)["reason"] == "irrelevant" for b in watcher.on(TOPICS.hub_certificate))

        wait_for(certified, 600, "FRAMU's certificate for the corrupted site")
        body = next(
            json.loads(b) for b in watcher.on(TOPICS.hub_certificate) if json.loads(b)["reason"] == "irrelevant"
        )
        cert = UnlearningCertificate.model_validate(body)
        bad_contribution = hub.ledger.contribution_ids(BAD)[0]

        def told() -> list[ErrorReport]:
            reports = [ErrorReport.model_validate_json(b) for b in watcher.on(TOPICS.site(BAD, "errors"))]
            return [r for r in reports if r.code == "unlearned"]

        wait_for(lambda: bool(told()), 60, f"{BAD} to be told")

        def running(version: int) -> bool:
            for s in SITES:
                statuses = [SiteStatus.model_validate_json(b) for b in watcher.on(TOPICS.site(s, "status")) if b]
                if not statuses or statuses[-1].model_version != version:
                    return False
            return True

        wait_for(lambda: running(cert.model_version_after), 120, "every site to run the certified model")
    finally:
        stop_edges(procs)
        watcher.stop()

    # The certificate: signed by the hub, only the corrupted contribution removed, exact, with FRAMU's figures.
    hub_key = signing.load_public_key(hub.settings.signing_key_path().with_suffix(".pub.pem"))
    assert signing.verify(body, {signing.key_id(hub_key): hub_key})
    assert cert.removed_contributions == [bad_contribution] and cert.request_ids == []
    assert bad_contribution not in cert.trained_on and len(cert.trained_on) == 3
    assert cert.method == "closed_form_exact" and cert.verification["refit_bit_identical"] == 1.0
    figures = {k: v for k, v in cert.verification.items() if k.startswith("framu_")}
    assert figures["framu_weight"] < figures["framu_threshold"] == RECOMMENDED.threshold
    assert figures["framu_rounds_below"] >= 2
    assert hub.registry.latest().version == cert.model_version_after
    # The site heard why, naming its contribution and the certificate.
    report = told()[0]
    assert report.ref_id == bad_contribution and cert.certificate_id in report.reason and "irrelevant" in report.reason
    # No good site was unlearned, and the ledger says what FRAMU did.
    assert hub.ledger.counts_by_state()["unlearned"] == 1
    assert all(r.trigger in ("min_sites", "framu") for r in hub.ledger.rounds())
    # The audit export carries the decision with its reason and figures, and verifies.
    out = tmp_path / "audit"
    audit.export(hub.ledger, signing.public_pem(hub_key), out)
    report_ = audit.verify(out, signing.public_pem(hub_key))
    assert report_["ok"], report_["problems"]
    rows = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    decided = [r["row"] for r in rows if r["table"] == "automatic_unlearning"]
    assert [(d["contribution_id"], d["reason"], d["certificate_id"]) for d in decided] == [
        (bad_contribution, "irrelevant", cert.certificate_id)
    ]
    assert json.loads(decided[0]["figures"])["weight"] == figures["framu_weight"]
    weighted = [r["row"] for r in rows if r["table"] == "model_versions" and r["row"]["weights"]]
    assert weighted, "mode auto fits weighted models, and the trail records the weights"
