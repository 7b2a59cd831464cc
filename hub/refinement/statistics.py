"""A site's refinement statistics: validated from the wire, turned into additive float64 statistics, summed, solved.

The wire carries float32 (a few tens of KB per site); the hub widens them to float64 and keeps
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
    """The additive statistics (float64, labels sorted, full symmetric Gram) that the solver sums."""
    d = st.dim
    gram = np.zeros((d, d))
    iu = np.triu_indices(d)
    upper = st.gram.to_numpy().astype(np.float64)
    gram[iu] = upper
    gram.T[iu] = upper
    order = sorted(range(len(st.labels)), key=lambda i: st.labels[i])
    sums = st.sums.to_numpy().astype(np.float64)[order]
    counts = np.array([st.counts[i] for i in order], np.int64)
    labels = tuple(st.labels[i] for i in order)
    return ContributionStats(st.statistics_id, st.feature_key, labels, counts, sums, gram)
