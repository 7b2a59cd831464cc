"""The MQTT services on a real Mosquitto: a full round, bad payloads, an edge killed mid-round."""

from __future__ import annotations

import base64
import hashlib
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from contract.payloads import ErrorReport
from contract.topics import Topics
from edge.models import ModelStore
from hub import datasets
from hub.config import HubSettings
from hub.demo import free_port
from hub.service import HubService
from runtime.mqtt import BrokerSettings
from tests.integration.helpers import Watcher, good_contribution, outbox_depth, start_edge, wait_for

pytestmark = pytest.mark.slow
TOPICS = Topics()


def test_ten_kinds_of_bad_payload_are_rejected_with_a_reason(hub: HubService, mosquitto: BrokerSettings) -> None:
    watcher = Watcher(mosquitto, [TOPICS.all_sites("errors")])
    first = good_contribution(hub, "site-a")
    watcher.publish(TOPICS.site("site-a", "embeddings"), first.to_json_bytes())
    wait_for(lambda: len(hub.ledger.contribution_ids()) == 1, 10, "the good contribution")

    good = json.loads(good_contribution(hub, "site-a", seed=1).to_json_bytes())
    label = good["labels"][0]

    def variant(**changes) -> bytes:
        d = json.loads(json.dumps(good))
        for k, v in changes.items():
            d[k] = v
        return json.dumps(d).encode()

    def with_vectors(dtype: str, arr: np.ndarray) -> bytes:
        lab = {
            **label,
            "vectors": {"dtype": dtype, "shape": list(arr.shape), "data": base64.b64encode(arr.tobytes()).decode()},
        }
        return variant(labels=[lab])

    nan = np.full((2, hub.foundation.dim), np.nan, "<f4")
    missing = json.loads(json.dumps(good))
    del missing["k"]
    cases = {
        "not_json": b"\xffthis is not json{",
        "schema_version": variant(schema_version=2),
        "invalid": json.dumps(missing).encode(),
        "non_finite": with_vectors("float32", nan),
        "dimension": with_vectors("float32", np.ones((2, hub.foundation.dim // 2), "<f4")),
        "dtype": with_vectors("float64", np.ones((2, hub.foundation.dim), "<f8")),
        "unknown_encoder": variant(encoder_id="resnet18-0000"),
        "oversize": variant(contribution_id="ab" * 16, encoder_id="x" * 100, note="y" * 300_000),
        "site_mismatch": variant(site_id="site-b"),
        "duplicate_id": variant(contribution_id=first.contribution_id),
    }
    for payload in cases.values():
        watcher.publish(TOPICS.site("site-a", "embeddings"), payload)
    wait_for(lambda: len(watcher.on(TOPICS.site("site-a", "errors"))) == len(cases), 15, "ten error reports")
    reports = [ErrorReport.model_validate_json(p) for p in watcher.on(TOPICS.site("site-a", "errors"))]
    assert [r.code for r in reports] == list(cases)
    for r in reports:
        assert r.site_id == "site-a" and r.reason and r.payload_bytes > 0
        assert hub.metrics.registry.get_sample_value("fedge_hub_rejections_total", {"code": r.code}) == 1
    by_code = {r.code: r for r in reports}
    assert "k" in by_code["invalid"].reason
    assert by_code["duplicate_id"].ref_id == first.contribution_id
    assert (
        hub.metrics.registry.get_sample_value("fedge_hub_messages_total", {"kind": "embeddings", "result": "rejected"})
        == 10
    )
    assert len(hub.ledger.rejections()) == 10
    # A topic whose site id no site may have (no errors topic to answer on): counted, acknowledged, ignored.
    watcher.publish("fedge/v1/site/bad.site.id/embeddings", first.to_json_bytes())
    wait_for(lambda: hub.metrics.registry.get_sample_value("fedge_hub_rejections_total", {"code": "invalid"}) == 2,
             10, "the invalid topic to be counted")  # fmt: skip
    rejected = {"kind": "embeddings", "result": "rejected"}
    assert hub.metrics.registry.get_sample_value("fedge_hub_messages_total", rejected) == 11
    # Nothing half-applied, and the hub keeps serving: the next good payload is ingested.
    assert hub.ledger.contribution_ids() == [first.contribution_id]
    nxt = good_contribution(hub, "site-c", seed=2)
    watcher.publish(TOPICS.site("site-c", "embeddings"), nxt.to_json_bytes())
    wait_for(lambda: nxt.contribution_id in hub.ledger.contribution_ids(), 10, "a good contribution after the bad ones")
    # A plain redelivery of the same payload is harmless: not an error, not a second contribution.
    watcher.publish(TOPICS.site("site-c", "embeddings"), nxt.to_json_bytes())
    wait_for(lambda: hub.metrics.registry.get_sample_value("fedge_hub_messages_total", {"kind": "embeddings", "result": "duplicate"}) == 1,
             10, "the redelivery to be counted")  # fmt: skip
    assert len(hub.ledger.contribution_ids()) == 2
    assert not watcher.on(TOPICS.site("site-c", "errors"))
    watcher.stop()


def test_killing_an_edge_mid_round_loses_and_duplicates_nothing(
    hub: HubService, mosquitto: BrokerSettings, tmp_path: Path
) -> None:
    data = datasets.load("digits")
    sites = ["site-1", "site-2", "site-3"]
    for i, s in enumerate(sites):
        datasets.write_folder(tmp_path / s / "data", data, np.arange(i * 150, (i + 1) * 150))
    d = {s: (tmp_path / s / "data", tmp_path / s / "state", tmp_path / f"{s}.log") for s in sites}
    procs = {}
    try:
        for s in sites[:2]:
            procs[s] = start_edge(s, *d[s][:2], mosquitto.port, d[s][2])
        wait_for(lambda: len(hub.ledger.contribution_ids()) == 2, 60, "two contributions")

        # site-3 cannot reach the broker: its contribution waits in the outbox; then it is killed.
        procs["site-3"] = start_edge("site-3", *d["site-3"][:2], free_port(), d["site-3"][2])
        wait_for(lambda: outbox_depth(d["site-3"][1]) == 1, 60, "site-3's contribution in its outbox")
        procs["site-3"].send_signal(signal.SIGKILL)
        procs["site-3"].wait()
        # site-1, already contributed, is killed and restarted: it must not contribute again.
        procs["site-1"].send_signal(signal.SIGKILL)
        procs["site-1"].wait()
        procs["site-1"] = start_edge("site-1", *d["site-1"][:2], mosquitto.port, d["site-1"][2])
        # site-3 comes back with the broker in reach: the outbox delivers, the round starts.
        procs["site-3"] = start_edge("site-3", *d["site-3"][:2], mosquitto.port, d["site-3"][2])
        wait_for(lambda: any(r.state in ("running", "done") for r in hub.ledger.rounds()), 60, "the round to start")
        # site-2 is killed in the middle of the round and restarted.
        procs["site-2"].send_signal(signal.SIGKILL)
        procs["site-2"].wait()
        procs["site-2"] = start_edge("site-2", *d["site-2"][:2], mosquitto.port, d["site-2"][2])

        def delivered() -> bool:
            evals = {e["site_id"] for e in hub.ledger.evaluations(1)}
            return evals == set(sites) and all(ModelStore(d[s][1] / "models").versions() == [1] for s in sites)

        wait_for(delivered, 120, "every site to install model v1 and report on it")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            p.wait(20)
    for s in sites:
        assert len(hub.ledger.contribution_ids(s)) == 1, f"{s} contributed more than once"
    assert hub.ledger.counts_by_state() == {"active": 3, "superseded": 0, "unlearned": 0}
    assert [r.state for r in hub.ledger.rounds()] == ["done"]
    assert sorted(hub.ledger.rounds()[0].contributions) == sorted(c.contribution_id for c in hub.ledger.active())
    sha = hub.registry.latest().sha256
    for s in sites:
        path, manifest = ModelStore(d[s][1] / "models").current()
        assert manifest.sha256 == sha == hashlib.sha256(path.read_bytes()).hexdigest()
        assert outbox_depth(d[s][1]) == 0


def test_round_start_command_runs_a_round_below_the_site_minimum(
    hub: HubService, mosquitto: BrokerSettings, tmp_path: Path
) -> None:
    watcher = Watcher(mosquitto, [TOPICS.hub_model])
    c = good_contribution(hub, "site-a")
    watcher.publish(TOPICS.site("site-a", "embeddings"), c.to_json_bytes())
    wait_for(lambda: len(hub.ledger.contribution_ids()) == 1, 10, "the contribution")
    time.sleep(1.0)
    assert hub.ledger.rounds() == []  # one site of the three the policy waits for
    conf = tmp_path / "hub.yaml"
    conf.write_text(json.dumps({"state_dir": str(hub.settings.state_dir)}))
    out = subprocess.run([sys.executable, "-m", "hub.cli", "round", "start", "--config", str(conf)],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    wait_for(lambda: bool(watcher.on(TOPICS.hub_model)), 60, "the model manifest")
    assert [(r.trigger, r.state, r.contributions) for r in hub.ledger.rounds()] == [
        ("manual", "done", [c.contribution_id])
    ]
    status = subprocess.run([sys.executable, "-m", "hub.cli", "status", "--config", str(conf)],
                            capture_output=True, text=True)  # fmt: skip
    assert status.returncode == 0, status.stderr
    view = json.loads(status.stdout)
    assert view["contributions"] == {"active": 1, "superseded": 0, "unlearned": 0}
    assert [(r["trigger"], r["state"], r["model_version"]) for r in view["rounds"]] == [("manual", "done", 1)]
    # Asking again with nothing new ships no second, identical model.
    again = subprocess.run([sys.executable, "-m", "hub.cli", "round", "start", "--config", str(conf)],
                           capture_output=True, text=True)  # fmt: skip
    assert again.returncode == 0, again.stderr
    wait_for(lambda: len(hub.ledger.rounds()) == 2 and hub.ledger.rounds()[1].state == "done", 60, "the second round")
    assert hub.ledger.rounds()[1].model_version == 1 and hub.registry.versions() == [1]
    watcher.stop()


def test_two_hub_workers_split_the_load_through_a_shared_subscription(
    mosquitto: BrokerSettings, tmp_path: Path
) -> None:
    workers, threads = [], []
    for name in ("w1", "w2"):
        s = HubSettings(hub_id=name, state_dir=tmp_path / "hub", broker=mosquitto, metrics_port=None,
                        rounds={"min_sites": 1000})  # fmt: skip
        workers.append(HubService(s))
        threads.append(threading.Thread(target=workers[-1].run))
        threads[-1].start()
    try:
        wait_for(lambda: all(w.bus.connected for w in workers), 20, "both workers")
        time.sleep(0.5)
        watcher = Watcher(mosquitto, [])
        sent = [good_contribution(workers[0], f"site-{i}", seed=i) for i in range(20)]
        for c in sent:
            watcher.publish(TOPICS.site(c.site_id, "embeddings"), c.to_json_bytes())
        wait_for(lambda: len(workers[0].ledger.contribution_ids()) == 20, 20, "all twenty contributions")
        watcher.stop()
        accepted = [w.metrics.registry.get_sample_value("fedge_hub_messages_total", {"kind": "embeddings", "result": "accepted"})
                    for w in workers]  # fmt: skip
        assert sum(accepted) == 20 and min(accepted) > 0  # each message went to exactly one worker
        assert sorted(workers[0].ledger.contribution_ids()) == sorted(c.contribution_id for c in sent)
    finally:
        for w, t in zip(workers, threads, strict=True):
            w.stop_event.set()
            t.join(30)
