"""A bundle folder read from its manifest alone: the encoder's id, dimension and input size; no torch.

What every bundle (digits, mnist, the general encoder) has. `hub.foundation.bundle.Foundation` adds
the image generator to it; feature-space synthesis (hub/learning/feature_synthesis.py) needs nothing more.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class EncoderBundle:
    """A bundle folder read for what feature-space synthesis needs: its encoder's id, dimension and input size."""

    path: Path
    manifest: dict[str, Any]

    @property
    def encoder_id(self) -> str:
        """Identity of the encoder whose embeddings the sites send (and a generator understands)."""
        return str(self.manifest["encoder_id"])

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self.manifest["embedding_dim"])

    @property
    def image_size(self) -> int:
        """Side of the encoder's input (and of a bundled generator's images)."""
        return int(self.manifest["image_size"])

    @property
    def has_image_generator(self) -> bool:
        """True when the bundle carries an image generator (digits, mnist); False for the general bundle."""
        return has_image_generator(self.path)


def has_image_generator(bundle_dir: Path) -> bool:
    """Whether `bundle_dir` holds an image generator (generator/ and scheduler/ beside the encoder)."""
    return (Path(bundle_dir) / "generator").is_dir() and (Path(bundle_dir) / "scheduler").is_dir()


def load_encoder_bundle(bundle_dir: Path) -> EncoderBundle:
    """Read a bundle's manifest (any bundle: digits, mnist, general); never loads torch."""
    path = Path(bundle_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{bundle_dir} is not a bundle: {path} is missing")
    return EncoderBundle(Path(bundle_dir), json.loads(path.read_text()))
