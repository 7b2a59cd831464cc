"""The refinement round on a real Mosquitto: three edges (processes, onnxruntime only) send additive statistics of
the delivered model's features, the hub solves one head per lambda, the delivery gate chooses one on the held-out
samples, the sites send statistics of those too and the hub solves the chosen lambda from every sample; one site
forgets a label and the certificate names the re-solved model and the statistics (both parts) that left it."""

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
    four = np.flatnonzero(data.labels < 4)
    procs = {}
    try:
        for i, s in enumerate(SITES):
            # labels 0-3, 200 samples a site: its held-out fifth has about 10 of a label, enough for the refit's
            # statistics (a label under the minimum group of 5 is left out of them)
            datasets.write_folder(tmp_path / s / "data", data, four[i * 200 : (i + 1) * 200])
            procs[s] = start_edge(
                s, tmp_path / s / "data", tmp_path / s / "state", mosquitto.port, tmp_path / f"{s}.log", k="2",
                operator_public_key_files=json.dumps([str(tmp_path / "operator.pub.pem")]), prefer_cuda="false",
            )  # fmt: skip

        def stage(name: str) -> list[int]:
            """Refined model versions of one stage (select, refit) solved from all three sites' statistics."""
            out = []
            for v in hub.registry.versions():
                info = hub.registry.get(v).manifest.get("refinement", {})
                if info.get("stage") == name and info.get("sites") == list(SITES):
                    out.append(v)
            return out

        def statistics(s: str) -> list[RefinementStatistics]:
            return [RefinementStatistics.model_validate_json(p) for p in watcher.on(TOPICS.site(s, "refine"))]

        wait_for(lambda: bool(stage("select")), 300, "a model refined from all three sites' statistics")
        v_refined = hub.registry.get(stage("select")[0])
        # The delivery gate weighs every head the refined model carries on the sites' held-out samples.
        extra = [f"head_refined_{i}" for i in range(len(RoundPolicy().refine_lams))]
        assert list(v_refined.manifest["heads"]) == ["logits", *extra, "head_nearest_prototype"]
        wait_for(lambda: hub.ledger.gate_decision(v_refined.version) is not None, 300, "the gate's decision")
        gate = hub.ledger.gate_decision(v_refined.version)
        assert gate["state"] == "served" and set(gate["balanced_accuracy"]) == set(v_refined.manifest["heads"])
        assert gate["balanced_accuracy"][gate["serve"]] == max(gate["balanced_accuracy"].values())
        first = hub.registry.get(1).manifest
        assert first["method"] == "closed_form_exact" and "sites" not in first["refinement"]
        request_ = RefinementRequest.model_validate_json(watcher.on(TOPICS.hub_refine)[0])
        assert request_.model_version == 1 and request_.dim == RoundPolicy().refine_dim and request_.part == "train"
        train = {s: statistics(s)[0] for s in SITES}
        assert {st.part for st in train.values()} == {"train"}
        assert sorted(v_refined.manifest["contributions"]) == sorted(st.statistics_id for st in train.values())

        # The gate served a refined head: the hub asks for the held-out part and solves that lambda from every sample.
        assert gate["serve"] != "head_nearest_prototype", gate
        choice = gate["refit"]
        assert choice["head"] == gate["serve"] and choice["version"] == v_refined.version
        assert choice["statistics"] == sorted(v_refined.manifest["contributions"])
        wait_for(lambda: bool(stage("refit")), 300, "the refit from every sample")
        v_refit = hub.registry.get(stage("refit")[0])
        held = {s: next(st for st in statistics(s) if st.part == "held_out") for s in SITES}
        asked = [RefinementRequest.model_validate_json(p) for p in watcher.on(TOPICS.hub_refine) if p]
        assert any(r.part == "held_out" and r.model_version == v_refined.version for r in asked)
        info = v_refit.manifest["refinement"]
        assert info["refit"]["version"] == v_refined.version and info["lam"] == choice["lam"] and info["heads"] == {}
        assert sorted(v_refit.manifest["contributions"]) == sorted(
            st.statistics_id for st in [*train.values(), *held.values()]
        )
        assert info["samples"] == sum(st.n_samples for st in [*train.values(), *held.values()])
        wait_for(lambda: hub.ledger.gate_decision(v_refit.version) is not None, 60, "the refit's gate decision")
        refit_gate = hub.ledger.gate_decision(v_refit.version)
        assert refit_gate["serve"] == "logits" and refit_gate["state"] == "served", refit_gate
        assert refit_gate["reason"].startswith(f"refit of v{v_refined.version}'s {choice['head']}")
        rounds = [(r.trigger, r.state, r.model_version) for r in hub.ledger.rounds()]
        assert [r[0] for r in rounds] == ["min_sites", "refine", "refine"], rounds

        # Bytes per site and round, refinement included: at most 64 KiB (the sites' own counters, acknowledged),
        # and each refinement upload is one round of its own.
        def sent(s: str) -> dict[str, int]:
            msgs = [SiteStatus.model_validate_json(p) for p in watcher.on(TOPICS.site(s, "status")) if p]
            return msgs[-1].bytes_sent if msgs else {}

        wait_for(lambda: all("refine" in sent(s) for s in SITES), 60, "the sites' byte counters")
        for s in SITES:
            up, each = sent(s), [len(p) for p in watcher.on(TOPICS.site(s, "refine"))]
            print(f"{s}: embeddings {up['embeddings']} B, refine {each} B")
            assert up["embeddings"] <= KIB64 and max(each) <= KIB64
        reg = hub.metrics.registry
        seen = sum(len(p) for s in SITES for p in watcher.on(TOPICS.site(s, "refine")))
        assert seen >= 6 * 10_000  # six payloads of float16 statistics (dim 128: up to 22-26 KB, less for few samples)
        assert reg.get_sample_value("fedge_hub_received_bytes_total", {"kind": "refine"}) >= seen
        assert reg.get_sample_value("fedge_hub_sent_bytes_total", {"kind": "refine_request"}) > 0

        # site-0 forgets label "3": new contribution, receipt, and statistics of what is left.
        _, payload = request(operator, {"kind": "label", "label": "3"}, site_id="site-0")
        watcher.publish(TOPICS.site("site-0", "forget/request"), payload)
        wait_for(lambda: bool(watcher.on(TOPICS.hub_certificate)), 90, "the certificate")
        cert = UnlearningCertificate.model_validate_json(watcher.on(TOPICS.hub_certificate)[0])
        after = hub.registry.get(cert.model_version_after)
        rounds = [(r.trigger, r.state, r.model_version) for r in hub.ledger.rounds()]
        assert cert.model_version_before == v_refit.version and after.version > v_refit.version, rounds
        # the re-solved refined model, from the other sites' training statistics: the gate chooses its lambda again
        assert after.manifest["refinement"]["stage"] == "select" and "sites" in after.manifest["refinement"]
        gone = [train["site-0"], held["site-0"]]
        assert train["site-0"].contribution_id in cert.removed_contributions
        assert all(st.statistics_id in cert.removed_contributions for st in gone)
        assert not set(cert.removed_contributions) & set(cert.trained_on)
        assert cert.trained_on == sorted(after.manifest["contributions"])
        assert cert.model_sha256 == after.sha256 and cert.training_digest == after.manifest["training_digest"]
        assert cert.verification["refit_bit_identical"] == 1.0 and cert.verification["refit_max_abs_diff"] == 0.0
        # What was derived from the deleted data is purged from the ledger.
        for st in gone:
            row = hub.ledger._db.execute(
                "SELECT length(payload), purged_at FROM refinements WHERE statistics_id = ?", (st.statistics_id,)
            ).fetchone()
            assert row[0] == 0 and row[1] is not None

        # site-0 then sends statistics of what it kept, both parts in turn, and the hub refines and refits again.
        def new_parts() -> dict[str, RefinementStatistics]:
            return {st.part: st for st in statistics("site-0") if st.contribution_id != train["site-0"].contribution_id}

        wait_for(lambda: len(new_parts()) == 2, 300, "site-0's new statistics, training and held-out parts")
        assert all("3" not in st.labels for st in new_parts().values())

        def refit_with_site0() -> bool:
            latest = hub.registry.latest().manifest
            ids = set(latest.get("contributions") or [])
            return (
                latest["refinement"].get("stage") == "refit"
                and {st.statistics_id for st in new_parts().values()} <= ids
            )

        wait_for(refit_with_site0, 300, "a refit with site-0's new statistics")
        assert not watcher.on(TOPICS.all_sites("errors"))
        # The audit trail verifies: certificate digests against the statistics, refinement payloads' sha256.
        pem = signing.public_pem(hub.signing_key.public_key())
        audit.export(hub.ledger, pem, tmp_path / "audit")
        report = audit.verify(tmp_path / "audit", pem)
        assert report["ok"], report["problems"]
        assert report["checked"]["certificates"] == 1 and report["checked"]["refinements"] == 8
    finally:
        stop_edges(procs)
        watcher.stop()


