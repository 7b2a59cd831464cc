"""The core-loop demo: three sites, one round, no image leaves a site.

    fedge-hub demo            (what `make demo` runs)

Each site holds a Dirichlet(0.3) share of the digits private split in the local data layout, encodes
it with the bundled ONNX encoder (the edge code path, no torch), and hands the hub a contribution of
prototypes. The hub synthesizes, trains, exports ONNX and publishes a model version; every site runs
it with onnxruntime on its own held-out samples. Transport is function calls here; the MQTT services
replace them without changing either core.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

import bundled
from contract.layout import load_images, scan
from edge.contribution import make_contribution
from edge.encoder import choose_encoder
from hub import datasets
from hub.foundation.bundle import load as load_foundation
from hub.registry import ModelRegistry
from hub.rounds import TrainConfig, publish, run_round
from hub.synthesis import SynthesisConfig, Synthesizer


@dataclass
class SiteReport:
    """What one site did and got."""

    site_id: str
    samples: int
    held_out: int
    bytes_sent: int
    bytes_received: int
    local_accuracy: float
    encoder_variant: str


def onnx_accuracy(model_path: Path, labels: list[str], images: np.ndarray, truth: list[str]) -> float:
    """Accuracy of a delivered ONNX model, run the way a site runs it."""
    if not len(images):
        return float("nan")
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    pred = session.run(None, {"image": images.astype(np.float32)})[0].argmax(1)
    return float((np.array(labels)[pred] == np.array(truth)).mean())


def run_demo(workdir: Path, n_sites: int = 3, alpha: float = 0.3, k: int = 4, seed: int = 0, log=print) -> dict:
    """Run the demo in `workdir` (wiped first) and return its figures."""
    shutil.rmtree(workdir, ignore_errors=True)
    bundle = bundled.path("digits")
    fm = load_foundation(bundle)
    ds = fm.manifest["dataset"]
    data = datasets.load("digits")
    sp = datasets.split(len(data.labels), ds["split_seed"], ds["public_frac"], ds["test_frac"])
    parts = datasets.dirichlet_sites(data.labels, sp.private, n_sites, alpha, seed=seed)
    rng = np.random.default_rng(seed)

    contributions, held, reports = [], {}, []
    for s, part in enumerate(parts):
        site_id = f"site-{s + 1}"
        order = rng.permutation(part)
        n_hold = max(1, len(order) // 5)
        datasets.write_folder(workdir / site_id / "data", data, np.sort(order[n_hold:]))
        held[site_id] = order[:n_hold]
        # --- edge side: only the site's folder, the ONNX encoder and numpy ---
        samples = scan(workdir / site_id / "data")
        images = load_images(samples)
        choice = choose_encoder(bundle, images[:64])
        c = make_contribution(
            site_id, choice.encoder_id, choice.encoder.encode(images), [x.label for x in samples], k=k, seed=seed
        )
        contributions.append(c)
        reports.append(SiteReport(site_id, len(samples), n_hold, len(c.to_json_bytes()), 0, 0.0, choice.variant))
        log(
            f"{site_id}: {len(samples)} samples, labels {sorted({x.label for x in samples})} -> {reports[-1].bytes_sent} B"
        )

    # --- hub side ---
    t = time.perf_counter()
    synth = Synthesizer(fm, SynthesisConfig(seed=seed), cache_dir=workdir / "hub" / "synthesis-cache", progress=False)
    result = run_round(contributions, synth, TrainConfig(seed=seed))
    version = publish(result, ModelRegistry(workdir / "hub" / "models"), contributions, {"foundation": fm.encoder_id})
    round_s = time.perf_counter() - t
    log(
        f"hub: {len(result.synthetic.labels)} synthetic samples, model v{version.version} ({version.manifest['size_bytes']} B) in {round_s:.1f} s"
    )

    # --- delivery: each site verifies and runs the model ---
    labels = version.manifest["labels"]
    for r in reports:
        idx = held[r.site_id]
        r.bytes_received = version.manifest["size_bytes"]
        r.local_accuracy = onnx_accuracy(
            version.path, labels, data.images[idx], [data.label_names[i] for i in data.labels[idx]]
        )
    test_acc = onnx_accuracy(
        version.path, labels, data.images[sp.test], [data.label_names[i] for i in data.labels[sp.test]]
    )
    import onnx

    params = sum(int(np.prod(t.dims)) for t in onnx.load(str(version.path)).graph.initializer)
    fedavg_bytes = 50 * 2 * params * 4  # 50 rounds, float32 weights up and down
    return {
        "sites": [r.__dict__ for r in reports],
        "global_test_accuracy": test_acc,
        "model_version": version.version,
        "model_path": str(version.path),
        "model_parameters": params,
        "fedavg_50_rounds_bytes_per_site": fedavg_bytes,
        "round_s": round_s,
    }


def print_table(result: dict) -> None:
    """The demo's closing table."""
    print()
    print(
        f"{'site':<8} {'samples':>7} {'held-out':>8} {'bytes sent':>11} {'bytes received':>15} {'local accuracy':>15}"
    )
    for s in result["sites"]:
        print(
            f"{s['site_id']:<8} {s['samples']:>7} {s['held_out']:>8} {s['bytes_sent']:>11,} "
            f"{s['bytes_received']:>15,} {s['local_accuracy']:>15.1%}"
        )
    sent = np.mean([s["bytes_sent"] for s in result["sites"]])
    fed = result["fedavg_50_rounds_bytes_per_site"]
    print()
    print(f"global test accuracy:            {result['global_test_accuracy']:.1%}  (model v{result['model_version']})")
    print(f"bytes sent per site:             {sent:,.0f} B of prototypes; no image left a site")
    print(f"FedAvg, 50 rounds of this model: {fed:,} B per site ({fed / sent:,.0f}x more)")
    print(f"model:                           {result['model_path']}")
    print("metrics endpoints:               arrive with the MQTT services (see README, Roadmap)")


def main(argv: list[str] | None = None) -> int:
    """Entry for `fedge-hub demo`."""
    ap = argparse.ArgumentParser(
        prog="fedge-hub demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workdir", type=Path, default=Path("var/demo"))
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = ap.parse_args(argv)
    result = run_demo(args.workdir, k=args.k)
    print_table(result)
    if args.json:
        print(json.dumps(result, indent=1))
    return 0
