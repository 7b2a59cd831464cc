"""Property-based: every handler of both services, driven with generated payloads, ends each one in one outcome.

The same harness as `python -m bench.fuzz` (which runs 10,000 cases per handler and commits its
counts), with a few hundred cases per handler so CI stays quick.
"""

from __future__ import annotations

from pathlib import Path

from bench.fuzz import run_all

CASES = 200


def test_every_generated_payload_ends_accepted_duplicate_or_rejected(tiny_bundle: Path, tmp_path: Path) -> None:
    tally = run_all(CASES, tiny_bundle, tmp_path, base_seed=0, log=lambda s: None)
    assert tally.problems == []  # never internal, never two outcomes, nothing half-applied
    assert set(tally.outcomes) == {
        "hub/embeddings",
        "hub/eval",
        "hub/forget/receipt",
        "hub/status",
        "hub/refine",
        "edge/hub_status",
        "edge/model",
        "edge/errors",
        "edge/forget",
        "edge/refine",
    }
    for handler, counts in tally.outcomes.items():
        assert sum(counts.values()) >= CASES, handler
        assert counts["accepted"] > 0 and counts["rejected"] > 0, (handler, counts)
    # The hostile classes the harness makes are all met, and each gets its own reason.
    codes = set().union(*(c.keys() for c in tally.codes.values()))
    assert {"not_json", "invalid", "non_finite", "schema_version", "retained", "signature"} <= codes