def test_sites_refine_over_the_embedding_and_random_features(
    hub_factory: Callable[..., HubService], mosquitto: BrokerSettings, tmp_path: Path
) -> None:
    """rounds.refine_features embedding+rff through the services: the edges run the delivered model's concatenated
    feature output with onnxruntime and send float16 statistics of it; the refined model the hub solves from them
    outputs, on images, the features the hub computes with the same projection (the embedding whole in the first
    columns), and its logits classify them."""
    import onnxruntime as ort

    from hub.learning.closed_form import FeatureExtractor

    hub = hub_factory(
        rounds={"min_sites": 3, "poll_s": 0.2, "refine": True, "refine_wait_s": 600, "refine_features": "embedding+rff",
                "refine_dim": 48, "refine_refit": False},
        synthesis={"samples_per_count": 0.25, "steps": 4, "epochs": 1},
    )  # fmt: skip
    assert hub.refinement is not None and hub.refinement.projection.kind == "embedding+rff"
    watcher = Watcher(mosquitto, [TOPICS.all_sites("refine")])
    data = datasets.load("digits")
    four = np.flatnonzero(data.labels < 4)
    procs = {}
    try:
        for i, s in enumerate(SITES):
            datasets.write_folder(tmp_path / s / "data", data, four[i * 120 : (i + 1) * 120])
            procs[s] = start_edge(s, tmp_path / s / "data", tmp_path / s / "state", mosquitto.port,
                                  tmp_path / f"{s}.log", k="2", prefer_cuda="false")  # fmt: skip

        def refined() -> list[int]:
            return [v for v in hub.registry.versions()
                    if hub.registry.get(v).manifest.get("refinement", {}).get("sites") == list(SITES)]  # fmt: skip

        wait_for(lambda: bool(refined()), 300, "a model refined from all three sites' statistics")
        sent = [
            RefinementStatistics.model_validate_json(p) for s in SITES for p in watcher.on(TOPICS.site(s, "refine"))
        ]
        assert {st.dim for st in sent} == {48} and {st.root.dtype for st in sent} == {"float16"}
        version = hub.registry.get(refined()[0])
        proj = hub.refinement.projection
        images = data.images[four[:50]].astype(np.float32)  # [n, 1, 8, 8] in [0, 1], as the encoder takes them
        sess = ort.InferenceSession(str(version.path), providers=["CPUExecutionProvider"])
        logits, z_model = sess.run(["logits", "fedge_refine_features"], {sess.get_inputs()[0].name: images})
        emb = FeatureExtractor(hub.refinement.encoder_onnx, proj.feature_map).embed(images)
        z = proj.features(emb)
        assert np.abs(z_model - z).max() < 1e-4 and np.abs(z_model[:, : proj.feature_map.dim] - emb).max() < 1e-5
        assert (logits.argmax(1) == data.labels[four[:50]]).mean() > 0.8  # a working head over both parts
    finally:
        stop_edges(procs)
        watcher.stop()
