"""Feature-space synthesis on the general bundle: Gaussian sampling around prototypes against trained generators.

The general EfficientNet-Lite0 bundle has no image generator, so the hub synthesizes embeddings
(hub/learning/feature_synthesis.py) and solves the closed-form head over them (hub/learning/closed_form.py,
as hub/learning/exact.py does). This bench asks whether a generator trained on public data beats
plain Gaussian sampling around the same prototypes (issue 14, build item 2):

    gaussian     isotropic, from the uploads alone (what a hub without public data does)
    covariance   within-group covariance of the public embeddings (shrunk), the cheap trained candidate
    diffusion    an MLP denoiser over residuals conditioned on the prototype (diffusers DDPM/DDIM)

and, from the same uploads, nearest prototype; for reference, the same head solved on the sites' real
embeddings pooled (what a closed-form refinement round would give) and a centralized logistic
regression on them (the ceiling).

Split per seed (hub.datasets.split, dirichlet_sites): 20 % public (unlabelled: only the generators
see it), 30 % test, the rest over 3 sites with Dirichlet(0.3) over the label; each site keeps 20 % of
its part as its local validation set (the federated evaluation), uploads prototypes (k = 4, at least 5
samples each, float16) of the rest. Every setting (spread scale, renormalisation, the head's bandwidth
and regularisation, the covariance shrinkage, the logistic regression's C) is chosen on the pooled
site validation sets, mean over the seeds; the test column is reported, never chosen on.

Tasks: sklearn digits (always available) enlarged to the encoder's 96x96; ELPV solar cells when
`elpv-dataset` is installed: mono-crystalline modules only, label defect probability >= 0.5
(CC BY-NC-SA 4.0: evaluated only; embeddings are cached outside the repository, only numbers written).

    python -m bench.feature_synthesis [--tasks digits elpv_mono] [--seeds 0 1 2] [--diffusion-steps 1000] [--jobs 3]
writes bench/results/feature_synthesis.{json,md,png}; tasks run apart (--tasks X --out DIR/X) are joined with
`--merge DIR/digits.json DIR/elpv_mono.json`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from contract.layout import fit_image
from hub.learning.closed_form import ContributionStats, FeatureMap, solve
from hub.learning.feature_synthesis import (
    DiffusionTraining,
    FeatureSynthesisConfig,
    FeatureSynthesizer,
    Generator,
    load_encoder_bundle,
    train_generator,
)

RESULTS = Path(__file__).parent / "results"
CACHE = Path.home() / ".cache" / "fedge" / "bench" / "feature_synthesis"
N_SITES, ALPHA, PUBLIC_FRAC, TEST_FRAC, VAL_FRAC = 3, 0.3, 0.2, 0.3, 0.2
K, MIN_GROUP = 4, 5
SPREAD_SCALES = (0.5, 1.0, 1.5)
NORMALISE = (False,)
BANDWIDTHS = (0.7, 1.0)
LAMS = (1e-6, 1e-3)
SHRINKAGES = (0.05, 0.2)
CS = (0.1, 1.0, 10.0, 100.0)
DIFFUSION_HIDDEN, DIFFUSION_BATCH = 256, 128  # a few hundred public embeddings: a small denoiser suffices


def load_task(name: str, size: int) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], dict[str, Any]]:
    """Images [N, 1, size, size] in [0, 1] as an edge feeds them, integer labels, label names, what the task is."""
    if name == "digits":
        from hub import datasets

        d = datasets.load("digits")
        imgs = np.stack([fit_image(im[0], size)[None] for im in d.images])
        return imgs, d.labels, d.label_names, {"source": "sklearn digits", "n": len(d.labels)}
    if name == "elpv_mono":
        from elpv_dataset.utils import load_dataset  # ImportError: the caller skips the task and says so

        images, probs, types = load_dataset()
        mono = types == "mono"
        labels = (probs[mono] >= 0.5).astype(np.int64)
        imgs = np.stack([fit_image(im.astype(np.float32) / 255.0, size)[None] for im in images[mono]])
        about = {"source": "elpv-dataset (CC BY-NC-SA 4.0; evaluated only, nothing copied), mono modules",
                 "label": "defect probability >= 0.5", "n": int(mono.sum()), "defective": int(labels.sum())}  # fmt: skip
        return imgs, labels, ("functional", "defective"), about
    raise ValueError(f"unknown task {name!r}")


def embeddings(name: str, bundle_dir: Path, encoder_id: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], dict]:
    """The task's embeddings through the bundle's fp32 encoder (cached outside the repository by encoder id)."""
    from edge.encoder import OnnxEncoder

    path = CACHE / f"{name}-{encoder_id}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return z["emb"], z["labels"], tuple(z["names"].tolist()), json.loads(str(z["about"]))
    enc = OnnxEncoder(bundle_dir / "encoder.onnx", prefer_cuda=False, threads=1)
    imgs, labels, names, about = load_task(name, enc.image_size)
    emb = enc.encode(imgs, batch_size=64)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, emb=emb, labels=labels, names=np.array(names), about=np.array(json.dumps(about)))
    return emb, labels, names, about


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean per-class recall over the classes present in y."""
    return float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)]))


