"""Per-label prototypes: k-means centroids of local embeddings, each averaging at least m samples.

Pure numpy. k = 1 is a class-level prompt; larger k moves towards instance level. No prototype ever
stands for fewer than `min_group_size` samples, since an embedding-conditioned generator can turn a
single sample's embedding back into that sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Prototypes:
    """Prototypes of one label."""

    label: str
    vectors: np.ndarray  # [k, dim] float32
    counts: np.ndarray  # [k] int64, each >= min_group_size
    spreads: np.ndarray  # [k] float32: RMS distance of the group's samples to its centroid


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 50) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding. Returns an assignment [n] into 0..k-1."""
    n = len(x)
    centers = [x[rng.integers(n)]]
    for _ in range(1, k):
        d2 = np.min(((x[:, None, :] - np.array(centers)[None]) ** 2).sum(-1), axis=1)
        total = d2.sum()
        centers.append(x[rng.choice(n, p=d2 / total)] if total > 0 else x[rng.integers(n)])
    c = np.array(centers)
    assign = np.zeros(n, dtype=np.int64)
    for _ in range(iters):
        new = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        if _ and np.array_equal(new, assign):
            break
        assign = new
        for j in range(k):
            members = x[assign == j]
            if len(members):
                c[j] = members.mean(0)
    return assign


def enforce_min_group(x: np.ndarray, assign: np.ndarray, m: int) -> np.ndarray:
    """Merge groups smaller than m into their nearest group until all hold at least m samples."""
    assign = assign.copy()
    while True:
        ids, sizes = np.unique(assign, return_counts=True)
        if sizes.min() >= m or len(ids) == 1:
            break
        small = ids[sizes.argmin()]
        centers = {j: x[assign == j].mean(0) for j in ids}
        others = [j for j in ids if j != small]
        nearest = min(others, key=lambda j: float(((centers[j] - centers[small]) ** 2).sum()))
        assign[assign == small] = nearest
    _, assign = np.unique(assign, return_inverse=True)
    return assign


def build_prototypes(
    embeddings: np.ndarray, labels: list[str] | np.ndarray, k: int, min_group_size: int = 5, seed: int = 0
) -> list[Prototypes]:
    """Prototypes per label, sorted by label.

    A label with n samples gets min(k, n // min_group_size) prototypes; a label with fewer than
    `min_group_size` samples gets none and is left out.
    """
    if k < 1 or min_group_size < 1:
        raise ValueError(f"k and min_group_size must be at least 1, got k={k}, min_group_size={min_group_size}")
    emb = np.asarray(embeddings, dtype=np.float32)
    labs = np.asarray(labels).astype(str)
    if emb.ndim != 2 or len(emb) != len(labs):
        raise ValueError(f"embeddings must be [n, dim] with one label each; got {emb.shape} and {len(labs)} labels")
    out = []
    for label in sorted(set(labs.tolist())):
        x = emb[labs == label].astype(np.float64)
        k_eff = min(k, len(x) // min_group_size)
        if k_eff == 0:
            continue
        rng = np.random.default_rng([seed, len(x), k_eff])
        assign = np.zeros(len(x), np.int64) if k_eff == 1 else kmeans(x, k_eff, rng)
        assign = enforce_min_group(x, assign, min_group_size)
        groups = [x[assign == j] for j in range(assign.max() + 1)]
        centers = np.array([g.mean(0) for g in groups])
        spreads = np.array([np.sqrt(((g - c) ** 2).sum(1).mean()) for g, c in zip(groups, centers, strict=True)])
        out.append(
            Prototypes(
                label=label,
                vectors=centers.astype(np.float32),
                counts=np.array([len(g) for g in groups], dtype=np.int64),
                spreads=spreads.astype(np.float32),
            )
        )
    return out
