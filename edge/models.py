"""Global models delivered to the site: assembled from chunks, verified, stored, run with onnxruntime.

A site installs only what it verified and loaded: the manifest's signature (checked before any chunk
is fetched), each chunk's and the whole file's sha256, then an onnxruntime load and a run on a
sample batch whose output must have the manifest's shape. A model that fails any step stays out and
the previous one keeps serving. A stored model that no longer loads (a disk fault, an onnxruntime
upgrade) is set aside on start, so a site never crash-loops on its own state.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from contract.payloads import ModelChunk, ModelManifest
from runtime.files import replace_file_atomically, write_dir_atomically

log = logging.getLogger("fedge.edge")


class ModelRejected(ValueError):
    """A delivered model or chunk that fails verification; nothing of it is installed."""


class ChunkAssembler:
    """Collects the chunks of one manifest; each is checked against the manifest's sha256 on arrival."""

    def __init__(self, manifest: ModelManifest):
        self.manifest = manifest
        self.parts: dict[int, bytes] = {}

    def add(self, payload: bytes) -> bool:
        """Add one chunk message; True once every chunk is in."""
        chunk = ModelChunk.model_validate_json(payload)
        m = self.manifest
        if chunk.version != m.version or chunk.count != len(m.chunks) or chunk.index >= len(m.chunks):
            raise ModelRejected(
                f"chunk {chunk.index}/{chunk.count} of v{chunk.version} does not belong to manifest v{m.version}"
            )
        try:
            data = base64.b64decode(chunk.data, validate=True)
        except (binascii.Error, ValueError) as err:
            raise ModelRejected(f"chunk {chunk.index} of v{m.version} is not valid base64: {err}") from None
        ref = m.chunks[chunk.index]
        if len(data) != ref.size_bytes or hashlib.sha256(data).hexdigest() != ref.sha256:
            raise ModelRejected(f"chunk {chunk.index} of v{m.version} does not match the manifest's sha256")
        self.parts[chunk.index] = data
        return len(self.parts) == len(m.chunks)

    def assemble(self) -> bytes:
        """The artifact, verified against the manifest's whole-file sha256."""
        data = b"".join(self.parts[i] for i in range(len(self.manifest.chunks)))
        if len(data) != self.manifest.size_bytes or hashlib.sha256(data).hexdigest() != self.manifest.sha256:
            raise ModelRejected(f"model v{self.manifest.version} does not match its sha256; not installed")
        return data


