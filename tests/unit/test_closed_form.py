"""The closed-form head: additive statistics, exact forgetting, ONNX parity, determinism, partition invariance."""

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from hub.learning.closed_form import (
    VARIANTS,
    ContributionStats,
    FeatureExtractor,
    FeatureMap,
    solve,
    sum_stats,
    to_onnx,
)
from hub.synthesis import SyntheticSet

LABELS = ("a", "b", "c")


def synthetic(cid: str, n: int, seed: int, labels: tuple[str, ...] = LABELS) -> SyntheticSet:
    """Images whose brightness pattern depends on the label, so that a head can learn something."""
    rng = np.random.default_rng(seed)
    y = rng.choice(np.array(labels), n)
    images = rng.random((n, 1, 8, 8), dtype=np.float32) * 0.5
    for i, name in enumerate(LABELS):
        images[y == name, 0, i * 2 : i * 2 + 2] += 0.5
    return SyntheticSet(images, y, np.array([cid] * n))


def cid(i: int) -> str:
    return f"{i:032x}"


@pytest.fixture(scope="module")
def extractor(tiny_bundle: Path) -> FeatureExtractor:
    return FeatureExtractor(tiny_bundle / "encoder.onnx", FeatureMap(dim=8, n_features=64, bandwidth=0.7, seed=3))


@pytest.fixture(scope="module")
def parts() -> dict[str, SyntheticSet]:
    # Contribution 2 lacks label "c": forgetting must also cope with labels absent from some contributions.
    return {
        cid(1): synthetic(cid(1), 40, 1),
        cid(2): synthetic(cid(2), 25, 2, ("a", "b")),
        cid(3): synthetic(cid(3), 30, 3),
        cid(4): synthetic(cid(4), 35, 4),
    }


def all_stats(parts: dict[str, SyntheticSet], extractor: FeatureExtractor) -> dict[str, ContributionStats]:
    return {c: ContributionStats.from_synthetic(s, c, extractor) for c, s in parts.items()}


def test_stats_of_a_union_are_the_sum_of_the_parts(extractor: FeatureExtractor) -> None:
    # Arrange
    s = synthetic(cid(9), 60, 9)
    feats = extractor.features(s.images)
    key = extractor.feature_map.key()
    # Act
    whole = ContributionStats.from_features(cid(9), key, feats, s.labels)
    halves = [
        ContributionStats.from_features(cid(10), key, feats[:25], s.labels[:25]),
        ContributionStats.from_features(cid(11), key, feats[25:], s.labels[25:]),
    ]
    total = sum_stats(halves)
    # Assert
    assert total.labels == whole.labels
    np.testing.assert_array_equal(total.counts, whole.counts)
    np.testing.assert_allclose(total.sums, whole.sums, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(total.gram, whole.gram, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(whole.gram, whole.gram.T)


def test_forgetting_is_bit_identical_to_retraining_without_the_contribution(
    parts: dict[str, SyntheticSet], extractor: FeatureExtractor, tiny_bundle: Path
) -> None:
    # Arrange: the hub holds statistics of four contributions and a model from all of them.
    stored = all_stats(parts, extractor)
    fmap = extractor.feature_map
    for variant in VARIANTS:
        # Act: forget contribution 3 by dropping its statistics and re-summing what is left ...
        unlearned = solve(sum_stats([s for c, s in stored.items() if c != cid(3)]), variant=variant)
        # ... and retrain from scratch: fresh statistics from the remaining images, another extractor.
        fresh = FeatureExtractor(tiny_bundle / "encoder.onnx", FeatureMap(dim=8, n_features=64, bandwidth=0.7, seed=3))
        remaining = {c: s for c, s in parts.items() if c != cid(3)}
        retrained = solve(sum_stats(list(all_stats(remaining, fresh).values())), variant=variant)
        # Assert
        assert np.array_equal(unlearned.weights, retrained.weights), variant
        assert np.array_equal(unlearned.bias, retrained.bias), variant
        assert unlearned.trained_on == retrained.trained_on
        onnx_path = tiny_bundle / "encoder.onnx"
        assert to_onnx(onnx_path, fmap, unlearned) == to_onnx(onnx_path, fmap, retrained)
    # And the model did change: the forgotten contribution had an influence.
    before = solve(sum_stats(list(stored.values())))
    assert not np.array_equal(before.weights, unlearned.weights)


def test_forgetting_the_only_contribution_with_a_label_removes_that_label(
    parts: dict[str, SyntheticSet], extractor: FeatureExtractor
) -> None:
    stored = all_stats({c: s for c, s in parts.items() if c in (cid(1), cid(2))}, extractor)
    head = solve(sum_stats([stored[cid(2)]]))
    assert head.label_names == ("a", "b")
    with pytest.raises(ValueError, match="no synthetic samples for label"):
        solve(sum_stats([stored[cid(2)]]), label_names=LABELS)


def test_composed_onnx_model_matches_the_numpy_path(
    parts: dict[str, SyntheticSet], extractor: FeatureExtractor, tiny_bundle: Path, tmp_path: Path
) -> None:
    from edge.models import GlobalModel

    head = solve(sum_stats(list(all_stats(parts, extractor).values())), variant="ridge-balanced")
    data = to_onnx(tiny_bundle / "encoder.onnx", extractor.feature_map, head)
    x = synthetic(cid(99), 50, 99).images
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image"]
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    logits = sess.run(None, {"image": x})[0]
    ref = head.logits(extractor.features(x))
    assert logits.shape == (50, 3) and logits.dtype == np.float32
    assert np.abs(logits - ref).max() < 1e-3
    assert np.array_equal(logits.argmax(1), ref.argmax(1))
    # A site runs it unchanged, one image at a time too.
    path = tmp_path / "model.onnx"
    path.write_bytes(data)
    site = GlobalModel(path, list(head.label_names), "image", 8)
    assert site.predict(x[:1]) == [LABELS[int(ref[0].argmax())]]
    assert site.predict(x) == [LABELS[int(i)] for i in ref.argmax(1)]
    meta = sess.get_modelmeta().custom_metadata_map
    assert meta["fedge.trained_on"] == head.trained_on


def test_same_seed_same_bytes_and_save_load_round_trip(
    parts: dict[str, SyntheticSet], extractor: FeatureExtractor, tiny_bundle: Path, tmp_path: Path
) -> None:
    a, b = FeatureMap(8, 64, 0.7, seed=3), FeatureMap(8, 64, 0.7, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a.params, b.params, strict=True)) and a.key() == b.key()
    assert not np.array_equal(FeatureMap(8, 64, 0.7, seed=4).params[0], a.params[0])
    s1 = ContributionStats.from_synthetic(parts[cid(1)], cid(1), extractor)
    s2 = ContributionStats.from_synthetic(parts[cid(1)], cid(1), extractor)
    assert s1.digest() == s2.digest()
    path = tmp_path / "s.npz"
    s1.save(path)
    loaded = ContributionStats.load(path)
    assert loaded.digest() == s1.digest() and loaded.labels == s1.labels
    assert np.array_equal(loaded.gram, s1.gram) and np.array_equal(loaded.sums, s1.sums)
    assert not list(tmp_path.glob(".tmp-*"))
    head1 = solve(sum_stats([s1]))
    head2 = solve(sum_stats([loaded]))
    assert to_onnx(tiny_bundle / "encoder.onnx", a, head1) == to_onnx(tiny_bundle / "encoder.onnx", b, head2)
    # A tampered file is refused.
    with np.load(path) as z:
        arrays = dict(z)
    arrays["sums"] = arrays["sums"] + 1e-9
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="digest"):
        ContributionStats.load(path)


