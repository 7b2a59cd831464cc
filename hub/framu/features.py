"""What the hub legitimately knows about each contribution, as named numbers: FRAMU's state.

Pure numpy over the uploads themselves (prototypes, counts, encoder, timestamps) and the sites'
evaluation reports; no synthesis and no model is needed, so the features cost microseconds.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from contract.payloads import Contribution

DAY_S = 86400.0

FEATURE_NAMES: tuple[str, ...] = (
    "agreement",
    "margin",
    "eval_gap",
    "eval_missing",
    "log_age_days",
    "log_site_idle_days",
    "log_count_ratio",
    "encoder_majority",
    "loo_gain",
    "self_gap",
)
"""The features, in the order of every feature vector:

agreement           nearest-class-mean check of the contribution's prototypes against the *other* sites.
                    By default (consensus "pairwise") site by site: for each other site sharing at least
                    two labels, the mean of two shares (weighted by counts): of this contribution's
                    prototypes whose nearest class mean among that site's own unit class means (cosine)
                    is their own label, and of that site's prototypes against this contribution's class
                    means; then the median over those sites (one site, one vote). With "median" or
                    "mean": against one consensus of all the others' class means, where a label that
                    fewer than `min_support` other sites hold is weaker evidence (its prototypes'
                    disagreement counts in proportion). 1 = every prototype sits where the others put
                    that label; flipped labels score near 0, data from another distribution (rotated,
                    inverted) scores low. 1.0 when no other site shares its labels (no evidence).
margin              the same prototypes' mean cosine to their own label's class mean minus their cosine
                    to the nearest other label's (count-weighted; in [-2, 2]; pairwise: the median over the
                    sites of the pairs' mean margins): graded agreement. 0 when there is no evidence.
eval_gap            the site's reported accuracy of the current model on its local held-out samples
                    minus the median of the other sites' reports (latest model version each). A site
                    with flipped labels or drifted data scores the consensus model badly. 0 when missing.
eval_missing        1 when the site has not reported an accuracy (yet), else 0.
log_age_days        log(1 + days since the contribution was created).
log_site_idle_days  log(1 + days since the site's newest contribution among those given).
log_count_ratio     log(samples of the contribution / median samples of all contributions).
encoder_majority    1 when the contribution's encoder is the one most contributions use, else 0.
loo_gain            counterfactual evidence: the *other* sites' pooled balanced accuracy of the model without
                    the contribution (its leave-one-out head) minus that of the full model, pooled over their
                    held-out confusion matrices of the newest `loo_window` model versions that carried a
                    leave-one-out head for it. Positive: the contribution hurts the others. 0 when no such
                    head was evaluated by another site (no evidence either way).
self_gap            counterfactual evidence from the contribution's own site: that site's held-out accuracy of
                    the model *without* the contribution (its leave-one-out head) minus the median of the other
                    sites' accuracies of the full model, on the newest model version with such a report. Data
                    the other sites' model cannot predict (stale, flipped) scores well below 0; a clean site's
                    held-out samples are predicted about as well as the others' own. 0 without such a report.
"""


Confusion = Sequence[Sequence[int]]  # rows: true label, columns: predicted, in the manifest's label order


@dataclass(frozen=True)
class SiteEvaluation:
    """What a site reports over the `eval` topic: accuracy of model `model_version` on its local held-out samples.

    With heads (docs/framu.md, "Counterfactual evidence"): `confusion` is the site's held-out confusion
    matrix of the full model (the `logits` output) and `without` maps a contribution id to the confusion
    matrix of that version's leave-one-out head for it (the model refitted with the contribution's
    weight 0). Both None on a report without heads: FRAMU then works from the accuracy alone.
    """

    site_id: str
    model_version: int
    accuracy: float | None
    samples: int
    confusion: Confusion | None = None
    without: Mapping[str, Confusion] | None = None


def _unit_prototypes(c: Contribution) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unit vectors [P, dim], label names [P], counts [P]) of every prototype of `c`."""
    vecs, names, counts = [], [], []
    for lp in c.labels:
        v = lp.vectors.to_numpy().astype(np.float64)
        v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        vecs.append(v)
        names += [lp.label] * len(v)
        counts += list(lp.counts)
    if not vecs:
        return np.zeros((0, 0)), np.array([], str), np.zeros(0)
    return np.concatenate(vecs), np.array(names), np.array(counts, np.float64)


