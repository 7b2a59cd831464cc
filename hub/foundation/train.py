"""`fedge-hub foundation train`: train a foundation model (encoder and generator) on public images.

A packaged dataset (digits, mnist) trains on its evaluation protocol's public split only; a folder
is public as a whole, labelled (`<label>/<sample>`) or flat (images directly in it, no labels).
The encoder and generator never see a label. Of a folder with at least two labels, `quality_holdout`
(10 % by default, at least 5 images per label) is held back: the judge's prototypes come from those
unseen images, as a site's would, and the judge is checked on them. Everything else trains.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import onnxruntime as ort
import torch

from contract.layout import fit_image, read_image, scan, scan_flat
from hub import datasets
from hub.foundation.budget import StepBudget
from hub.foundation.bundle import Foundation, load, save_bundle, write_manifest
from hub.foundation.encoder import embed, train_simclr
from hub.foundation.generator import PrototypeConditionedUNet, train_generator
from hub.foundation.judge import chance_verdict, judge_quality, unavailable
from hub.synthesis import SynthesisConfig

# Sides the generator's UNet takes: every level halves the image and the way back up must meet it
# again, so a side divides by 2 ** (levels - 1); 32 is the largest a 2-core machine trains (a
# 32x32 step costs about 4x a 16x16 one, docs/foundation.md).
SIDES = (8, 10, 12, 14, 16, 20, 24, 28, 32)
DEFAULT_HOLDOUT = 0.1
MIN_HOLDOUT_PER_LABEL = 5  # the judge's prototypes average groups of at least 5 (make_contribution)
SIMCLR_SHARE = 0.2  # of a time budget, the most the encoder may take; the generator gets the rest


class FoundationError(ValueError):
    """A problem with what the command was given, said in one line (the CLI prints it and exits 2)."""


def default_out(name: str) -> Path:
    """Where a trained bundle goes unless --out says otherwise: outside the repository, never into bundled/."""
    return Path.home() / ".cache" / "fedge" / "bundles" / name


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained model, recorded in the manifest."""

    dataset: str = "digits"
    split_seed: int = 0  # packaged datasets only: a folder is public as a whole
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
    quality_holdout: float = DEFAULT_HOLDOUT
    time_budget_s: float | None = None


def default_recipe(dataset: str, image_size: int) -> Recipe:
    """The committed recipe for a side; FoundationError for a side the generator cannot take."""
    if image_size not in SIDES:
        raise FoundationError(
            f"images of {image_size}x{image_size} cannot be trained: the generator takes sides "
            f"{', '.join(map(str, SIDES))}; resize them with --image-size S (as edges do, contract.layout.fit_image)"
        )
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
    return Recipe(dataset=dataset, diffusion_steps=3600)  # three levels: attention at a quarter of the side


@dataclass(frozen=True)
class Public:
    """The public images a foundation model trains on, and what the manifest says about them."""

    images: np.ndarray  # [N, 1, S, S] in [0, 1]
    labels: np.ndarray  # label indices [N]; all 0 in a flat folder
    label_names: tuple[str, ...]  # () in a flat folder
    source: dict[str, Any] = field(default_factory=dict)  # the manifest's "dataset" section

    @property
    def labelled(self) -> bool:
        """Whether the images came with labels."""
        return bool(self.label_names)


def _fit_all(images: list[np.ndarray], size: int) -> np.ndarray:
    return np.stack([fit_image(im, size) for im in images])[:, None]


