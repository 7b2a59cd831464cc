"""Synthesis on a real (tiny, seeded) diffusers model: determinism (to the trained model), tagging, cache."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edge.contribution import make_contribution
from hub.export import export_classifier
from hub.foundation.bundle import load
from hub.rounds import TrainConfig, run_round
from hub.synthesis import SynthesisConfig, Synthesizer, samples_for

CFG = SynthesisConfig(samples_per_count=1.0, min_per_prototype=2, steps=3, batch_size=16)


def site_contribution(fm, site: str, seed: int, labels=("a", "b")):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(10 * len(labels), fm.dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return make_contribution(site, fm.encoder_id, emb, np.repeat(labels, 10), k=2)


@pytest.fixture(scope="module")
def fm(tiny_bundle: Path):
    return load(tiny_bundle)


def test_same_contribution_same_samples(fm) -> None:
    c = site_contribution(fm, "s1", 0)
    a = Synthesizer(fm, CFG, progress=False).synthesize(c)
    b = Synthesizer(fm, CFG, progress=False).synthesize(c)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_every_sample_is_tagged_and_counted(fm) -> None:
    c = site_contribution(fm, "s1", 0)
    out = Synthesizer(fm, CFG, progress=False).synthesize(c)
    assert set(out.tags) == {c.contribution_id}
    for lp in c.labels:
        assert (out.labels == lp.label).sum() == sum(samples_for(n, CFG) for n in lp.counts)
    assert out.images.shape[1:] == (1, 8, 8)
    assert out.images.min() >= 0.0 and out.images.max() <= 1.0


def test_a_contribution_does_not_depend_on_the_others(fm) -> None:
    a, b = site_contribution(fm, "s1", 0), site_contribution(fm, "s2", 1, labels=("b", "c"))
    syn = Synthesizer(fm, CFG, progress=False)
    both = syn.synthesize_all([a, b])
    alone = syn.synthesize(a)
    np.testing.assert_array_equal(both.without({b.contribution_id}).images, alone.images)
    assert set(both.without({a.contribution_id}).tags) == {b.contribution_id}


def test_seed_changes_samples(fm) -> None:
    c = site_contribution(fm, "s1", 0)
    a = Synthesizer(fm, CFG, progress=False).synthesize(c)
    b = Synthesizer(fm, replace(CFG, seed=1), progress=False).synthesize(c)
    assert not np.array_equal(a.images, b.images)


def test_cache_returns_what_a_fresh_run_returns(fm, tmp_path: Path) -> None:
    c = site_contribution(fm, "s1", 0)
    first = Synthesizer(fm, CFG, cache_dir=tmp_path, progress=False).synthesize(c)
    cached_files = list(tmp_path.rglob("*.npz"))
    assert len(cached_files) == 1
    second = Synthesizer(fm, CFG, cache_dir=tmp_path, progress=False).synthesize(c)
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.tags, second.tags)


def test_foreign_encoder_is_refused(fm) -> None:
    c = site_contribution(fm, "s1", 0).model_copy(update={"encoder_id": "someone-else"})
    with pytest.raises(ValueError, match="encoded by 'someone-else'"):
        Synthesizer(fm, CFG, progress=False).synthesize(c)


def onnx_logits(fm, contributions, seed: int, tmp: Path) -> np.ndarray:
    """One round from scratch (a fresh synthesizer, no cache), exported, run by onnxruntime on a fixed batch."""
    import onnxruntime as ort

    synth = Synthesizer(fm, replace(CFG, seed=seed), progress=False)
    result = run_round(contributions, synth, TrainConfig(epochs=2, batch_size=16, seed=seed))
    path = tmp / f"model-{seed}-{len(list(tmp.iterdir()))}.onnx"
    export_classifier(result.model, path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    batch = np.random.default_rng(123).random((32, 1, 8, 8), dtype=np.float32)
    return session.run(None, {session.get_inputs()[0].name: batch})[0]


def test_same_inputs_and_seed_give_the_same_trained_model(fm, tmp_path: Path) -> None:
    contributions = [site_contribution(fm, "s1", 0), site_contribution(fm, "s2", 1, labels=("b", "c"))]

    first = onnx_logits(fm, contributions, 0, tmp_path)
    again = onnx_logits(fm, list(reversed(contributions)), 0, tmp_path)  # arrival order does not matter either
    other = onnx_logits(fm, contributions, 1, tmp_path)

    assert first.shape == (32, 3)
    np.testing.assert_array_equal(first, again)  # bit-identical logits
    assert not np.array_equal(first, other)
