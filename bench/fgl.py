"""bench/fgl: fedge one round against centralized, local-only, Flower FedAvg, linear-probe FedAvg, nearest prototype.

One split per dataset (the bundled foundation model's own: public / private / test), private data
spread over N sites by Dirichlet(alpha) over labels. Writes bench/results/fgl.json, fgl.summary.json,
fgl.timings.json, fgl.md, fgl.png.

    python -m bench.fgl            # full grid (both datasets, alpha 0.1/0.5/100, N 5/20, k 1/4/16)
    python -m bench.fgl --quick    # digits, alpha 0.1, N 5: a few minutes

Reproducible: two runs with the same --seed and --threads write byte-identical fgl.json and
fgl.summary.json (every model is built after seeding, contribution ids derive from content, synthesis
seeds derive from them, thread pools are sized). Wall-clock times go to fgl.timings.json only.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

import bundled
from bench.baselines import LinearHead, local_only, nearest_prototype, run_fedavg
from edge.contribution import make_contribution
from edge.encoder import OnnxEncoder
from hub import datasets
from hub.classifier import SmallCNN, accuracy, predict, train_classifier
from hub.export import export_classifier
from hub.foundation.bundle import load as load_foundation
from hub.rounds import TrainConfig, run_round
from hub.synthesis import SynthesisConfig, Synthesizer
from runtime.threads import DEFAULT_THREADS, size_pools

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Grid:
    """What one run covers."""

    datasets: tuple[str, ...] = ("digits", "mnist")
    alphas: tuple[float, ...] = (0.1, 0.5, 100.0)
    sites: tuple[int, ...] = (5, 20)
    ks: tuple[int, ...] = (1, 4, 16)
    fedavg_rounds: int = 50
    local_epochs: int = 2
    fedavg_lr: float = 0.05
    probe_lr: float = 0.5
    epochs: int = 30
    min_group_size: int = 5
    seed: int = 0


QUICK = Grid(datasets=("digits",), alphas=(0.1,), sites=(5,), ks=(1, 4, 16))

# Synthetic samples per real sample: 8 for digits (12 scored a little above 6 in bench/tune_synthesis,
# within that measure's noise; 8 keeps the grid's time down); 2 for MNIST, whose generator is about
# 3x slower per image, so that the full grid stays within 60 minutes on 2 cores.
SYNTHESIS = {"digits": SynthesisConfig(samples_per_count=8.0), "mnist": SynthesisConfig(samples_per_count=2.0)}


def row(
    dataset: str,
    alpha: float,
    n: int,
    method: str,
    k: int | None,
    rounds: int,
    acc: float,
    up: float,
    down: float,
    wall: float,
    timings: dict[str, float] | None = None,
    **extra: object,
) -> dict:
    """One result row; its wall time (and any other `timings`) under the private key "_timings", kept out of fgl.json."""
    return {
        "dataset": dataset, "alpha": alpha, "sites": n, "method": method, "k": k, "rounds": rounds,
        "accuracy": round(acc, 4), "bytes_up_per_site": int(round(up)), "bytes_down_per_site": int(round(down)),
        **extra, "_timings": {"wall_s": round(wall, 2), **(timings or {})},
    }  # fmt: skip


TIMED = ("dataset", "alpha", "sites", "method", "k")  # what names a row in fgl.timings.json


def split_timings(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(rows without wall-clock fields, one timing record per row that had them)."""
    clean, timings = [], []
    for r in rows:
        r = dict(r)
        t = r.pop("_timings", None) or {k: r.pop(k) for k in ("wall_s", "synthesis_s") if k in r}
        clean.append(r)
        if t:
            timings.append({**{k: r[k] for k in TIMED}, **t})
    return clean, timings


def onnx_size(model: SmallCNN) -> int:
    """Bytes of the model as fedge ships it (ONNX)."""
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "m.onnx"
        export_classifier(model, p)
        return p.stat().st_size


