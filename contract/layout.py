"""The local data layout sites bring: `<data_dir>/<label>/<sample_id>.<png|jpg|npy>` + optional metadata.csv.

`metadata.csv` has columns `sample_id,label,timestamp` (ISO 8601) and optionally `caption`; where it
gives a timestamp the sample gets it, otherwise the file's modification time. Captions are what a
site sends, encoded, to a text-conditioned foundation model (Stable Diffusion) instead of a
class-name prompt. Numpy only; Pillow is imported for images.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

SUFFIXES = (".png", ".jpg", ".jpeg", ".npy")


@dataclass(frozen=True)
class LocalSample:
    """One sample of a site's local store."""

    sample_id: str
    label: str
    path: Path
    timestamp: datetime
    caption: str | None = None


def read_image(path: Path) -> np.ndarray:
    """One sample as float32 [H, W] in [0, 1]: grayscale PNG/JPEG, or a 2-D .npy already in [0, 1]."""
    if path.suffix.lower() == ".npy":
        arr = np.load(path, allow_pickle=False).astype(np.float32)
        if arr.ndim != 2:
            raise ValueError(f"{path}: expected a 2-D array, got shape {arr.shape}")
        return arr
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


def fit_image(image: np.ndarray, size: int) -> np.ndarray:
    """An image [H, W] in [0, 1] brought to the encoder's input [size, size], the edge's one resizing policy.

    The whole image is resized, its aspect ratio not kept, so no part of an inspection image is cut
    away; area averaging (Pillow's BOX filter) when shrinking, bilinear when enlarging. Colour was
    already converted to luminance by `read_image`.
    """
    if image.shape == (size, size):
        return image
    from PIL import Image

    shrink = image.shape[0] > size or image.shape[1] > size
    resample = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
    out = np.asarray(Image.fromarray(image.astype(np.float32), mode="F").resize((size, size), resample), np.float32)
    return np.clip(out, 0.0, 1.0)


def _metadata(data_dir: Path) -> tuple[dict[str, datetime], dict[str, str]]:
    """(timestamps, captions) by sample id from `data_dir/metadata.csv`, empty when there is none."""
    stamps: dict[str, datetime] = {}
    captions: dict[str, str] = {}
    meta = data_dir / "metadata.csv"
    if meta.is_file():
        with open(meta, newline="") as fh:
            for row in csv.DictReader(fh):
                if row.get("timestamp"):
                    ts = datetime.fromisoformat(row["timestamp"])
                    stamps[row["sample_id"]] = ts if ts.tzinfo else ts.replace(tzinfo=UTC)
                if row.get("caption"):
                    captions[row["sample_id"]] = row["caption"].strip()
    return stamps, captions


def _samples_in(folder: Path, label: str, stamps: dict[str, datetime], captions: dict[str, str]) -> list[LocalSample]:
    """The image files directly in `folder`, sorted by id, all given `label`."""
    out = []
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix.lower() in SUFFIXES:
            ts = stamps.get(f.stem) or datetime.fromtimestamp(f.stat().st_mtime, UTC)
            out.append(LocalSample(f.stem, label, f, ts, captions.get(f.stem)))
    return out


def scan(data_dir: Path) -> list[LocalSample]:
    """Every sample under `data_dir`, sorted by label then id."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder {data_dir} does not exist")
    stamps, captions = _metadata(data_dir)
    out = []
    for label_dir in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        out += _samples_in(label_dir, label_dir.name, stamps, captions)
    return out


def scan_flat(data_dir: Path) -> list[LocalSample]:
    """The images directly in `data_dir` (an unlabelled folder: no label subfolders), sorted by id, label "".

    Only a hub-side public folder may be unlabelled; a site's folder always has labels (`scan`).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder {data_dir} does not exist")
    return _samples_in(data_dir, "", *_metadata(data_dir))


def load_images(samples: list[LocalSample]) -> np.ndarray:
    """Stack samples into [N, 1, H, W] float32; all must share one square size."""
    if not samples:
        return np.zeros((0, 1, 0, 0), np.float32)
    images = [read_image(s.path) for s in samples]
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise ValueError(f"samples have different sizes: {sorted(shapes)}")
    return np.stack(images)[:, None]
