"""Evaluate fedge and the simple baselines on your own folders (issue 14, build items 5 and 6).

    python -m bench.folders --sites A B C --test T [--public P] [--bundle DIR] [--seeds 3] [--seed 0] [--out DIR]
    fedge-hub evaluate ...            (the same command)

Folders are in the bring-your-own-data layout `<dir>/<label>/<id>.png|jpg|npy` (contract/layout.py).
The public folder is optional and may be labelled or flat (images directly in it); its labels are
never read: only fedge's generator may learn from it. Every image is read as luminance and resized
whole, as an edge does (contract.layout.read_image, fit_image), to the encoder bundle's input (default:
the general EfficientNet-Lite0 bundle built by `make general`, ~/.cache/fedge/bundles/general), and
encoded once with onnxruntime (CPU, --threads). Rows, all over the same encoder features unless said:

  nearest-prototype   label of the nearest uploaded prototype (cosine): the k-means prototypes an edge
                      uploads (edge.contribution.make_contribution, k and minimum group as an edge's defaults)
  gaussian+logreg     Gaussian samples around those prototypes (their uploaded spreads, times a scale
                      chosen on validation), then a class-balanced logistic regression (C chosen on validation)
  closed-form         Fed3R: each site sends the Gram matrix (upper triangle), per-label sums and counts of
                      its features randomly projected to --projection dims (labels with at least the
                      minimum group only); the hub sums them and solves a class-balanced ridge head
                      (hub.learning.closed_form, lambda chosen on validation). Partition-invariant.
  fedavg-cnn          Flower FedAvg (bench.baselines.run_fedavg) of the bench's CNN from scratch on the
                      images resized to --cnn-size, --rounds rounds: no encoder
  fedavg-linear       the same FedAvg of a linear head on the encoder's embeddings
  centralized-logreg  every site's embeddings pooled, class-balanced logistic regression (C on validation): the ceiling
  fedge               the hub's own path: feature-space synthesis around the same uploads
                      (hub.learning.feature_synthesis) and its exactly unlearnable closed-form head
                      (hub.learning.exact.ExactTrainer), at the hub's default settings; reported as
                      "not available: <reason>" when that code is not there
  fedge+refine        the same, then the refinement round (hub.refinement, rounds.refine* defaults)

fedge's rows are scored as the service delivers them: the sites upload from their training part only
(--holdout of each site's images held out, as the edge's holdout_fraction), every head of the model
(candidate `logits`, `head_refined_<i>`, `head_nearest_prototype`) is evaluated on each site's held-out
part, and the delivery gate (hub.delivery.gate) serves the best by pooled balanced accuracy; that head
is scored on the test folder. The baselines refit on all site data.

Hyper-parameters are chosen per seed on a validation split carved from the site folders (each site
holds back --val-frac of each of its labels; sites and the hub train on the rest and are scored on the
pooled held-back images, by balanced accuracy), never on the test folder; the chosen setting is then
refit on all site data. Every seed (prototypes, sampling, projections, FedAvg, validation carve)
derives from --seed (bench.unlearning.derive); the folders themselves are one fixed split.

Per row and seed: accuracy, balanced accuracy, per-class recall, confusion matrix, bytes up and down
per site; the summary is mean ± std over seeds, and a win or loss is called only where the spreads
(mean ± std) do not overlap. Writes <out>/<name>.json (deterministic: two runs with one --seed and
--threads write the same bytes), <name>.timings.json, <name>.md and <name>.png; --out defaults to
~/.cache/fedge/evaluate (outside the repository).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from contract.arrays import ArrayPayload
from contract.layout import SUFFIXES, fit_image, read_image, scan
from edge.contribution import make_contribution

DEFAULT_BUNDLE = Path.home() / ".cache" / "fedge" / "bundles" / "general"  # where `make general` writes it
DEFAULT_OUT = Path.home() / ".cache" / "fedge" / "evaluate"
CREATED_AT = datetime(2026, 1, 1, tzinfo=UTC)  # every upload's timestamp: the clock must not change a byte
METHODS = ("nearest-prototype", "gaussian+logreg", "closed-form", "fedavg-cnn", "fedavg-linear",
           "centralized-logreg", "fedge", "fedge+refine")  # fmt: skip
BASELINES = ("nearest-prototype", "gaussian+logreg", "fedavg-cnn", "fedavg-linear")  # what fedge must match
UNLEARNING = {
    "nearest-prototype": "exact: drop the prototypes",
    "gaussian+logreg": "retrain from the remaining prototypes",
    "closed-form": "exact: subtract the site's statistics",
    "fedavg-cnn": "not unlearnable (retrain from scratch)",
    "fedavg-linear": "not unlearnable (retrain from scratch)",
    "centralized-logreg": "retrain without the data",
    "fedge": "exact: drop the contribution's statistics (hub.learning.exact)",
    "fedge+refine": "exact: drop the site's statistics (hub.refinement)",
}


@dataclass(frozen=True)
class Options:
    """What one run does; every random choice derives from `seed`."""

    seeds: int = 3
    seed: int = 0
    k: int = 4  # prototypes per label, the edge's default (edge/config.py)
    min_group_size: int = 5  # the edge's default
    val_frac: float = 0.2
    holdout: float = 0.2  # the edge's holdout_fraction: fedge's sites train on the rest, the delivery gate scores on it
    rounds: int = 50
    local_epochs: int = 2
    cnn_lr: float = 0.05  # bench/fgl's FedAvg learning rates
    probe_lr: float = 0.5
    cnn_size: int = 16
    projection: int = 128  # closed-form: dims of the projected features (upload ~ dim^2 / 2 floats)
    samples_per_count: float = 4.0  # gaussian: synthetic samples per real sample a prototype stands for
    spread_scales: tuple[float, ...] = (0.25, 0.5, 1.0, 1.5)
    cs: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
    lams: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    fedge_generator: str = "gaussian"  # the hub's default without a trained generator folder
    threads: int = 1


def seed_of(*parts: object) -> int:
    """A 31-bit seed (torch, numpy and scikit-learn take it) for one purpose, derived from the run's seed."""
    from bench.unlearning import derive

    return derive(*parts) % 2**31


# ------------------------------------------------------------------------------------------------ data


@dataclass
class Part:
    """One folder, read and encoded."""

    name: str
    path: str
    labels: np.ndarray  # [n] label indices (-1: unlabelled)
    emb: np.ndarray  # [n, dim] encoder embeddings
    pixels: np.ndarray  # [n, 1, cnn_size, cnn_size] for the CNN
    file_bytes: int


@dataclass
class Folders:
    """Everything the methods see."""

    label_names: tuple[str, ...]
    sites: list[Part]
    test: Part
    public: Part | None
    encoder_path: Path
    encoder_id: str
    encoder_bytes: int
    cnn_size: int
    about: dict = field(default_factory=dict)


def resolve_bundle(bundle: str | None) -> Path:
    """A bundle folder: a path, `digits`/`mnist` (bundled), or the general bundle by default."""
    if bundle in ("digits", "mnist"):
        import bundled

        return bundled.path(bundle)
    path = Path(bundle) if bundle else DEFAULT_BUNDLE
    if not (path / "encoder.onnx").is_file():
        hint = " Build it with `make general` (about 30 s)." if bundle is None else ""
        raise SystemExit(f"error: no encoder bundle at {path} (encoder.onnx missing).{hint}")
    return path


