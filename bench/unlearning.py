"""bench/unlearning: exact unlearning with the closed-form head, against retraining from scratch.

On the bench's own split (the bundled foundation model's public / private / test, private data over
N sites by Dirichlet(alpha)), for three forget cases (a whole site leaves; one label at one site;
1 % of the private samples at random across sites, whose sites re-encode what is left and send
superseding contributions), each compared with:
  - a closed-form refit from scratch without the forgotten data (statistics recomputed from the
    cached synthetic images of every remaining contribution, not reused), and
  - an honest retrain of today's CNN (hub.rounds.train_on_synthetic) on the same cached synthesis.
Reports test accuracy and balanced accuracy, accuracy on the forgotten real samples, membership
inference AUC on the forgotten samples against fresh non-members (test samples): a loss-threshold
attack and ART's black-box attack; agreement of the unlearned and retrained models' test
predictions (and whether they are bit-identical); wall times and their ratio.
Writes bench/results/unlearning.json, unlearning.md, unlearning.png.

    python -m bench.unlearning            # digits and MNIST, 3 seeds, 20 sites, Dirichlet 0.1, k=16
    python -m bench.unlearning --quick    # digits, 1 seed: a couple of minutes
    python -m bench.unlearning --select   # choose D, bandwidth, lambda and the variant on validation data
    python -m bench.unlearning --quick --refine   # also the refinement round (rounds.refine* defaults): -refine files

The hyper-parameters of the head are chosen by `--select`, which never reads the test split: sites
are simulated on 70 % of the public split and models scored on the other 30 % (bench/tune_synthesis's
protocol); it writes bench/results/unlearning-select.json.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

import bundled
from bench.fgl import RESULTS, SYNTHESIS
from contract.payloads import Contribution
from edge.contribution import make_contribution
from edge.encoder import OnnxEncoder
from hub import datasets
from hub.classifier import predict
from hub.foundation.bundle import Foundation
from hub.foundation.bundle import load as load_foundation
from hub.learning.closed_form import (
    VARIANTS,
    ContributionStats,
    FeatureExtractor,
    FeatureMap,
    solve,
    sum_stats,
    to_onnx,
)
from hub.rounds import TrainConfig, label_space, train_on_synthetic
from hub.synthesis import SynthesisConfig, Synthesizer, SyntheticSet

CASES = ("site", "label", "random-1pct")


@dataclass(frozen=True)
class Setting:
    """What one run covers; every seed and id derives from `seeds`."""

    datasets: tuple[str, ...] = ("digits", "mnist")
    seeds: tuple[int, ...] = (0, 1, 2)
    sites: int = 20
    alpha: float = 0.1
    k: int = 16
    min_group_size: int = 5
    forget_frac: float = 0.01
    epochs: int = 30
    # The head, chosen by --select on validation data (bench/results/unlearning-select.json, digits,
    # 3 seeds): ridge-balanced led every D; D=512 and D=1024 tied for the best mean accuracy (0.957)
    # and the larger D is taken because MNIST's synthetic sets are 2-3 times larger.
    n_features: int = 1024
    bandwidth: float = 0.7
    variant: str = "ridge-balanced"
    lam: float = 1e-6
    refine: bool = False  # --refine: also the refinement round (rounds.refine* defaults), forgotten and re-solved


QUICK = Setting(datasets=("digits",), seeds=(0,))


def derive(*parts: object) -> int:
    """A 63-bit seed from the bench seed and a purpose, so that every random choice repeats exactly."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def contribution_id(*parts: object) -> str:
    """A deterministic contribution id (32 hex digits) instead of a random uuid."""
    return hashlib.sha256("/".join(str(p) for p in parts).encode()).hexdigest()[:32]


@dataclass
class World:
    """One dataset's data, foundation model, split and embeddings, as bench/fgl builds them."""

    name: str
    data: datasets.Dataset
    fm: Foundation
    split: datasets.Split
    emb: np.ndarray  # edge embeddings of every private and test sample (zeros elsewhere)


def load_world(name: str) -> World:
    """The bundled split (checked against the manifest) and the edges' own embeddings."""
    data = datasets.load(name)
    fm = load_foundation(bundled.path(name))
    ds = fm.manifest["dataset"]
    sp = datasets.split(len(data.labels), ds["split_seed"], ds["public_frac"], ds["test_frac"])
    if sp.public_hash() != ds["public_indices_sha256"]:
        raise RuntimeError(f"split of {name} differs from the one the bundled model was trained on")
    emb = OnnxEncoder(bundled.path(name) / "encoder.onnx", prefer_cuda=False).encode(data.images)
    return World(name, data, fm, sp, emb)


def site_contribution(w: World, idx: np.ndarray, site: str, cid: str, st: Setting, seed: int) -> Contribution:
    """A site's upload from the samples `idx`, with a deterministic id."""
    c = make_contribution(
        site, w.fm.encoder_id, w.emb[idx], np.array(w.data.label_names)[w.data.labels[idx]],
        k=st.k, min_group_size=st.min_group_size, seed=seed,
    )  # fmt: skip
    return c.model_copy(update={"contribution_id": cid})


def cnn_predict(model: torch.nn.Module, names: tuple[str, ...], w: World, images: np.ndarray) -> np.ndarray:
    """CNN predictions as dataset label indices."""
    index = np.array([w.data.label_names.index(x) for x in names])
    return index[predict(model, images)]


