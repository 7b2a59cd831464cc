"""Versioned global models on disk: `<root>/v0001/{model.onnx, manifest.json}`, written atomically.

A version directory appears only once both files are complete and fsynced, so a crash mid-write
leaves no half version behind and the version number is never reused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from runtime.files import write_dir_atomically


@dataclass(frozen=True)
class ModelVersion:
    """A published global model."""

    version: int
    path: Path
    sha256: str
    manifest: dict[str, Any]


class ModelRegistry:
    """Append-only store of model versions."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def versions(self) -> list[int]:
        """Published version numbers, ascending."""
        return sorted(int(p.name[1:]) for p in self.root.glob("v[0-9]*") if (p / "manifest.json").is_file())

    def latest(self) -> ModelVersion | None:
        """The newest version, if any."""
        v = self.versions()
        return self.get(v[-1]) if v else None

    def get(self, version: int) -> ModelVersion:
        """One version by number."""
        d = self.root / f"v{version:04d}"
        manifest = json.loads((d / "manifest.json").read_text())
        return ModelVersion(version, d / "model.onnx", manifest["sha256"], manifest)

    def publish(self, onnx_bytes: bytes, meta: dict[str, Any]) -> ModelVersion:
        """Store a new version with `meta` merged into its manifest."""
        version = (self.versions() or [0])[-1] + 1
        final = self.root / f"v{version:04d}"
        sha = hashlib.sha256(onnx_bytes).hexdigest()
        manifest = {
            **meta,
            "version": version,
            "sha256": sha,
            "size_bytes": len(onnx_bytes),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        write_dir_atomically(
            final, {"model.onnx": onnx_bytes, "manifest.json": json.dumps(manifest, indent=2).encode()}
        )
        return ModelVersion(version, final / "model.onnx", sha, manifest)