METHODS = ("centralized", "local-only", "fedavg", "fedavg-linear-probe", "fedge")  # fedge includes nearest-prototype


def run_dataset(
    name: str, grid: Grid, cache_dir: Path, log, methods: tuple[str, ...] = METHODS, threads: int = DEFAULT_THREADS
) -> list[dict]:
    """Every method in `methods` at every (alpha, N) for one dataset; onnxruntime uses `threads` threads."""
    data = datasets.load(name)
    fm = load_foundation(bundled.path(name))
    ds = fm.manifest["dataset"]
    sp = datasets.split(len(data.labels), ds["split_seed"], ds["public_frac"], ds["test_frac"])
    if sp.public_hash() != ds["public_indices_sha256"]:
        raise RuntimeError(f"split of {name} differs from the one the bundled model was trained on")
    nc = len(data.label_names)
    test = (data.images[sp.test], data.labels[sp.test])
    encoder = OnnxEncoder(bundled.path(name) / "encoder.onnx", threads=threads)  # the edge's own encoder path
    emb = np.zeros((len(data.labels), fm.dim), np.float32)
    used = np.concatenate([sp.private, sp.test])
    emb[used] = encoder.encode(data.images[used])
    pixel_bytes = int(np.prod(data.images.shape[1:]))  # raw 8-bit pixels per image
    synth_cfg = replace(SYNTHESIS.get(name, SynthesisConfig()), seed=grid.seed)
    train_cfg = TrainConfig(epochs=grid.epochs, seed=grid.seed)

    t = time.perf_counter()
    central = train_classifier(
        data.images[sp.private], data.labels[sp.private], nc, epochs=grid.epochs, seed=grid.seed, balance=False
    )
    central_acc, central_s = accuracy(central, *test), time.perf_counter() - t
    model_bytes = onnx_size(central)
    log(f"[{name}] centralized {central_acc:.4f}; model {model_bytes} B as ONNX")

    rows = []
    for alpha in grid.alphas:
        for n in grid.sites:
            parts = datasets.dirichlet_sites(data.labels, sp.private, n, alpha, seed=grid.seed)
            sites = [(data.images[p], data.labels[p]) for p in parts]
            mean_n = float(np.mean([len(p) for p in parts]))
            tag = f"[{name} a={alpha} N={n}]"
            if "centralized" in methods:
                rows.append(row(name, alpha, n, "centralized", None, 1, central_acc, mean_n * pixel_bytes, model_bytes, central_s,
                                note="raw 8-bit pixels uploaded"))  # fmt: skip

            if "local-only" in methods:
                t = time.perf_counter()
                lo_mean, lo_std = local_only(sites, test, nc, grid.epochs, seed=grid.seed)
                wall = time.perf_counter() - t
                rows.append(
                    row(name, alpha, n, "local-only", None, 0, lo_mean, 0, 0, wall, accuracy_std=round(lo_std, 4))
                )
                log(f"{tag} local-only {lo_mean:.4f}")

            federated = {
                "fedavg": (lambda: SmallCNN(data.image_size, nc), sites, test, grid.fedavg_lr),
                "fedavg-linear-probe": (
                    lambda: LinearHead(fm.dim, nc),
                    [(emb[p], data.labels[p]) for p in parts],
                    (emb[sp.test], data.labels[sp.test]),
                    grid.probe_lr,
                ),
            }
            for method, (make_model, fed_sites, fed_test, lr) in federated.items():
                if method not in methods:
                    continue
                r = run_fedavg(
                    make_model, fed_sites, fed_test, grid.fedavg_rounds, grid.local_epochs, lr, seed=grid.seed
                )
                up, down = r.bytes_up_per_site, r.bytes_down_per_site
                rows.append(row(name, alpha, n, method, None, grid.fedavg_rounds, r.accuracy, up, down, r.wall_s, curve=r.curve))  # fmt: skip
                log(f"{tag} {method} {r.accuracy:.4f} ({up:.0f} B up/site, {down:.0f} B down/site)")

            if "fedge" not in methods:
                continue
            synthesizer = Synthesizer(fm, synth_cfg, cache_dir=cache_dir, progress=False)
            for k in grid.ks:
                t = time.perf_counter()
                contribs = [
                    make_contribution(
                        f"site{s:02d}",
                        fm.encoder_id,
                        emb[p],
                        np.array(data.label_names)[data.labels[p]],
                        k=k,
                        min_group_size=grid.min_group_size,
                        seed=grid.seed,
                    )  # fmt: skip
                    for s, p in enumerate(parts)
                ]
                encode_s = time.perf_counter() - t
                up = float(np.mean([len(c.to_json_bytes()) for c in contribs]))
                np_acc = nearest_prototype(contribs, emb[sp.test], data.labels[sp.test], data.label_names)
                rows.append(row(name, alpha, n, "nearest-prototype", k, 1, np_acc, up, 0, encode_s))
                result = run_round(contribs, synthesizer, train_cfg)
                index = [data.label_names.index(x) for x in result.label_names]
                pred = np.array(index)[predict(result.model, test[0])]
                acc = float((pred == test[1]).mean())
                rows.append(row(name, alpha, n, "fedge", k, 1, acc, up, model_bytes, encode_s + result.synthesis_s + result.training_s,
                                {"synthesis_s": round(result.synthesis_s, 2)}, synthetic_samples=int(len(result.synthetic.labels))))  # fmt: skip
                log(f"{tag} k={k}: nearest-prototype {np_acc:.4f}, fedge {acc:.4f} ({up:.0f} B up/site, "
                    f"{len(result.synthetic.labels)} synthetic, {result.synthesis_s:.1f}+{result.training_s:.1f} s)")  # fmt: skip
    return rows


