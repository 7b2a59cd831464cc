"""The delivery gate: its rule, the nearest-prototype head in a real onnxruntime session, and the site's side."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from contract import signing
from contract.arrays import ArrayPayload
from contract.payloads import Contribution, LabelPrototypes, ModelManifest, now
from contract.topics import Topics
from edge.models import GlobalModel, ModelRejected, ModelStore
from hub.delivery import model_messages
from hub.delivery.gate import choose, pooled
from hub.delivery.heads import NEAREST_PROTOTYPE, add_linear_head, add_nearest_prototype, roles, roles_with
from hub.learning.closed_form import ClosedFormHead, FeatureMap, to_onnx
from hub.registry import ModelRegistry

LABELS = ["a", "b", "c"]


def conf(*rows: list[int]) -> np.ndarray:
    return np.array(rows, dtype=np.int64)


def test_the_best_balanced_accuracy_wins_not_the_best_accuracy() -> None:
    # 90 "a", 10 "b": the candidate says "a" always (accuracy 0.90, balanced 0.50); the baseline finds most "b".
    heads = ["logits", NEAREST_PROTOTYPE]
    total = pooled(
        [{"logits": [[60, 0], [7, 0]], NEAREST_PROTOTYPE: [[50, 10], [1, 6]]}, {"logits": [[30, 0], [3, 0]]}],
        heads,
        2,
    )
    assert total[NEAREST_PROTOTYPE].sum() == 67  # a site that did not report a head adds nothing to it
    d = choose(total, heads)
    assert d.state == "served" and d.serve == NEAREST_PROTOTYPE
    assert d.scores["logits"] == pytest.approx(0.5)
    assert d.scores[NEAREST_PROTOTYPE] == pytest.approx((50 / 60 + 6 / 7) / 2)
    assert d.confusion == [[50, 10], [1, 6]] and d.samples == 100


def test_a_tie_goes_to_the_candidate_and_chance_is_refused() -> None:
    same = conf([8, 2], [2, 8])
    assert choose({"logits": same, "head_x": same}, ["logits", "head_x"]).serve == "logits"
    at_chance = choose({"logits": conf([5, 5], [5, 6])}, ["logits"], chance_margin=0.05)
    assert at_chance.state == "at_chance" and at_chance.serve is None and "chance" in at_chance.reason
    # A model that removed data must replace the previous one even at chance, and says so.
    forced = choose({"logits": conf([5, 5], [5, 6])}, ["logits"], withdraw_previous=True)
    assert forced.state == "at_chance" and forced.serve == "logits" and "forgotten" in forced.reason
    one_label = choose({"logits": conf([9, 1], [0, 0])}, ["logits"])
    assert one_label.state == "at_chance" and "only 1 label" in one_label.reason
    nothing = choose({}, ["logits", "head_x"])
    assert nothing.state == "unchecked" and nothing.serve == "logits"
    with pytest.raises(ValueError, match="shape"):
        pooled([{"logits": [[1, 2, 3]]}], ["logits"], 2)


def contribution(site: int, protos: dict[str, np.ndarray]) -> Contribution:
    labels = [
        LabelPrototypes(label=lab, counts=[5] * len(v), spreads=[0.1] * len(v), vectors=ArrayPayload.from_numpy(v))
        for lab, v in protos.items()
    ]
    return Contribution(contribution_id=f"{site:032x}", site_id=f"site{site}", encoder_id="enc", created_at=now(),
                        k=2, min_group_size=5, labels=labels)  # fmt: skip


@pytest.fixture(scope="module")
def closed_form_model(tiny_bundle: Path) -> bytes:
    rng = np.random.default_rng(1)
    fmap = FeatureMap(dim=8, n_features=32, bandwidth=0.7, seed=3)
    head = ClosedFormHead(rng.standard_normal((32, 3)), rng.standard_normal(3), tuple(LABELS), "ridge", 1e-6, "x")
    return to_onnx(tiny_bundle / "encoder.onnx", fmap, head)


def embed(tiny_bundle: Path, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(str(tiny_bundle / "encoder.onnx"), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def test_the_nearest_prototype_head_predicts_what_the_rule_says(tiny_bundle: Path, closed_form_model: bytes) -> None:
    rng = np.random.default_rng(2)
    x = rng.random((40, 1, 8, 8), dtype=np.float32)
    e = embed(tiny_bundle, x)
    # Prototypes near real embeddings, two sites, site 2 without label "c" and with a label the model lacks.
    p1 = {lab: e[i * 4 : i * 4 + 2] + 0.01 for i, lab in enumerate(LABELS)}
    p2 = {"a": e[20:22], "b": e[22:24], "zz": e[24:26]}
    cs = [contribution(1, p1), contribution(2, p2)]
    model, info = add_nearest_prototype(closed_form_model, cs, LABELS)
    assert roles(model) == {"logits": "candidate", NEAREST_PROTOTYPE: "nearest_prototype"}
    assert info["prototypes"] == 10 and info["contributions"] == [c.contribution_id for c in cs]
    s = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    logits, np_logits = s.run(["logits", NEAREST_PROTOTYPE], {"image": x})
    before = ort.InferenceSession(closed_form_model, providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    np.testing.assert_array_equal(logits, before)  # the candidate is untouched
    vecs = np.concatenate([p1[lab] for lab in LABELS] + [p2["a"], p2["b"]]).astype(np.float64)
    labs = np.array([0, 0, 1, 1, 2, 2, 0, 0, 1, 1])
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    unit = e / np.linalg.norm(e, axis=1, keepdims=True)
    np.testing.assert_array_equal(np_logits.argmax(1), labs[(unit @ vecs.T).argmax(1)])
    assert add_nearest_prototype(model, cs, LABELS)[0] == model  # added once
    assert add_nearest_prototype(closed_form_model, [], LABELS) == (closed_form_model, {})


def manifest_for(tmp_path: Path, data: bytes, key, serve: str | None, gate: dict | None) -> ModelManifest:
    meta = {"labels": LABELS, "input": {"name": "image", "shape": [-1, 1, 8, 8]}, "contributions": [],
            "heads": roles(data)}  # fmt: skip
    reg = ModelRegistry(tmp_path / "hub")
    version = reg.latest() if reg.latest() and reg.latest().sha256 == _sha(data) else reg.publish(data, meta)
    manifest, body, _ = model_messages(version, Topics(), "enc", key, serve=serve, gate=gate)
    assert signing.verify(json.loads(body), {signing.key_id(key.public_key()): key.public_key()})
    return manifest


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_a_site_serves_what_the_gate_decided(tmp_path: Path, tiny_bundle: Path, closed_form_model: bytes) -> None:
    key = signing.write_keypair(tmp_path / "hub.pem")
    rng = np.random.default_rng(3)
    x = rng.random((12, 1, 8, 8), dtype=np.float32)
    e = embed(tiny_bundle, x)
    model, _ = add_nearest_prototype(closed_form_model, [contribution(1, {lab: e[i * 2 : i * 2 + 2] for i, lab in
                                                                           enumerate(LABELS)})], LABELS)  # fmt: skip
    store = ModelStore(tmp_path / "site")
    pending = manifest_for(tmp_path, model, key, None, {"state": "pending", "reason": "sites evaluate"})
    path = store.install(pending, model)
    assert store.current()[1].version == 1 and store.serving() is None  # evaluated, not served yet
    truth = [LABELS[i % 3] for i in range(12)] + ["zz"]  # a label the model lacks is left out of the matrices
    images = np.concatenate([x, x[:1]])
    m = GlobalModel.from_manifest(path, pending)
    cm = m.confusions(images, truth, sorted(pending.heads))
    assert set(cm) == {"logits", NEAREST_PROTOTYPE} and all(c.sum() == 12 for c in cm.values())
    decided = manifest_for(tmp_path, model, key, NEAREST_PROTOTYPE, {"state": "served", "reason": "best"})
    assert store.update_gate(decided) and not store.update_gate(decided)
    served_path, served = store.serving()
    assert served.serve == NEAREST_PROTOTYPE and served.version == 1
    preds = GlobalModel.from_manifest(served_path, served).predict(x)
    np_pred = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run([NEAREST_PROTOTYPE], {"image": x})
    assert preds == [LABELS[i] for i in np_pred[0].argmax(1)]
    with pytest.raises(ModelRejected, match="heads"):  # a manifest naming a head the model does not have
        store.update_gate(decided.model_copy(update={"serve": "head_missing", "gate": None}))


def test_a_leave_one_out_head_is_a_linear_head_over_the_same_random_features(
    tiny_bundle: Path, closed_form_model: bytes
) -> None:
    rng = np.random.default_rng(4)
    x = rng.random((16, 1, 8, 8), dtype=np.float32)
    fmap = FeatureMap(dim=8, n_features=32, bandwidth=0.7, seed=3)
    w, b = rng.standard_normal((32, 2)), rng.standard_normal(2)
    # A head that lost label "b" (its only contribution was left out): "b" is never predicted.
    model = add_linear_head(closed_form_model, "head_loo_1", w, b, ("c", "a"), LABELS)
    assert roles_with(model, {"head_loo_1": "without:" + "0" * 32})["head_loo_1"] == "without:" + "0" * 32
    out = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(["head_loo_1"], {"image": x})[0]
    feats = fmap.transform(embed(tiny_bundle, x))
    want = feats @ w + b
    np.testing.assert_allclose(out[:, [2, 0]], want, rtol=1e-4, atol=1e-4)
    assert (out[:, 1] == -1e4).all()


def test_a_refined_model_over_the_embedding_gets_its_nearest_prototype_head(tiny_bundle: Path) -> None:
    from hub.refinement.features import _linear_onnx

    rng = np.random.default_rng(5)
    head = ClosedFormHead(rng.standard_normal((8, 3)), rng.standard_normal(3), tuple(LABELS), "ridge", 1e-4, "x")
    linear = _linear_onnx(tiny_bundle / "encoder.onnx", head)  # no random features: the embedding is named
    x = rng.random((6, 1, 8, 8), dtype=np.float32)
    e = embed(tiny_bundle, x)
    model, info = add_nearest_prototype(linear, [contribution(1, {lab: e[i : i + 1] for i, lab in enumerate(LABELS)})],
                                        LABELS)  # fmt: skip
    assert info["prototypes"] == 3 and NEAREST_PROTOTYPE in roles(model)
    out = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run([NEAREST_PROTOTYPE], {"image": x})[0]
    assert out[:3].argmax(1).tolist() == [0, 1, 2]  # each of the first three images is its own label's prototype
