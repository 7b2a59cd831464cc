"""Forget requests at a site, on a real Mosquitto with edges as processes: refusals, deletion and a signed receipt,
redelivery, a site that was offline, a site killed between deletion and receipt, and `fedge-edge forget`."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from contract import signing
from contract.payloads import Contribution, ErrorReport, ForgetReceipt, HubStatus, new_id, now
from contract.topics import Topics
from edge.config import EdgeSettings
from edge.service import EdgeService
from runtime.mqtt import BrokerSettings, Message
from tests.integration.helpers import Watcher, start_edge, wait_for
from tests.unit.test_edge_forget import request, write_samples

pytestmark = pytest.mark.slow
TOPICS = Topics()
SITE = "site-a"


class Site:
    """One site's folders, keys and process, and a watcher on its topics."""

    def __init__(self, broker: BrokerSettings, root: Path):
        self.broker, self.root = broker, root
        self.data, self.state, self.log = root / "data", root / "state", root / "edge.log"
        self.ids = write_samples(self.data, {"0": 12, "1": 12, "2": 12})
        self.operator = signing.write_keypair(root / "operator.pem")
        self.env = {"operator_public_key_files": json.dumps([str(root / "operator.pub.pem")]), "k": "2",
                    "prefer_cuda": "false"}  # fmt: skip
        self.watcher = Watcher(broker, [TOPICS.all_sites("embeddings"), TOPICS.site(SITE, "forget/receipt"),
                                        TOPICS.site(SITE, "errors"), TOPICS.site(SITE, "status")])  # fmt: skip
        self.proc: subprocess.Popen | None = None

    def hub_online(self) -> None:
        """A retained hub status, as a hub publishes it: the site's outbox opens once it has seen one."""
        status = HubStatus(message_id=new_id(), hub_id="hub", session_id=new_id(), state="online", at=now())
        self.watcher.publish(TOPICS.hub_status, status.model_dump_json().encode(), retain=True)

    def start(self) -> None:
        self.watcher.messages.clear()
        self.proc = start_edge(SITE, self.data, self.state, self.broker.port, self.log, **self.env)
        wait_for(lambda: self.status() == "online", 60, "the site to come online (subscribed)")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(30)
        self.proc = None
        return code

    def status(self) -> str | None:
        msgs = [p for p in self.watcher.on(TOPICS.site(SITE, "status")) if p]
        return json.loads(msgs[-1])["state"] if msgs else None

    def contributions(self) -> list[Contribution]:
        return [Contribution.model_validate_json(p) for p in self.watcher.on(TOPICS.site(SITE, "embeddings"))]

    def receipts(self) -> list[bytes]:
        return self.watcher.on(TOPICS.site(SITE, "forget/receipt"))

    def errors(self) -> list[ErrorReport]:
        return [ErrorReport.model_validate_json(p) for p in self.watcher.on(TOPICS.site(SITE, "errors"))]

    def send(self, payload: bytes, retain: bool = False) -> None:
        self.watcher.publish(TOPICS.site(SITE, "forget/request"), payload, retain=retain)

    def verify_receipt(self, raw: bytes) -> ForgetReceipt:
        """The receipt checked against the site's key file (not the key it carries)."""
        key = signing.load_public_key(self.state / "keys" / "site.pub.pem")
        body = json.loads(raw)
        signing.verify(body, {signing.key_id(key): key})
        return ForgetReceipt.model_validate(body)

    def forget_state(self, request_id: str) -> tuple[str, int | None] | None:
        with sqlite3.connect(f"file:{self.state / 'edge.sqlite'}?mode=ro", uri=True, timeout=5) as con:
            row = con.execute(
                "SELECT state, samples_deleted FROM forget_requests WHERE request_id = ?", (request_id,)
            ).fetchone()
        return (row[0], row[1]) if row else None

    def close(self) -> None:
        try:
            if self.proc is not None:
                assert self.stop() == 0, f"the edge did not stop cleanly; see {self.log}"
        finally:
            self.watcher.stop()


@pytest.fixture
def site(mosquitto: BrokerSettings, tmp_path: Path):
    s = Site(mosquitto, tmp_path)
    try:
        yield s
    finally:
        s.close()


def files(site: Site, label: str) -> list[str]:
    folder = site.data / label
    return sorted(p.stem for p in folder.iterdir()) if folder.is_dir() else []


