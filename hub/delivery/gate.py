"""The delivery gate's rule: which head of a model the sites serve, from their pooled held-out confusion matrices.

A delivered model carries several heads over the same encoder, each an ONNX output of logits over the
manifest's labels: the round's candidate (`logits`) and the baselines that the same uploads allow (the
nearest prototype; the closed-form head when the refinement round ran; see docs/delivery-gate.md). Each
site evaluates every head on its held-out samples and reports one confusion matrix per head. The gate sums
them over the sites (a pooled confusion matrix, as if the held-out samples were in one place), scores each
head by balanced accuracy (mean recall over the labels that have held-out samples), and serves the best;
ties go to the earlier head in `heads` (the candidate first). A best head whose balanced accuracy is
within `chance_margin` of chance (1 / labels with samples) is not served as an improvement.

This module is pure (numpy only): the hub's service and the benches (bench/folders) call the same rule.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from contract.scores import balanced_accuracy

__all__ = ["Decision", "choose", "pooled"]

DEFAULT_CHANCE_MARGIN = 0.05


def pooled(reports: Iterable[Mapping[str, Sequence[Sequence[int]]]], heads: Sequence[str], n_labels: int) -> dict:
    """Sum each head's confusion matrices over the sites' reports (a report lacking a head adds nothing to it)."""
    total = {h: np.zeros((n_labels, n_labels), dtype=np.int64) for h in heads}
    for report in reports:
        for h in heads:
            m = report.get(h)
            if m is None:
                continue
            a = np.asarray(m, dtype=np.int64)
            if a.shape != (n_labels, n_labels) or (a < 0).any():
                raise ValueError(f"head {h}: a confusion matrix of shape {list(a.shape)}; {[n_labels] * 2} expected")
            total[h] += a
    return total


@dataclass(frozen=True)
class Decision:
    """What the gate decided for one model version."""

    serve: str | None  # the head the sites serve; None: keep serving the previous model (or nothing)
    state: str  # "served" | "at_chance" | "unchecked"
    reason: str
    scores: dict[str, float | None] = field(default_factory=dict)  # pooled balanced accuracy per head
    samples: int = 0  # pooled held-out samples
    confusion: list[list[int]] | None = None  # the pooled confusion matrix of the best head

    def as_dict(self) -> dict:
        """JSON-ready; the manifest's and the hub status's `gate` (contract.payloads.GateDecision) plus `serve`."""
        return {
            "serve": self.serve,
            "state": self.state,
            "reason": self.reason[:2000],
            "balanced_accuracy": {h: None if v is None else round(v, 6) for h, v in self.scores.items()},
            "samples": self.samples,
            "confusion": self.confusion,
        }


def choose(
    confusions: Mapping[str, np.ndarray],
    heads: Sequence[str],
    chance_margin: float = DEFAULT_CHANCE_MARGIN,
    withdraw_previous: bool = False,
) -> Decision:
    """The head to serve from pooled confusion matrices (`pooled`), `heads` in order of preference for ties.

    `withdraw_previous`: the previous model carries data this one no longer does (a forget request or FRAMU
    removed it), so it must not keep serving: a best head at chance is then served anyway, and said so.
    """
    if not heads:
        raise ValueError("a model without heads")
    scores = {h: balanced_accuracy(confusions[h]) if h in confusions else None for h in heads}
    scored = [h for h in heads if scores[h] is not None]
    samples = int(np.asarray(confusions[heads[0]]).sum()) if heads[0] in confusions else 0
    if not scored:
        return Decision(heads[0], "unchecked", "no site reported a held-out evaluation; the candidate is served "
                        "unchecked", scores, samples)  # fmt: skip
    best = max(scored, key=lambda h: (scores[h], -heads.index(h)))
    conf = np.asarray(confusions[best])
    table = conf.astype(int).tolist()
    n_with = int((conf.sum(1) > 0).sum())
    chance = 1.0 / max(n_with, 1)
    b = scores[best]
    assert b is not None
    if n_with < 2 or b < chance + chance_margin:
        why = (
            f"held-out samples of only {n_with} label(s): balanced accuracy cannot tell a model from chance"
            if n_with < 2
            else f"the best head, {best}, has balanced accuracy {b:.3f}, within {chance_margin:g} of chance "
            f"({chance:.3f}) on {samples} pooled held-out samples"
        )
        if withdraw_previous:
            why += f"; served anyway ({best}), because the previous model carries data this one has forgotten"
            return Decision(best, "at_chance", why, scores, samples, table)
        return Decision(None, "at_chance", why + "; not served as an improvement", scores, samples, table)
    others = ", ".join(f"{h} {scores[h]:.3f}" for h in scored if h != best)
    reason = f"{best} has the best balanced accuracy on {samples} pooled held-out samples: {b:.3f}"
    return Decision(best, "served", reason + (f" (against {others})" if others else ""), scores, samples, table)
