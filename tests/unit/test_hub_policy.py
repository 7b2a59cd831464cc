"""The round policy: enough sites, or a deadline; a failed round is not retried every poll."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.contribution import make_contribution
from hub.config import HubSettings
from hub.service import ROUND_RETRY_S, HubService


def test_deadline_then_no_busy_retry_after_a_failure(tmp_path: Path) -> None:
    hub = HubService(HubSettings(state_dir=tmp_path, metrics_port=None, rounds={"min_sites": 3, "deadline_s": 5}))
    emb = np.random.default_rng(0).normal(size=(20, hub.foundation.dim)).astype(np.float32)
    c = make_contribution("s1", hub.foundation.encoder_id, emb, ["a"] * 10 + ["b"] * 10, k=1)
    hub.ledger.ingest(c, c.to_json_bytes())
    assert hub.check_policy(now=100.0) is None  # one site of three, deadline not reached
    assert hub.check_policy(now=106.0) == "deadline"
    rid = hub.ledger.claim_round()
    hub._failed = ({c.contribution_id}, 106.0)  # as run_round records a failure
    hub.ledger.finish_round(rid, [c.contribution_id], None, "boom")
    assert hub.check_policy(now=107.0) is None
    assert hub.check_policy(now=106.0 + ROUND_RETRY_S + 1) == "deadline"
    hub.ledger.close()