class ModelStore:
    """`<root>/v0001/{model.onnx, manifest.json}`; a version exists only once complete and fsynced."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def versions(self) -> list[int]:
        """Installed versions, ascending."""
        return sorted(int(p.name[1:]) for p in self.root.glob("v[0-9]*") if (p / "manifest.json").is_file())

    def _get(self, version: int) -> tuple[Path, ModelManifest]:
        d = self.root / f"v{version:04d}"
        return d / "model.onnx", ModelManifest.model_validate_json((d / "manifest.json").read_bytes())

    def current(self) -> tuple[Path, ModelManifest] | None:
        """The newest installed model and its manifest (evaluated, refined on; served once its gate says so)."""
        v = self.versions()
        return self._get(v[-1]) if v else None

    def serving(self) -> tuple[Path, ModelManifest] | None:
        """The model a site serves: the newest installed one that names a head to serve (docs/delivery-gate.md).
        One whose gate is pending or refused it at chance names none, and the previous one keeps serving."""
        for version in reversed(self.versions()):
            path, manifest = self._get(version)
            if manifest.serve is not None:
                return path, manifest
        return None

    def update_gate(self, manifest: ModelManifest) -> bool:
        """Record the gate's decision for an installed version (same artifact, newly signed manifest); True if
        it changed what the stored manifest says."""
        d = self.root / f"v{manifest.version:04d}"
        stored = ModelManifest.model_validate_json((d / "manifest.json").read_bytes())
        if stored.sha256 != manifest.sha256 or (stored.serve, stored.gate) == (manifest.serve, manifest.gate):
            return False
        check_heads(manifest, (d / "model.onnx").read_bytes())
        replace_file_atomically(d / "manifest.json", manifest.model_dump_json(indent=1).encode())
        return True

    def set_aside_unloadable(self) -> list[str]:
        """Move installed versions that no longer load out of the way (newest first); why, for each one moved."""
        moved = []
        for version in reversed(self.versions()):
            d = self.root / f"v{version:04d}"
            try:
                manifest = ModelManifest.model_validate_json((d / "manifest.json").read_bytes())
                check_runs(manifest, (d / "model.onnx").read_bytes())
                break
            except (OSError, ValueError) as err:  # ModelRejected and pydantic's ValidationError are ValueErrors
                reason = f"stored model v{version} does not load: {err}"
                d.rename(self.root / f"unloadable-v{version:04d}")
                log.error("%s; set aside, the previous model serves", reason)
                moved.append(reason)
        return moved

    def install(self, manifest: ModelManifest, data: bytes) -> Path:
        """Write a model durably once it matches its sha256 and runs; returns its path."""
        if hashlib.sha256(data).hexdigest() != manifest.sha256:
            raise ModelRejected(f"model v{manifest.version} does not match its sha256; not installed")
        check_runs(manifest, data)
        final = self.root / f"v{manifest.version:04d}"
        if (final / "manifest.json").is_file():
            return final / "model.onnx"
        write_dir_atomically(final, {"model.onnx": data, "manifest.json": manifest.model_dump_json(indent=1).encode()})
        return final / "model.onnx"


def check_runs(manifest: ModelManifest, data: bytes) -> None:
    """Load `data` in onnxruntime and run it on a sample batch; ModelRejected unless it answers as the manifest says."""
    shape = list(manifest.input_shape)
    if len(shape) != 4 or any(d < 1 for d in shape[1:]) or np.prod(shape[1:]) > 1 << 24:
        raise ModelRejected(f"model v{manifest.version}: input shape {shape} is not [-1, C, H, W]")
    try:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        sample = np.random.default_rng(0).random((2, *shape[1:]), dtype=np.float32)
        out = session.run(None, {manifest.input_name: sample})[0]
    except Exception as err:  # onnxruntime raises its own exception types for every kind of bad model
        raise ModelRejected(f"model v{manifest.version} does not load or run in onnxruntime: {err}") from None
    expected = (2, len(manifest.labels))
    if tuple(np.shape(out)) != expected or not np.all(np.isfinite(out)):
        raise ModelRejected(
            f"model v{manifest.version} answers a sample batch with shape {list(np.shape(out))} "
            f"(finite: {bool(np.all(np.isfinite(out)))}); {list(expected)} of finite logits expected"
        )
    check_heads(manifest, data, session)


def check_heads(manifest: ModelManifest, data: bytes, session: ort.InferenceSession | None = None) -> None:
    """ModelRejected unless every head the manifest names (and the one it serves) is an output of logits over its
    labels."""
    if session is None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    outputs = {o.name for o in session.get_outputs()}
    named = set(manifest.heads) | ({manifest.serve} if manifest.serve else set())
    missing = sorted(named - outputs)
    if "logits" not in manifest.heads or missing:
        raise ModelRejected(
            f"model v{manifest.version}: the manifest names heads {sorted(named)}, the model's outputs are "
            f"{sorted(outputs)}" + ("" if "logits" in manifest.heads else "; `logits` must be one of the heads")
        )
    sample = np.random.default_rng(0).random((2, *manifest.input_shape[1:]), dtype=np.float32)
    for name, out in zip(sorted(named), session.run(sorted(named), {manifest.input_name: sample}), strict=True):
        if tuple(np.shape(out)) != (2, len(manifest.labels)) or not np.all(np.isfinite(out)):
            raise ModelRejected(
                f"model v{manifest.version}: head {name} answers with shape {list(np.shape(out))}; "
                f"{[2, len(manifest.labels)]} of finite logits expected"
            )


class GlobalModel:
    """A delivered model, run with onnxruntime the way a site runs it: `serve` is the head it predicts with."""

    def __init__(
        self,
        path: Path,
        labels: list[str],
        input_name: str,
        image_size: int,
        providers: list[str] | None = None,
        serve: str = "logits",
    ):
        self.labels, self.input_name, self.image_size = list(labels), input_name, int(image_size)
        self.serve = serve
        self.session = ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])

    @classmethod
    def from_manifest(cls, path: Path, manifest: ModelManifest) -> GlobalModel:
        """From a delivered model and its manifest (the head it serves; `logits` while its gate is pending)."""
        return cls(
            path, manifest.labels, manifest.input_name, manifest.input_shape[-1], serve=manifest.serve or "logits"
        )

    @classmethod
    def from_file(cls, path: Path) -> GlobalModel:
        """From `model.onnx` with a `manifest.json` beside it: a delivered one, or one from the hub's registry."""
        meta = json.loads((Path(path).parent / "manifest.json").read_text())
        if "input" in meta:  # the hub registry's manifest
            return cls(path, meta["labels"], meta["input"]["name"], meta["input"]["shape"][-1])
        return cls.from_manifest(path, ModelManifest.model_validate(meta))

    def predict(self, images: np.ndarray) -> list[str]:
        """Label names for images [N, 1, S, S] in [0, 1]."""
        size = self.image_size
        if images.ndim != 4 or images.shape[1:] != (1, size, size):
            raise ValueError(f"the model expects images [N, 1, {size}, {size}], got {list(images.shape)}")
        if not len(images):
            return []
        logits = self.session.run([self.serve], {self.input_name: images.astype(np.float32)})[0]
        return [self.labels[int(i)] for i in logits.argmax(1)]

    def accuracy(self, images: np.ndarray, truth: list[str]) -> float | None:
        """Share of `truth` predicted; None for no samples."""
        if not len(truth):
            return None
        pred = self.predict(images)
        return float(np.mean([p == t for p, t in zip(pred, truth, strict=True)]))

    def confusions(self, images: np.ndarray, truth: list[str], heads: list[str]) -> dict[str, np.ndarray]:
        """Each head's confusion matrix [labels, labels] (rows: true, columns: predicted) in one run of the model;
        samples whose label the model lacks are left out (they count as wrong in `accuracy`)."""
        n = len(self.labels)
        index = {name: i for i, name in enumerate(self.labels)}
        keep = np.array([t in index for t in truth], dtype=bool)
        out = {h: np.zeros((n, n), dtype=np.int64) for h in heads}
        if not keep.any():
            return out
        rows = np.array([index[t] for t, k in zip(truth, keep, strict=True) if k])
        x = images[keep].astype(np.float32)
        for h, logits in zip(heads, self.session.run(list(heads), {self.input_name: x}), strict=True):
            np.add.at(out[h], (rows, np.asarray(logits).argmax(1)), 1)
        return out