def test_partition_and_order_invariance(parts: dict[str, SyntheticSet], extractor: FeatureExtractor) -> None:
    # The same samples grouped into different contributions give the same head (to rounding).
    feats = {c: extractor.features(s.images) for c, s in parts.items()}
    key = extractor.feature_map.key()
    x = np.concatenate([feats[c] for c in sorted(feats)])
    y = np.concatenate([parts[c].labels for c in sorted(parts)])
    by_site = [ContributionStats.from_features(c, key, feats[c], parts[c].labels) for c in sorted(feats)]
    cuts = [0, 17, 70, 71, len(x)]
    regrouped = [
        ContributionStats.from_features(cid(50 + i), key, x[lo:hi], y[lo:hi])
        for i, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:], strict=True))
    ]
    for variant in VARIANTS:
        h1, h2 = solve(sum_stats(by_site), variant=variant), solve(sum_stats(regrouped), variant=variant)
        np.testing.assert_allclose(h1.weights, h2.weights, rtol=1e-6, atol=1e-8)
        # Arrival order never matters: statistics are summed in contribution-id order.
        h3 = solve(sum_stats(by_site[::-1]), variant=variant)
        assert np.array_equal(h1.weights, h3.weights)
    # Every variant learns the label pattern.
    for variant in VARIANTS:
        head = solve(sum_stats(by_site), variant=variant)
        assert (np.array(head.label_names)[head.predict(x)] == y).mean() > 0.8, variant


def test_refuses_to_mix_what_cannot_be_summed(extractor: FeatureExtractor) -> None:
    s = synthetic(cid(7), 20, 7)
    one = ContributionStats.from_synthetic(s, cid(7), extractor)
    with pytest.raises(ValueError, match="more than once"):
        sum_stats([one, one])
    other = ContributionStats.from_features(cid(8), "other-map", extractor.features(s.images), s.labels)
    with pytest.raises(ValueError, match="different feature maps"):
        sum_stats([one, other])
    with pytest.raises(ValueError, match="tagged"):
        ContributionStats.from_synthetic(s, cid(8), extractor)