def acceptance(rows: list[dict]) -> list[dict]:
    """For every (dataset, alpha=0.1, N): fedge's best k against FedAvg-50 and nearest prototype of the same k."""
    out = []
    for ds, alpha, n in sorted({(r["dataset"], r["alpha"], r["sites"]) for r in rows}):
        if alpha != 0.1:
            continue
        grp = [r for r in rows if (r["dataset"], r["alpha"], r["sites"]) == (ds, alpha, n)]
        fedge = max((r for r in grp if r["method"] == "fedge"), key=lambda r: r["accuracy"])
        fedavg = next(r for r in grp if r["method"] == "fedavg")
        npc = next(r for r in grp if r["method"] == "nearest-prototype" and r["k"] == fedge["k"])
        ratio_up = fedge["bytes_up_per_site"] / fedavg["bytes_up_per_site"]
        total = (fedge["bytes_up_per_site"] + fedge["bytes_down_per_site"]) / (
            fedavg["bytes_up_per_site"] + fedavg["bytes_down_per_site"]
        )
        out.append({
            "dataset": ds, "alpha": alpha, "sites": n, "fedge_k": fedge["k"], "fedge": fedge["accuracy"],
            "fedavg": fedavg["accuracy"], "nearest_prototype": npc["accuracy"], "bytes_up_ratio": ratio_up,
            "bytes_total_ratio": total,
            "beats_fedavg": fedge["accuracy"] >= fedavg["accuracy"], "beats_nearest_prototype": fedge["accuracy"] > npc["accuracy"],
            "up_within_1_1000": ratio_up <= 1e-3,
        })  # fmt: skip
    return out


def fmt_bytes(b: float) -> str:
    """Human-readable bytes."""
    for unit in ("B", "KB", "MB", "GB"):
        if b < 1000 or unit == "GB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1000
    return f"{b:.1f} GB"