def load_public(dataset: str, image_size: int | None = None, split_seed: int = 0, public_frac: float = 0.4,
                test_frac: float = 0.2) -> Public:  # fmt: skip
    """The public images of a packaged dataset (its public split) or a folder (all of it), resized to
    `image_size` when given. FoundationError, in one line, for what cannot be trained on."""
    if dataset in datasets.BUILTIN:
        data = datasets.load(dataset)
        sp = datasets.split(len(data.labels), split_seed, public_frac, test_frac)
        images = data.images[sp.public]
        if image_size is not None and image_size != data.image_size:
            images = _fit_all([im[0] for im in images], image_size)
        source = {
            "name": dataset, "n_total": int(len(data.labels)), "split_seed": split_seed, "public_frac": public_frac,
            "test_frac": test_frac, "n_public": int(len(sp.public)), "public_indices_sha256": sp.public_hash(),
        }  # fmt: skip
        if image_size is not None and image_size != data.image_size:
            source["resized_to"] = image_size
        return Public(images, data.labels[sp.public], data.label_names, source)
    root = Path(dataset)
    if not root.is_dir():
        raise FoundationError(f"{dataset!r} is neither a packaged dataset ({', '.join(datasets.BUILTIN)}) nor a folder")
    labelled, flat = scan(root), scan_flat(root)
    if labelled and flat:
        raise FoundationError(
            f"{root} has both label subfolders and {len(flat)} images directly in it: use one layout "
            "(<label>/<sample> or a flat folder of images)"
        )
    samples = labelled or flat
    if not samples:
        raise FoundationError(f"{root}: no images (.png, .jpg, .npy) in it or in label subfolders")
    raw = []
    for s in samples:
        try:
            raw.append(read_image(s.path))
        except (OSError, ValueError) as err:
            raise FoundationError(f"{s.path} cannot be read as an image: {err}") from None
    shapes = sorted({im.shape for im in raw})
    if image_size is not None:
        images = _fit_all(raw, image_size)
    elif len(shapes) > 1 or shapes[0][0] != shapes[0][1]:
        shown = ", ".join(f"{h}x{w}" for h, w in shapes[:4]) + (" ..." if len(shapes) > 4 else "")
        raise FoundationError(
            f"{root}: images of {shown}; give --image-size S to resize them all to S x S (sides {', '.join(map(str, SIDES))})"
        )
    else:
        images = np.stack(raw)[:, None]
    names = tuple(sorted({s.label for s in samples})) if labelled else ()
    labels = np.array([names.index(s.label) for s in samples] if labelled else [0] * len(samples), np.int64)
    ids = "\n".join(f"{s.label}/{s.sample_id}" for s in samples).encode()
    source = {
        "name": root.name, "folder": str(root.resolve()), "layout": "labelled" if labelled else "flat",
        "n_total": len(samples), "n_public": len(samples), "labels": len(names),
        "samples_sha256": hashlib.sha256(ids).hexdigest(),
        "original_sizes": [f"{h}x{w}" for h, w in shapes[:8]],
        "resized_to": image_size,
    }  # fmt: skip
    return Public(images, labels, names, source)


