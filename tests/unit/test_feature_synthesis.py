"""Feature-space synthesis: seeded per contribution, spread as reported, generators saved and loaded, exact fits."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from contract.payloads import Contribution
from edge.contribution import make_contribution
from hub.config import HubSettings
from hub.learning.exact import ExactConfig, ExactTrainer, max_abs_diff
from hub.learning.feature_synthesis import (
    CovarianceGenerator,
    DiffusionTraining,
    FeatureSynthesisConfig,
    FeatureSynthesizer,
    Generator,
    encode_folder,
    load_encoder_bundle,
    load_generator,
    public_groups,
    samples_for,
    save_generator,
    synthesizer_for_bundle,
    train_generator,
    uses_feature_synthesis,
)

DIM = 8


def embeddings(n: int, seed: int, labels: tuple[str, ...] = ("a", "b", "c")) -> tuple[np.ndarray, np.ndarray]:
    """Unit embeddings clustered by label (each label near its own axis)."""
    rng = np.random.default_rng(seed)
    y = rng.choice(np.array(labels), n)
    x = rng.normal(0.0, 0.3, (n, DIM))
    for i, name in enumerate(("a", "b", "c")):
        x[y == name, i] += 2.0
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


@pytest.fixture(scope="module")
def encoder_only(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle without its image generator: what the general bundle looks like to the hub."""
    path = tmp_path_factory.mktemp("encoder-only") / "tiny-encoder"
    path.mkdir()
    for name in ("manifest.json", "encoder.onnx"):
        shutil.copy(tiny_bundle / name, path / name)
    return path


@pytest.fixture(scope="module")
def contributions(encoder_only: Path) -> list[Contribution]:
    eid = load_encoder_bundle(encoder_only).encoder_id
    out = []
    for i, labels in enumerate([("a", "b", "c"), ("a", "b"), ("a", "b", "c")]):
        x, y = embeddings(60, i, labels)
        out.append(make_contribution(f"site-{i}", eid, x, y, k=2, min_group_size=5, seed=0))
    return out


def test_auto_uses_features_only_without_an_image_generator(tiny_bundle: Path, encoder_only: Path) -> None:
    assert uses_feature_synthesis(encoder_only, "auto")
    assert not uses_feature_synthesis(tiny_bundle, "auto")
    assert uses_feature_synthesis(tiny_bundle, "features")
    assert not uses_feature_synthesis(tiny_bundle, "images")
    with pytest.raises(ValueError, match="has none"):
        uses_feature_synthesis(encoder_only, "images")
    assert synthesizer_for_bundle(tiny_bundle, "auto") is None
    assert isinstance(synthesizer_for_bundle(encoder_only, "auto"), FeatureSynthesizer)
    s = HubSettings(closed_form={"synthesis": "features"})
    assert s.closed_form.synthesis == "features" and s.closed_form.feature_generator is None


def test_gaussian_samples_are_seeded_per_contribution_and_spread_as_reported(
    encoder_only: Path, contributions: list[Contribution]
) -> None:
    # Arrange
    bundle = load_encoder_bundle(encoder_only)
    cfg = FeatureSynthesisConfig(samples_per_count=40.0, max_per_prototype=4096, seed=5)
    fs = FeatureSynthesizer(bundle, cfg)
    c = contributions[0]
    # Act
    first, again = fs.synthesize(c), FeatureSynthesizer(bundle, cfg).synthesize(c)
    other_seed = FeatureSynthesizer(bundle, FeatureSynthesisConfig(samples_per_count=40.0, max_per_prototype=4096,
                                                                   seed=6)).synthesize(c)  # fmt: skip
    # Assert: the same bits from the same id and seed, other bits from another seed
    np.testing.assert_array_equal(first.embeddings, again.embeddings)
    assert not np.array_equal(first.embeddings, other_seed.embeddings)
    assert set(first.tags.tolist()) == {c.contribution_id}
    start = 0
    for lp in c.labels:
        vectors = lp.vectors.to_numpy()
        for j, (count, spread) in enumerate(zip(lp.counts, lp.spreads, strict=True)):
            n = samples_for(count, cfg)
            block = first.embeddings[start : start + n]
            assert (first.labels[start : start + n] == lp.label).all()
            rms = float(np.sqrt(((block - vectors[j]) ** 2).sum(1).mean()))
            assert rms == pytest.approx(spread, rel=0.1)  # n >= 200 draws in 8 dims
            start += n
    assert start == len(first.labels)


