"""The refinement round's pure parts: the exact solve from summed site statistics, the wire payload, the ONNX
feature output the sites run, and the ledger's records (tied to the site's active contribution)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import scipy.linalg

from contract import signing
from contract.payloads import RefinementRequest, RefinementStatistics
from edge.contribution import make_contribution
from edge.refine import make_statistics, projected_features, statistics, wire_scale, wire_statistics
from hub.learning.closed_form import ContributionStats, FeatureExtractor, FeatureMap, solve, sum_stats
from hub.ledger import Ledger
from hub.refinement.features import OUTPUT, Projection, head_name, refined_onnx, with_feature_output
from hub.refinement.statistics import parse_statistics, to_stats
from runtime.outcomes import Rejected

KEY = "0123456789abcdef"


def _request(dim: int, key=None, part: str = "train") -> RefinementRequest:
    body = {
        "schema_version": 1, "request_id": "ab" * 16, "created_at": "2026-11-29T00:00:00Z", "feature_key": KEY,
        "model_version": 1, "model_sha256": "00" * 32, "output_name": OUTPUT, "dim": dim, "min_group_size": 5,
        "part": part,
    }  # fmt: skip
    key = key or signing.Ed25519PrivateKey.generate()
    return RefinementRequest.model_validate(signing.sign(body, key))


def _data(n: int = 600, dim: int = 24, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    z = rng.normal(size=(n, dim)) * 0.3 + np.eye(classes, dim)[y]
    return z, [str(v) for v in y]


def _head(parts: list[tuple[np.ndarray, list[str]]]):
    stats = [ContributionStats.from_features(f"{i:032x}", KEY, z, np.array(y)) for i, (z, y) in enumerate(parts)]
    return solve(sum_stats(stats), variant="ridge-balanced", lam=1e-6)


def test_the_head_does_not_depend_on_how_the_samples_are_split_across_sites() -> None:
    z, y = _data()
    pooled = _head([(z, y)])
    # Three sites under strong label skew: site i holds mostly class i.
    order = np.argsort([int(v) for v in y], kind="stable")
    cuts = np.split(order, [150, 420])
    split = _head([(z[c], [y[i] for i in c]) for c in cuts])
    assert split.label_names == pooled.label_names
    assert np.abs(split.weights - pooled.weights).max() < 1e-9
    assert np.abs(split.bias - pooled.bias).max() < 1e-9
    # The same through the wire: float16 sums and a float16 square root of the scatter per site, each divided by a
    # power of two. Every value arrives within half a float16 step at its largest one's exponent; the Gram matrix
    # rebuilt from them is within that rounding of the exact one, and the head solved from them predicts the same.
    req = _request(z.shape[1])
    wire = []
    for c in cuts:
        names, counts, sums, root = wire_statistics(z[c], [y[i] for i in c], 5)
        exact = statistics(z[c], [y[i] for i in c], 5)
        assert exact is not None and np.allclose(
            root.T @ root + np.outer(sums.sum(0), sums.sum(0)) / sum(counts), exact[3]
        )
        payload = make_statistics("s", req, "cd" * 16, 5, names, counts, sums, root)
        for scale, largest in ((payload.sums_scale, np.abs(sums).max()), (payload.root_scale, np.abs(root).max())):
            assert scale in 2.0 ** np.arange(-64, 65) and 0.5 <= largest / scale < 1.0
        assert payload.root.dtype == payload.sums.dtype == "float16" and payload.root_rows == z.shape[1]
        got = to_stats(payload)
        assert np.abs(got.sums - sums).max() <= 2.0**-12 * payload.sums_scale
        assert np.abs(got.gram - exact[3]).max() < 2e-3 * np.abs(exact[3]).max()
        assert np.array_equal(got.gram, got.gram.T)
        wire.append(got)
    head = solve(sum_stats(wire), variant="ridge-balanced", lam=1e-6)
    assert np.abs(head.weights - pooled.weights).max() < 1e-2 * np.abs(pooled.weights).max()
    assert np.array_equal(head.predict(z), pooled.predict(z))


def test_the_rebuilt_gram_is_positive_semi_definite_and_large_sites_travel_scaled() -> None:
    """A site with fewer samples than dimensions (5 samples of one label, as a new site may have): R has 5 rows, and the
    ridge system over what arrived is positive definite at any lambda, the intercept included (float16 rounding of a
    Gram matrix itself can make it indefinite). A large site (Gram entries far above float16's 65,504) arrives within
    float16 rounding. A scale that is not a power of two, which the hub could not multiply back exactly, is refused."""
    from pydantic import ValidationError

    z, y = _data(dim=24)
    few = wire_statistics(z[:5] * 0.01 + z[0], ["a"] * 5, 5)  # nearly identical samples: a tiny scatter
    assert few is not None and few[3].shape == (5, 24)
    st = to_stats(make_statistics("s", _request(24), "cd" * 16, 5, *few))
    n = float(st.counts.sum())
    m = st.sums.sum(0) / n
    schur = st.gram / n - np.outer(m, m)  # the intercept's system is positive definite iff this + lam I is
    assert np.linalg.eigvalsh(schur).min() > -1e-12
    solve(sum_stats([st]), lam=1e-9)  # Cholesky succeeds
    z, y = _data(dim=6)
    z = np.tile(z, (500, 1))  # 300,000 samples: Gram diagonal beyond float16's range
    exact = statistics(z, y * 500, 5)
    assert exact is not None and exact[3].max() > 65504
    payload = make_statistics("s", _request(6), "cd" * 16, 5, *wire_statistics(z, y * 500, 5))
    assert np.abs(to_stats(payload).gram - exact[3]).max() / exact[3].max() < 1e-3
    body = json.loads(payload.model_dump_json())
    for name in ("sums_scale", "root_scale"):
        with pytest.raises(ValidationError, match="power of two"):
            RefinementStatistics.model_validate({**body, name: 3.0 * body[name]})
    with pytest.raises(ValidationError, match="root_rows"):
        RefinementStatistics.model_validate({**body, "root_rows": 5, "counts": [1] * 4, "min_group_size": 1})
    assert (
        wire_scale(0.0) == 1.0 and wire_scale(0.75) == 1.0 and wire_scale(1.0) == 2.0 and wire_scale(1e-30) == 2.0**-64
    )


def test_labels_under_the_minimum_group_are_left_out_of_every_statistic() -> None:
    z, _ = _data(12)
    names, counts, sums, gram = statistics(z, ["a"] * 7 + ["b"] * 4 + ["c"], 5)
    assert names == ["a"] and counts == [7]
    assert np.allclose(gram, z[:7].T @ z[:7]) and np.allclose(sums[0], z[:7].sum(0))
    assert statistics(z, ["a"] * 4 + ["b"] * 8, 9) is None


def test_the_payload_validates_and_the_hub_refuses_what_does_not_fit() -> None:
    z, y = _data(200, dim=16)
    req = _request(16)
    st = make_statistics("site-a", req, "cd" * 16, 5, *wire_statistics(z, y, 5))
    payload = st.model_dump_json().encode()
    again = make_statistics("site-a", req, "cd" * 16, 5, *wire_statistics(z, y, 5))
    assert again.statistics_id == st.statistics_id  # derived from the content
    ok = parse_statistics(payload, "site-a", KEY, 16, 5, 1 << 16)
    assert ok.n_samples == 200
    for args, code in (
        (("site-b", KEY, 16, 5), "site_mismatch"), (("site-a", "f" * 16, 16, 5), "stale"),
        (("site-a", KEY, 32, 5), "dimension"), (("site-a", KEY, 16, 80), "group_size"),
    ):  # fmt: skip
        with pytest.raises(Rejected) as err:
            parse_statistics(payload, *args, 1 << 16)
        assert err.value.code == code
    body = json.loads(payload)
    body["root"] = body["sums"]
    with pytest.raises(Rejected) as err:
        parse_statistics(json.dumps(body).encode(), "site-a", KEY, 16, 5, 1 << 16)
    assert err.value.code == "invalid" and "upper triangle" in err.value.reason
    with pytest.raises(ValueError, match="more than once"):
        RefinementStatistics.model_validate({**json.loads(payload), "labels": ["0", "0", "2", "3"]})


def test_the_model_outputs_the_projected_features_and_the_refined_model_scores_with_the_solved_head(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    fm = FeatureMap(dim=8, n_features=64, bandwidth=0.7, seed=3)
    proj = Projection(fm, dim=12, seed=0)
    images = np.random.default_rng(1).random((40, 1, 8, 8), dtype=np.float32)
    labels = [str(i % 3) for i in range(40)]
    phi = FeatureExtractor(tiny_bundle / "encoder.onnx", fm).features(images)
    z = proj.transform(phi)
    head = solve(sum_stats([ContributionStats.from_features("a" * 32, KEY, z, np.array(labels))]))
    path = tmp_path / "refined.onnx"
    path.write_bytes(refined_onnx(tiny_bundle / "encoder.onnx", proj, head))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["logits", OUTPUT]
    logits, out = sess.run(None, {"image": images})
    assert np.abs(out - z).max() < 1e-4
    assert np.abs(logits - head.logits(z)).max() < 1e-3
    assert (logits.argmax(1) == head.predict(z)).mean() > 0.95
    # The edge reads the same output, in batches, without torch.
    assert np.abs(projected_features(path, "image", OUTPUT, images) - z).max() < 1e-4
    # Adding the output twice is a no-op; a model without random features cannot be refined.
    data = path.read_bytes()
    assert with_feature_output(data, proj) == data
    with pytest.raises(ValueError, match="only closed-form models"):
        with_feature_output((tiny_bundle / "encoder.onnx").read_bytes(), proj)


def test_the_ledger_ties_statistics_to_the_sites_active_contribution(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    emb = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    c1 = make_contribution("site-a", "enc", emb, ["0"] * 10 + ["1"] * 10, k=1)
    ledger.ingest(c1, c1.to_json_bytes())
    z, y = _data(100, dim=6)
    req = _request(6)
    st = make_statistics("site-a", req, c1.contribution_id, 5, *wire_statistics(z, y, 5))
    payload = st.model_dump_json().encode()
    assert ledger.ingest_refinement(st, payload) is True
    assert ledger.ingest_refinement(st, payload) is False  # a redelivery
    assert [r[0] for r in ledger.active_refinements(KEY)] == [st.statistics_id]
    # The site replaces its contribution (a forget request): its statistics leave with the old one.
    c2 = make_contribution("site-a", "enc", emb[:10], ["0"] * 10, k=1, supersedes=c1.contribution_id)
    ledger.ingest(c2, c2.to_json_bytes())
    assert ledger.active_refinements(KEY) == []
    assert ledger.refinements_based_on([c1.contribution_id]) == [st.statistics_id]
    stale = make_statistics("site-a", req, c1.contribution_id, 5, *wire_statistics(z[:50], y[:50], 5))
    with pytest.raises(Rejected) as err:
        ledger.ingest_refinement(stale, stale.model_dump_json().encode())
    assert err.value.code == "stale"
    ledger.close()


def test_refinement_needs_the_closed_form_model() -> None:
    from pydantic import ValidationError

    from hub.config import HubSettings

    r = HubSettings(rounds={"refine": True}).rounds
    assert (r.refine_features, r.refine_dim, r.refine_lam, r.refine_lams) == ("auto", 128, 1e-4, [1e-3, 1e-2, 1e-1])
    with pytest.raises(ValidationError, match="refine_lams"):
        HubSettings(rounds={"refine": True, "refine_lams": [0.0]})
    with pytest.raises(ValidationError, match="rounds.refine needs model closed_form"):
        HubSettings(rounds={"refine": True}, model="cnn")
    # lda's within-class scatter is not kept positive semi-definite by the float16 statistics (docs/mqtt.md)
    with pytest.raises(ValidationError, match="closed_form.variant ridge or ridge-balanced"):
        HubSettings(rounds={"refine": True}, closed_form={"variant": "lda"})
    assert HubSettings(closed_form={"variant": "lda"}).closed_form.variant == "lda"  # without refinement it stays


def test_statistics_beyond_the_features_are_refused_and_an_unsolvable_sum_delivers_no_refined_model(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """Honest statistics of the projected features pass `plausible`; the same scaled by 1e8 (a broken model, a forged
    upload) are refused with a reason. Had such statistics been recorded anyway (before the check existed), the sum
    gives a singular ridge system: `fit` logs it and returns None, so the round delivers the synthesis model."""
    from hub.refinement import Refinement

    ledger = Ledger(tmp_path / "ledger.sqlite")
    fm = FeatureMap(dim=8, n_features=64, seed=0)
    proj = Projection(fm, dim=12, kind="rff")
    ref = Refinement(ledger, proj, tiny_bundle / "encoder.onnx", "enc", signing.Ed25519PrivateKey.generate(), 5,
                     1 << 20, 60.0, lam=1e-4, lams=(1e-3,))  # fmt: skip
    ref.feature_key = KEY
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(60, 8))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)  # unit embeddings, as every bundled encoder outputs
    z, y = proj.features(emb), [str(i % 3) for i in range(60)]
    c = make_contribution("site-a", "enc", emb.astype(np.float32), ["0"] * 30 + ["1"] * 30, k=1)
    ledger.ingest(c, c.to_json_bytes())
    honest = make_statistics("site-a", _request(12), c.contribution_id, 5, *wire_statistics(z, y, 5))
    ref.plausible(honest)
    forged = make_statistics("site-a", _request(12), c.contribution_id, 5, *wire_statistics(z * 1e8, y, 5))
    with pytest.raises(Rejected) as err:
        ref.ingest("site-a", forged.model_dump_json().encode())
    assert err.value.code == "invalid" and "beyond what the requested features can produce" in err.value.reason
    assert ledger.active_refinements(KEY) == []  # nothing recorded
    assert ledger.ingest_refinement(forged, forged.model_dump_json().encode())  # as if recorded before the check
    with warnings.catch_warnings():  # singular, or so ill-conditioned that scipy warns: unusable either way
        warnings.simplefilter("error", scipy.linalg.LinAlgWarning)
        with pytest.raises((np.linalg.LinAlgError, scipy.linalg.LinAlgWarning)):
            solve(sum_stats([to_stats(forged)]), lam=1e-4)
    assert ref.fit({"0", "1", "2"}) is None
    ledger.close()


def test_over_the_embedding_the_model_outputs_its_projection_and_every_lambda_is_a_head(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """refine_features embedding: z = e P over the encoder's embedding, read from the synthesis model and from the
    refined one; extra lambdas are outputs head_refined_<i> after the feature output, each the solved head's logits."""
    from hub.learning.closed_form import ClosedFormHead, to_onnx

    fm = FeatureMap(dim=8, n_features=64, bandwidth=0.7, seed=3)
    proj = Projection(fm, dim=6, seed=0, kind="embedding")
    assert proj.matrix.shape == (8, 6) and proj.key("enc") != Projection(fm, dim=6, seed=0).key("enc")
    # auto: the embedding when it is at least as wide as the projection, else the random features
    assert Projection(fm, dim=8, kind="auto").kind == "embedding" and Projection(fm, dim=9, kind="auto").kind == "rff"
    images = np.random.default_rng(1).random((40, 1, 8, 8), dtype=np.float32)
    labels = [str(i % 3) for i in range(40)]
    emb = FeatureExtractor(tiny_bundle / "encoder.onnx", fm).embed(images)
    z = proj.features(emb)
    assert np.abs(z - emb.astype(np.float64) @ proj.matrix.astype(np.float64)).max() < 1e-12
    # The synthesis (closed-form) model a refining hub delivers first: its embedding is projected.
    dummy = ClosedFormHead(np.zeros((64, 3)), np.zeros(3), ("0", "1", "2"), "ridge-balanced", 1e-6, "x")
    first = tmp_path / "first.onnx"
    first.write_bytes(with_feature_output(to_onnx(tiny_bundle / "encoder.onnx", fm, dummy), proj))
    assert np.abs(projected_features(first, "image", OUTPUT, images) - z).max() < 1e-4
    total = sum_stats([ContributionStats.from_features("a" * 32, KEY, z, np.array(labels))])
    head = solve(total, lam=1e-4)
    extra = [solve(total, head.label_names, lam=lam) for lam in (1e-6, 1e-1)]
    path = tmp_path / "refined.onnx"
    path.write_bytes(refined_onnx(tiny_bundle / "encoder.onnx", proj, head, extra))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["logits", OUTPUT, head_name(0), head_name(1)]
    logits, out, h0, h1 = sess.run(None, {"image": images})
    assert np.abs(out - z).max() < 1e-4
    assert np.abs(logits - head.logits(z)).max() < 1e-3
    assert np.abs(h0 - extra[0].logits(z)).max() < 1e-3 and np.abs(h1 - extra[1].logits(z)).max() < 1e-3
    assert not np.allclose(h0, h1)  # the lambdas give different heads
    meta = {p.key: p.value for p in __import__("onnx").load(str(path)).metadata_props}
    assert [h["lam"] for h in json.loads(meta["fedge.refined_heads"])] == [1e-6, 1e-1]
    assert with_feature_output(path.read_bytes(), proj) == path.read_bytes()
    with pytest.raises(ValueError, match="only closed-form models"):
        with_feature_output((tiny_bundle / "encoder.onnx").read_bytes(), proj)


def test_over_embedding_and_random_features_the_embedding_stays_whole_and_the_model_matches_the_hub(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """refine_features embedding+rff: z = [e, phi P'] (the embedding in the first E columns, untouched); the first
    model and the refined one output the hub's z, and the refined logits are the head over both parts."""
    from hub.learning.closed_form import ClosedFormHead, to_onnx

    fm = FeatureMap(dim=8, n_features=64, bandwidth=0.7, seed=3)
    proj = Projection(fm, dim=14, seed=0, kind="embedding+rff")
    assert proj.matrix.shape == (72, 14) and proj.d_in == 72
    assert (
        np.array_equal(proj.matrix[:8, :8], np.eye(8))
        and not proj.matrix[8:, :8].any()
        and not proj.matrix[:8, 8:].any()
    )
    assert (
        len({proj.key("enc"), Projection(fm, dim=14, seed=0).key("enc"), Projection(fm, 14, 0, "embedding").key("enc")})
        == 3
    )
    with pytest.raises(ValueError, match="above the embedding"):
        Projection(fm, dim=8, kind="embedding+rff")
    images = np.random.default_rng(1).random((40, 1, 8, 8), dtype=np.float32)
    labels = [str(i % 3) for i in range(40)]
    emb = FeatureExtractor(tiny_bundle / "encoder.onnx", fm).embed(images)
    z = proj.features(emb)
    assert np.abs(z[:, :8] - emb).max() < 1e-12
    assert np.abs(z[:, 8:] - fm.transform(emb) @ proj.matrix[8:, 8:].astype(np.float64)).max() < 1e-12
    dummy = ClosedFormHead(np.zeros((64, 3)), np.zeros(3), ("0", "1", "2"), "ridge-balanced", 1e-6, "x")
    first = tmp_path / "first.onnx"
    first.write_bytes(with_feature_output(to_onnx(tiny_bundle / "encoder.onnx", fm, dummy), proj))
    assert np.abs(projected_features(first, "image", OUTPUT, images) - z).max() < 1e-4
    head = solve(sum_stats([ContributionStats.from_features("a" * 32, KEY, z, np.array(labels))]), lam=1e-4)
    extra = [solve(sum_stats([ContributionStats.from_features("a" * 32, KEY, z, np.array(labels))]), lam=1e-2)]
    path = tmp_path / "refined.onnx"
    path.write_bytes(refined_onnx(tiny_bundle / "encoder.onnx", proj, head, extra))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["logits", OUTPUT, head_name(0)]
    logits, out, h0 = sess.run(None, {"image": images})
    assert np.abs(out - z).max() < 1e-4
    assert np.abs(logits - head.logits(z)).max() < 1e-3 and np.abs(h0 - extra[0].logits(z)).max() < 1e-3
    meta = {p.key: p.value for p in __import__("onnx").load(str(path)).metadata_props}
    folded = ClosedFormHead(proj.matrix.astype(np.float64) @ head.weights, head.bias, head.label_names, head.variant,
                            head.lam, head.trained_on)  # fmt: skip
    assert json.loads(meta["fedge.head"])["digest"] == folded.digest()  # the whole folded head, as for rff
    assert with_feature_output(path.read_bytes(), proj) == path.read_bytes()


def test_the_hub_solves_one_head_per_lambda_from_the_same_sum(tmp_path: Path) -> None:
    """Refinement with extra lambdas: `logits` at refine_lam, head_refined_<i> at each extra one, all from one sum,
    named in the model's head outputs; the head's digest names the sum, so a bit-identical refit of it covers all."""
    from hub.refinement import Refinement

    z, y = _data(dim=12)
    req = _request(12)
    payloads = {}
    for i, part in enumerate(np.array_split(np.arange(len(y)), 3)):
        made = wire_statistics(z[part], [y[j] for j in part], 5)
        assert made is not None
        st = make_statistics(f"site-{i}", req, f"{i:032x}", 5, *made)
        payloads[st.statistics_id] = st.model_dump_json().encode()
    fm = FeatureMap(dim=8, n_features=12, seed=0)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ref = Refinement(ledger, Projection(fm, dim=12, kind="rff"), tmp_path / "encoder.onnx", "enc",
                     signing.Ed25519PrivateKey.generate(), 5, 1 << 20, 60.0, lam=1e-4, lams=(1e-3, 1e-1))  # fmt: skip
    model = ref._solve(payloads, dict.fromkeys(payloads, "site"), ref.lam, ref.lams)
    total = sum_stats([to_stats(RefinementStatistics.model_validate_json(p)) for p in payloads.values()])
    assert model.head.digest() == solve(total, lam=1e-4).digest()
    assert [h.digest() for h in model.heads] == [solve(total, lam=lam).digest() for lam in (1e-3, 1e-1)]
    assert list(model.head_outputs()) == [head_name(0), head_name(1)]
    assert {h.trained_on for h in model.heads} == {model.head.trained_on} == {total.digest()}
    again = ref._solve(payloads, dict.fromkeys(payloads, "site"), ref.lam, ref.lams)
    assert [h.digest() for h in (again.head, *again.heads)] == [h.digest() for h in (model.head, *model.heads)]
    ledger.close()


def test_once_the_gate_chooses_a_refined_head_the_hub_solves_its_lambda_again_from_every_sample(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """The refit: training statistics give one head per lambda; a gate decision that served one of them, made on
    exactly these statistics, switches the plan to training + held-out statistics at that lambda alone (waiting for
    every site's held-out part); a changed training part (a forgotten site) goes back to choosing."""
    from hub.refinement import Refinement

    z, y = _data(1500, dim=12)  # every label has >= 5 samples in each held-out part
    ledger = Ledger(tmp_path / "ledger.sqlite")
    fm = FeatureMap(dim=8, n_features=12, seed=0)
    ref = Refinement(ledger, Projection(fm, dim=12, kind="rff"), tiny_bundle / "encoder.onnx", "enc",
                     signing.Ed25519PrivateKey.generate(), 5, 1 << 20, 60.0, lam=1e-4, lams=(1e-3, 1e-1))  # fmt: skip
    ref.feature_key = KEY
    emb = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    parts = np.array_split(np.arange(len(y)), 3)
    train_ids, trained, held = [], [], {}
    for i, idx in enumerate(parts):
        c = make_contribution(f"site-{i}", "enc", emb, ["0"] * 10 + ["1"] * 10, k=1)
        ledger.ingest(c, c.to_json_bytes())
        cut = len(idx) * 4 // 5
        st = make_statistics(f"site-{i}", _request(12), c.contribution_id, 5, *wire_statistics(z[idx[:cut]], [y[j] for j in idx[:cut]], 5))  # fmt: skip
        assert ledger.ingest_refinement(st, st.model_dump_json().encode())
        train_ids.append(st.statistics_id)
        trained.append(st)
        h = make_statistics(f"site-{i}", _request(12, part="held_out"), c.contribution_id, 5,
                            *wire_statistics(z[idx[cut:]], [y[j] for j in idx[cut:]], 5))  # fmt: skip
        assert h.part == "held_out" and h.statistics_id != st.statistics_id
        held[f"site-{i}"] = h
    sites = {f"site-{i}" for i in range(3)}
    plan = ref.plan()
    assert (plan.stage, plan.ids, plan.lam, plan.lams) == ("select", set(train_ids), 1e-4, (1e-3, 1e-1))
    assert ref.wants_round(0.0, sites)
    selected = ref.fit(set())
    assert selected is not None and selected.stage == "select" and len(selected.heads) == 2
    ledger.finish_round(ledger.request_round("refine"), [], 1, refinements=selected.trained_on)
    assert not ref.wants_round(1.0, sites)
    # Held-out statistics alone change nothing until the gate has chosen on these training statistics.
    ledger.ingest_refinement(held["site-0"], held["site-0"].model_dump_json().encode())
    assert ref.plan().stage == "select" and not ref.wants_round(2.0, sites)
    choice = {"version": 2, "head": "head_refined_0", "lam": 1e-3, "balanced_accuracy": 0.9, "statistics": sorted(train_ids)}  # fmt: skip
    assert ledger.record_gate(2, {"serve": "head_refined_0", "state": "served", "refit": choice}, b"{}")
    assert ledger.refit_choice() == choice
    plan = ref.plan()
    assert plan.stage == "refit" and plan.lam == 1e-3 and plan.lams == ()
    assert plan.ids == {*train_ids, held["site-0"].statistics_id}
    assert not ref.wants_round(3.0, sites)  # waits for every site's held-out part ...
    assert ref.wants_round(3.0 + 60.0, sites)  # ... or refine_wait_s
    for s in ("site-1", "site-2"):
        ledger.ingest_refinement(held[s], held[s].model_dump_json().encode())
    assert ref.wants_round(100.0, sites)
    refit = ref.fit(set())
    assert refit is not None and refit.stage == "refit" and refit.refit == choice and refit.heads == ()
    all_ids = [*train_ids, *(h.statistics_id for h in held.values())]
    assert sorted(refit.trained_on) == sorted(all_ids)
    # The same head as solving every part's statistics, as they travelled, pooled at the chosen lambda (and, up to the
    # wire's float16, the pooled samples); a refit from the stored payloads is identical.
    wire = sum_stats([to_stats(p) for p in (*trained, *held.values())])
    assert np.abs(refit.head.weights - solve(wire, lam=1e-3).weights).max() < 1e-9
    total = sum_stats([ContributionStats.from_features("x" * 32, KEY, z, np.array(y))])
    assert np.abs(refit.head.weights - solve(total, lam=1e-3).weights).max() < 1e-2 * np.abs(refit.head.weights).max()
    assert [h.digest() for h in ref.refit_heads_from_scratch(refit)] == [refit.head.digest()]
    # site-1 is forgotten: both its parts leave, and the plan chooses again from the training part.
    c = next(c for c in ledger.active() if c.site_id == "site-1")
    new = make_contribution("site-1", "enc", emb[:10], ["0"] * 10, k=1, supersedes=c.contribution_id)
    ledger.ingest(new, new.to_json_bytes())
    assert sorted(ledger.refinements_based_on([c.contribution_id])) == sorted(
        [train_ids[1], held["site-1"].statistics_id]
    )
    plan = ref.plan()
    assert plan.stage == "select" and plan.ids == {train_ids[0], train_ids[2]}
    ledger.close()
