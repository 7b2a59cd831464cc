"""The hub ledger: idempotent ingest, supersession, rejection of reused ids, rounds claimed once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from contract.payloads import Contribution
from edge.contribution import make_contribution
from hub.intake import Rejected
from hub.ledger import Ledger


def contribution(site: str, seed: int = 0, supersedes: str | None = None) -> Contribution:
    emb = np.random.default_rng(seed).normal(size=(20, 8)).astype(np.float32)
    return make_contribution(site, "enc", emb, ["a"] * 10 + ["b"] * 10, k=1, supersedes=supersedes)


def test_ingest_is_idempotent_and_survives_reopening(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    c = contribution("s1")
    assert ledger.ingest(c, c.to_json_bytes()) is True
    assert ledger.ingest(c, c.to_json_bytes()) is False  # redelivery
    ledger.close()
    again = Ledger(tmp_path / "l.sqlite")
    assert [x.contribution_id for x in again.active()] == [c.contribution_id]


def test_a_reused_id_with_other_content_is_rejected_and_nothing_changes(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    c = contribution("s1")
    ledger.ingest(c, c.to_json_bytes())
    other = contribution("s1", seed=1).model_copy(update={"contribution_id": c.contribution_id})
    with pytest.raises(Rejected) as err:
        ledger.ingest(other, other.to_json_bytes())
    assert err.value.code == "duplicate_id"
    assert ledger.counts_by_state() == {"active": 1, "superseded": 0, "unlearned": 0}


def test_a_newer_contribution_supersedes_the_site_s_previous_one(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    first, other_site = contribution("s1"), contribution("s2")
    for c in (first, other_site):
        ledger.ingest(c, c.to_json_bytes())
    second = contribution("s1", seed=2, supersedes=first.contribution_id)
    ledger.ingest(second, second.to_json_bytes())
    assert {c.contribution_id for c in ledger.active()} == {second.contribution_id, other_site.contribution_id}
    assert ledger.counts_by_state() == {"active": 2, "superseded": 1, "unlearned": 0}
    stray = contribution("s2", seed=3, supersedes=first.contribution_id)  # s1's id, claimed by s2
    with pytest.raises(Rejected) as err:
        ledger.ingest(stray, stray.to_json_bytes())
    assert err.value.code == "unknown_supersedes"


def test_a_round_is_claimed_once_and_an_interrupted_one_is_failed_and_requested_again(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    rid = ledger.request_round("manual")
    assert ledger.request_round("min_sites") == rid  # one open request at a time
    assert ledger.claim_round() == rid
    assert Ledger(tmp_path / "l.sqlite").claim_round() is None  # a second worker finds it running
    assert ledger.redo_interrupted_rounds() == [rid]
    assert [(r.round_id, r.state, r.trigger) for r in ledger.rounds()] == [
        (rid, "failed", "manual"),
        (rid + 1, "requested", f"redo:{rid}"),
    ]
    assert ledger.redo_interrupted_rounds() == []  # nothing is running any more
    assert ledger.claim_round() == rid + 1
    assert ledger.last_trained_set() is None


def test_a_rejection_quoting_a_lone_surrogate_is_recorded(tmp_path: Path) -> None:
    """Found by bench/fuzz: a reason quoting hostile input could not be stored, so the rejection went unrecorded."""
    from contract.payloads import ErrorReport, new_id, now
    from runtime.outcomes import Rejected

    err = Rejected("invalid", "key '\ud800' appears twice in one object")
    ledger = Ledger(tmp_path / "l.sqlite")
    report = ErrorReport(error_id=new_id(), site_id="site-a", at=now(), topic="t", code="invalid", reason=err.reason,
                         payload_sha256="0" * 64, payload_bytes=3)  # fmt: skip
    ledger.reject(report)
    assert report.model_dump_json()  # and it can be sent
    assert [r["reason"] for r in ledger.rejections()] == ["key '\\ud800' appears twice in one object"]


def test_an_id_quoting_a_lone_surrogate_is_recorded(tmp_path: Path) -> None:
    """Found by bench/fuzz: a hostile payload's own id, quoted as ref_id, could not be stored either."""
    from runtime.outcomes import Rejected

    err = Rejected("invalid", "samples: too large", ref_id="ab\udc80")
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.reject_raw("0" * 32, "site-a", "t", err.code, err.reason, err.ref_id, "0" * 64, 3)
    assert ledger.rejections()[0]["ref_id"] == "ab\\udc80"