def _support(protos: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, int]:
    """How many of these (other) sites hold each label."""
    out: dict[str, int] = {}
    for _, names, _ in protos:
        for n in set(names.tolist()):
            out[n] = out.get(n, 0) + 1
    return out


def _class_means(protos: list[tuple[np.ndarray, np.ndarray, np.ndarray]], consensus: str) -> dict[str, np.ndarray]:
    """Unit class means of the other sites' prototypes.

    "mean": the count-weighted mean of every prototype of the label (a big site weighs more).
    "median": one site, one vote: each site's own count-weighted unit class mean, then their
    coordinate-wise median (robust to a minority of sites, however many samples they hold).
    """
    if consensus == "mean":
        acc: dict[str, np.ndarray] = {}
        for vecs, names, counts in protos:
            for v, n, k in zip(vecs, names, counts, strict=True):
                acc[n] = acc.get(n, 0.0) + k * v
        return {n: s / max(float(np.linalg.norm(s)), 1e-12) for n, s in acc.items()}
    per_site: dict[str, list[np.ndarray]] = {}
    for vecs, names, counts in protos:
        for n in sorted(set(names.tolist())):
            m = (counts[names == n, None] * vecs[names == n]).sum(axis=0)
            per_site.setdefault(n, []).append(m / max(float(np.linalg.norm(m)), 1e-12))
    out = {}
    for n, ms in per_site.items():
        med = np.median(np.stack(ms), axis=0)
        out[n] = med / max(float(np.linalg.norm(med)), 1e-12)
    return out


def _agreement(
    mine: tuple[np.ndarray, np.ndarray, np.ndarray],
    means: dict[str, np.ndarray],
    support: dict[str, int] | None = None,
    min_support: int = 1,
) -> tuple[float, float]:
    """(agreement, margin) of one contribution's prototypes against the others' class means.

    A prototype whose label fewer than `min_support` other sites hold is weaker evidence (a class
    mean of one or two sites is as good as those sites are): its disagreement counts
    (other sites holding the label) / min_support, the rest of it counts as agreeing.
    """
    vecs, names, counts = mine
    known = np.array([n in means for n in names], bool)
    if not len(vecs) or not known.any() or len(means) < 2:
        return 1.0, 0.0
    labels = sorted(means)
    m = np.stack([means[n] for n in labels])  # [L, dim]
    cos = vecs[known] @ m.T  # [P, L]
    own = np.array([labels.index(n) for n in names[known]])
    rows = np.arange(len(own))
    own_cos = cos[rows, own]
    other = cos.copy()
    other[rows, own] = -np.inf
    best_other = other.max(axis=1)
    w = counts[known] / counts[known].sum()
    strength = np.ones(len(own))
    if min_support > 1 and support is not None:
        strength = np.minimum(1.0, np.array([support.get(n, 0) for n in names[known]], np.float64) / min_support)
    agreement = float((w * (1.0 - strength * (own_cos < best_other))).sum())
    margin = float((w * strength * (own_cos - best_other)).sum())
    return agreement, margin


Prototypes = tuple[np.ndarray, np.ndarray, np.ndarray]  # (unit vectors, label names, counts): `_unit_prototypes`


def _pairwise(
    mine: Prototypes, mine_means: dict[str, np.ndarray], theirs: list[tuple[Prototypes, dict[str, np.ndarray]]]
) -> tuple[float, float]:
    """(agreement, margin) of one contribution against the other sites one by one (consensus "pairwise").

    For each other site with evidence (at least two labels held by both sites), the pair's agreement is
    the mean of the two directions: this contribution's prototypes against that site's own unit class
    means, and that site's prototypes against this contribution's (`_agreement` with a one-site
    consensus); the margin likewise. The result is the median over the sites: one site, one vote,
    whatever labels or samples they hold, so sites that agree with each other but not with the rest
    (two stale lines) stay a minority. (1.0, 0.0) when no site has evidence. Each side comes with its own
    unit class means (`_class_means` of its prototypes alone), computed once per contribution.
    """
    pairs = []
    for other, their_means in theirs:
        if len(set(mine_means) & set(their_means)) < 2:
            continue
        a1, m1 = _agreement(mine, their_means)
        a2, m2 = _agreement(other, mine_means)
        pairs.append(((a1 + a2) / 2, (m1 + m2) / 2))
    if not pairs:
        return 1.0, 0.0
    return float(np.median([a for a, _ in pairs])), float(np.median([m for _, m in pairs]))