def onnx_logits(model_bytes: bytes, images: np.ndarray) -> np.ndarray:
    """Logits of a delivered model run the way a site runs it (onnxruntime, CPU)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"image": images.astype(np.float32)})[0]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@torch.no_grad()
def cnn_probs(model: torch.nn.Module, names: tuple[str, ...], w: World, images: np.ndarray) -> np.ndarray:
    """CNN class probabilities over the dataset's label order."""
    logits = model(torch.from_numpy(images.astype(np.float32))).numpy()
    out = np.zeros((len(images), len(w.data.label_names)))
    out[:, [w.data.label_names.index(x) for x in names]] = softmax(logits)
    return out


def head_probs(model_bytes: bytes, names: tuple[str, ...], w: World, images: np.ndarray) -> np.ndarray:
    """Closed-form model probabilities (softmax of its logits) over the dataset's label order."""
    out = np.zeros((len(images), len(w.data.label_names)))
    out[:, [w.data.label_names.index(x) for x in names]] = softmax(onnx_logits(model_bytes, images))
    return out


def probs_of(model: bytes | torch.nn.Module, names: tuple[str, ...], w: World, images: np.ndarray) -> np.ndarray:
    """Class probabilities of a closed-form ONNX model (bytes) or a CNN, over the dataset's label order."""
    if isinstance(model, bytes):
        return head_probs(model, names, w, images)
    return cnn_probs(model, names, w, images)


def mia_auc(
    probs: dict[str, np.ndarray], labels: dict[str, np.ndarray], seed: int
) -> tuple[float | None, float | None]:
    """Membership-inference AUC on the forgotten samples against fresh non-members (test samples).

    `probs`/`labels` hold "forgotten" (judged members), "test" (non-members) and "known" (remaining
    private samples: true members the attacker may train on). Loss threshold: lower loss -> member.
    ART black box: a random forest on (probabilities, label), trained on known members against half
    of the test samples, scored on the forgotten samples against the other half.
    """
    if len(labels["forgotten"]) == 0:
        return None, None

    def loss(p: np.ndarray, y: np.ndarray) -> np.ndarray:
        return -np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None))

    y_true = np.r_[np.ones(len(labels["forgotten"])), np.zeros(len(labels["test"]))]
    scores = -np.r_[loss(probs["forgotten"], labels["forgotten"]), loss(probs["test"], labels["test"])]
    loss_auc = float(roc_auc_score(y_true, scores))

    from art.attacks.inference.membership_inference import MembershipInferenceBlackBox
    from art.estimators.classification import BlackBoxClassifier
    from sklearn.ensemble import RandomForestClassifier

    nc = probs["test"].shape[1]
    rng = np.random.default_rng(derive(seed, "mia"))
    order = rng.permutation(len(labels["test"]))
    half = len(order) // 2
    fit_out, eval_out = order[:half], order[half:]
    known = rng.permutation(len(labels["known"]))[:half]
    onehot = lambda y: np.eye(nc)[y]  # noqa: E731
    est = BlackBoxClassifier(lambda x: np.zeros((len(x), nc)), (1,), nc)
    attack = MembershipInferenceBlackBox(est, input_type="prediction", attack_model_type="rf")
    # Set after construction: ART's parameter check calls len() on an unfitted forest, which
    # scikit-learn >= 1.6 refuses; a seeded forest also makes the AUC repeat exactly.
    attack.attack_model = RandomForestClassifier(n_estimators=100, random_state=derive(seed, "mia-rf") % 2**31)
    attack.fit(
        y=onehot(labels["known"][known]), pred=probs["known"][known].astype(np.float32),
        test_y=onehot(labels["test"][fit_out]), test_pred=probs["test"][fit_out].astype(np.float32),
    )  # fmt: skip
    member = attack.infer(
        None, onehot(labels["forgotten"]), pred=probs["forgotten"].astype(np.float32), probabilities=True
    )
    other = attack.infer(None, onehot(labels["test"][eval_out]), pred=probs["test"][eval_out].astype(np.float32), probabilities=True)  # fmt: skip
    y_art = np.r_[np.ones(len(member)), np.zeros(len(other))]
    art_auc = float(roc_auc_score(y_art, np.r_[np.asarray(member)[:, -1], np.asarray(other)[:, -1]]))
    return loss_auc, art_auc


def stats_of(
    synthetic: dict[str, SyntheticSet], ids: list[str], extractor: FeatureExtractor
) -> dict[str, ContributionStats]:
    """Statistics of each contribution from its own synthetic images."""
    return {cid: ContributionStats.from_synthetic(synthetic[cid], cid, extractor) for cid in ids}


def closed_form_model(
    stats: dict[str, ContributionStats], w: World, fmap: FeatureMap, st: Setting
) -> tuple[bytes, np.ndarray, np.ndarray]:
    """Sum, solve and compose: the ONNX bytes and the head's weights and bias."""
    head = solve(sum_stats(list(stats.values())), variant=st.variant, lam=st.lam)  # type: ignore[arg-type]
    return to_onnx(bundled.path(w.name) / "encoder.onnx", fmap, head), head.weights, head.bias


def forget_plan(
    w: World, parts: tuple[np.ndarray, ...], case: str, st: Setting, seed: int
) -> tuple[np.ndarray, set[int]]:
    """Which private samples are forgotten and which sites are affected."""
    rng = np.random.default_rng(derive(seed, "forget", case))
    if case == "site":
        s = int(rng.integers(len(parts)))
        return parts[s], {s}
    if case == "label":
        # A (site, label) pair that gave the site's upload at least one prototype.
        pairs = [
            (s, int(lab))
            for s, p in enumerate(parts)
            for lab in np.unique(w.data.labels[p])
            if (w.data.labels[p] == lab).sum() >= st.min_group_size
        ]
        s, lab = pairs[int(rng.integers(len(pairs)))]
        return parts[s][w.data.labels[parts[s]] == lab], {s}
    n = max(1, round(st.forget_frac * len(w.split.private)))
    gone = np.sort(rng.choice(w.split.private, n, replace=False))
    return gone, {s for s, p in enumerate(parts) if np.isin(p, gone).any()}