def test_bad_signatures_replays_and_retained_requests_are_refused_on_the_sites_errors_topic(site: Site) -> None:
    # A retained request is replayed to the site on every subscribe (each start): refused as such.
    retained = request(site.operator, {"kind": "all"})
    site.send(retained[1], retain=True)
    site.start()
    wait_for(lambda: len(site.errors()) >= 1, 60, "the retained request refused")
    site.watcher.publish(TOPICS.site(SITE, "forget/request"), b"", retain=True)  # clearing it is no request
    stranger = signing.write_keypair(site.root / "stranger.pem")
    unknown = request(stranger, {"kind": "all"})
    rid, good = request(site.operator, {"kind": "label", "label": "0"})
    tampered = json.loads(good)
    tampered["selector"]["label"] = "1"
    replay = request(site.operator, {"kind": "all"}, issued_at=now() - timedelta(days=2))
    site.send(unknown[1])
    site.send(json.dumps(tampered).encode())
    site.send(replay[1])
    wait_for(lambda: len(site.errors()) >= 4, 60, "four error reports")
    codes = {e.ref_id: e.code for e in site.errors()}
    assert codes == {unknown[0]: "unknown_key", rid: "signature", replay[0]: "replay", retained[0]: "retained"}
    assert all(e.topic == TOPICS.site(SITE, "forget/request") and e.site_id == SITE for e in site.errors())
    assert sum(len(files(site, lab)) for lab in "012") == 36 and not site.receipts()
    assert site.proc is not None and site.proc.poll() is None
    for r in (unknown[0], rid, replay[0], retained[0]):
        assert site.forget_state(r) is None  # nothing of a refused request is kept


def test_a_label_is_forgotten_with_a_signed_receipt_and_a_redelivery_repeats_it(site: Site) -> None:
    site.hub_online()
    site.start()
    wait_for(lambda: len(site.contributions()) == 1, 60, "the site's first contribution")
    first = site.contributions()[0]
    rid, payload = request(site.operator, {"kind": "label", "label": "1"})
    site.send(payload)
    wait_for(lambda: len(site.receipts()) == 1, 60, "the receipt")
    receipt = site.verify_receipt(site.receipts()[0])
    assert (receipt.request_id, receipt.samples_deleted, receipt.labels_affected) == (rid, 12, ["1"])
    assert receipt.superseded == first.contribution_id
    superseding = [c for c in site.contributions() if c.contribution_id == receipt.contribution_id]
    assert len(superseding) == 1 and superseding[0].supersedes == first.contribution_id
    assert sorted(lp.label for lp in superseding[0].labels) == ["0", "2"]
    assert files(site, "1") == [] and "smp1x" not in (site.data / "metadata.csv").read_text()
    raw = b"".join(p.read_bytes() for p in site.state.glob("edge.sqlite*"))
    assert not any(sid.encode() in raw for sid in site.ids if sid.startswith("smp1x"))

    # A new sample of that label arrives; the same request delivered again repeats the receipt, deletes nothing.
    write_samples(site.data, {"1": 1}, start=900)
    wait_for(lambda: len(site.contributions()) == 3, 60, "the contribution with the new sample")
    site.send(payload)
    wait_for(lambda: len(site.receipts()) == 2, 60, "the receipt again")
    assert site.receipts()[1] == site.receipts()[0]
    assert files(site, "1") == ["smp1x0900"] and site.forget_state(rid) == ("receipted", 12)


def test_a_request_sent_while_the_site_is_offline_is_honoured_when_it_returns(site: Site) -> None:
    site.hub_online()
    site.start()
    wait_for(lambda: len(site.contributions()) == 1, 60, "the site's first contribution")
    assert site.stop() == 0
    rid, payload = request(site.operator, {"kind": "samples", "sample_ids": ["smp0x0001", "smp2x0003", "nope"]})
    site.send(payload)  # the broker queues it in the site's persistent session
    site.start()
    wait_for(lambda: len(site.receipts()) == 1, 60, "the receipt after the restart")
    receipt = site.verify_receipt(site.receipts()[0])
    assert (receipt.request_id, receipt.samples_deleted, receipt.labels_affected) == (rid, 2, ["0", "2"])
    assert "smp0x0001" not in files(site, "0") and "smp2x0003" not in files(site, "2")
    assert len(files(site, "0")) == 11 and len(files(site, "1")) == 12