def quality_holdout(public: Public, fraction: float, seed: int) -> np.ndarray:
    """Indices held back for the quality estimate: `fraction` of each label (at least 5, at most half).

    None without two labels: there is no score to estimate (judge.unavailable), so everything trains.
    """
    if not 0 <= fraction <= 0.5:
        raise FoundationError(f"--quality-holdout must be between 0 and 0.5, got {fraction}")
    if len(public.label_names) < 2 or fraction == 0:
        return np.zeros(0, np.int64)
    rng = np.random.default_rng(seed)
    held = []
    for c in range(len(public.label_names)):
        idx = rng.permutation(np.flatnonzero(public.labels == c))
        held.append(idx[: min(len(idx) // 2, max(MIN_HOLDOUT_PER_LABEL, round(fraction * len(idx))))])
    return np.sort(np.concatenate(held)).astype(np.int64)


def check_out(out: Path) -> None:
    """FoundationError unless `out` is absent, empty or a bundle (which a new one replaces)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.json").is_file())):
        raise FoundationError(f"{out} exists and is not a foundation bundle; not replacing it (choose another --out)")


def train_bundle(recipe: Recipe, public: Public, out: Path, command: str, name: str) -> dict[str, Any]:
    """Train encoder and generator on `public` (less the quality hold-out) and write a bundle to `out`."""
    check_out(out)
    held = quality_holdout(public, recipe.quality_holdout, recipe.seed)
    train = np.setdiff1d(np.arange(len(public.images)), held)
    images = public.images[train]
    size = int(images.shape[-1])
    layout = public.source.get("layout", "public split")
    print(f"{name}: {len(public.images)} public images of {size}x{size} ({layout}); {len(train)} train the encoder "
          f"and generator (labels unused), {len(held)} held back for the quality estimate", flush=True)  # fmt: skip
    budget_s = recipe.time_budget_s
    start = time.perf_counter()
    simclr_budget = None if budget_s is None else StepBudget(recipe.simclr_steps, SIMCLR_SHARE * budget_s)
    encoder = train_simclr(
        images, recipe.embedding_dim, recipe.encoder_channels, recipe.simclr_steps, seed=recipe.seed,
        budget=simclr_budget,
    )  # fmt: skip
    encoder_s = time.perf_counter() - start
    emb = embed(encoder, images)

    t0 = time.perf_counter()
    generator = PrototypeConditionedUNet(
        sample_size=size,
        cond_dim=recipe.embedding_dim,
        block_out_channels=recipe.block_out_channels,
        down_block_types=recipe.down_block_types,
        up_block_types=recipe.up_block_types,
    )
    generator, steps_done = train_generator(
        images, emb, generator, recipe.diffusion_steps, recipe.batch_size,
        cond_dropout=recipe.cond_dropout, max_jitter=recipe.max_jitter, seed=recipe.seed,
        time_budget_s=None if budget_s is None else max(1.0, budget_s - (t0 - start)),
    )  # fmt: skip
    generator_s = time.perf_counter() - t0
    simclr_done = recipe.simclr_steps if simclr_budget is None else simclr_budget.done

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    manifest: dict[str, Any] = {
        "label_free": "encoder: SimCLR on unlabelled public images; generator: conditioned on embeddings only",
        "dataset": public.source,
        "quality_holdout": {
            "fraction": recipe.quality_holdout,
            "min_per_label": MIN_HOLDOUT_PER_LABEL,
            "images": int(len(held)),
            "train_images": int(len(train)),
            "use": "never seen by the encoder or generator; the judge's prototypes and its check on real images",
        },
        "recipe": asdict(recipe),
        "command": command,
        "training": {
            "simclr_steps": simclr_done,
            "encoder_wall_s": round(encoder_s, 1),
            "diffusion_steps": steps_done,
            "generator_wall_s": round(generator_s, 1),
            "generator_parameters": int(sum(p.numel() for p in generator.parameters())),
            "threads": torch.get_num_threads(),
            "time_budget_s": budget_s,
            "stopped_by_time_budget": simclr_done < recipe.simclr_steps or steps_done < recipe.diffusion_steps,
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
    manifest = save_bundle(tmp, name, encoder, generator, images[:512], manifest)
    manifest["quality"] = measure_quality(load(tmp), public, train, held, recipe.seed, command)
    manifest["training"]["total_wall_s"] = round(time.perf_counter() - start, 1)
    manifest.pop("files", None)
    write_manifest(tmp, manifest)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    report_quality(manifest["quality"])
    print(f"wrote {out} in {manifest['training']['total_wall_s']} s")
    return manifest


def report_quality(quality: dict[str, Any]) -> None:
    """One line on stdout; a quality at chance is a loud line on stderr as well."""
    if not quality.get("available", True):
        print(f"quality: not available ({quality['reason']})")
        return
    print(f"quality: judge balanced accuracy {quality['judge_balanced_accuracy']:.4f} "
          f"(accuracy {quality['judge_accuracy']:.4f}, chance {quality.get('chance_level', 0):.3f})")  # fmt: skip
    if quality.get("at_chance"):
        print(f"WARNING: {quality['warning']}", file=sys.stderr, flush=True)


def _judged(
    foundation: Foundation, fit: tuple[np.ndarray, np.ndarray], check: tuple[np.ndarray, np.ndarray],
    protos: tuple[np.ndarray, np.ndarray], names: tuple[str, ...], seed: int, command: str,
) -> dict[str, Any]:  # fmt: skip
    synthesis = SynthesisConfig()
    t0 = time.perf_counter()
    quality = judge_quality(foundation, fit, check, protos, names, synthesis, seed=seed)
    quality = chance_verdict(quality, len(names))
    return {**quality, "synthesis": asdict(synthesis), "command": command, "wall_s": round(time.perf_counter() - t0, 1)}


def measure_quality(
    foundation: Foundation, public: Public, train: np.ndarray, held: np.ndarray, seed: int, command: str
) -> dict[str, Any]:
    """The quality section of a manifest, with the hub's default synthesis settings, or why there is none."""
    if not public.labelled:
        return {**unavailable("a flat folder has no labels to judge synthesized images by"), "command": command}
    if len(public.label_names) < 2:
        return {**unavailable(f"one label ({public.label_names[0]}): nothing to tell apart"), "command": command}
    if len(held) == 0:
        return {**unavailable("nothing was held back (--quality-holdout 0)"), "command": command}
    im, lb = public.images, public.labels
    return _judged(foundation, (im[train], lb[train]), (im[held], lb[held]), (im[held], lb[held]),
                   public.label_names, seed, command)  # fmt: skip


def evaluate_from_args(args: argparse.Namespace, command: str) -> int:
    """`fedge-hub foundation evaluate` once hub.cli has parsed its arguments: recompute and rewrite the quality."""
    import bundled

    path = Path(args.bundle) if Path(args.bundle).is_dir() else bundled.path(args.bundle)
    fm = load(path)
    manifest = dict(fm.manifest)
    ds, recipe = manifest["dataset"], manifest["recipe"]
    public = load_public(ds.get("folder", ds["name"]), ds.get("resized_to"), ds.get("split_seed", 0),
                         ds.get("public_frac", 0.4), ds.get("test_frac", 0.2))  # fmt: skip
    key = "samples_sha256" if "samples_sha256" in ds else "public_indices_sha256"
    if public.source[key] != ds[key]:
        raise FoundationError(f"{ds['name']} no longer holds the images {path} was trained on")
    seed = int(recipe["seed"])
    if "quality_holdout" in manifest:
        held = quality_holdout(public, float(recipe["quality_holdout"]), seed)
        train = np.setdiff1d(np.arange(len(public.images)), held)
        manifest["quality"] = measure_quality(fm, public, train, held, seed, command)
    else:  # trained before the hold-out (the committed digits and mnist): every public image trained it
        order = np.random.default_rng(seed).permutation(len(public.images))
        cut = int(0.8 * len(order))
        im, lb = public.images, public.labels
        manifest["quality"] = _judged(fm, (im[order[:cut]], lb[order[:cut]]), (im[order[cut:]], lb[order[cut:]]),
                                      (im, lb), public.label_names, seed, command)  # fmt: skip
    manifest.pop("files", None)
    write_manifest(path, manifest)
    print(json.dumps(manifest["quality"], indent=1))
    report_quality(manifest["quality"])
    return 0


def train_from_args(args: argparse.Namespace, command: str) -> int:
    """`fedge-hub foundation train` once hub.cli has parsed its arguments (without torch) and sized the threads."""
    if args.time_budget is not None and args.time_budget <= 0:
        raise FoundationError(f"--time-budget must be a positive number of seconds, got {args.time_budget}")
    if args.image_size is not None:
        default_recipe(args.dataset, args.image_size)  # a side it cannot take fails before the images are read
    public = load_public(args.dataset, args.image_size)
    recipe = default_recipe(args.dataset, int(public.images.shape[-1]))
    overrides: dict[str, Any] = {"seed": args.seed, "quality_holdout": args.quality_holdout,
                                 "time_budget_s": args.time_budget}  # fmt: skip
    if args.diffusion_steps:
        overrides["diffusion_steps"] = args.diffusion_steps
    if args.simclr_steps:
        overrides["simclr_steps"] = args.simclr_steps
    recipe = Recipe(**{**asdict(recipe), **overrides})
    name = args.name or Path(args.dataset).name
    out = args.out or default_out(name)
    quality_holdout(public, recipe.quality_holdout, recipe.seed)  # a bad fraction fails before the long part
    check_out(out)
    train_bundle(recipe, public, out, command=command, name=name)
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