def refine_payloads(
    w: World, parts: dict[str, np.ndarray], proj, st: Setting, extractor: FeatureExtractor
) -> dict[str, bytes]:
    """Each site's refinement statistics as it sends them (edge.refine: float32 JSON), keyed by contribution id:
    the site encodes its own images (fixed batches) and projects them (`proj.features`, the twin of the model's
    `fedge_refine_features` output). Sites without a label of at least the minimum group send nothing."""
    from contract.payloads import RefinementRequest
    from edge.refine import make_statistics, wire_statistics

    request = RefinementRequest.model_construct(feature_key=proj.key(w.fm.encoder_id), model_version=1)
    out = {}
    for cid, idx in parts.items():
        if not len(idx):
            continue
        z = proj.features(extractor.embed(w.data.images[idx]))
        made = wire_statistics(z, list(np.array(w.data.label_names)[w.data.labels[idx]]), st.min_group_size)
        if made is not None:
            out[cid] = (
                make_statistics(f"site-{cid[:8]}", request, cid, st.min_group_size, *made).model_dump_json().encode()
            )
    return out


def refined_model(payloads: dict[str, bytes], w: World, proj, st: Setting) -> tuple[bytes, list]:
    """What the hub's refinement round does with the active statistics (hub.refinement.Refinement._solve and fit):
    parse, sum in id order, solve the `logits` head and one head per extra lambda, compose the refined ONNX."""
    from contract.payloads import RefinementStatistics
    from hub.config import RoundPolicy
    from hub.refinement.features import refined_onnx
    from hub.refinement.statistics import to_stats

    rp = RoundPolicy()
    stats = [to_stats(RefinementStatistics.model_validate_json(payloads[k])) for k in sorted(payloads)]
    total = sum_stats(stats)
    head = solve(total, variant=st.variant, lam=rp.refine_lam)  # type: ignore[arg-type]
    extra = [solve(total, head.label_names, variant=st.variant, lam=lam) for lam in rp.refine_lams]  # type: ignore[arg-type]
    return refined_onnx(bundled.path(w.name) / "encoder.onnx", proj, head, extra), [head, *extra]


def refine_case(
    w: World, st: Setting, proj, stored: dict[str, bytes], site_idx: dict[str, np.ndarray], parts, affected: set[int],
    gone: np.ndarray, contribs: dict, seed: int, case: str, extractor: FeatureExtractor, row: dict, preds: dict,
    y_test: np.ndarray,
) -> dict:  # fmt: skip
    """One forget case through the refinement round. Unlearned: the removed sites' stored statistics dropped, the
    superseding statistics of what they kept added (computed at the sites, timed apart), re-summed, solved (every
    head), composed. Retrained: every remaining site recomputes its statistics from its images, then the same solve."""
    removed = {contribs[s].contribution_id for s in affected}
    left = {contribution_id(seed, s, case, "refine"): parts[s][~np.isin(parts[s], gone)] for s in sorted(affected)}
    t = time.perf_counter()
    superseding = refine_payloads(w, left, proj, st, extractor)
    site_s = time.perf_counter() - t
    t = time.perf_counter()
    kept = {k: v for k, v in stored.items() if k not in removed} | superseding
    unlearned, heads_u = refined_model(kept, w, proj, st)
    unlearn_s = time.perf_counter() - t
    t = time.perf_counter()
    remaining = {k: v for k, v in site_idx.items() if k not in removed} | left
    fresh_extractor = FeatureExtractor(bundled.path(w.name) / "encoder.onnx", proj.feature_map)
    retrained, heads_r = refined_model(refine_payloads(w, remaining, proj, st, fresh_extractor), w, proj, st)
    retrain_s = time.perf_counter() - t
    names = tuple(json.loads(ort.InferenceSession(unlearned).get_modelmeta().custom_metadata_map["fedge.labels"]))
    x_test = w.data.images[w.split.test]
    p_u = probs_of(unlearned, names, w, x_test).argmax(1)
    p_r = probs_of(retrained, names, w, x_test).argmax(1)
    same = all(np.array_equal(a.weights, b.weights) and np.array_equal(a.bias, b.bias) for a, b in zip(heads_u, heads_r, strict=True))  # fmt: skip
    return {
        "refine_features": proj.kind, "refine_heads": len(heads_u),
        "refine_acc_unlearned": float((p_u == y_test).mean()), "refine_acc_retrained": float((p_r == y_test).mean()),
        "refine_bal_acc_unlearned": float(balanced_accuracy_score(y_test, p_u)),
        "refine_bal_acc_retrained": float(balanced_accuracy_score(y_test, p_r)),
        "refine_agreement": float((p_u == p_r).mean()), "refine_bit_identical": bool(same and unlearned == retrained),
        "refine_unlearn_s": unlearn_s, "refine_retrain_s": retrain_s, "refine_superseding_site_s": site_s,
        "refine_speedup_vs_cnn": row["cnn_retrain_s"] / unlearn_s, "refine_speedup_vs_retrain": retrain_s / unlearn_s,
        "refine_acc_minus_cnn": float((p_u == y_test).mean()) - row["acc_cnn_retrained"],
    }  # fmt: skip


