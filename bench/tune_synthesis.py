"""Choose the hub's synthesis settings without touching the test split.

Sites are simulated on the labelled *public* split (Dirichlet 0.1 over N sites, on 70 % of it) and
the resulting global model is scored on the other 30 % of the public split. The bench's test split
is never read. The generator has seen these public images, so absolute figures are optimistic; only
the ranking of settings is used.

    python -m bench.tune_synthesis --dataset digits
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

import bundled
from edge.contribution import make_contribution
from edge.encoder import OnnxEncoder
from hub import datasets
from hub.classifier import predict
from hub.foundation.bundle import load as load_foundation
from hub.rounds import TrainConfig, run_round
from hub.synthesis import SynthesisConfig, Synthesizer

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    """Grid over guidance, jitter and samples per count; prints validation accuracy per setting."""
    ap = argparse.ArgumentParser(prog="python -m bench.tune_synthesis", description=__doc__)
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--sites", type=int, nargs="+", default=[5, 20])
    ap.add_argument("--k", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    ap.add_argument("--jitter", type=float, nargs="+", default=[0.5, 1.0])
    ap.add_argument("--samples-per-count", type=float, nargs="+", default=[2.0])
    ap.add_argument("--epochs", type=int, nargs="+", default=[30])
    ap.add_argument("--cache", type=Path, help="synthesis cache (reused across classifier-only variants)")
    args = ap.parse_args(argv)
    data = datasets.load(args.dataset)
    fm = load_foundation(bundled.path(args.dataset))
    ds = fm.manifest["dataset"]
    sp = datasets.split(len(data.labels), ds["split_seed"], ds["public_frac"], ds["test_frac"])
    rng = np.random.default_rng(0)
    pub = rng.permutation(sp.public)
    cut = int(0.7 * len(pub))
    sim, val = np.sort(pub[:cut]), np.sort(pub[cut:])
    emb = OnnxEncoder(bundled.path(args.dataset) / "encoder.onnx").encode(data.images)
    names = np.array(data.label_names)
    results = []
    for n, k in itertools.product(args.sites, args.k):
        parts = datasets.dirichlet_sites(data.labels, sim, n, 0.1, seed=0, min_size=5)
        contribs = [
            make_contribution(f"s{s}", fm.encoder_id, emb[p], names[data.labels[p]], k=k) for s, p in enumerate(parts)
        ]
        for g, j, spc, ep in itertools.product(args.guidance, args.jitter, args.samples_per_count, args.epochs):
            cfg = replace(SynthesisConfig(), guidance=g, jitter_scale=j, samples_per_count=spc)
            t = time.perf_counter()
            r = run_round(contribs, Synthesizer(fm, cfg, cache_dir=args.cache, progress=False), TrainConfig(epochs=ep))
            index = np.array([data.label_names.index(x) for x in r.label_names])
            acc = float((index[predict(r.model, data.images[val])] == data.labels[val]).mean())
            results.append(
                {
                    "dataset": args.dataset,
                    "sites": n,
                    "k": k,
                    **asdict(cfg),
                    "epochs": ep,
                    "val_accuracy": acc,
                    "wall_s": round(time.perf_counter() - t, 1),
                }
            )
            print(
                f"N={n} k={k} guidance={g} jitter={j} spc={spc} epochs={ep}: {acc:.4f} ({time.perf_counter() - t:.0f} s)",
                flush=True,
            )
    out = RESULTS / f"tune_synthesis-{args.dataset}.json"
    previous = json.loads(out.read_text()) if out.is_file() else []
    out.write_text(json.dumps(previous + results, indent=1) + "\n")
    print(f"appended {len(results)} rows to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
