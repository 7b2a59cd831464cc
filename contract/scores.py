"""Scores from a confusion matrix (rows: true label, columns: predicted), shared by the sites and the hub."""

from __future__ import annotations

import numpy as np


def balanced_accuracy(confusion: np.ndarray) -> float | None:
    """Mean recall over the labels (rows) that have samples; None when no row has any."""
    c = np.asarray(confusion, dtype=np.float64)
    support = c.sum(1)
    has = support > 0
    if not has.any():
        return None
    return float(np.mean(np.diag(c)[has] / support[has]))


def recalls(confusion: np.ndarray) -> list[float | None]:
    """Recall of each label (row); None for a label without samples."""
    c = np.asarray(confusion, dtype=np.float64)
    support = c.sum(1)
    return [float(c[i, i] / n) if n > 0 else None for i, n in enumerate(support)]