def run_seed(w: World, st: Setting, seed: int, cache: Path, log) -> list[dict]:
    """Every forget case for one dataset and one seed."""
    torch.manual_seed(derive(seed, "torch"))
    sp, data = w.split, w.data
    # Seeded like bench/fgl (seed 0 gives exactly its sites), so the CNN figures compare with its table.
    parts = datasets.dirichlet_sites(data.labels, sp.private, st.sites, st.alpha, seed=seed)
    synthesizer = Synthesizer(w.fm, replace(SYNTHESIS.get(w.name, SynthesisConfig()), seed=seed), cache, progress=False)
    contribs = {
        s: site_contribution(w, p, f"site{s:02d}", contribution_id(seed, s), st, seed) for s, p in enumerate(parts)
    }
    t = time.perf_counter()
    synthetic = {c.contribution_id: synthesizer.synthesize(c) for c in contribs.values()}
    synth_s = time.perf_counter() - t
    fmap = FeatureMap(w.fm.dim, st.n_features, st.bandwidth, seed=derive(seed, "rff"))
    extractor = FeatureExtractor(bundled.path(w.name) / "encoder.onnx", fmap, threads=1)
    t = time.perf_counter()
    stats = stats_of(synthetic, sorted(synthetic), extractor)
    stats_s = time.perf_counter() - t
    t = time.perf_counter()
    before, _, _ = closed_form_model(stats, w, fmap, st)
    train_cfg = TrainConfig(epochs=st.epochs, seed=derive(seed, "cnn") % 2**31)
    mb = sum(s.nbytes for s in stats.values()) / len(stats) / 1e6
    log(f"[{w.name} seed {seed}] synthesis {synth_s:.1f} s, stats {stats_s:.1f} s ({mb:.1f} MB/contribution), "
        f"model {time.perf_counter() - t:.1f} s")  # fmt: skip

    x_test, y_test = data.images[sp.test], data.labels[sp.test]
    if st.refine:
        from hub.config import RoundPolicy
        from hub.refinement.features import Projection

        rp = RoundPolicy()
        proj = Projection(fmap, rp.refine_dim, derive(seed, "refine") % 2**31, rp.refine_features)
        site_idx = {contribs[s].contribution_id: p for s, p in enumerate(parts)}
        refine_stored = refine_payloads(w, site_idx, proj, st, extractor)
        refine_up = float(np.mean([len(p) for p in refine_stored.values()]))
    rows = []
    for case in CASES:
        gone, affected = forget_plan(w, parts, case, st, seed)
        # The affected sites delete the data, re-encode what is left and send superseding uploads.
        removed = {contribs[s].contribution_id for s in affected}
        new = {}
        for s in sorted(affected):
            left = parts[s][~np.isin(parts[s], gone)]
            c = site_contribution(w, left, f"site{s:02d}", contribution_id(seed, s, case, 1), st, seed)
            if len(left) and c.labels:  # nothing left to prototype: a retraction, no new contribution
                new[c.contribution_id] = c
        t = time.perf_counter()
        synthetic_new = {cid: synthesizer.synthesize(c) for cid, c in new.items()}
        new_synth_s = time.perf_counter() - t
        synth = {**{k: v for k, v in synthetic.items() if k not in removed}, **synthetic_new}
        remaining_contribs = [c for c in contribs.values() if c.contribution_id not in removed] + list(new.values())

        # Unlearning: drop the removed statistics, add the superseding ones, re-sum in id order, solve.
        t = time.perf_counter()
        kept = {k: v for k, v in stats.items() if k not in removed}
        kept.update(stats_of(synthetic_new, sorted(synthetic_new), extractor))
        unlearned, w_u, b_u = closed_form_model(kept, w, fmap, st)
        unlearn_s = time.perf_counter() - t

        # Retraining from scratch: statistics recomputed from every remaining contribution's images.
        t = time.perf_counter()
        fresh = stats_of(synth, sorted(synth), FeatureExtractor(bundled.path(w.name) / "encoder.onnx", fmap))
        retrained, w_r, b_r = closed_form_model(fresh, w, fmap, st)
        retrain_s = time.perf_counter() - t

        names = label_space(remaining_contribs)
        t = time.perf_counter()
        cnn = train_on_synthetic(
            SyntheticSet.concat([synth[c] for c in sorted(synth)]), names, w.fm.image_size, train_cfg
        )
        cnn_s = time.perf_counter() - t

        names_u = tuple(json.loads(ort.InferenceSession(unlearned).get_modelmeta().custom_metadata_map["fedge.labels"]))
        names_b = tuple(json.loads(ort.InferenceSession(before).get_modelmeta().custom_metadata_map["fedge.labels"]))
        known = np.setdiff1d(sp.private, gone)
        sets = {"forgotten": gone, "test": sp.test, "known": known}
        lab = {k: data.labels[v] for k, v in sets.items()}
        models: dict[str, tuple[bytes | torch.nn.Module, tuple[str, ...]]] = {
            "before": (before, names_b), "unlearned": (unlearned, names_u), "retrained": (retrained, names_u),
            "cnn_retrained": (cnn, names),
        }  # fmt: skip
        row: dict = {"dataset": w.name, "seed": seed, "case": case, "forgotten_samples": int(len(gone)),
                     "affected_sites": len(affected), "superseding_contributions": len(new)}  # fmt: skip
        preds = {}
        for m, (model, model_names) in models.items():
            probs = {k: probs_of(model, model_names, w, data.images[v]) for k, v in sets.items()}
            preds[m] = probs["test"].argmax(1)
            row[f"acc_{m}"] = float((preds[m] == y_test).mean())
            row[f"bal_acc_{m}"] = float(balanced_accuracy_score(y_test, preds[m]))
            row[f"forgotten_acc_{m}"] = float((probs["forgotten"].argmax(1) == lab["forgotten"]).mean())
            row[f"mia_loss_auc_{m}"], row[f"mia_art_auc_{m}"] = mia_auc(probs, lab, seed)
        row["agreement"] = float((preds["unlearned"] == preds["retrained"]).mean())
        row["bit_identical"] = bool(np.array_equal(w_u, w_r) and np.array_equal(b_u, b_r) and unlearned == retrained)
        logits = onnx_logits(unlearned, x_test)
        head_logits = solve(sum_stats(list(kept.values())), variant=st.variant, lam=st.lam).logits(  # type: ignore[arg-type]
            extractor.features(x_test)
        )
        row["onnx_vs_numpy_max_abs"] = float(np.abs(logits - head_logits).max())
        row.update(
            unlearn_s=unlearn_s, cf_retrain_s=retrain_s, cnn_retrain_s=cnn_s, superseding_synthesis_s=new_synth_s,
            speedup_vs_cnn=cnn_s / unlearn_s, speedup_vs_cf_retrain=retrain_s / unlearn_s,
            speedup_vs_cnn_with_synthesis=(cnn_s + new_synth_s) / (unlearn_s + new_synth_s),
            stats_mb_per_contribution=mb, n_features=st.n_features, variant=st.variant, lam=st.lam,
        )  # fmt: skip
        if st.refine:
            row.update(refine_case(w, st, proj, refine_stored, site_idx, parts, affected, gone, contribs, seed, case,
                                   extractor, row, preds, y_test))  # fmt: skip
            row["refine_bytes_up_per_site"] = refine_up
            log(f"[{w.name} seed {seed} {case}] refinement ({row['refine_features']}, dim {rp.refine_dim}): bal. acc "
                f"unlearned {row['refine_bal_acc_unlearned']:.4f} retrained {row['refine_bal_acc_retrained']:.4f}, agree "
                f"{row['refine_agreement']:.4f} bit-identical {row['refine_bit_identical']}, unlearn "
                f"{row['refine_unlearn_s']:.2f} s vs refit {row['refine_retrain_s']:.2f} s")  # fmt: skip
        rows.append(row)
        log(f"[{w.name} seed {seed} {case}] forgot {len(gone)} ({len(affected)} sites): acc before/unl/retr/CNN "
            f"{row['acc_before']:.4f}/{row['acc_unlearned']:.4f}/{row['acc_retrained']:.4f}/{row['acc_cnn_retrained']:.4f}, "
            f"agree {row['agreement']:.4f} bit-identical {row['bit_identical']}, unlearn {unlearn_s:.2f} s vs "
            f"CF retrain {retrain_s:.2f} s vs CNN {cnn_s:.1f} s (+ synthesis {new_synth_s:.1f} s)")  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------- select