def _latest_accuracy(evaluations: Sequence[SiteEvaluation]) -> dict[str, float]:
    """Each site's accuracy from its report on the newest model version it evaluated."""
    best: dict[str, SiteEvaluation] = {}
    for e in evaluations:
        if e.accuracy is None or e.samples <= 0 or not math.isfinite(e.accuracy):
            continue
        if e.site_id not in best or e.model_version > best[e.site_id].model_version:
            best[e.site_id] = e
    return {s: float(e.accuracy) for s, e in best.items()}  # type: ignore[arg-type]


def balanced_accuracy(confusion: np.ndarray) -> float | None:
    """Mean recall over the labels (rows) that have samples; None when no row has any (as the delivery gate scores)."""
    support = confusion.sum(1)
    has = support > 0
    if not has.any():
        return None
    return float(np.mean(np.diag(confusion)[has] / support[has]))


def loo_gains(
    contributions: Sequence[Contribution], evaluations: Sequence[SiteEvaluation], window: int = 1
) -> dict[str, float]:
    """Per contribution id with evidence: the other sites' pooled balanced accuracy without it minus with it.

    The newest `window` model versions in which at least one *other* site reported both the full
    model's confusion matrix and the leave-one-out head's for the contribution are pooled (each
    site's matrices summed, as if its held-out samples were evaluated once per version). A
    contribution without such reports is absent from the result (its feature is 0).
    """
    site_of = {c.contribution_id: c.site_id for c in contributions}
    # cid -> version -> (pooled full, pooled without), only from reports of sites other than the contribution's.
    pooled: dict[str, dict[int, list[np.ndarray]]] = {}
    for e in evaluations:
        if e.confusion is None or not e.without:
            continue
        full = np.asarray(e.confusion, np.int64)
        for cid, m in e.without.items():
            if cid not in site_of or site_of[cid] == e.site_id:
                continue
            loo = np.asarray(m, np.int64)
            if loo.shape != full.shape or full.ndim != 2 or full.shape[0] != full.shape[1]:
                continue  # a malformed report adds nothing
            acc = pooled.setdefault(cid, {}).setdefault(
                int(e.model_version), [np.zeros_like(full), np.zeros_like(full)]
            )
            if acc[0].shape != full.shape:
                continue
            acc[0] += full
            acc[1] += loo
    out = {}
    for cid, by_version in pooled.items():
        newest = sorted(by_version)[-max(1, window) :]
        full = sum(by_version[v][0] for v in newest)
        loo = sum(by_version[v][1] for v in newest)
        a, b = balanced_accuracy(full), balanced_accuracy(loo)
        if a is not None and b is not None:
            out[cid] = b - a
    return out


def self_gaps(contributions: Sequence[Contribution], evaluations: Sequence[SiteEvaluation]) -> dict[str, float]:
    """Per contribution id with evidence: its own site's accuracy without it minus the others' accuracy with it.

    On the newest model version in which the contribution's own site reported the confusion matrix of the
    leave-one-out head for it: that matrix's accuracy (trace / total) minus the median of the other sites'
    accuracies of the full model of the same version (their reports' `accuracy`). A contribution without such
    a report, or whose version no other site reported on, is absent (its feature is 0).
    """
    site_of = {c.contribution_id: c.site_id for c in contributions}
    own: dict[str, tuple[int, float]] = {}  # cid -> (version, own site's accuracy without it)
    others: dict[int, dict[str, float]] = {}  # version -> site -> accuracy of the full model
    for e in evaluations:
        v = int(e.model_version)
        if e.accuracy is not None and e.samples > 0 and math.isfinite(e.accuracy):
            others.setdefault(v, {})[e.site_id] = float(e.accuracy)
        for cid, m in (e.without or {}).items():
            if site_of.get(cid) != e.site_id:
                continue
            loo = np.asarray(m, np.int64)
            if loo.ndim != 2 or loo.shape[0] != loo.shape[1] or loo.sum() <= 0:
                continue  # a malformed or empty report adds nothing
            if cid not in own or v > own[cid][0]:
                own[cid] = (v, float(np.trace(loo) / loo.sum()))
    out = {}
    for cid, (v, acc) in own.items():
        rest = [a for s, a in others.get(v, {}).items() if s != site_of[cid]]
        if rest:
            out[cid] = acc - float(np.median(rest))
    return out


