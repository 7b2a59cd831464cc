"""The bundled foundation models, committed small with a manifest of how each was made.

Torch-free: the edge reads the ONNX encoders from here; the hub loads the generators.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent


def built_root() -> Path:
    """Where bundles built on this machine live (`make general`, `fedge-hub foundation train`): $FEDGE_BUNDLES_DIR,
    else ~/.cache/fedge/bundles. They are found by name like the committed ones."""
    return Path(os.environ.get("FEDGE_BUNDLES_DIR") or Path.home() / ".cache" / "fedge" / "bundles")


def path(name: str = "digits") -> Path:
    """Directory of bundle `name`: a committed one, else one built on this machine (`built_root`)."""
    for root in (ROOT, built_root()):
        p = root / name
        if (p / "manifest.json").is_file():
            return p
    found = {d.name for root in (ROOT, built_root()) if root.is_dir() for d in root.iterdir()
             if (d / "manifest.json").is_file()}  # fmt: skip
    hint = "; `make general` builds the general encoder" if name == "general" else ""
    raise FileNotFoundError(
        f"no foundation bundle {name!r} in {ROOT} or {built_root()}; available: {sorted(found)}{hint}"
    )


def manifest(name: str = "digits") -> dict[str, Any]:
    """The manifest of bundled model `name`."""
    return json.loads((path(name) / "manifest.json").read_text())


def resolve(name_or_path: str) -> Path:
    """A bundled model name (digits, mnist) or the path of a bundle directory."""
    p = Path(name_or_path)
    return p if p.is_dir() else path(name_or_path)