def image_files(folder: Path) -> list[Path]:
    """Every image under a public folder, flat or labelled (labels ignored), sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)


def read_part(name: str, folder: Path, files: list[Path], labels: np.ndarray, encoder, cnn_size: int) -> Part:
    """Read, resize (as an edge does) and encode one folder's images in batches."""
    emb, pix = [], []
    for i in range(0, len(files), 64):
        images = [read_image(f) for f in files[i : i + 64]]
        emb.append(encoder.encode(np.stack([fit_image(im, encoder.image_size)[None] for im in images])))
        pix.append(np.stack([fit_image(im, cnn_size)[None] for im in images]))
    dim = int(emb[0].shape[1]) if emb else 0
    return Part(
        name, str(folder), labels, np.concatenate(emb) if emb else np.zeros((0, dim), np.float32),
        np.concatenate(pix) if pix else np.zeros((0, 1, cnn_size, cnn_size), np.float32),
        int(sum(f.stat().st_size for f in files)),
    )  # fmt: skip


def load_folders(sites: list[Path], test: Path, public: Path | None, bundle: Path, opts: Options, log) -> Folders:
    """Scan every folder, check the labels and encode everything once."""
    from edge.encoder import OnnxEncoder

    scanned = {p: scan(p) for p in [*sites, test]}
    for p, samples in scanned.items():
        if not samples:
            raise SystemExit(f"error: {p} holds no image in <label>/<id>.png|jpg|npy folders")
    site_labels = sorted({s.label for p in sites for s in scanned[p]})
    names = tuple(sorted(set(site_labels) | {s.label for s in scanned[test]}))
    if len(site_labels) < 2:
        raise SystemExit(f"error: the site folders hold {len(site_labels)} label(s); at least 2 are needed")
    unseen = sorted(set(names) - set(site_labels))
    encoder = OnnxEncoder(bundle / "encoder.onnx", prefer_cuda=False, threads=opts.threads)
    manifest = json.loads((bundle / "manifest.json").read_text())
    native = read_image(scanned[sites[0]][0].path).shape
    cnn_size = min(opts.cnn_size, 4 * math.ceil(max(native) / 4))  # never enlarge beyond the images (rounded to /4)

    def part(name: str, p: Path) -> Part:
        t = time.perf_counter()
        samples = scanned[p]
        labels = np.array([names.index(s.label) for s in samples], np.int64)
        out = read_part(name, p, [s.path for s in samples], labels, encoder, cnn_size)
        log(f"read and encoded {name} ({p}): {len(samples)} images in {time.perf_counter() - t:.1f} s")
        return out

    site_parts = [part(f"site{i + 1}", p) for i, p in enumerate(sites)]
    test_part = part("test", test)
    pub = None
    if public is not None:
        files = image_files(public)
        if not files:
            raise SystemExit(f"error: the public folder {public} holds no image")
        t = time.perf_counter()
        pub = read_part("public", public, files, np.full(len(files), -1, np.int64), encoder, cnn_size)
        log(f"read and encoded public ({public}): {len(files)} images in {time.perf_counter() - t:.1f} s")
    counts = {p.name: {n: int((p.labels == i).sum()) for i, n in enumerate(names) if (p.labels == i).any()}
              for p in [*site_parts, test_part]}  # fmt: skip
    about = {
        "label_names": list(names), "counts": counts, "public": None if pub is None else len(pub.labels),
        "test_labels_no_site_has": unseen, "native_image_shape": list(native), "cnn_size": cnn_size,
        "encoder": {"path": str(bundle), "encoder_id": manifest.get("encoder_id"), "input_size": encoder.image_size,
                    "dim": int(test_part.emb.shape[1]), "bytes": (bundle / "encoder.onnx").stat().st_size},
    }  # fmt: skip
    return Folders(names, site_parts, test_part, pub, bundle / "encoder.onnx", str(manifest.get("encoder_id")),
                   (bundle / "encoder.onnx").stat().st_size, cnn_size, about)  # fmt: skip


# --------------------------------------------------------------------------------------------- metrics


def scores(y: np.ndarray, pred: np.ndarray, n_classes: int) -> dict:
    """Accuracy, balanced accuracy (mean recall over the labels present in y), per-class recall, confusion matrix."""
    cm = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(cm, (y, pred), 1)
    support = cm.sum(1)
    recall = [None if support[c] == 0 else round(float(cm[c, c] / support[c]), 4) for c in range(n_classes)]
    present = [r for r in recall if r is not None]
    return {
        "accuracy": round(float((y == pred).mean()), 4),
        "balanced_accuracy": round(float(np.mean(present)), 4),
        "recall": recall,
        "confusion": cm.tolist(),  # rows: true label, columns: predicted, in label_names order
    }


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean recall over the labels present in y (the selection score)."""
    return float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)]))


# --------------------------------------------------------------------------------------------- methods


@dataclass
class Site:
    """One site's training data for one fit: embeddings, CNN pixels, label indices."""

    emb: np.ndarray
    pixels: np.ndarray
    labels: np.ndarray


def carve(sites: list[Part], frac: float, tag: tuple) -> tuple[list[Site], list[Site]]:
    """(fit, validation) per site: each site holds back round(frac * n) of each of its labels (at least 1 of 2+)."""
    fit, val = [], []
    for s, p in enumerate(sites):
        rng = np.random.default_rng(seed_of(*tag, "carve", s))
        held = []
        for c in np.unique(p.labels):
            idx = rng.permutation(np.flatnonzero(p.labels == c))
            n = int(round(frac * len(idx))) if len(idx) >= 2 else 0
            held.append(idx[: max(n, 1) if len(idx) >= 2 else 0])
        v = np.sort(np.concatenate(held))
        f = np.setdiff1d(np.arange(len(p.labels)), v)
        fit.append(Site(p.emb[f], p.pixels[f], p.labels[f]))
        val.append(Site(p.emb[v], p.pixels[v], p.labels[v]))
    return fit, val


def full(sites: list[Part]) -> list[Site]:
    """Every site's whole folder."""
    return [Site(p.emb, p.pixels, p.labels) for p in sites]


def contributions(sites: list[Site], f: Folders, opts: Options, tag: tuple) -> list:
    """Each site's upload, exactly as an edge makes it (prototype seeds and ids derived from `tag`)."""
    from bench.unlearning import contribution_id

    out = []
    for s, site in enumerate(sites):
        c = make_contribution(
            f"site{s + 1}", f.encoder_id, site.emb, np.array(f.label_names)[site.labels], k=opts.k,
            min_group_size=opts.min_group_size, seed=seed_of(*tag, "prototypes", s),
            contribution_id=contribution_id(*tag, "site", s),
        )  # fmt: skip
        out.append(c.model_copy(update={"created_at": CREATED_AT}))
    return out


