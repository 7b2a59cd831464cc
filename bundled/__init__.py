"""The bundled foundation models, committed small with a manifest of how each was made.

Torch-free: the edge reads the ONNX encoders from here; the hub loads the generators.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent


def path(name: str = "digits") -> Path:
    """Directory of bundled model `name`."""
    p = ROOT / name
    if not (p / "manifest.json").is_file():
        available = sorted(d.name for d in ROOT.iterdir() if (d / "manifest.json").is_file())
        raise FileNotFoundError(f"no bundled foundation model {name!r}; available: {available}")
    return p


def manifest(name: str = "digits") -> dict[str, Any]:
    """The manifest of bundled model `name`."""
    return json.loads((path(name) / "manifest.json").read_text())


def resolve(name_or_path: str) -> Path:
    """A bundled model name (digits, mnist) or the path of a bundle directory."""
    p = Path(name_or_path)
    return p if p.is_dir() else path(name_or_path)
