"""A site's refinement statistics: validated from the wire, turned into additive float64 statistics, summed, solved.

The wire carries float16, divided by powers of two, of the per-label sums and of a square root R of the
scatter (edge/refine.py; about 14 KB of JSON per site at dim 96); the hub widens them to float64, multiplies
the scales back (exact: powers of two), rebuilds the Gram matrix and keeps
everything else of the closed-form model's machinery (hub/learning/closed_form.py): statistics are
summed in id order, never subtracted, so dropping one site's statistics and solving again is
bit-identical to solving without them from the start.
"""

from __future__ import annotations

import numpy as np

from contract.payloads import RefinementStatistics
from hub.intake import parse_site_message
from hub.learning.closed_form import ContributionStats
from runtime.outcomes import Rejected


def parse_statistics(
    payload: bytes, topic_site: str, feature_key: str, dim: int, min_group_size: int, max_bytes: int
) -> RefinementStatistics:
    """Validate a `refine` payload from `topic_site` against the hub's current feature part; raises Rejected."""
    st = parse_site_message(payload, topic_site, RefinementStatistics, "statistics_id", max_bytes)
    ref = st.statistics_id
    if st.feature_key != feature_key:
        raise Rejected("stale", f"feature_key {st.feature_key} is not the one this hub requests ({feature_key})", ref)
    if st.dim != dim:
        raise Rejected("dimension", f"statistics have dimension {st.dim}; the requested features have {dim}", ref)
    if st.min_group_size < min_group_size or min(st.counts) < min_group_size:
        raise Rejected(
            "group_size",
            f"every label must count at least {min_group_size} samples for this hub; the upload declares "
            f"min_group_size={st.min_group_size} and its smallest label counts {min(st.counts)}",
            ref,
        )
    return st


def to_stats(st: RefinementStatistics) -> ContributionStats:
    """The additive statistics (float64, labels sorted, full symmetric Gram) that the solver sums.

    Gram = R^T R + s s^T / n from the scaled float16 values as they arrived (s the sum of the per-label sums):
    positive semi-definite with the intercept's mean, so sums of them never make the ridge system indefinite.
    """
    d, r = st.dim, st.root_rows
    root = np.zeros((r, d))
    root[np.triu_indices(r, m=d)] = st.root.to_numpy().astype(np.float64) * st.root_scale
    order = sorted(range(len(st.labels)), key=lambda i: st.labels[i])
    sums = st.sums.to_numpy().astype(np.float64)[order] * st.sums_scale
    counts = np.array([st.counts[i] for i in order], np.int64)
    total = sums.sum(axis=0)
    gram = root.T @ root + np.outer(total, total) / float(counts.sum())
    gram = (gram + gram.T) / 2.0  # bit-symmetric whatever the BLAS
    labels = tuple(st.labels[i] for i in order)
    return ContributionStats(st.statistics_id, st.feature_key, labels, counts, sums, gram)