@dataclass(frozen=True)
class SelectGrid:
    """Candidates scored on validation data."""

    n_features: tuple[int, ...] = (512, 1024, 2000)
    bandwidths: tuple[float, ...] = (0.35, 0.5, 0.7)
    lams: tuple[float, ...] = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3)


def select(w: World, st: Setting, grid: SelectGrid, seed: int, cache: Path, log) -> list[dict]:
    """Validation accuracy of every candidate head (and of the CNN) for one dataset and seed.

    Sites are simulated on 70 % of the public split and scored on the other 30 %; the test split is
    never read.
    """
    rng = np.random.default_rng(derive(seed, "select"))
    pub = rng.permutation(w.split.public)
    cut = int(0.7 * len(pub))
    sim, val = np.sort(pub[:cut]), np.sort(pub[cut:])
    parts = datasets.dirichlet_sites(w.data.labels, sim, st.sites, st.alpha, seed=derive(seed, "select-sites"), min_size=5)  # fmt: skip
    synthesizer = Synthesizer(w.fm, replace(SYNTHESIS.get(w.name, SynthesisConfig()), seed=seed), cache, progress=False)
    contribs = [site_contribution(w, p, f"val{s:02d}", contribution_id(seed, "select", s), st, seed) for s, p in enumerate(parts)]  # fmt: skip
    synthetic = {c.contribution_id: synthesizer.synthesize(c) for c in contribs}
    x_val, y_val = w.data.images[val], w.data.labels[val]
    names = label_space(contribs)
    index = np.array([w.data.label_names.index(x) for x in names])
    out = []
    t = time.perf_counter()
    cnn = train_on_synthetic(
        SyntheticSet.concat([synthetic[c] for c in sorted(synthetic)]), names, w.fm.image_size,
        TrainConfig(epochs=st.epochs, seed=derive(seed, "cnn") % 2**31),
    )  # fmt: skip
    pred = cnn_predict(cnn, names, w, x_val)
    out.append({"dataset": w.name, "seed": seed, "model": "cnn", "val_acc": float((pred == y_val).mean()),
                "val_bal_acc": float(balanced_accuracy_score(y_val, pred)), "solve_s": time.perf_counter() - t})  # fmt: skip
    for d, bw in itertools.product(grid.n_features, grid.bandwidths):
        fmap = FeatureMap(w.fm.dim, d, bw, seed=derive(seed, "rff"))
        ex = FeatureExtractor(bundled.path(w.name) / "encoder.onnx", fmap)
        total = sum_stats(list(stats_of(synthetic, sorted(synthetic), ex).values()))
        f_val = ex.features(x_val)
        for variant, lam in itertools.product(VARIANTS, grid.lams):
            t = time.perf_counter()
            head = solve(total, names, variant=variant, lam=lam)  # type: ignore[arg-type]
            solve_s = time.perf_counter() - t
            pred = index[head.predict(f_val)]
            out.append({"dataset": w.name, "seed": seed, "model": "closed-form", "n_features": d, "bandwidth": bw,
                        "variant": variant, "lam": lam, "val_acc": float((pred == y_val).mean()),
                        "val_bal_acc": float(balanced_accuracy_score(y_val, pred)), "solve_s": solve_s})  # fmt: skip
        best = max(
            (r for r in out if r.get("n_features") == d and r.get("bandwidth") == bw), key=lambda r: r["val_acc"]
        )
        log(f"[select {w.name} seed {seed}] D={d} bw={bw}: best {best['variant']} lam={best['lam']} {best['val_acc']:.4f} (CNN {out[0]['val_acc']:.4f})")  # fmt: skip
    return out