def features(
    contributions: Sequence[Contribution],
    evaluations: Sequence[SiteEvaluation],
    now: datetime,
    consensus: str = "pairwise",
    min_support: int = 1,
    loo_window: int = 1,
    trust: Mapping[str, float] | None = None,
    trust_min: float = 0.0,
) -> dict[str, np.ndarray]:
    """One vector (len(FEATURE_NAMES), float64, in FEATURE_NAMES order) per contribution id.

    Args:
        contributions: the active contributions (one per site in the hub; several per site work too:
            the leave-one-out consensus then leaves out the whole site).
        evaluations: the sites' reports; each site's newest model version counts.
        now: the time the features are taken at (aware datetime).
        consensus: what `agreement` and `margin` are measured against: "pairwise" (the default, chosen
            on validation data: each other site on its own, then the median of the pairs' agreements,
            `_pairwise`; `min_support` does not apply), "median" (the coordinate-wise median of the other
            sites' class means) or "mean" (the count-weighted mean of all their prototypes).
        min_support: how many other sites must hold a label before a prototype's disagreement with
            that label's class mean counts in full (`_agreement`); 1 counts every disagreement in full.
        loo_window: how many of the newest model versions with a leave-one-out head for a contribution
            pool into its `loo_gain` (`loo_gains`).
        trust: contribution id -> attention (the previous proposal's); with it, the consensus that a
            contribution's agreement and margin are measured against is formed only from the other
            sites' contributions whose trust is at least `trust_min` (an id absent from `trust` is
            trusted), or from all the others when fewer than two are trusted.
    """
    # Id order everywhere: the consensus sums, and so the features' last bits, do not depend on input order.
    contributions = sorted(contributions, key=lambda c: c.contribution_id)
    protos = {c.contribution_id: _unit_prototypes(c) for c in contributions}
    own_means = (
        {cid: _class_means([p], "median") for cid, p in protos.items() if len(p[0])} if consensus == "pairwise" else {}
    )
    newest: dict[str, datetime] = {}
    for c in contributions:
        if c.site_id not in newest or c.created_at > newest[c.site_id]:
            newest[c.site_id] = c.created_at
    sizes = [c.n_samples for c in contributions if c.n_samples > 0]
    median_size = float(np.median(sizes)) if sizes else 1.0
    encoders = Counter(c.encoder_id for c in contributions)
    # Ties between encoders: the smallest id wins, so the feature does not depend on input order.
    majority = min(encoders, key=lambda e: (-encoders[e], e)) if encoders else ""
    acc = _latest_accuracy(evaluations)
    gains = loo_gains(contributions, evaluations, loo_window)
    selfs = self_gaps(contributions, evaluations)
    out: dict[str, np.ndarray] = {}
    for c in contributions:
        # Prototypes of another encoder live in another space: only the same encoder's are compared.
        other_ids = [
            o.contribution_id
            for o in contributions
            if o.site_id != c.site_id and o.encoder_id == c.encoder_id and len(protos[o.contribution_id][0])
        ]
        if trust is not None:
            trusted = [o for o in other_ids if float(trust.get(o, 1.0)) >= trust_min]
            other_ids = trusted if len(trusted) >= 2 else other_ids
        others = [protos[o] for o in other_ids]
        mine = protos[c.contribution_id]
        if len(mine[0]) and others and {p[0].shape[1] for p in others} == {mine[0].shape[1]}:
            if consensus == "pairwise":
                theirs = [(protos[o], own_means[o]) for o in other_ids]
                agreement, margin = _pairwise(mine, own_means[c.contribution_id], theirs)
            else:
                agreement, margin = _agreement(mine, _class_means(others, consensus), _support(others), min_support)
        else:
            agreement, margin = 1.0, 0.0
        if c.site_id in acc:
            rest = [a for s, a in acc.items() if s != c.site_id]
            gap = acc[c.site_id] - float(np.median(rest)) if rest else 0.0
            missing = 0.0
        else:
            gap, missing = 0.0, 1.0
        age_d = max(0.0, (now - c.created_at).total_seconds() / DAY_S)
        idle_d = max(0.0, (now - newest[c.site_id]).total_seconds() / DAY_S)
        ratio = math.log(max(c.n_samples, 1) / median_size)
        out[c.contribution_id] = np.array(
            [agreement, margin, gap, missing, math.log1p(age_d), math.log1p(idle_d), ratio,
             1.0 if c.encoder_id == majority else 0.0, gains.get(c.contribution_id, 0.0),
             selfs.get(c.contribution_id, 0.0)],
            np.float64,
        )  # fmt: skip
    return out