def test_a_site_stopped_between_deletion_and_receipt_finishes_on_restart(site: Site) -> None:
    """Deterministic: the running edge is stopped, then its own code persists the request and carries out the
    deletion step in this process (exactly what a kill right after the deletion's commit leaves on disk), and the
    restarted process must finish with one receipt and nothing deleted twice."""
    site.hub_online()
    site.start()
    wait_for(lambda: len(site.contributions()) == 1, 60, "the site's first contribution")
    first = site.contributions()[0]
    assert site.stop() == 0
    settings = EdgeSettings(site_id=SITE, data_dir=site.data, state_dir=site.state, metrics_port=None, k=2,
                            prefer_cuda=False, operator_public_key_files=[site.root / "operator.pub.pem"])  # fmt: skip
    svc = EdgeService(settings)
    rid, payload = request(site.operator, {"kind": "label", "label": "2"})
    svc.handlers()["forget"](Message(svc.forgetter.request_topic, payload))
    svc.forgetter.step(rid)
    svc.forgetter.step(rid)
    assert svc.store.forget_row(rid).state == "deleted" and files(site, "2") == []
    svc.store.close()  # killed here: the deletion is committed, no contribution and no receipt yet
    write_samples(site.data, {"2": 1}, start=700)  # arrives after the deletion; must survive

    site.start()
    wait_for(lambda: len(site.receipts()) == 1, 60, "the receipt after the restart")
    receipt = site.verify_receipt(site.receipts()[0])
    assert (receipt.samples_deleted, receipt.superseded) == (12, first.contribution_id)
    assert files(site, "2") == ["smp2x0700"] and site.forget_state(rid) == ("receipted", 12)
    wait_for(
        lambda: receipt.contribution_id in [c.contribution_id for c in site.contributions()], 30, "its contribution"
    )


def test_a_site_killed_mid_forget_finishes_on_restart_whatever_step_the_kill_hit(site: Site) -> None:
    """Racy by nature: SIGKILL as soon as the deletion shows on disk; where it lands varies, the outcome must not."""
    site.hub_online()
    site.start()
    wait_for(lambda: len(site.contributions()) == 1, 60, "the site's first contribution")
    rid, payload = request(site.operator, {"kind": "label", "label": "0"})
    site.send(payload)
    deadline = time.monotonic() + 60
    while (site.data / "0" / "smp0x0000.npy").exists() and time.monotonic() < deadline:
        time.sleep(0.001)  # the first file of the label goes first
    assert site.stop(signal.SIGKILL) == -signal.SIGKILL
    print(f"killed at forget state {site.forget_state(rid)}")
    before = site.receipts()
    site.start()
    wait_for(lambda: before or site.receipts(), 60, "the receipt after the restart")
    time.sleep(2)
    receipts = before + site.receipts()
    assert len(set(receipts)) == 1  # one receipt, sent again only if the killed process had not seen it acked
    receipt = site.verify_receipt(receipts[0])
    assert receipt.samples_deleted == 12 and files(site, "0") == [] and site.forget_state(rid) == ("receipted", 12)


def test_fedge_edge_forget_end_to_end(site: Site) -> None:
    out = subprocess.run([sys.executable, "-m", "edge.cli", "keygen", "--out", str(site.root / "op2.pem")],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(os.stat(site.root / "op2.pem").st_mode) == 0o600
    kid = signing.key_id(signing.load_public_key(site.root / "op2.pub.pem"))
    assert f"key id {kid}" in out.stdout
    site.env["operator_public_key_files"] = json.dumps([str(site.root / "op2.pub.pem")])
    site.hub_online()
    site.start()
    wait_for(lambda: len(site.contributions()) == 1, 60, "the site's first contribution")
    cmd = [sys.executable, "-m", "edge.cli", "forget", "--site", SITE, "--samples", "smp1x0002,smp1x0004",
           "--reason", "customer withdrew consent", "--issuer", "dpo@test", "--key", str(site.root / "op2.pem"),
           "--broker-port", str(site.broker.port), "--wait-receipt", "60",
           "--site-public-key", str(site.state / "keys" / "site.pub.pem")]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    print(out.stdout[-400:])
    assert out.returncode == 0, out.stderr
    assert "request to receipt" in out.stdout and "2 samples deleted" in out.stdout
    assert len(files(site, "1")) == 10
    # Signed by a key the site does not trust: refused, and the command says so with a non-zero exit.
    cmd[cmd.index("--key") + 1] = str(site.root / "operator.pem")
    out = subprocess.run(cmd[:-2], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "unknown_key" in out.stderr
