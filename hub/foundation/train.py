"""`fedge-hub foundation train`: train the bundled foundation model on the public split only."""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import onnxruntime as ort
import torch

from hub import datasets
from hub.foundation.bundle import Foundation, load, save_bundle, write_manifest
from hub.foundation.encoder import embed, train_simclr
from hub.foundation.generator import PrototypeConditionedUNet, train_generator
from hub.foundation.judge import judge_quality
from hub.synthesis import SynthesisConfig


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained model, recorded in the manifest."""

    dataset: str = "digits"
    split_seed: int = 0
    public_frac: float = 0.4
    test_frac: float = 0.2
    embedding_dim: int = 32
    encoder_channels: tuple[int, ...] = (32, 64)
    simclr_steps: int = 1500
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")
    diffusion_steps: int = 4000
    batch_size: int = 128
    cond_dropout: float = 0.1
    max_jitter: float = 0.08
    seed: int = 0


def default_recipe(dataset: str, image_size: int) -> Recipe:
    """The committed recipe for a dataset; folders pick one by image size."""
    if image_size <= 8:
        return Recipe(dataset=dataset)
    if image_size <= 16:
        return Recipe(
            dataset=dataset,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            diffusion_steps=3600,
        )
    raise ValueError(
        f"images of {image_size}x{image_size} are too large for the bundled CPU recipe; "
        "use a 16x16 or smaller dataset, or the Stable Diffusion backend"
    )


def train_bundle(recipe: Recipe, out: Path, command: str, name: str | None = None) -> dict[str, object]:
    """Train encoder and generator on the public split of `recipe.dataset` and write a bundle to `out`."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    data = datasets.load(recipe.dataset)
    sp = datasets.split(len(data.labels), recipe.split_seed, recipe.public_frac, recipe.test_frac)
    public = data.images[sp.public]
    print(f"{recipe.dataset}: {len(public)} public images of {data.image_size}x{data.image_size} (labels unused)")

    t0 = time.perf_counter()
    encoder = train_simclr(public, recipe.embedding_dim, recipe.encoder_channels, recipe.simclr_steps, seed=recipe.seed)
    encoder_s = time.perf_counter() - t0
    emb = embed(encoder, public)

    t0 = time.perf_counter()
    generator = PrototypeConditionedUNet(
        sample_size=data.image_size,
        cond_dim=recipe.embedding_dim,
        block_out_channels=recipe.block_out_channels,
        down_block_types=recipe.down_block_types,
        up_block_types=recipe.up_block_types,
    )
    generator, steps_done = train_generator(
        public, emb, generator, recipe.diffusion_steps, recipe.batch_size,
        cond_dropout=recipe.cond_dropout, max_jitter=recipe.max_jitter, seed=recipe.seed,
    )  # fmt: skip
    generator_s = time.perf_counter() - t0

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    name = name or recipe.dataset
    manifest: dict[str, object] = {
        "label_free": "encoder: SimCLR on unlabelled public images; generator: conditioned on embeddings only",
        "dataset": {
            "name": recipe.dataset,
            "n_total": int(len(data.labels)),
            "split_seed": recipe.split_seed,
            "public_frac": recipe.public_frac,
            "test_frac": recipe.test_frac,
            "n_public": int(len(sp.public)),
            "public_indices_sha256": sp.public_hash(),
        },
        "recipe": asdict(recipe),
        "command": command,
        "training": {
            "simclr_steps": recipe.simclr_steps,
            "encoder_wall_s": round(encoder_s, 1),
            "diffusion_steps": steps_done,
            "generator_wall_s": round(generator_s, 1),
            "generator_parameters": int(sum(p.numel() for p in generator.parameters())),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
        },
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    manifest = save_bundle(tmp, name, encoder, generator, public[:512], manifest)

    manifest["quality"] = evaluate(load(tmp), data, sp, recipe.seed, command)
    manifest["training"]["total_wall_s"] = round(time.perf_counter() - start, 1)
    manifest.pop("files", None)
    write_manifest(tmp, manifest)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(
        f"wrote {out}: judge accuracy {manifest['quality']['judge_accuracy']:.4f} in {manifest['training']['total_wall_s']} s"
    )
    return manifest


def evaluate(
    foundation: Foundation, data: datasets.Dataset, sp: datasets.Split, seed: int, command: str
) -> dict[str, Any]:
    """The quality section of a manifest, with the hub's default synthesis settings."""
    synthesis = SynthesisConfig()
    quality = judge_quality(
        foundation, data.images[sp.public], data.labels[sp.public], data.label_names, synthesis, seed=seed
    )
    return {**quality, "synthesis": asdict(synthesis), "command": command}


def evaluate_from_args(args: argparse.Namespace, command: str) -> int:
    """`fedge-hub foundation evaluate` once hub.cli has parsed its arguments: recompute and rewrite the quality."""
    import bundled

    path = Path(args.bundle) if Path(args.bundle).is_dir() else bundled.path(args.bundle)
    fm = load(path)
    ds = fm.manifest["dataset"]
    data = datasets.load(ds["name"])
    sp = datasets.split(len(data.labels), ds["split_seed"], ds["public_frac"], ds["test_frac"])
    if sp.public_hash() != ds["public_indices_sha256"]:
        raise SystemExit(f"{ds['name']} no longer splits as it did when {path} was trained")
    manifest = dict(fm.manifest)
    manifest["quality"] = evaluate(fm, data, sp, int(manifest["recipe"]["seed"]), command)
    manifest.pop("files", None)
    write_manifest(path, manifest)
    print(json.dumps(manifest["quality"], indent=1))
    return 0


def train_from_args(args: argparse.Namespace, command: str) -> int:
    """`fedge-hub foundation train` once hub.cli has parsed its arguments (without torch) and sized the threads."""
    size = datasets.load(args.dataset).image_size
    recipe = default_recipe(args.dataset, size)
    overrides: dict[str, int] = {"seed": args.seed}
    if args.diffusion_steps:
        overrides["diffusion_steps"] = args.diffusion_steps
    if args.simclr_steps:
        overrides["simclr_steps"] = args.simclr_steps
    recipe = Recipe(**{**asdict(recipe), **overrides})
    name = args.name or Path(args.dataset).name
    import bundled

    out = args.out or (bundled.ROOT / name)
    train_bundle(recipe, out, command=command, name=name)
    return 0


def evaluate_main(argv: list[str]) -> int:
    """Entry for `fedge-hub foundation evaluate` (the arguments are parsed in hub.cli)."""
    from hub.cli import main as cli_main

    return cli_main(["foundation", "evaluate", *argv])


def main(argv: list[str]) -> int:
    """Entry for `python -m hub.foundation.train` (the arguments are parsed in hub.cli, which loads no torch)."""
    from hub.cli import main as cli_main

    return cli_main(["foundation", "train", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