def test_covariance_generator_follows_the_public_within_group_shape() -> None:
    # Arrange: public embeddings whose within-group variation lies along axis 0 only
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, DIM))
    x = np.repeat(centres, 10, axis=0)
    x[:, 0] += rng.normal(0.0, 0.5, len(x))
    # Act
    groups = public_groups(x, group_sizes=(10,), seed=0)
    gen = CovarianceGenerator.fit(groups, shrinkage=0.1)
    r = gen.residuals(np.zeros(DIM), 0.1, 4000, seed=1)
    # Assert: trace dim, and most of it on axis 0
    cov = gen.factor @ gen.factor.T
    assert np.trace(cov) == pytest.approx(DIM)
    var = r.var(axis=0)
    assert var[0] > 5 * var[1:].max()
    np.testing.assert_array_equal(r, gen.residuals(np.zeros(DIM), 0.1, 4000, seed=1))


def test_tiny_diffusion_generator_trains_saves_and_samples_the_same_bits(tmp_path: Path) -> None:
    # Arrange
    x, _ = embeddings(80, 0)
    training = DiffusionTraining(hidden=16, blocks=1, batch_size=32, max_steps=20, time_budget_s=30.0, threads=1)
    # Act
    gen = train_generator("diffusion", x, seed=0, training=training, steps=4)
    save_generator(gen, tmp_path / "gen", encoder_id="tiny-x")
    loaded = load_generator(tmp_path / "gen", encoder_id="tiny-x")
    r1 = gen.residuals(x[0], 0.2, 16, seed=3)
    r2 = loaded.residuals(x[0], 0.2, 16, seed=3)
    # Assert
    assert gen.info["steps"] == 20  # type: ignore[attr-defined]
    assert r1.shape == (16, DIM) and np.isfinite(r1).all()
    np.testing.assert_array_equal(r1, r2)
    assert loaded.digest() == gen.digest()
    meta = json.loads((tmp_path / "gen" / "generator.json").read_text())
    assert meta["kind"] == "diffusion" and "denoiser/config.json" in meta["files"]
    with pytest.raises(ValueError, match="made for encoder"):
        load_generator(tmp_path / "gen", encoder_id="other")
    assert type(load_generator(None)) is Generator  # no public data: Gaussian sampling