def select_summary(rows: list[dict]) -> list[dict]:
    """Mean validation accuracy of each candidate over datasets and seeds, best first."""
    keys = sorted(
        {(r["n_features"], r["bandwidth"], r["variant"], r["lam"]) for r in rows if r["model"] == "closed-form"}
    )
    out = []
    for d, bw, v, lam in keys:
        grp = [r for r in rows if r["model"] == "closed-form" and (r["n_features"], r["bandwidth"], r["variant"], r["lam"]) == (d, bw, v, lam)]  # fmt: skip
        per_ds = {ds: float(np.mean([r["val_acc"] for r in grp if r["dataset"] == ds])) for ds in sorted({r["dataset"] for r in grp})}  # fmt: skip
        out.append({"n_features": d, "bandwidth": bw, "variant": v, "lam": lam, "val_acc_mean": float(np.mean(list(per_ds.values()))),
                    **{f"val_acc_{k}": a for k, a in per_ds.items()},
                    "val_bal_acc_mean": float(np.mean([r["val_bal_acc"] for r in grp])),
                    "solve_s": float(np.mean([r["solve_s"] for r in grp]))})  # fmt: skip
    return sorted(out, key=lambda r: -r["val_acc_mean"])


# --------------------------------------------------------------------------------------------- report


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation."""
    return float(np.mean(values)), float(np.std(values))


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and spread over seeds per (dataset, case)."""
    out = []
    skip = {"dataset", "seed", "case", "variant", "bit_identical", "refine_features", "refine_bit_identical"}
    for ds, case in sorted({(r["dataset"], r["case"]) for r in rows}, key=lambda k: (k[0], CASES.index(k[1]))):
        grp = [r for r in rows if (r["dataset"], r["case"]) == (ds, case)]
        s: dict = {
            "dataset": ds,
            "case": case,
            "seeds": len(grp),
            "bit_identical_all": all(r["bit_identical"] for r in grp),
        }
        if "refine_bit_identical" in grp[0]:
            s["refine_bit_identical_all"] = all(r["refine_bit_identical"] for r in grp)
            s["refine_features"] = grp[0]["refine_features"]
        for key in grp[0]:
            if key in skip or grp[0][key] is None or isinstance(grp[0][key], bool):
                continue
            vals = [r[key] for r in grp if r[key] is not None]
            s[key], s[f"{key}_std"] = mean_std(vals)
        out.append(s)
    return out


def pm(s: dict, key: str, digits: int = 3) -> str:
    """`mean ± std` of a summary field."""
    return f"{s[key]:.{digits}f} ± {s[key + '_std']:.{digits}f}"


def verdict(s: dict, a: str, b: str) -> str:
    """'tie' where the spreads (mean ± std) overlap, else which is higher."""
    if s["seeds"] < 2:
        return "one seed: no spread to judge"
    lo_a, hi_a = s[a] - s[a + "_std"], s[a] + s[a + "_std"]
    lo_b, hi_b = s[b] - s[b + "_std"], s[b] + s[b + "_std"]
    if hi_a >= lo_b and hi_b >= lo_a:
        return "tie"
    return "higher" if s[a] > s[b] else "lower"