def markdown(rows: list[dict], checks: list[dict], meta: dict) -> str:
    """The results as Markdown tables."""
    lines = [
        "# bench/fgl results",
        "",
        f"Machine: {meta['machine']}. Runs, in order (a later run replaces the rows of the methods it names):",
        "",
    ]
    lines += [f"- `{r['command']}`" + (f": {r['wall_s']:.0f} s" if "wall_s" in r else "") for r in meta["runs"]] + [""]
    lines += [
        "## Acceptance (alpha = 0.1)",
        "",
        "| dataset | N | fedge best k | fedge acc | FedAvg-50 acc | nearest-prototype acc (same k) | up bytes fedge/FedAvg | total bytes fedge/FedAvg | fedge >= FedAvg | fedge > NP | up <= 1/1000 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        yes = lambda b: "yes" if b else "**no**"  # noqa: E731
        lines.append(f"| {c['dataset']} | {c['sites']} | {c['fedge_k']} | {c['fedge']:.4f} | {c['fedavg']:.4f} | {c['nearest_prototype']:.4f} | "
                     f"1/{1 / c['bytes_up_ratio']:.0f} | 1/{1 / c['bytes_total_ratio']:.0f} | {yes(c['beats_fedavg'])} | {yes(c['beats_nearest_prototype'])} | {yes(c['up_within_1_1000'])} |")  # fmt: skip
    lines += ["", "Bytes are per site. Up: what a site sends (fedge: its contribution JSON; FedAvg: Flower's serialized parameters, every round). "
              "Down: what a site receives (fedge: the global model as ONNX, once). Centralized uploads raw 8-bit pixels.", ""]  # fmt: skip
    for ds, alpha, n in sorted({(r["dataset"], r["alpha"], r["sites"]) for r in rows}):
        lines += [
            f"## {ds}, alpha = {alpha}, N = {n}",
            "",
            "| method | k | rounds | accuracy | bytes up/site | bytes down/site | wall s |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in rows if (r["dataset"], r["alpha"], r["sites"]) == (ds, alpha, n)):
            acc = f"{r['accuracy']:.4f}" + (f" ± {r['accuracy_std']:.3f}" if "accuracy_std" in r else "")
            wall = f"{r['wall_s']:.1f}" if "wall_s" in r else ""
            lines.append(
                f"| {r['method']} | {r['k'] or ''} | {r['rounds']} | {acc} | {fmt_bytes(r['bytes_up_per_site'])} | {fmt_bytes(r['bytes_down_per_site'])} | {wall} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy against bytes up per site (log x), one panel per dataset and N at alpha = 0.1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["dataset"], r["sites"]) for r in rows if r["alpha"] == 0.1})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    style = {"fedge": "o-", "nearest-prototype": "s--", "fedavg": "^", "fedavg-linear-probe": "v", "centralized": "*"}
    for ax, (ds, n) in zip(axes[0], panels, strict=True):
        grp = [r for r in rows if r["dataset"] == ds and r["sites"] == n and r["alpha"] == 0.1]
        for method, st in style.items():
            pts = sorted(
                (r["bytes_up_per_site"], r["accuracy"])
                for r in grp
                if r["method"] == method and r["bytes_up_per_site"] > 0
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), st, label=method, markersize=8)
        lo = next((r for r in grp if r["method"] == "local-only"), None)
        if lo:
            ax.axhline(lo["accuracy"], color="gray", ls=":", label="local-only (0 B)")
        ax.set_xscale("log")
        ax.set_xlabel("bytes sent per site")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{ds}, Dirichlet 0.1, {n} sites")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    """Run the grid and write the results."""
    ap = argparse.ArgumentParser(
        prog="python -m bench.fgl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="digits, alpha 0.1, N 5 only")
    ap.add_argument("--datasets", nargs="+", help="override the datasets")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--cache", type=Path, help="synthesis cache directory (default: a temporary one)")
    ap.add_argument(
        "--only", nargs="+", choices=METHODS, help="re-run these methods and replace their rows in the existing results"
    )
    ap.add_argument(
        "--seed", type=int, default=Grid.seed, help="seed of the split over sites, every model and synthesis"
    )
    ap.add_argument(
        "--threads", type=int, default=DEFAULT_THREADS,
        help="threads per torch, onnxruntime and BLAS pool (part of what decides the numbers: float sums change with it)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    methods = tuple(args.only) if args.only else METHODS
    grid = replace(QUICK if args.quick else Grid(), seed=args.seed)
    if args.datasets:
        grid = replace(grid, datasets=tuple(args.datasets))
    from threadpoolctl import threadpool_limits  # scikit-learn's dependency: numpy's BLAS pool

    ort_threads = size_pools(args.threads, import_torch=True)
    threadpool_limits(args.threads)
    start = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp)
        for name in grid.datasets:
            rows += run_dataset(
                name, grid, cache, lambda s: print(f"{time.perf_counter() - start:7.1f}s {s}", flush=True), methods,
                ort_threads,
            )  # fmt: skip
    stem = "fgl-quick" if args.quick else "fgl"
    command = (
        "python -m bench.fgl"
        + (" --quick" if args.quick else "")
        + (f" --datasets {' '.join(args.datasets)}" if args.datasets else "")
        + (f" --only {' '.join(args.only)}" if args.only else "")
        + (f" --seed {args.seed}" if args.seed != Grid.seed else "")
        + (f" --threads {args.threads}" if args.threads != DEFAULT_THREADS else "")
    )
    rows, timings = split_timings(rows)
    runs = [{"command": command}]
    run_times = [{"command": command, "wall_s": round(time.perf_counter() - start, 1)}]
    if args.only:
        # Replace exactly the re-run (dataset, method) rows; every other row stays as it was measured.
        redone = {(r["dataset"], r["method"]) for r in rows}
        old_rows, old_timings = split_timings(json.loads((args.out / f"{stem}.json").read_text()))
        timings_file = args.out / f"{stem}.timings.json"
        if timings_file.is_file():
            old_timings = json.loads(timings_file.read_text())["rows"]
        kept = [r for r in old_rows if (r["dataset"], r["method"]) not in redone]
        order = {m: i for i, m in enumerate(("centralized", "local-only", "fedavg", "fedavg-linear-probe"))}
        key = lambda r: (r["dataset"], r["alpha"], r["sites"], order.get(r["method"], 9), r["k"] or 0, r["method"])  # noqa: E731
        rows = sorted(kept + rows, key=key)
        timings = sorted([t for t in old_timings if (t["dataset"], t["method"]) not in redone] + timings, key=key)
        old_runs = json.loads((args.out / f"{stem}.summary.json").read_text())["meta"]["runs"]
        runs = [{"command": r["command"]} for r in old_runs] + runs
        run_times = (json.loads(timings_file.read_text())["runs"] if timings_file.is_file() else old_runs) + run_times
    checks = acceptance(rows)
    import os
    import platform

    meta = {
        "runs": runs,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "threads": args.threads,
        "grid": asdict(grid),
        "synthesis": {k: asdict(v) for k, v in SYNTHESIS.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / f"{stem}.summary.json").write_text(json.dumps({"meta": meta, "acceptance": checks}, indent=1) + "\n")
    (args.out / f"{stem}.timings.json").write_text(json.dumps({"runs": run_times, "rows": timings}, indent=1) + "\n")
    timed = {tuple(t[k] for k in TIMED): t for t in timings}
    shown = [{**r, **timed.get(tuple(r[k] for k in TIMED), {})} for r in rows]
    (args.out / f"{stem}.md").write_text(markdown(shown, checks, {**meta, "runs": run_times}) + "\n")
    plot(rows, args.out / f"{stem}.png")
    print(markdown([], checks, {**meta, "runs": run_times}))
    print(f"wrote {args.out / stem}.json, .summary.json, .timings.json, .md, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