def test_encode_folder_reads_a_flat_unlabelled_folder(encoder_only: Path, tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((12, 10)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
    np.save(tmp_path / "x.npy", rng.random((8, 8)).astype(np.float32))
    emb = encode_folder(tmp_path, encoder_only)
    assert emb.shape == (4, DIM)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("kind", ["gaussian", "covariance"])
def test_exact_trainer_in_feature_space_forgets_by_dropping_statistics(
    kind: str, encoder_only: Path, contributions: list[Contribution], tmp_path: Path
) -> None:
    # Arrange: a hub over a bundle without an image generator
    x, _ = embeddings(100, 9)
    gen = train_generator(kind, x, seed=0)
    if kind != "gaussian":
        save_generator(gen, tmp_path / "gen", load_encoder_bundle(encoder_only).encoder_id)
    fs = synthesizer_for_bundle(encoder_only, "auto", seed=1, generator_dir=tmp_path / "gen" if kind != "gaussian"
                                else None)  # fmt: skip
    assert fs is not None
    cfg = ExactConfig(n_features=64, seed=1)
    trainer = ExactTrainer(fs, encoder_only / "encoder.onnx", cfg, tmp_path / "stats")
    assert trainer.feature_space
    # Act
    full = trainer.fit(contributions)
    forgotten = contributions[1].contribution_id
    unlearned = trainer.fit([c for c in contributions if c.contribution_id != forgotten])
    fresh = ExactTrainer(fs, encoder_only / "encoder.onnx", cfg, tmp_path / "stats-fresh")
    refit = fresh.refit_from_scratch([c for c in contributions if c.contribution_id != forgotten])
    # Assert: unlearning is bit-identical to a refit without the contribution, and the model is deliverable
    assert full.trained_on == sorted(c.contribution_id for c in contributions)
    assert forgotten not in unlearned.trained_on
    assert max_abs_diff(unlearned.head, refit.head) == 0.0
    assert unlearned.training_digest == refit.training_digest
    assert full.label_names == ("a", "b", "c") and len(full.onnx) > 0
    x_eval, y_eval = embeddings(200, 42)
    pred = np.array(full.label_names)[full.head.predict(trainer.feature_map.transform(x_eval))]
    assert (pred == y_eval).mean() > 0.8


def test_command_trains_a_generator_from_a_flat_folder_and_refuses_an_empty_one(
    encoder_only: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hub.learning.feature_synthesis import main

    public = tmp_path / "public"
    public.mkdir()
    rng = np.random.default_rng(1)
    for i in range(30):
        np.save(public / f"{i}.npy", rng.random((8, 8)).astype(np.float32))
    out = tmp_path / "gen"
    args = ["--bundle", str(encoder_only), "--public", str(public), "--out", str(out), "--threads", "1"]
    assert main([*args, "--kind", "covariance"]) == 0
    gen = load_generator(out, load_encoder_bundle(encoder_only).encoder_id)
    assert isinstance(gen, CovarianceGenerator) and gen.factor.shape == (DIM, DIM)
    (tmp_path / "empty").mkdir()
    assert main([*args[:2], "--public", str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 2
    assert "no image" in capsys.readouterr().err


def test_delivered_model_over_an_rgb_encoder_takes_site_images(tmp_path: Path) -> None:
    """A bundle whose encoder wants normalised RGB (the general bundle) still delivers a model fed [N, 1, S, S]."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edge.encoder import OnnxEncoder
    from hub.learning.closed_form import ClosedFormHead, FeatureMap, to_onnx

    # Arrange: a real 3-channel encoder (1x1 conv, pooled, normalised) with the general bundle's input section
    w = np.random.default_rng(0).normal(size=(DIM, 3, 1, 1)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w"], ["conv"]),
         helper.make_node("Relu", ["conv"], ["relu"]),
         helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
         helper.make_node("Flatten", ["pool"], ["flat"]),
         helper.make_node("LpNormalization", ["flat"], ["embedding"], axis=1, p=2)],
        "rgb", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", DIM])], [numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "encoder.onnx")
    spec = {"channels": 3, "mean": [0.2, 0.4, 0.6], "std": [0.5, 0.25, 1.0]}
    (tmp_path / "manifest.json").write_text(json.dumps({"encoder_id": "rgb-x", "embedding_dim": DIM, "input": spec}))
    fm = FeatureMap(DIM, 32, 0.7, 0)
    rng = np.random.default_rng(1)
    head = ClosedFormHead(rng.normal(size=(32, 2)), rng.normal(size=2), ("a", "b"), "ridge", 1e-6, "x")
    images = rng.random((5, 1, 8, 8), dtype=np.float32)
    # Act
    model = ort.InferenceSession(to_onnx(tmp_path / "encoder.onnx", fm, head), providers=["CPUExecutionProvider"])
    logits = model.run(None, {"image": images})[0]
    expected = head.logits(fm.transform(OnnxEncoder(tmp_path / "encoder.onnx", prefer_cuda=False).encode(images)))
    # Assert
    assert model.get_inputs()[0].shape == ["N", 1, 8, 8]
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