def markdown(summary: list[dict], meta: dict) -> str:
    """The results as Markdown."""
    st = meta["setting"]
    lines = [
        "# bench/unlearning results",
        "",
        f"Machine: {meta['machine']}. Command: `{meta['command']}`, {meta['wall_s']:.0f} s"
        + ("." if meta.get("complete", True) else f" so far (**partial run**: finished {meta['done']})."),
        f"Setting: {st['sites']} sites, Dirichlet {st['alpha']}, k={st['k']}, seeds {st['seeds']}; head: {st['variant']}, "
        f"D={st['n_features']} random Fourier features (bandwidth {st['bandwidth']}), lambda={st['lam']} "
        "(chosen on validation data by `--select`, bench/results/unlearning-select.json). Mean ± std over seeds.",
        "",
        "Models: *before* = closed-form head on every contribution; *unlearned* = stored statistics of the removed "
        "contributions dropped, superseding ones added, re-summed in id order and solved; *retrained* = closed-form "
        "refit from scratch (statistics recomputed from the cached synthetic images of the remaining contributions); "
        "*CNN* = today's SmallCNN retrained from scratch on the same cached synthesis (hub.rounds.train_on_synthetic).",
        "",
        "## Accuracy (test split)",
        "",
        "| dataset | case | forgotten | before | unlearned | retrained | CNN retrained | unlearned vs CNN | bal. acc unlearned | bal. acc CNN |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['dataset']} | {s['case']} | {s['forgotten_samples']:.0f} | {pm(s, 'acc_before')} | {pm(s, 'acc_unlearned')} | "
            f"{pm(s, 'acc_retrained')} | {pm(s, 'acc_cnn_retrained')} | "
            f"{s['acc_unlearned'] - s['acc_cnn_retrained']:+.3f} ({verdict(s, 'acc_unlearned', 'acc_cnn_retrained')}) | "
            f"{pm(s, 'bal_acc_unlearned')} | {pm(s, 'bal_acc_cnn_retrained')} |"
        )
    lines += [
        "",
        "## Exactness and time",
        "",
        "| dataset | case | agreement unlearned/retrained | bit-identical (weights + ONNX bytes) | ONNX vs numpy max abs logit | "
        "unlearn s | closed-form retrain s | CNN retrain s | speed-up vs CNN | synthesis of superseding uploads s | speed-up vs CNN incl. that synthesis |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['dataset']} | {s['case']} | {s['agreement']:.4f} | {'yes, every seed' if s['bit_identical_all'] else '**no**'} | "
            f"{s['onnx_vs_numpy_max_abs']:.1e} | {pm(s, 'unlearn_s', 2)} | {pm(s, 'cf_retrain_s', 2)} | {pm(s, 'cnn_retrain_s', 1)} | "
            f"{pm(s, 'speedup_vs_cnn', 1)}x | {pm(s, 'superseding_synthesis_s', 1)} | {pm(s, 'speedup_vs_cnn_with_synthesis', 2)}x |"
        )
    if summary and "refine_bit_identical_all" in summary[0]:
        lines += [
            "",
            "## With the refinement round (--refine)",
            "",
            "The delivered model is the refinement round's (rounds.refine* defaults: features "
            f"{summary[0]['refine_features']}, every extra lambda a head): the sites' statistics of their own images. "
            "*Unlearned*: the removed sites' stored statistics dropped, the superseding statistics of what they kept "
            "added (made at the sites, timed apart), re-summed in id order, every head solved, ONNX composed. "
            "*Retrained*: every remaining site recomputes its statistics from its images, then the same solve. "
            "Speed-up vs CNN: the CNN retrain of the same case (today's monolithic model) over the unlearning time.",
            "",
            "| dataset | case | bal. acc unlearned | retrained | acc unlearned − CNN retrained | agreement | bit-identical (every head + ONNX bytes) | "
            "unlearn s | refit from scratch s | superseding statistics at the sites s | speed-up vs CNN | speed-up vs refit | up/site |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in summary:
            lines.append(
                f"| {s['dataset']} | {s['case']} | {pm(s, 'refine_bal_acc_unlearned')} | {pm(s, 'refine_bal_acc_retrained')} | "
                f"{s['refine_acc_minus_cnn']:+.3f} | {s['refine_agreement']:.4f} | "
                f"{'yes, every seed' if s['refine_bit_identical_all'] else '**no**'} | {pm(s, 'refine_unlearn_s', 3)} | "
                f"{pm(s, 'refine_retrain_s', 2)} | {pm(s, 'refine_superseding_site_s', 2)} | {pm(s, 'refine_speedup_vs_cnn', 0)}x | "
                f"{pm(s, 'refine_speedup_vs_retrain', 1)}x | {s['refine_bytes_up_per_site'] / 1024:.1f} KiB |"
            )
    lines += [
        "",
        "## Forgotten samples and membership inference",
        "",
        "Accuracy on the forgotten real samples, and membership-inference AUC on them against test samples (0.5 = chance): "
        "*loss* = loss-threshold attack; *ART* = adversarial-robustness-toolbox MembershipInferenceBlackBox (random forest "
        "on probabilities and label, trained on remaining private samples against half the test split).",
        "",
        "| dataset | case | n | forgotten acc before | unlearned | retrained | CNN retrained | loss AUC before | unlearned | retrained | CNN retrained | ART AUC before | unlearned | retrained | CNN retrained |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        cells = [pm(s, f"forgotten_acc_{m}") for m in ("before", "unlearned", "retrained", "cnn_retrained")]
        cells += [pm(s, f"mia_loss_auc_{m}") for m in ("before", "unlearned", "retrained", "cnn_retrained")]
        cells += [pm(s, f"mia_art_auc_{m}") for m in ("before", "unlearned", "retrained", "cnn_retrained")]
        lines.append(f"| {s['dataset']} | {s['case']} | {s['forgotten_samples']:.0f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Memory: {summary[0]['stats_mb_per_contribution']:.1f} MB of statistics per contribution at D={st['n_features']} "
        "(Gram D²·8 bytes + per-label sums), half that on disk (upper triangle).",
        "",
        "Speed-ups compare the model update (features of the superseding contributions' synthetic images, re-sum, solve, "
        "compose ONNX) with the CNN's training alone (its ONNX export not counted). The superseding contributions must "
        "be synthesized whichever model is trained; that time is shown separately and in the last ratio. With `--cache` "
        "pointing at a directory a previous run filled, that synthesis is a cache read and its time near zero.",
        "",
    ]
    return "\n".join(lines)


def plot(summary: list[dict], path: Path) -> None:
    """Test accuracy per model and wall times per case, one column per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dsets = sorted({s["dataset"] for s in summary})
    fig, axes = plt.subplots(2, len(dsets), figsize=(6 * len(dsets), 7), squeeze=False)
    for j, ds in enumerate(dsets):
        grp = [s for s in summary if s["dataset"] == ds]
        x = np.arange(len(grp))
        for i, m in enumerate(("before", "unlearned", "retrained", "cnn_retrained")):
            axes[0][j].bar(x + (i - 1.5) * 0.2, [s[f"acc_{m}"] for s in grp], 0.2,
                           yerr=[s[f"acc_{m}_std"] for s in grp], label=m)  # fmt: skip
        axes[0][j].set_xticks(x, [s["case"] for s in grp])
        lo = min(s[f"acc_{m}"] for s in grp for m in ("before", "unlearned", "retrained", "cnn_retrained"))
        axes[0][j].set_ylim(max(0.0, lo - 0.05), 1.0)
        axes[0][j].set_ylabel("test accuracy")
        axes[0][j].set_title(f"{ds}: accuracy after forgetting")
        for i, (key, lab) in enumerate(
            (
                ("unlearn_s", "unlearn (closed form)"),
                ("cf_retrain_s", "closed-form retrain"),
                ("cnn_retrain_s", "CNN retrain"),
            )
        ):
            axes[1][j].bar(
                x + (i - 1) * 0.27, [s[key] for s in grp], 0.27, yerr=[s[key + "_std"] for s in grp], label=lab
            )
        axes[1][j].set_yscale("log")
        axes[1][j].set_xticks(x, [s["case"] for s in grp])
        axes[1][j].set_ylabel("wall time (s, log)")
        axes[1][j].set_title(f"{ds}: time to the new model")
    axes[0][0].legend(fontsize=8, loc="lower left")
    axes[1][0].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_results(rows: list[dict], meta: dict, out: Path, stem: str) -> None:
    """JSON, Markdown and plot of the rows so far."""
    summary = summarize(rows)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(summary, meta) + "\n")
    plot(summary, out / f"{stem}.png")


def main(argv: list[str] | None = None) -> int:
    """Run the bench (or the validation selection) and write the results."""
    ap = argparse.ArgumentParser(
        prog="python -m bench.unlearning", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="digits, one seed")
    ap.add_argument("--select", action="store_true", help="score head candidates on validation data and exit")
    ap.add_argument("--datasets", nargs="+", help="override the datasets")
    ap.add_argument("--seeds", nargs="+", type=int, help="override the seeds")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--cache", type=Path, help="synthesis cache directory (default: a temporary one)")
    ap.add_argument("--refine", action="store_true", help="also the refinement round (rounds.refine* defaults)")
    args = ap.parse_args(argv)
    st = QUICK if args.quick else Setting()
    if args.datasets:
        st = replace(st, datasets=tuple(args.datasets))
    if args.seeds:
        st = replace(st, seeds=tuple(args.seeds))
    if args.refine:
        st = replace(st, refine=True)
    torch.set_num_threads(1)  # the bench machine is shared; one thread also keeps timings comparable
    start = time.perf_counter()
    log = lambda s: print(f"{time.perf_counter() - start:7.1f}s {s}", flush=True)  # noqa: E731
    command = "python -m bench.unlearning" + " ".join(
        [""] + (["--quick"] if args.quick else []) + (["--select"] if args.select else [])
        + (["--datasets", *args.datasets] if args.datasets else []) + (["--seeds", *map(str, args.seeds)] if args.seeds else [])
        + (["--refine"] if args.refine else [])
    )  # fmt: skip
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, 1 thread"
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    stem = ("unlearning-quick" if args.quick else "unlearning") + ("-refine" if args.refine else "")
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp)
        worlds = {name: load_world(name) for name in st.datasets}
        # Seeds outer, datasets inner, and the results rewritten after each: a run cut short still
        # leaves every dataset's finished seeds on disk (the meta says which).
        for seed in st.seeds:
            for name in st.datasets:
                if args.select:
                    rows += select(worlds[name], st, SelectGrid(), seed, cache, log)
                    continue
                rows += run_seed(worlds[name], st, seed, cache, log)
                done = sorted({(r["dataset"], r["seed"]) for r in rows})
                meta = {"command": command, "wall_s": round(time.perf_counter() - start, 1), "machine": machine,
                        "setting": asdict(st), "done": done, "complete": len(done) == len(st.seeds) * len(st.datasets)}  # fmt: skip
                write_results(rows, meta, args.out, stem)
    wall = time.perf_counter() - start
    meta = {"command": command, "wall_s": round(wall, 1), "machine": machine, "setting": asdict(st)}
    if args.select:
        summary = select_summary(rows)
        (args.out / "unlearning-select.json").write_text(
            json.dumps({"meta": {**meta, "grid": asdict(SelectGrid())}, "ranking": summary, "rows": rows}, indent=1)
            + "\n"
        )
        for r in summary[:10]:
            print(r)
        cnn = [r for r in rows if r["model"] == "cnn"]
        for ds in st.datasets:
            print(ds, "CNN val acc", mean_std([r["val_acc"] for r in cnn if r["dataset"] == ds]))
        print(f"wrote {args.out / 'unlearning-select.json'} in {wall:.0f} s")
        return 0
    print(
        markdown(summarize(rows), {**meta, "done": sorted({(r["dataset"], r["seed"]) for r in rows}), "complete": True})
    )
    print(f"wrote {args.out / stem}.json, .md, .png in {wall:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