def prototypes(contribs: list, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(vectors [P, dim], label indices [P], counts [P], spreads [P]) of every uploaded prototype."""
    vecs, labs, counts, spreads = [], [], [], []
    for c in contribs:
        for lp in c.labels:
            v = lp.vectors.to_numpy().astype(np.float64)
            vecs.append(v)
            labs += [names.index(lp.label)] * len(v)
            counts += list(lp.counts)
            spreads += list(lp.spreads)
    if not vecs:
        raise ValueError("no site uploaded a prototype (every label below the minimum group)")
    return np.concatenate(vecs), np.array(labs), np.array(counts), np.array(spreads)


def nearest_prototype(contribs: list, names: tuple[str, ...], x: np.ndarray) -> np.ndarray:
    """Label of the nearest prototype by cosine (bench.baselines.nearest_prototype's rule, returning predictions)."""
    vecs, labs, _, _ = prototypes(contribs, names)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return labs[(x @ vecs.T).argmax(1)]


def gaussian_samples(contribs: list, names: tuple[str, ...], scale: float, per_count: float, seed: int):
    """Samples c + scale * spread / sqrt(dim) * N(0, I) around every prototype, ceil(count * per_count) each (>= 8)."""
    vecs, labs, counts, spreads = prototypes(contribs, names)
    rng = np.random.default_rng(seed)
    dim = vecs.shape[1]
    xs, ys = [], []
    for v, lab, n, s in zip(vecs, labs, counts, spreads, strict=True):
        m = max(8, math.ceil(n * per_count))
        xs.append(v + (scale * s / math.sqrt(dim)) * rng.standard_normal((m, dim)))
        ys.append(np.full(m, lab))
    return np.concatenate(xs), np.concatenate(ys)


def logreg(x: np.ndarray, y: np.ndarray, c: float, seed: int):
    """Class-balanced logistic regression (scikit-learn, lbfgs)."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=3000, class_weight="balanced", random_state=seed).fit(x, y)


def logreg_bytes(model) -> int:
    """float32 bytes of a logistic regression's weights and intercepts."""
    return int((model.coef_.size + model.intercept_.size) * 4)


def projection(dim: int, out: int, seed: int) -> np.ndarray:
    """A seeded Gaussian projection [dim, out], entries N(0, 1/out): sites derive it from the seed (no bytes down)."""
    return np.random.default_rng(seed).standard_normal((dim, out)) / math.sqrt(out)


def closed_form_fit(sites: list[Site], names: tuple[str, ...], proj: np.ndarray, lam: float, min_group: int):
    """(head, bytes up per site): Fed3R's additive statistics per site, summed, ridge-balanced solve."""
    from hub.learning.closed_form import ContributionStats, solve, sum_stats

    stats, ups = [], []
    for s, site in enumerate(sites):
        keep = np.isin(site.labels, [c for c in np.unique(site.labels) if (site.labels == c).sum() >= min_group])
        if not keep.any():
            ups.append(0)
            continue
        z = site.emb[keep].astype(np.float64) @ proj
        st = ContributionStats.from_features(f"site{s + 1}", "projection", z, np.array(names)[site.labels[keep]])
        stats.append(st)
        # What a Fed3R site sends: the Gram matrix's upper triangle, per-label sums and counts, as float32 arrays
        # (Fed3R's statistics; fedge's own refinement round sends float16 sums and a square root: edge/refine.py).
        upper = st.gram[np.triu_indices(st.gram.shape[0])]
        arrays = [ArrayPayload.from_numpy(a, "float32").model_dump_json() for a in (upper, st.sums)]
        ups.append(sum(len(a) for a in arrays) + len(json.dumps({"labels": st.labels, "counts": st.counts.tolist()})))
    head = solve(sum_stats(stats), variant="ridge-balanced", lam=lam)
    return head, ups


def closed_form_predict(head, names: tuple[str, ...], proj: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Predicted label indices of the head over projected embeddings."""
    idx = np.array([names.index(n) for n in head.label_names])
    return idx[head.predict(x.astype(np.float64) @ proj)]


def fedavg(make, sites: list[tuple[np.ndarray, np.ndarray]], test: tuple[np.ndarray, np.ndarray], opts: Options, lr: float, seed: int):  # fmt: skip
    """(predictions on test, FedAvgResult): bench.baselines.run_fedavg, every site every round."""
    from bench.baselines import run_fedavg
    from hub.classifier import predict

    made = []

    def recording():
        m = make()
        made.append(m)
        return m

    res = run_fedavg(recording, sites, test, opts.rounds, opts.local_epochs, lr, seed=seed, eval_every=opts.rounds)
    # run_fedavg's first model is its global model, which holds the last round's weights after its final evaluation.
    return predict(made[0], test[0]), res


@dataclass
class FedgeRound:
    """The hub's one-round model on the uploads: test predictions and what the refinement round builds on."""

    predict: object  # embeddings -> label indices: the candidate head (`logits`)
    info: dict
    trainer: object  # hub.learning.exact.ExactTrainer
    model: object  # hub.learning.exact.ExactModel
    seed: int


def fedge(f: Folders, contribs: list, opts: Options, tag: tuple, stats_dir: Path) -> FedgeRound | str:
    """The hub's feature-space synthesis + closed-form head on the uploads at its default settings, or why not.

    One seed for synthesis, random features and projection, as the hub's service uses its synthesis seed for all.
    """
    try:
        from hub.learning.exact import ExactConfig, ExactTrainer
        from hub.learning.feature_synthesis import (
            FeatureSynthesisConfig,
            FeatureSynthesizer,
            load_encoder_bundle,
            train_generator,
        )
    except ImportError as err:
        return f"not available: the hub has no feature-space synthesis ({err})"
    bundle = load_encoder_bundle(f.encoder_path.parent)
    kind = opts.fedge_generator
    if kind != "gaussian" and f.public is None:
        return f"not available: generator {kind!r} needs a public folder, none given"
    seed = seed_of(*tag, "hub")
    public = f.public.emb if f.public is not None else np.zeros((0, f.test.emb.shape[1]), np.float32)
    gen = train_generator(kind, public, seed=seed)  # type: ignore[arg-type]
    synth = FeatureSynthesizer(bundle, FeatureSynthesisConfig(seed=seed), gen)
    trainer = ExactTrainer(synth, f.encoder_path, ExactConfig(seed=seed, threads=opts.threads), stats_dir)
    model = trainer.fit([c for c in contribs if c.labels])
    idx = np.array([f.label_names.index(n) for n in model.label_names])

    def predict(x: np.ndarray) -> np.ndarray:
        return idx[model.head.predict(trainer.feature_map.transform(x))]

    info = {"model_bytes": len(model.onnx), "synthetic_samples": model.synthetic_samples, "generator": kind}
    return FedgeRound(predict, info, trainer, model, seed)


def confusion(y: np.ndarray, pred: np.ndarray, n: int) -> list[list[int]]:
    """Confusion matrix (rows: true, columns: predicted) as a site reports it to the delivery gate."""
    cm = np.zeros((n, n), np.int64)
    np.add.at(cm, (y, pred), 1)
    return cm.tolist()


def gate(heads: dict, hold: list[Site], n: int) -> tuple[str, dict]:
    """The delivery gate as the service runs it: each site's confusion matrix of every head on its held-out part,
    pooled over the sites and the best head by balanced accuracy (hub.delivery.gate.pooled + choose; `heads` maps
    an ONNX output name to a function embeddings -> label indices, in the model's output order, candidate first).
    Returns (the head delivered, the decision); a decision at chance delivers the candidate, marked as such."""
    from hub.delivery.gate import choose, pooled

    names = list(heads)
    reports = [
        {h: confusion(site.labels, fn(site.emb), n) for h, fn in heads.items()} for site in hold if len(site.labels)
    ]
    decision = choose(pooled(reports, names, n), names)
    return decision.serve or names[0], decision.as_dict()


def fedge_refine(f: Folders, fr: FedgeRound, sites: list[Site], contribs: list, opts: Options) -> dict | str:
    """The refinement round at the hub's defaults (rounds.refine_features, refine_dim, refine_lam, refine_lams): each
    site's statistics of the delivered model's projected features, made by the edge's own code (edge.refine), summed
    and solved by the hub's (hub.refinement), one head per lambda. Returns the heads ({output name: embeddings ->
    label indices}, `logits` first) and what was sent, or why not; the hub delivers the one-round model instead when
    the statistics miss a label (then the heads are the one-round model's)."""
    try:
        from contract.payloads import RefinementRequest
        from edge.refine import make_statistics, wire_statistics
        from hub.config import RoundPolicy
        from hub.learning.closed_form import solve, sum_stats
        from hub.refinement.features import Projection, head_name, refined_onnx, with_feature_output
        from hub.refinement.statistics import to_stats
    except ImportError as err:
        return f"not available: the hub has no refinement round ({err})"
    rp, fmap = RoundPolicy(), fr.trainer.feature_map  # type: ignore[attr-defined]
    proj = Projection(fmap, rp.refine_dim, fr.seed, rp.refine_features)
    request = RefinementRequest.model_construct(feature_key=proj.key(f.encoder_id), model_version=1)

    def upload(parts: list[Site], part: str) -> tuple[list, list[int]]:
        """Each site's statistics of `part` as the edge makes and sends them: (the hub's stats, bytes per site)."""
        req = request.model_copy(update={"part": part})
        got, sent = [], []
        for s, (site, c) in enumerate(zip(parts, contribs, strict=True)):
            # The hub-side twin of the ONNX output a site reads (the projected features of its embeddings).
            out = wire_statistics(
                proj.features(site.emb), list(np.array(f.label_names)[site.labels]), opts.min_group_size
            )
            if out is None:
                sent.append(0)
                continue
            payload = make_statistics(f"site{s + 1}", req, c.contribution_id, opts.min_group_size, *out)
            sent.append(len(payload.model_dump_json().encode()))
            got.append(to_stats(payload))
        return got, sent

    stats, ups = upload(sites, "train")
    variant = fr.trainer.config.variant  # type: ignore[attr-defined]
    total = sum_stats(stats)
    head = solve(total, variant=variant, lam=rp.refine_lam)  # type: ignore[arg-type]
    extra = [solve(total, head.label_names, variant=variant, lam=lam) for lam in rp.refine_lams]  # type: ignore[arg-type]
    delivered = len(with_feature_output(fr.model.onnx, proj))  # type: ignore[attr-defined]
    missing = sorted(set(fr.model.label_names) - set(head.label_names))  # type: ignore[attr-defined]
    info = {"refine_features": f"{rp.refine_features} ({proj.kind})", "refine_dim": rp.refine_dim, "refine_lam": rp.refine_lam,
            "refine_lams": list(rp.refine_lams), "refine_bytes_up": ups, "first_model_bytes": delivered}  # fmt: skip
    if missing:  # the hub keeps the synthesis model (hub/refinement/engine.py: Refinement.fit)
        return {"heads": {"logits": fr.predict}, "info": {**info, "model_bytes": 0, "kept_one_round_model": missing}}
    idx = np.array([f.label_names.index(n) for n in head.label_names])

    def predictor(h):
        return lambda x: idx[h.predict(proj.features(x))]

    heads = {"logits": predictor(head), **{head_name(i): predictor(h) for i, h in enumerate(extra)}}
    lams = {"logits": rp.refine_lam, **{head_name(i): lam for i, lam in enumerate(rp.refine_lams)}}

    def refit(served: str, hold: list[Site]) -> dict | None:
        """rounds.refine_refit: the gate served refined head `served`; each site sends statistics of its held-out
        part (edge.refine, with part held_out) and the hub solves that head's lambda from both parts."""
        if served not in lams or not rp.refine_refit:
            return None
        more, ups_held = upload(hold, "held_out")
        if not more:
            return None
        h = solve(sum_stats([*stats, *more]), head.label_names, variant=variant, lam=lams[served])  # type: ignore[arg-type]
        return {"predict": predictor(h), "lam": lams[served], "held_out_bytes_up": ups_held,
                "model_bytes": len(refined_onnx(f.encoder_path, proj, h, []))}  # fmt: skip

    return {"heads": heads, "refit": refit,
            "info": {**info, "model_bytes": len(refined_onnx(f.encoder_path, proj, head, extra))}}  # fmt: skip


# ---------------------------------------------------------------------------------------------- a seed


def select(f: Folders, opts: Options, tag: tuple, log) -> dict:
    """Every hyper-parameter, chosen on the validation carve by balanced accuracy (ties: the first in grid order)."""
    fit, val = carve(f.sites, opts.val_frac, tag)
    xv, yv = np.concatenate([s.emb for s in val]), np.concatenate([s.labels for s in val])
    grid: dict[str, dict[str, float]] = {"gaussian+logreg": {}, "closed-form": {}, "centralized-logreg": {}}
    contribs = contributions(fit, f, opts, (*tag, "validation"))
    for scale in opts.spread_scales:
        x, y = gaussian_samples(contribs, f.label_names, scale, opts.samples_per_count, seed_of(*tag, "validation", "gauss", scale))  # fmt: skip
        for c in opts.cs:
            grid["gaussian+logreg"][f"scale={scale} C={c}"] = balanced_accuracy(yv, logreg(x, y, c, 0).predict(xv))
    proj = projection(f.test.emb.shape[1], opts.projection, seed_of(*tag, "validation", "projection"))
    for lam in opts.lams:
        head, _ = closed_form_fit(fit, f.label_names, proj, lam, opts.min_group_size)
        grid["closed-form"][f"lambda={lam}"] = balanced_accuracy(yv, closed_form_predict(head, f.label_names, proj, xv))
    xf, yf = np.concatenate([s.emb for s in fit]), np.concatenate([s.labels for s in fit])
    for c in opts.cs:
        grid["centralized-logreg"][f"C={c}"] = balanced_accuracy(yv, logreg(xf, yf, c, 0).predict(xv))
    chosen = {m: max(g, key=lambda k: g[k]) for m, g in grid.items()}  # first maximum in grid order
    log(f"[seed {tag[-1]}] chosen on validation ({len(yv)} held-back site images): "
        + ", ".join(f"{m} {k} ({grid[m][k]:.3f})" for m, k in chosen.items()))  # fmt: skip
    return {"chosen": chosen, "validation_balanced_accuracy": {m: {k: round(v, 4) for k, v in g.items()} for m, g in grid.items()},
            "validation_images": len(yv)}  # fmt: skip


REFINE_KINDS = ("rff", "embedding")
REFINE_DIMS = (64, 96, 128)  # 128: the largest whose statistics keep a 2-label site under 64 KiB with its prototypes
REFINE_LAMS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
# (logits' lambda, extra lambdas): head sets the delivery gate chooses from on the held-out part
REFINE_HEAD_SETS = ((1e-4, (1e-2,)), (1e-4, (1e-5, 1e-3)), (1e-4, (1e-3, 1e-2, 1e-1)), (1e-6, REFINE_LAMS[1:]))


def refine_select(f: Folders, opts: Options, seeds: int, log) -> dict:
    """The refinement round's settings scored on validation only (`--select-refine`; the test folder is never read).

    Per validation seed: each site holds back --val-frac of its labels as the validation set; of the rest, the
    edge's --holdout is held out for the delivery gate and the statistics are made from what is left (edge.refine,
    hub.refinement.Projection), summed and solved for every lambda. Scored: each fixed lambda, and each head set
    (logits' lambda, extra lambdas) through the gate (hub.delivery.gate on the pooled held-out confusion matrices),
    by the balanced accuracy of the served head on the validation set."""
    from edge.refine import statistics
    from hub.delivery.gate import choose, pooled
    from hub.learning.closed_form import ContributionStats, FeatureMap, solve, sum_stats
    from hub.refinement.features import Projection

    n, names = len(f.label_names), np.array(f.label_names)

    def site_stats(proj: Projection, parts: list[Site], first: int) -> list:
        """Each site's statistics of `parts` (edge.refine), ids numbered from `first`."""
        out = []
        for s, site in enumerate(parts):
            got = statistics(proj.features(site.emb), list(names[site.labels]), opts.min_group_size)
            if got is not None:
                out.append(ContributionStats(f"{first + s:032x}", "select", tuple(got[0]), np.array(got[1]), got[2], got[3]))  # fmt: skip
        return out

    scores: dict[str, list[float]] = {}
    for v in range(seeds):
        tag = (opts.seed, "refine-select", v)
        fit, val = carve(f.sites, opts.val_frac, tag)
        train, hold = carve(fit, opts.holdout, (*tag, "holdout"))  # type: ignore[arg-type]
        xv, yv = np.concatenate([s.emb for s in val]), np.concatenate([s.labels for s in val])
        fmap = FeatureMap(f.test.emb.shape[1], seed=seed_of(*tag, "hub"))
        for kind in REFINE_KINDS:
            for dim in REFINE_DIMS:
                proj = Projection(fmap, dim, seed_of(*tag, "hub"), kind)  # type: ignore[arg-type]
                stats = site_stats(proj, train, 0)
                total = sum_stats(stats)
                heads = {lam: solve(total, variant="ridge-balanced", lam=lam) for lam in REFINE_LAMS}
                held = site_stats(proj, hold, 1000)  # the refit's held-out statistics (rounds.refine_refit)
                every = sum_stats([*stats, *held])
                refits = {lam: solve(every, heads[lam].label_names, variant="ridge-balanced", lam=lam) for lam in REFINE_LAMS}  # fmt: skip

                def pred(lam: float, x: np.ndarray, heads=heads, proj=proj) -> np.ndarray:
                    idx = np.array([f.label_names.index(c) for c in heads[lam].label_names])
                    return idx[heads[lam].predict(proj.features(x))]

                on_val = {lam: balanced_accuracy(yv, pred(lam, xv)) for lam in REFINE_LAMS}
                on_val_refit = {lam: balanced_accuracy(yv, pred(lam, xv, refits)) for lam in REFINE_LAMS}
                reports = [{str(lam): confusion(h.labels, pred(lam, h.emb), n) for lam in REFINE_LAMS} for h in hold if len(h.labels)]  # fmt: skip
                conf = pooled(reports, [str(lam) for lam in REFINE_LAMS], n)
                for lam in REFINE_LAMS:
                    scores.setdefault(f"{kind} dim={dim} lam={lam:g}", []).append(on_val[lam])
                for first, extra in REFINE_HEAD_SETS:
                    served = choose(conf, [str(lam) for lam in (first, *extra)]).serve or str(first)
                    key = f"{kind} dim={dim} lam={first:g} extra={','.join(f'{x:g}' for x in extra)} (gate)"
                    scores.setdefault(key, []).append(on_val[float(served)])
                    scores.setdefault(key.replace("(gate)", "(gate, refit)"), []).append(on_val_refit[float(served)])
        log(f"refine-select: validation seed {v} done ({len(yv)} validation images)")
    ranking = sorted(({"setting": k, "mean": round(float(np.mean(x)), 4), "std": round(float(np.std(x)), 4),
                       "per_seed": [round(y, 4) for y in x]} for k, x in scores.items()), key=lambda r: -r["mean"])  # fmt: skip
    return {"validation_seeds": seeds, "dims": REFINE_DIMS, "lams": REFINE_LAMS,
            "head_sets": [[a, list(b)] for a, b in REFINE_HEAD_SETS], "ranking": ranking}  # fmt: skip


def parse(setting: str) -> dict[str, float]:
    """'scale=1.0 C=10.0' -> {'scale': 1.0, 'C': 10.0}."""
    return {k: float(v) for k, v in (kv.split("=") for kv in setting.split())}


def run_seed(f: Folders, opts: Options, r: int, stats_dir: Path, log) -> tuple[list[dict], dict]:
    """Every method for one seed: (rows, the validation choices)."""
    from bench.baselines import LinearHead
    from hub.classifier import SmallCNN

    tag = (opts.seed, "folders", r)
    sel = select(f, opts, tag, log)
    nc, names, y = len(f.label_names), f.label_names, f.test.labels
    sites = full(f.sites)
    up_protos: list[int] = []
    rows: list[dict] = []

    def add(method: str, pred: np.ndarray | None, up: float, down: float, wall: float, **extra) -> None:
        row = {"seed": r, "method": method, **(scores(y, pred, nc) if pred is not None else {}),
               "bytes_up_per_site": int(round(up)), "bytes_down_per_site": int(round(down)), **extra,
               "_wall_s": round(wall, 2)}  # fmt: skip
        rows.append(row)
        if pred is not None:
            log(f"[seed {r}] {method}: balanced accuracy {row['balanced_accuracy']:.4f}, accuracy {row['accuracy']:.4f}, "
                f"up {row['bytes_up_per_site']} B/site ({wall:.1f} s)")  # fmt: skip
        else:
            log(f"[seed {r}] {method}: {extra.get('note')}")

    t = time.perf_counter()
    contribs = contributions(sites, f, opts, tag)
    up_protos = [len(c.to_json_bytes()) for c in contribs]
    every_upload = sum(up_protos)
    encode_s = time.perf_counter() - t
    pred = nearest_prototype(contribs, names, f.test.emb)
    add(
        "nearest-prototype",
        pred,
        np.mean(up_protos),
        f.encoder_bytes + every_upload,
        time.perf_counter() - t,
        k=opts.k,
        bytes_up_max_round=max(up_protos),
    )

    t = time.perf_counter()
    g = parse(sel["chosen"]["gaussian+logreg"])
    x, yy = gaussian_samples(contribs, names, g["scale"], opts.samples_per_count, seed_of(*tag, "gauss"))
    model = logreg(x, yy, g["C"], 0)
    add("gaussian+logreg", model.predict(f.test.emb), np.mean(up_protos), f.encoder_bytes + logreg_bytes(model),
        encode_s + time.perf_counter() - t, k=opts.k, setting=sel["chosen"]["gaussian+logreg"], synthetic_samples=len(yy),
        bytes_up_max_round=max(up_protos))  # fmt: skip

    t = time.perf_counter()
    lam = parse(sel["chosen"]["closed-form"])["lambda"]
    proj = projection(f.test.emb.shape[1], opts.projection, seed_of(*tag, "projection"))
    head, ups = closed_form_fit(sites, names, proj, lam, opts.min_group_size)
    head_bytes = (head.weights.size + head.bias.size) * 4
    add("closed-form", closed_form_predict(head, names, proj, f.test.emb), np.mean(ups), f.encoder_bytes + head_bytes,
        time.perf_counter() - t, setting=sel["chosen"]["closed-form"], projection=opts.projection, bytes_up_max_round=max(ups))  # fmt: skip

    t = time.perf_counter()
    pred, res = fedavg(lambda: SmallCNN(f.cnn_size, nc), [(s.pixels, s.labels) for s in sites], (f.test.pixels, y), opts,
                       opts.cnn_lr, seed_of(*tag, "fedavg-cnn"))  # fmt: skip
    add("fedavg-cnn", pred, res.bytes_up_per_site, res.bytes_down_per_site, time.perf_counter() - t, rounds=opts.rounds,
        image_size=f.cnn_size)  # fmt: skip

    t = time.perf_counter()
    dim = f.test.emb.shape[1]
    pred, res = fedavg(lambda: LinearHead(dim, nc), [(s.emb, s.labels) for s in sites], (f.test.emb, y), opts,
                       opts.probe_lr, seed_of(*tag, "fedavg-linear"))  # fmt: skip
    add("fedavg-linear", pred, res.bytes_up_per_site, res.bytes_down_per_site + f.encoder_bytes, time.perf_counter() - t,
        rounds=opts.rounds)  # fmt: skip

    t = time.perf_counter()
    c = parse(sel["chosen"]["centralized-logreg"])["C"]
    model = logreg(np.concatenate([s.emb for s in sites]), np.concatenate([s.labels for s in sites]), c, 0)
    add("centralized-logreg", model.predict(f.test.emb), np.mean([p.file_bytes for p in f.sites]),
        f.encoder_bytes + logreg_bytes(model), time.perf_counter() - t, setting=sel["chosen"]["centralized-logreg"],
        bytes_up_max_round=max(p.file_bytes for p in f.sites))  # fmt: skip

    # fedge as the service delivers it: every site uploads from its training part only (the edge holds out
    # holdout_fraction of its samples, never used for prototypes or refinement statistics) and the delivery gate
    # serves the head with the best balanced accuracy on the sites' pooled held-out confusion matrices.
    t = time.perf_counter()
    train, hold = carve(f.sites, opts.holdout, (*tag, "holdout"))
    fcontribs = contributions(train, f, opts, (*tag, "fedge"))
    fup = [len(c.to_json_bytes()) for c in fcontribs]
    proto_head = lambda x: nearest_prototype(fcontribs, names, x)  # noqa: E731
    fr = fedge(f, fcontribs, opts, tag, stats_dir)
    if isinstance(fr, str):
        add("fedge", None, 0, 0, 0.0, note=fr)
        add("fedge+refine", None, 0, 0, 0.0, note=fr)
    else:
        heads = {"logits": fr.predict, "head_nearest_prototype": proto_head}
        served, decision = gate(heads, hold, nc)
        add("fedge", heads[served](f.test.emb), np.mean(fup), f.encoder_bytes + fr.info["model_bytes"],
            time.perf_counter() - t, k=opts.k, served=served, gate=decision, bytes_up_max_round=max(fup), **fr.info)  # fmt: skip
        t = time.perf_counter()
        out = fedge_refine(f, fr, train, fcontribs, opts)
        if isinstance(out, str):
            add("fedge+refine", None, 0, 0, 0.0, note=out)
        else:
            heads = {**out["heads"], "head_nearest_prototype": proto_head}
            served, decision = gate(heads, hold, nc)
            info = out["info"]
            rounds_up = [fup, info["refine_bytes_up"]]  # bytes per site, one list per round
            down = f.encoder_bytes + info["first_model_bytes"] + info["model_bytes"]
            pred = heads[served](f.test.emb)
            refit = out["refit"](served, hold) if "refit" in out else None
            if refit is not None:  # the delivered model is the refit (docs/delivery-gate.md, "The refit")
                rounds_up.append(refit["held_out_bytes_up"])
                down += refit["model_bytes"]
                pred = refit["predict"](f.test.emb)
                info = {**info, "refit": {"lam": refit["lam"], "held_out_bytes_up": refit["held_out_bytes_up"]}}
            up = np.mean(np.sum(rounds_up, axis=0))
            add("fedge+refine", pred, up, down, time.perf_counter() - t, k=opts.k, served=served, gate=decision,
                bytes_up_max_round=int(max(max(r) for r in rounds_up)), **info)  # fmt: skip
    for row in rows:
        row["unlearning"] = UNLEARNING[row["method"]]
    return rows, sel


# --------------------------------------------------------------------------------------------- summary


def summarize(rows: list[dict], names: tuple[str, ...]) -> list[dict]:
    """Mean and std over seeds per method: accuracy, balanced accuracy, per-class recall, bytes; the summed confusion."""
    from bench.unlearning import mean_std

    out = []
    for m in METHODS:
        grp = [r for r in rows if r["method"] == m]
        done = [r for r in grp if "balanced_accuracy" in r]
        s: dict = {"method": m, "seeds": len(done), "unlearning": UNLEARNING[m]}
        if not done:
            s["note"] = grp[0].get("note") if grp else "not run"
            out.append(s)
            continue
        for key in ("accuracy", "balanced_accuracy"):
            mean, std = mean_std([r[key] for r in done])
            s[key], s[key + "_std"] = round(mean, 4), round(std, 4)
        s["recall"] = [None if done[0]["recall"][c] is None else round(float(np.mean([r["recall"][c] for r in done])), 4)
                       for c in range(len(names))]  # fmt: skip
        s["recall_std"] = [None if done[0]["recall"][c] is None else round(float(np.std([r["recall"][c] for r in done])), 4)
                           for c in range(len(names))]  # fmt: skip
        s["confusion_summed"] = np.sum([r["confusion"] for r in done], axis=0).tolist()
        for b in ("bytes_up_per_site", "bytes_down_per_site"):
            s[b] = int(round(np.mean([r[b] for r in done])))
        # the most one site sent in one round, over the sites and seeds (FedAvg: a round's update, the same for all)
        s["bytes_up_max_round"] = int(max(r.get("bytes_up_max_round", r["bytes_up_per_site"] / r.get("rounds", 1)) for r in done))  # fmt: skip
        out.append(s)
    return out


def pair(a: dict, b: dict) -> dict:
    """Two summaries' balanced accuracies in the shape bench.unlearning.verdict reads."""
    return {"seeds": min(a["seeds"], b["seeds"]), "a": a["balanced_accuracy"], "a_std": a["balanced_accuracy_std"],
            "b": b["balanced_accuracy"], "b_std": b["balanced_accuracy_std"]}  # fmt: skip


def acceptance(summary: list[dict], up_limit: int = 64 * 1024) -> dict[str, dict]:
    """Issue 14's bars on these folders, for fedge's one-round model and for its model after the refinement round:
    mean balanced accuracy at least each baseline's, within 2 points of centralized logistic regression, at most
    64 KiB up per site (refinement included); verdicts only where the spreads (mean ± std) do not overlap."""
    from bench.unlearning import verdict

    by = {s["method"]: s for s in summary}
    out: dict[str, dict] = {}
    for cand in ("fedge", "fedge+refine"):
        fe = by[cand]
        if not fe["seeds"]:
            continue
        res: dict = {"balanced_accuracy": fe["balanced_accuracy"], "balanced_accuracy_std": fe["balanced_accuracy_std"],
                     "against": {}}  # fmt: skip
        for m in (*BASELINES, "closed-form", "centralized-logreg"):
            if by[m]["seeds"]:
                res["against"][m] = {"mean_at_least": fe["balanced_accuracy"] >= by[m]["balanced_accuracy"],
                                     "verdict": verdict(pair(fe, by[m]), "a", "b")}  # fmt: skip
        res["within_2_points_of_centralized"] = fe["balanced_accuracy"] >= by["centralized-logreg"]["balanced_accuracy"] - 0.02  # fmt: skip
        res["up_per_site_bytes"] = fe["bytes_up_per_site"]
        res["up_max_round_bytes"] = fe["bytes_up_max_round"]
        res["up_within_64KiB"] = fe["bytes_up_max_round"] <= up_limit  # issue 14: per site per round
        res["meets_baselines"] = all(res["against"][m]["mean_at_least"] for m in BASELINES if m in res["against"])
        out[cand] = res
    return out


# ---------------------------------------------------------------------------------------------- report


def markdown(result: dict, walls: dict[str, float]) -> str:
    """The results as Markdown."""
    from bench.fgl import fmt_bytes
    from bench.unlearning import pm, verdict

    meta, data, summary = result["meta"], result["data"], result["summary"]
    names = data["label_names"]
    o = meta["options"]
    enc = data["encoder"]
    lines = [
        f"# fedge evaluate: {meta['name']}",
        "",
        f"Command: `{meta['command']}`. Machine: {meta['machine']} (at the start), {o['threads']} thread(s); wall time "
        f"{meta['wall_s']:.0f} s" + ("." if meta["seeds_done"] == o["seeds"] else f": **partial run, {meta['seeds_done']} of {o['seeds']} seeds**."),
        "",
        f"Encoder: `{enc['encoder_id']}` ({enc['dim']}-d, input {enc['input_size']}x{enc['input_size']}, {fmt_bytes(enc['bytes'])}); "
        f"images of native shape {'x'.join(map(str, data['native_image_shape']))}, resized whole as an edge does. "
        f"Public folder: {data['public'] if data['public'] is not None else 'none'} images (labels never read; only fedge's generator may use it).",
        "",
        "| folder | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]  # fmt: skip
    for part, counts in data["counts"].items():
        lines.append(f"| {part} | " + " | ".join(str(counts.get(n, 0)) for n in names) + " |")
    if data["test_labels_no_site_has"]:
        lines += ["", f"Labels in the test folder that no site holds (every method's recall there is 0): {data['test_labels_no_site_has']}."]  # fmt: skip
    lines += [
        "",
        f"{o['seeds']} seeds derived from --seed {o['seed']} (prototypes, sampling, projections, FedAvg, validation carve); "
        "the folders are one fixed split. Mean ± std over seeds. Hyper-parameters chosen per seed on a validation "
        f"carve of the site folders ({o['val_frac']:.0%} of each site's labels held back), never on the test folder, "
        f"then refit on all site data. Prototypes: k={o['k']} per label, at least {o['min_group_size']} images each "
        f"(float16, as an edge uploads). FedAvg: {o['rounds']} rounds, {o['local_epochs']} local epochs, lr {o['cnn_lr']} "
        f"(CNN at {data['cnn_size']}x{data['cnn_size']}) and {o['probe_lr']} (linear head). Closed-form: features projected "
        f"to {o['projection']} dims.",
        "",
        "Bytes per site: up = all a site sends (prototypes as JSON; Fed3R statistics as float32 arrays in the wire's "
        "base64 JSON; FedAvg every round's update; centralized: its image files); down = all it receives (the encoder "
        "where the method needs it, the model; nearest prototype: every site's prototypes; FedAvg: the model every round).",
        "",
        "## Results",
        "",
        "*vs fedge*, *vs fedge+refine*: the row's balanced accuracy against theirs; higher or lower only where the "
        "spreads (mean ± std) do not overlap, else tie. Recall: mean over seeds (std in the JSON).",
        "",
        "| method | balanced accuracy | accuracy | " + " | ".join(f"recall {n}" for n in names)
        + " | up/site | up/site/round (max) | down/site | vs fedge | vs fedge+refine | unlearning | wall s/seed |",
        "|---|---|---|" + "---|" * len(names) + "---|---|---|---|---|---|---|",
    ]  # fmt: skip
    by = {s["method"]: s for s in summary}

    def vs(s: dict, ref: str) -> str:
        return "" if s["method"] == ref or not by[ref]["seeds"] else verdict(pair(s, by[ref]), "a", "b")

    for s in summary:
        if not s["seeds"]:
            lines.append(f"| {s['method']} | {s['note']} |" + " |" * (len(names) + 8))
            continue
        rec = " | ".join("-" if r is None else f"{r:.3f}" for r in s["recall"])
        lines.append(f"| {s['method']} | {pm(s, 'balanced_accuracy')} | {pm(s, 'accuracy')} | {rec} | "
                     f"{fmt_bytes(s['bytes_up_per_site'])} | {fmt_bytes(s['bytes_up_max_round'])} | "
                     f"{fmt_bytes(s['bytes_down_per_site'])} | {vs(s, 'fedge')} | "
                     f"{vs(s, 'fedge+refine')} | {s['unlearning']} | {walls.get(s['method'], 0):.1f} |")  # fmt: skip
    lines += [
        "",
        f"**fedge and fedge+refine are scored as the service delivers them**: every site uploads (prototypes, "
        f"refinement statistics) from {1 - o['holdout']:.0%} of its images and holds out the other {o['holdout']:.0%} "
        "(the edge's holdout_fraction; a stratified carve derived from the seed); the model carries several heads "
        "(`logits`: the round's candidate; `head_refined_<i>`: the refined head at each extra lambda; "
        "`head_nearest_prototype`: the nearest prototype of the same uploads), each site reports one confusion "
        "matrix per head on its held-out part, and the delivery gate (`hub.delivery.gate.pooled` + `choose`) serves "
        "the head with the best pooled balanced accuracy. That served head is what is scored on the test folder; "
        "for fedge+refine, when the gate served a refined head, the refit is (rounds.refine_refit: each site sends "
        "statistics of its held-out part in a third round and the hub solves the chosen lambda from both parts, "
        "docs/delivery-gate.md). So fedge's one-round model trains on 80 % of each site's data, fedge+refine's refit "
        "on 100 %, like the baselines.",
        "",
        "### The head the delivery gate served",
        "",
        "| seed | row | served | state | pooled held-out balanced accuracy per head |",
        "|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        if "gate" not in row:
            continue
        g = row["gate"]
        per = ", ".join(f"{h} {'-' if v is None else f'{v:.3f}'}" for h, v in g["balanced_accuracy"].items())
        lines.append(
            f"| {row['seed']} | {row['method']} | `{row['served']}` | {g['state']} | {per} ({g['samples']} samples) |"
        )
    lines += ["", "## Issue 14's bars on these folders", ""]
    if not result["acceptance"]:
        lines.append(f"Not judged: fedge {by['fedge'].get('note', 'did not run')}.")
    yes = lambda b: "yes" if b else "**no**"  # noqa: E731
    for cand, acc in result["acceptance"].items():
        lines += [f"**{cand}** ({pm(by[cand], 'balanced_accuracy')}):", "",
                  f"| {cand} against | its mean ≥ the other's | verdict (spreads) |", "|---|---|---|"]  # fmt: skip
        for m, a in acc["against"].items():
            lines.append(f"| {m} | {yes(a['mean_at_least'])} | {a['verdict']} |")
        lines += [
            "",
            f"Mean at least every baseline's (nearest prototype, Gaussian sampling, both FedAvg): {yes(acc['meets_baselines'])}. "
            f"Within 2 points of centralized logistic regression: {yes(acc['within_2_points_of_centralized'])}. "
            f"Up per site and round at most {acc['up_max_round_bytes'] / 1024:.1f} KiB ≤ 64 KiB: {yes(acc['up_within_64KiB'])} "
            f"({acc['up_per_site_bytes'] / 1024:.1f} KiB per site in all rounds together).",
            "",
        ]  # fmt: skip
    lines += ["", "## Chosen on validation", "", "| seed | " + " | ".join(result["selection"][0]["chosen"]) + " |",
              "|---|" + "---|" * len(result["selection"][0]["chosen"])]  # fmt: skip
    for r, sel in enumerate(result["selection"]):
        cells = [f"{k} ({sel['validation_balanced_accuracy'][m][k]:.3f})" for m, k in sel["chosen"].items()]
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    lines += ["", "Confusion matrices (rows: true, columns: predicted, summed over seeds) are in the JSON."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Balanced accuracy against bytes per site (up + down), and per-class recall, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = [s for s in result["summary"] if s["seeds"]]
    names = result["data"]["label_names"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, s in enumerate(summary):
        total = s["bytes_up_per_site"] + s["bytes_down_per_site"]
        ax.errorbar([total], [s["balanced_accuracy"]], yerr=[s["balanced_accuracy_std"]], fmt="os^Dv<>"[i % 7], ms=7,
                    label=s["method"], capsize=3)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("bytes per site, up + down")
    ax.set_ylabel("test balanced accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    width = 0.8 / max(1, len(summary))
    for i, s in enumerate(summary):
        xs = np.arange(len(names)) + i * width
        rec = [np.nan if r is None else r for r in s["recall"]]
        err = [0 if r is None else r for r in s["recall_std"]]
        bx.bar(xs, rec, width, yerr=err, label=s["method"], capsize=2)
    bx.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, fontsize=7 if len(names) > 6 else 9)
    bx.set_ylabel("test recall per class")
    bx.set_ylim(0, 1.05)
    bx.grid(alpha=0.3, axis="y")
    fig.suptitle(f"fedge evaluate: {result['meta']['name']} ({result['meta']['options']['seeds']} seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(out: Path, result: dict, timings: list[dict]) -> None:
    """<name>.json (no wall clock), <name>.timings.json, <name>.md, <name>.png."""
    out.mkdir(parents=True, exist_ok=True)
    stem = result["meta"]["name"]
    meta = {k: v for k, v in result["meta"].items() if k not in ("wall_s", "machine")}
    (out / f"{stem}.json").write_text(json.dumps({**result, "meta": meta}, indent=1) + "\n")
    (out / f"{stem}.timings.json").write_text(json.dumps({"command": result["meta"]["command"], "wall_s": result["meta"]["wall_s"],
                                                          "machine": result["meta"]["machine"], "rows": timings}, indent=1) + "\n")  # fmt: skip
    walls = {m: float(np.mean([t["wall_s"] for t in timings if t["method"] == m] or [0])) for m in METHODS}
    (out / f"{stem}.md").write_text(markdown(result, walls))
    plot(result, out / f"{stem}.png")


def parser() -> argparse.ArgumentParser:
    """Arguments of `python -m bench.folders` and `fedge-hub evaluate`."""
    d = Options()
    ap = argparse.ArgumentParser(prog="fedge-hub evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--sites", type=Path, nargs="+", required=True, help="one labelled folder per site")
    ap.add_argument("--test", type=Path, required=True, help="labelled test folder (never trained or tuned on)")
    ap.add_argument("--public", type=Path, help="optional public folder, labelled or flat (labels never read)")
    ap.add_argument(
        "--bundle", help=f"encoder bundle folder, or digits/mnist (default: the general bundle, {DEFAULT_BUNDLE})"
    )
    ap.add_argument("--seeds", type=int, default=d.seeds, help="replicates, at least 3 for a verdict (default 3)")
    ap.add_argument("--seed", type=int, default=d.seed, help="every seed derives from it")
    ap.add_argument("--rounds", type=int, default=d.rounds, help="FedAvg rounds (default 50)")
    ap.add_argument("--k", type=int, default=d.k, help="prototypes per label (default: the edge's 4)")
    ap.add_argument("--cnn-size", type=int, default=d.cnn_size, help="side the CNN baseline's images are resized to")
    ap.add_argument("--projection", type=int, default=d.projection, help="closed-form: projected feature dims")
    ap.add_argument("--fedge-generator", choices=["gaussian", "covariance", "diffusion"], default=d.fedge_generator,
                    help="fedge's feature generator (covariance and diffusion train on the public folder)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=d.threads, help="threads per pool (torch, onnxruntime, BLAS)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    ap.add_argument("--name", default="folders", help="file stem of the results (default folders)")
    ap.add_argument("--select-refine", type=int, metavar="SEEDS", help="score the refinement round's settings on "
                    "SEEDS validation carves of the site folders, write <name>-refine-select.json and exit")  # fmt: skip
    return ap


def main(argv: list[str] | None = None, prog: str = "python -m bench.folders") -> int:
    """Run every method over the seeds and write the results."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.seeds < 1 or args.rounds < 1:
        raise SystemExit("error: --seeds and --rounds must be at least 1")
    from threadpoolctl import threadpool_limits

    from runtime.threads import size_pools

    size_pools(args.threads, import_torch=True)
    threadpool_limits(args.threads)
    opts = Options(seeds=args.seeds, seed=args.seed, rounds=args.rounds, k=args.k, cnn_size=args.cnn_size,
                   projection=args.projection, fedge_generator=args.fedge_generator, threads=args.threads)  # fmt: skip
    start = time.perf_counter()
    log = lambda s: print(f"{time.perf_counter() - start:7.1f}s {s}", flush=True)  # noqa: E731
    bundle = resolve_bundle(args.bundle)
    f = load_folders(args.sites, args.test, args.public, bundle, opts, log)
    if args.select_refine:
        sel = refine_select(f, opts, args.select_refine, log)
        sel = {"command": " ".join([prog, *argv]), "encoder": f.about["encoder"], **sel}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}-refine-select.json").write_text(json.dumps(sel, indent=1) + "\n")
        for r in sel["ranking"]:
            print(f"{r['setting']:55s} {r['mean']:.4f} ± {r['std']:.4f}")
        print(f"wrote {args.out / args.name}-refine-select.json")
        return 0
    rows: list[dict] = []
    selection = []
    import torch

    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, load average " + " ".join(
        f"{x:.1f}" for x in os.getloadavg()
    )
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(opts.seeds):
            seed_rows, sel = run_seed(f, opts, r, Path(tmp) / f"stats-{r}", log)
            rows += seed_rows
            selection.append(sel)
            # after every seed, so that an interrupted run leaves what it finished (marked partial)
            clean = [{k: v for k, v in row.items() if k != "_wall_s"} for row in rows]
            timings = [{"seed": row["seed"], "method": row["method"], "wall_s": row["_wall_s"]} for row in rows]
            summary = summarize(clean, f.label_names)
            result = {
                "meta": {"name": args.name, "command": " ".join([prog, *argv]), "options": asdict(opts),
                         "seeds_done": r + 1, "machine": machine, "wall_s": round(time.perf_counter() - start, 1)},
                "data": f.about, "selection": selection, "summary": summary, "acceptance": acceptance(summary),
                "rows": clean,
            }  # fmt: skip
            write(args.out, result, timings)
    print((args.out / f"{args.name}.md").read_text().split("## Results", 1)[1].split("## Chosen", 1)[0])
    print(f"wrote {args.out / args.name}.json, .timings.json, .md, .png ({result['meta']['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
