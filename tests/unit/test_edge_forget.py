"""Forget requests at a site: selectors, real deletion (files, metadata.csv, index, the SQLite file's bytes), receipts,
rejections, and a crash at every step finishing exactly once."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from contract import signing
from contract.layout import LocalSample
from contract.payloads import Contribution, ForgetReceipt, ForgetSelector, new_id, now
from edge.config import EdgeSettings
from edge.forget import remove_metadata_rows, resolve
from edge.service import EdgeService
from runtime.mqtt import Message

SITE = "site-a"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def write_samples(data: Path, per_label: dict[str, int], start: int = 0) -> list[str]:
    """Random 8x8 samples `smp<label>x<i>` with timestamps one hour apart, listed in metadata.csv; their ids."""
    rng = np.random.default_rng(start)
    data.mkdir(parents=True, exist_ok=True)
    meta = data / "metadata.csv"
    new = not meta.exists()
    ids = []
    with open(meta, "a", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        if new:
            w.writerow(["sample_id", "label", "timestamp"])
        for label, n in per_label.items():
            (data / label).mkdir(parents=True, exist_ok=True)
            for i in range(start, start + n):
                sid = f"smp{label}x{i:04d}"
                np.save(data / label / f"{sid}.npy", rng.random((8, 8), dtype=np.float32))
                w.writerow([sid, label, (T0 + timedelta(hours=i)).isoformat()])
                ids.append(sid)
    return ids


@pytest.fixture
def site(tmp_path: Path):
    """A site service (not connected: its handlers and steps are driven directly) with 3 labels of 12 samples."""
    op = signing.write_keypair(tmp_path / "operator.pem")
    write_samples(tmp_path / "data", {"0": 12, "1": 12, "2": 12})
    settings = EdgeSettings(
        site_id=SITE, data_dir=tmp_path / "data", state_dir=tmp_path / "state", metrics_port=None, settle_s=0,
        operator_public_key_files=[tmp_path / "operator.pub.pem"], k=2, prefer_cuda=False,
    )  # fmt: skip
    services: list[EdgeService] = []

    def open_service() -> EdgeService:
        svc = EdgeService(settings)
        services.append(svc)
        return svc

    yield open_service, op, tmp_path
    for svc in services:
        svc.store.close()  # closing twice is harmless


def request(op, selector: dict, *, issued_at: datetime | None = None, site_id: str = SITE, rid: str | None = None):
    """A signed forget request: (request_id, payload bytes)."""
    rid = rid or new_id()
    body = {
        "schema_version": 1, "request_id": rid, "site_id": site_id, "selector": selector, "reason": "test",
        "issued_at": (issued_at or now()).isoformat(), "issuer": "dpo@test",
    }  # fmt: skip
    return rid, json.dumps(signing.sign(body, op)).encode()


def deliver(svc: EdgeService, payload: bytes, retain: bool = False) -> None:
    svc.handlers()["forget"](Message(svc.forgetter.request_topic, payload, retain))


def count(svc: EdgeService, result: str) -> float:
    return svc.metrics.registry.get_sample_value("fedge_edge_forget_requests_total", {"result": result}) or 0.0


def outbox(svc: EdgeService, kind: str) -> list[bytes]:
    return [i.payload for i in svc.store.pending(1000) if i.kind == kind]


def test_selectors_resolve_against_the_index_and_the_folder() -> None:
    idx = [("a1", "a", "/d/a/a1.npy", T0), ("a2", "a", "/d/a/a2.npy", T0 + timedelta(hours=2)),
           ("b1", "b", "/d/b/b1.npy", T0 + timedelta(hours=5))]  # fmt: skip
    # a1 again under b: the index kept the first one, the folder has both; b9 arrived after the last scan.
    found = [LocalSample("a1", "b", Path("/d/b/a1.npy"), T0), LocalSample("b9", "b", Path("/d/b/b9.npy"), T0)]

    def ids(**sel) -> list[tuple[str, str]]:
        return [(sid, label) for sid, label, _ in resolve(ForgetSelector(**sel), idx, found)]

    assert ids(kind="samples", sample_ids=["a1", "zz"]) == [("a1", "a"), ("a1", "b")]
    assert ids(kind="label", label="b") == [("a1", "b"), ("b1", "b"), ("b9", "b")]
    assert ids(kind="time_window", since=T0 + timedelta(hours=1)) == [("a2", "a"), ("b1", "b")]
    assert ids(kind="time_window", until=T0 + timedelta(hours=2)) == [("a1", "a"), ("a1", "b"), ("b9", "b")]
    assert ids(kind="time_window", since=T0 + timedelta(hours=1), until=T0 + timedelta(hours=3)) == [("a2", "a")]
    assert len(ids(kind="all")) == 5


def test_metadata_rows_are_removed_atomically(tmp_path: Path) -> None:
    (tmp_path / "metadata.csv").write_text('sample_id,label,timestamp,caption\nx,a,,one\ny,a,,"two, with comma"\n')
    assert remove_metadata_rows(tmp_path, {"x", "nope"}) == 1
    assert (tmp_path / "metadata.csv").read_text() == 'sample_id,label,timestamp,caption\ny,a,,"two, with comma"\n'
    assert remove_metadata_rows(tmp_path, {"x"}) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["metadata.csv"]  # no temporary file left


def test_a_label_is_deleted_for_real_and_a_signed_receipt_names_the_superseding_contribution(site) -> None:
    open_service, op, root = site
    svc = open_service()
    svc.sync()
    first = svc.maybe_contribute()
    assert first is not None
    gone = sorted(p.stem for p in (root / "data" / "1").iterdir())
    assert len(gone) == 12 and svc.store.sample_count(holdout=True) > 0
    rid, payload = request(op, {"kind": "label", "label": "1"})
    deliver(svc, payload)
    assert count(svc, "accepted") == 1 and svc.store.forget_row(rid).state == "received"  # persisted before the ack
    row = svc.forgetter.execute(rid)

    assert not (root / "data" / "1").exists()
    assert {s.label for s in svc.store.samples()} == {"0", "2"} and svc.store.sample_count() == 24
    meta = (root / "data" / "metadata.csv").read_text()
    assert not any(sid in meta for sid in gone) and meta.count("\n") == 25
    raw = b"".join(p.read_bytes() for p in (root / "state").glob("edge.sqlite*"))
    for sid in gone:
        assert sid.encode() not in raw, f"{sid} still in the SQLite file's bytes"
    assert b"smp0x0000" in raw  # a sample that was kept is still there (the search can find ids)

    contributions = [Contribution.model_validate_json(p) for p in outbox(svc, "embeddings")]
    assert [c.contribution_id for c in contributions] == [first.contribution_id, row.contribution_id]
    assert contributions[1].supersedes == first.contribution_id
    assert sorted(lp.label for lp in contributions[1].labels) == ["0", "2"]
    kinds = [i.kind for i in svc.store.pending(1000)]
    assert kinds == ["embeddings", "embeddings", "forget_receipt"]  # the receipt after its contribution
    body = json.loads(outbox(svc, "forget_receipt")[0])
    site_pub = signing.load_public_key(root / "state" / "keys" / "site.pub.pem")
    assert signing.verify(body, {signing.key_id(site_pub): site_pub}) == signing.key_id(site_pub)
    receipt = ForgetReceipt.model_validate(body)
    assert (receipt.request_id, receipt.samples_deleted, receipt.labels_affected) == (rid, 12, ["1"])
    assert (receipt.superseded, receipt.contribution_id) == (first.contribution_id, row.contribution_id)
    reg = svc.metrics.registry
    assert reg.get_sample_value("fedge_edge_forgotten_samples_total") == 12
    assert reg.get_sample_value("fedge_edge_forget_seconds_count") == 1
    assert svc.maybe_contribute() is None  # the forget already contributed what is left


def test_forgetting_everything_retracts(site) -> None:
    open_service, op, root = site
    svc = open_service()
    svc.sync()
    first = svc.maybe_contribute()
    rid, payload = request(op, {"kind": "all"})
    deliver(svc, payload)
    row = svc.forgetter.execute(rid)
    retraction = Contribution.model_validate_json(outbox(svc, "embeddings")[-1])
    assert retraction.labels == [] and retraction.supersedes == first.contribution_id == row.superseded
    assert row.samples_deleted == 36 and svc.store.sample_count() == 0
    assert [p.name for p in (root / "data").iterdir()] == ["metadata.csv"]


def test_deleting_only_held_out_samples_supersedes_nothing(site) -> None:
    open_service, op, _ = site
    svc = open_service()
    svc.sync()
    first = svc.maybe_contribute()
    held = [s.sample_id for s in svc.store.samples(holdout=True)]
    rid, payload = request(op, {"kind": "samples", "sample_ids": held})
    deliver(svc, payload)
    row = svc.forgetter.execute(rid)
    assert row.samples_deleted == len(held) and svc.store.sample_count(holdout=True) == 0
    assert (row.superseded, row.contribution_id) == (None, first.contribution_id)  # no contribution carried them
    assert len(outbox(svc, "embeddings")) == 1


@pytest.mark.parametrize("crash_after", ["received", "deleting", "deleted", "contributed"])
def test_a_crash_at_any_step_finishes_once_on_restart(site, crash_after: str) -> None:
    open_service, op, root = site
    svc = open_service()
    svc.sync()
    first = svc.maybe_contribute()
    rid, payload = request(op, {"kind": "label", "label": "2"})
    deliver(svc, payload)
    while svc.store.forget_row(rid).state != crash_after:
        svc.forgetter.step(rid)
    svc.store.close()  # the process dies here: what is committed stays, nothing else runs

    # A sample of the same label arrives while the site is down. Once resolved (state deleting and after), the
    # request covers exactly the files it covered then: the newcomer survives and nothing is deleted twice.
    # A request not yet resolved is resolved on restart and covers what is there then.
    write_samples(root / "data", {"2": 1}, start=500)
    svc = open_service()
    assert svc.forgetter.execute_pending() == 1
    row = svc.store.forget_row(rid)
    resolved_before = crash_after != "received"
    assert row.state == "receipted" and row.samples_deleted == (12 if resolved_before else 13)
    left = sorted(p.stem for p in (root / "data" / "2").iterdir()) if (root / "data" / "2").exists() else []
    assert left == (["smp2x0500"] if resolved_before else [])
    receipts = outbox(svc, "forget_receipt")
    assert len(receipts) == 1 and json.loads(receipts[0])["contribution_id"] == row.contribution_id
    chain = [Contribution.model_validate_json(p) for p in outbox(svc, "embeddings")]
    assert [c.supersedes for c in chain] == [None, first.contribution_id]
    assert svc.forgetter.execute_pending() == 0  # nothing left to do

    # Redelivered after its receipt was acknowledged: the same receipt bytes again, nothing deleted.
    for item in svc.store.pending(1000):
        svc.store.acknowledged(item)
    deliver(svc, payload)
    assert count(svc, "duplicate") == 1 and outbox(svc, "forget_receipt") == receipts
    assert svc.store.forget_row(rid).samples_deleted == row.samples_deleted
    assert (root / "data" / "2" / "smp2x0500.npy").exists() == resolved_before


def test_refused_requests_get_a_code_and_change_nothing(site) -> None:
    open_service, op, root = site
    svc = open_service()
    svc.sync()
    stranger = signing.write_keypair(root / "stranger.pem")
    rid, good = request(op, {"kind": "label", "label": "0"})
    tampered = json.loads(good)
    tampered["selector"]["label"] = "2"
    cases = {
        "unknown_key": request(stranger, {"kind": "all"})[1],
        "signature": json.dumps(tampered).encode(),
        "replay": request(op, {"kind": "all"}, issued_at=now() - timedelta(days=2))[1],
        "site_mismatch": request(op, {"kind": "all"}, site_id="site-b")[1],
        "invalid": request(op, {"kind": "label", "label": "0", "sample_ids": ["x"]})[1],
        "not_json": b"\xff",
    }
    for code, payload in cases.items():
        deliver(svc, payload)
        assert (
            svc.metrics.registry.get_sample_value("fedge_edge_rejections_total", {"kind": "forget", "code": code}) == 1
        ), code
    deliver(svc, request(op, {"kind": "all"}, issued_at=now() + timedelta(minutes=10))[1])  # from the future
    deliver(svc, good, retain=True)
    deliver(svc, good)
    deliver(svc, request(op, {"kind": "all"}, rid=rid)[1])  # the same id for another request
    reg = svc.metrics.registry
    assert reg.get_sample_value("fedge_edge_rejections_total", {"kind": "forget", "code": "replay"}) == 2
    assert reg.get_sample_value("fedge_edge_rejections_total", {"kind": "forget", "code": "retained"}) == 1
    assert reg.get_sample_value("fedge_edge_rejections_total", {"kind": "forget", "code": "duplicate_id"}) == 1
    assert (count(svc, "accepted"), count(svc, "rejected")) == (1, 9)
    assert [r.request_id for r in svc.store.forget_rows()] == [rid]
    assert svc.store.sample_count() == 36  # nothing executed yet, nothing deleted by any refused one