def scores(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Accuracy and balanced accuracy."""
    return {"acc": float((y == pred).mean()), "ba": balanced_accuracy(y, pred)}


class MemoGenerator(Generator):
    """A generator whose draws are kept: the bench varies scale and head settings over the same residuals."""

    def __init__(self, inner: Generator):
        self.inner, self.kind, self.memo = inner, inner.kind, {}

    def residuals(self, centre: np.ndarray, spread: float, n: int, seed: int) -> np.ndarray:
        """The inner generator's residuals, computed once per (seed, n)."""
        if (seed, n) not in self.memo:
            self.memo[(seed, n)] = self.inner.residuals(centre, spread, n, seed)
        return self.memo[(seed, n)]

    def digest(self) -> str:
        """The inner generator's digest."""
        return self.inner.digest()


def site_split(labels: np.ndarray, seed: int) -> dict[str, Any]:
    """Public / test / per-site train and validation indices for one seed."""
    from hub import datasets

    sp = datasets.split(len(labels), seed=seed, public_frac=PUBLIC_FRAC, test_frac=TEST_FRAC)
    sites = datasets.dirichlet_sites(labels, sp.private, N_SITES, ALPHA, seed=seed)
    train, val = [], []
    for i, idx in enumerate(sites):
        perm = np.random.default_rng([seed, i, 7]).permutation(idx)
        n_val = int(round(len(idx) * VAL_FRAC))
        val.append(np.sort(perm[:n_val]))
        train.append(np.sort(perm[n_val:]))
    return {"public": sp.public, "test": sp.test, "train": train, "val": val}


def head_predict(emb_fit: np.ndarray, lab_fit: np.ndarray, evals: list[np.ndarray], bw: float,
                 names: tuple[str, ...]) -> dict[float, list[np.ndarray]]:  # fmt: skip
    """The hub's closed-form head (random features, ridge-balanced) fitted on (emb_fit, lab_fit): predictions per lam."""
    from hub.learning.closed_form import sum_stats

    fm = FeatureMap(emb_fit.shape[1], 1024, bw, 0)
    stats = ContributionStats.from_features("bench", fm.key(), fm.transform(emb_fit), lab_fit)
    total = sum_stats([stats])
    feats = [fm.transform(e) for e in evals]
    out = {}
    for lam in LAMS:
        head = solve(total, label_names=[n for n in names if n in stats.labels], variant="ridge-balanced", lam=lam)
        index = np.array([names.index(n) for n in head.label_names])
        out[lam] = [index[head.predict(f)] for f in feats]
    return out


def nearest_prototype(contributions: list, names: tuple[str, ...], evals: list[np.ndarray]) -> list[np.ndarray]:
    """Label of the nearest uploaded prototype by cosine."""
    vecs, labs = [], []
    for c in contributions:
        for lp in c.labels:
            v = lp.vectors.to_numpy()
            vecs.append(v / np.linalg.norm(v, axis=1, keepdims=True))
            labs += [names.index(lp.label)] * len(v)
    protos, labs_a = np.concatenate(vecs), np.array(labs)
    return [labs_a[(e @ protos.T).argmax(1)] for e in evals]


def run_seed(task: str, emb: np.ndarray, labels: np.ndarray, names: tuple[str, ...], encoder_id: str, seed: int,
             budget_s: float, max_steps: int, threads: int) -> dict[str, Any]:  # fmt: skip
    """Every method and setting on one seed: validation and test scores, bytes, generator training."""
    import torch

    torch.set_num_threads(threads)
    from edge.contribution import make_contribution
    from hub.learning.feature_synthesis import EncoderBundle

    sp = site_split(labels, seed)
    val = np.concatenate(sp["val"])
    evals, ys = [emb[val], emb[sp["test"]]], [labels[val], labels[sp["test"]]]
    contributions = [
        make_contribution(
            f"site-{i}", encoder_id, emb[idx], np.array(names)[labels[idx]], k=K, min_group_size=MIN_GROUP, seed=seed
        )  # fmt: skip
        for i, idx in enumerate(sp["train"])
    ]
    up = [len(c.model_dump_json().encode()) for c in contributions]
    out: dict[str, Any] = {"seed": seed, "bytes_up": up, "n": {"public": len(sp["public"]), "test": len(sp["test"]),
                           "train": [len(t) for t in sp["train"]], "val": [len(v) for v in sp["val"]]}, "methods": {}}  # fmt: skip

    def record(method: str, setting: dict, preds: list[np.ndarray]) -> None:
        out["methods"].setdefault(method, []).append(
            {"setting": setting, "val": scores(ys[0], preds[0]), "test": scores(ys[1], preds[1])}
        )

    record("nearest prototype", {}, nearest_prototype(contributions, names, evals))
    real = np.concatenate(sp["train"])
    for bw in BANDWIDTHS:
        for lam, preds in head_predict(emb[real], np.array(names)[labels[real]], evals, bw, names).items():
            record("head on real embeddings (reference)", {"bandwidth": bw, "lam": lam}, preds)
    from sklearn.linear_model import LogisticRegression

    for c in CS:
        clf = LogisticRegression(C=c, max_iter=3000, class_weight="balanced").fit(emb[real], labels[real])
        record("centralized logistic regression (ceiling)", {"C": c}, [clf.predict(e) for e in evals])

    bundle = EncoderBundle(Path("."), {"encoder_id": encoder_id, "embedding_dim": emb.shape[1], "image_size": 0})
    public = emb[sp["public"]]
    gens: list[tuple[str, dict, Generator]] = [("gaussian", {}, Generator())]
    t0 = time.perf_counter()
    for sh in SHRINKAGES:
        gens.append(("covariance", {"shrinkage": sh}, train_generator("covariance", public, seed, shrinkage=sh)))
    out["covariance_fit_s"] = round((time.perf_counter() - t0) / len(SHRINKAGES), 2)
    training = DiffusionTraining(time_budget_s=budget_s, max_steps=max_steps, threads=threads, seed=seed,
                                 hidden=DIFFUSION_HIDDEN, batch_size=DIFFUSION_BATCH)  # fmt: skip
    cpu0 = time.process_time()
    diff = train_generator("diffusion", public, seed, training=training)
    out["diffusion_training"] = {**diff.info, "cpu_s": round(time.process_time() - cpu0, 1)}  # type: ignore[attr-defined]
    gens.append(("diffusion", {}, diff))
    for kind, gset, gen in gens:
        memo = MemoGenerator(gen)
        t1 = time.perf_counter()
        for scale, norm in itertools.product(SPREAD_SCALES, NORMALISE):
            fs = FeatureSynthesizer(bundle, FeatureSynthesisConfig(spread_scale=scale, normalise=norm, seed=seed), memo)
            parts = [fs.synthesize(c) for c in contributions]
            syn = np.concatenate([p.embeddings for p in parts])
            syn_labels = np.concatenate([p.labels for p in parts])
            for bw in BANDWIDTHS:
                for lam, preds in head_predict(syn, syn_labels, evals, bw, names).items():
                    setting = {**gset, "spread_scale": scale, "normalise": norm, "bandwidth": bw, "lam": lam}
                    record(f"fedge: {kind}", setting, preds)
        out.setdefault("synthesis_grid_s", {})[f"{kind}{gset}"] = round(time.perf_counter() - t1, 1)
        out.setdefault("synthetic_samples", len(syn))
    return out


def select(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method: the setting with the best mean validation balanced accuracy over seeds, and its test scores."""
    summary = {}
    for method in per_seed[0]["methods"]:
        rows = [s["methods"][method] for s in per_seed]
        n_settings = len(rows[0])
        val_means = [np.mean([r[i]["val"]["ba"] for r in rows]) for i in range(n_settings)]
        best = int(np.argmax(val_means))
        pick = [r[best] for r in rows]
        summary[method] = {
            "setting": pick[0]["setting"],
            **{f"{part}_{m}": float(np.mean([p[part][m] for p in pick])) for part in ("val", "test") for m in ("acc", "ba")},
            **{f"{part}_{m}_std": float(np.std([p[part][m] for p in pick])) for part in ("val", "test") for m in ("acc", "ba")},
            "val_ba_per_seed": [p["val"]["ba"] for p in pick],
            "test_ba_per_seed": [p["test"]["ba"] for p in pick],
        }  # fmt: skip
    return summary


def verdict(summary: dict[str, Any], candidate: str, part: str = "val") -> str:
    """win / loss / tie of a candidate against Gaussian sampling: a win or loss only where mean ± std do not overlap."""
    a, b = summary[f"fedge: {candidate}"], summary["fedge: gaussian"]
    lo_a, hi_a = a[f"{part}_ba"] - a[f"{part}_ba_std"], a[f"{part}_ba"] + a[f"{part}_ba_std"]
    lo_b, hi_b = b[f"{part}_ba"] - b[f"{part}_ba_std"], b[f"{part}_ba"] + b[f"{part}_ba_std"]
    return "win" if lo_a > hi_b else "loss" if hi_a < lo_b else "tie"


def paired(summary: dict[str, Any], candidate: str) -> list[float]:
    """Per seed, the candidate's validation balanced accuracy minus Gaussian sampling's (same split, same uploads)."""
    a, b = summary[f"fedge: {candidate}"]["val_ba_per_seed"], summary["fedge: gaussian"]["val_ba_per_seed"]
    return [round(x - y, 4) for x, y in zip(a, b, strict=True)]


def markdown(result: dict[str, Any]) -> str:
    """The results table, one block per task."""
    lines = ["# Feature-space synthesis on the general bundle (bench/feature_synthesis.py)", "",
             f"Seeds {result['seeds']}; {N_SITES} sites, Dirichlet {ALPHA}, {int(TEST_FRAC * 100)} % test, "
             f"{int(PUBLIC_FRAC * 100)} % public (unlabelled), {int(VAL_FRAC * 100)} % of each site kept for "
             "validation; settings chosen on validation balanced accuracy (mean over seeds). mean ± std over seeds.",
             ""]  # fmt: skip
    for task, t in result["tasks"].items():
        if "skipped" in t:
            lines += [f"## {task}", "", f"not evaluated: {t['skipped']}", ""]
            continue
        up = t["bytes_up_per_site"]
        lines += [f"## {task}", "", f"Bytes up per site: mean {up['mean'] / 1024:.1f} KiB, max {up['max'] / 1024:.1f} KiB "
                  f"(one contribution, JSON). Diffusion training per seed: {t['diffusion_steps']} steps, "
                  f"{t['diffusion_train_s']} s wall, {t['diffusion_cpu_s']} s CPU ({result['threads']} thread, "
                  f"{result['jobs']} seeds at once on a shared machine).", "",
                  "| method | val BA | test acc | test BA | setting |", "|---|---|---|---|---|"]  # fmt: skip
        for m, s in t["summary"].items():
            lines.append(f"| {m} | {s['val_ba']:.3f} ± {s['val_ba_std']:.3f} | {s['test_acc']:.3f} ± {s['test_acc_std']:.3f} "
                         f"| {s['test_ba']:.3f} ± {s['test_ba_std']:.3f} | {json.dumps(s['setting'])} |")  # fmt: skip
        lines += ["", "Against Gaussian sampling (balanced accuracy, win/loss only where mean ± std do not overlap): "
                  + "; ".join(f"{k}: validation {v['val']}, test {v['test']}" for k, v in t["verdicts"].items()), ""]  # fmt: skip
    lines += ["## Decision", "", result["decision"], ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Test balanced accuracy per method and task, with the spread over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t, v in result["tasks"].items() if "summary" in v]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        summ = result["tasks"][task]["summary"]
        names = list(summ)
        ax.barh(range(len(names)), [summ[n]["test_ba"] for n in names], xerr=[summ[n]["test_ba_std"] for n in names])
        ax.set_yticks(range(len(names)), names, fontsize=7)
        lo = min(summ[n]["test_ba"] - summ[n]["test_ba_std"] for n in names)
        ax.set_xlim(max(0.0, lo - 0.05), 1.0)
        ax.set_xlabel("test balanced accuracy")
        ax.set_title(task)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run the bench and write its JSON, Markdown and plot."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["digits", "elpv_mono"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--bundle", type=Path, default=Path.home() / ".cache" / "fedge" / "bundles" / "general")
    ap.add_argument("--diffusion-budget-s", type=float, default=900.0, help="training time cap per seed (wall)")
    ap.add_argument("--diffusion-steps", type=int, default=1000, help="training steps per seed (the binding limit)")
    ap.add_argument("--jobs", type=int, default=3, help="seeds run in parallel processes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for diffusion training and sampling")
    ap.add_argument("--out", type=Path, default=RESULTS / "feature_synthesis")
    ap.add_argument("--merge", nargs="+", type=Path, help="combine the JSON of runs made task by task, run nothing")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    import torch

    torch.set_num_threads(args.threads)
    bundle = load_encoder_bundle(args.bundle)
    t0 = time.perf_counter()
    result: dict[str, Any] = {"seeds": args.seeds, "threads": args.threads, "jobs": args.jobs, "bundle": bundle.encoder_id,
                              "diffusion_budget_s": args.diffusion_budget_s,
                              "diffusion_steps": args.diffusion_steps,
                              "diffusion_model": {"hidden": DIFFUSION_HIDDEN, "blocks": 3, "batch_size": DIFFUSION_BATCH},
                              "grid": {
                                  "spread_scale": SPREAD_SCALES, "normalise": NORMALISE, "bandwidth": BANDWIDTHS,
                                  "lam": LAMS, "shrinkage": SHRINKAGES, "C": CS, "k": K, "min_group_size": MIN_GROUP},
                              "tasks": {}}  # fmt: skip
    for task in args.tasks:
        try:
            emb, labels, names, about = embeddings(task, args.bundle, bundle.encoder_id)
        except ImportError as err:
            result["tasks"][task] = {"skipped": f"{err} (pip install elpv-dataset)"}
            print(f"{task}: skipped ({err})", flush=True)
            continue
        with ProcessPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(run_seed, task, emb, labels, names, bundle.encoder_id, seed, args.diffusion_budget_s,
                                   args.diffusion_steps, args.threads) for seed in args.seeds]  # fmt: skip
            per_seed = []
            for f in futures:  # each seed kept as it ends: a run cut short still leaves what it measured
                per_seed.append(f.result())
                args.out.parent.mkdir(parents=True, exist_ok=True)
                part = args.out.parent / f"{args.out.name}-{task}-seed{per_seed[-1]['seed']}.json"
                part.write_text(json.dumps(per_seed[-1], default=str) + "\n")
        for s in per_seed:
            print(f"{task} seed {s['seed']}: diffusion {s['diffusion_training']}", flush=True)
        summary = select(per_seed)
        ups = [b for s in per_seed for b in s["bytes_up"]]
        result["tasks"][task] = {
            "about": about, "summary": summary,
            "verdicts": {k: {"val": verdict(summary, k, "val"), "test": verdict(summary, k, "test"),
                             "paired_val_ba_diff_per_seed": paired(summary, k)} for k in ("covariance", "diffusion")},
            "bytes_up_per_site": {"mean": float(np.mean(ups)), "max": int(max(ups))},
            "diffusion_train_s": [s["diffusion_training"]["train_s"] for s in per_seed],
            "diffusion_steps": [s["diffusion_training"]["steps"] for s in per_seed],
            "diffusion_cpu_s": [s["diffusion_training"]["cpu_s"] for s in per_seed],
            "per_seed": per_seed,
        }  # fmt: skip
        print(json.dumps({m: (round(s["val_ba"], 3), round(s["test_ba"], 3)) for m, s in summary.items()}), flush=True)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(), "load": os.getloadavg()}
    finish(result, args.out)
    return 0


def finish(result: dict[str, Any], out: Path) -> None:
    """Decide the generator from every task's validation verdicts and write JSON, Markdown and plot."""
    done = [t for t in result["tasks"].values() if "verdicts" in t]
    wins = {k: all(t["verdicts"][k]["val"] == "win" for t in done) for k in ("covariance", "diffusion")}
    keep = [k for k in ("diffusion", "covariance") if done and wins[k]]
    result["decision"] = (
        f"The hub's feature generator: {keep[0]} (beats Gaussian sampling on validation on every task)." if keep
        else "The hub's feature generator: gaussian. Neither trained generator beats Gaussian sampling on validation "
        "on every task (a win needs mean ± std over the seeds not to overlap)."
    )  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    plot(result, out.with_suffix(".png"))
    print(result["decision"])


def merge(parts: list[Path], out: Path) -> int:
    """Combine runs made task by task (`--tasks X --out ...`, same settings) into one result."""
    runs = [json.loads(p.read_text()) for p in parts]
    result = dict(runs[0])
    result["tasks"] = {k: v for r in runs for k, v in r["tasks"].items()}
    result["wall_s"] = [r["wall_s"] for r in runs]
    result["machine"] = [r["machine"] for r in runs]
    result["merged_from"] = [str(p) for p in parts]
    finish(result, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
