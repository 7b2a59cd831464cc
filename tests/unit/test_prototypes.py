"""Prototype building: group sizes, class level, determinism."""

import numpy as np
import pytest

from edge.prototypes import build_prototypes


def clustered(n_per: int, centres: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, dim)) * 5
    return np.concatenate([c[i] + rng.normal(size=(n_per, dim)) * 0.1 for i in range(centres)]).astype(np.float32)


def test_k1_is_the_class_mean() -> None:
    x = clustered(20, 1)
    [p] = build_prototypes(x, ["a"] * 20, k=1)
    np.testing.assert_allclose(p.vectors[0], x.mean(0), rtol=1e-5, atol=1e-6)
    assert p.counts.tolist() == [20]
    assert p.spreads[0] == pytest.approx(np.sqrt(((x - x.mean(0)) ** 2).sum(1).mean()), rel=1e-5)


def test_every_prototype_averages_at_least_min_group_size() -> None:
    # 3 tight clusters of 4 samples, one of 30: k=8 with m=5 must merge the small ones.
    x = np.concatenate([clustered(4, 3, seed=1), clustered(30, 1, seed=2)])
    protos = build_prototypes(x, ["a"] * len(x), k=8, min_group_size=5)
    counts = protos[0].counts
    assert counts.min() >= 5
    assert counts.sum() == len(x)
    assert len(counts) <= len(x) // 5


def test_a_label_with_fewer_than_m_samples_gets_no_prototype() -> None:
    x = clustered(10, 1)
    protos = build_prototypes(x, ["a"] * 6 + ["b"] * 4, k=4, min_group_size=5)
    assert [p.label for p in protos] == ["a"]
    assert protos[0].counts.tolist() == [6]


def test_k_finds_separated_clusters() -> None:
    x = clustered(10, 4)
    [p] = build_prototypes(x, ["a"] * 40, k=4, min_group_size=5)
    assert sorted(p.counts.tolist()) == [10, 10, 10, 10]


def test_deterministic_for_a_seed() -> None:
    x = clustered(15, 3)
    a = build_prototypes(x, ["a"] * 45, k=3, seed=7)
    b = build_prototypes(x, ["a"] * 45, k=3, seed=7)
    np.testing.assert_array_equal(a[0].vectors, b[0].vectors)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="k and min_group_size"):
        build_prototypes(np.zeros((5, 2)), ["a"] * 5, k=0)
    with pytest.raises(ValueError, match="one label each"):
        build_prototypes(np.zeros((5, 2)), ["a"] * 4, k=1)
