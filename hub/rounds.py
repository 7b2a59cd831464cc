"""One fedge round: contributions -> synthetic set -> global classifier -> ONNX -> new model version."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contract.payloads import Contribution
from hub.classifier import SmallCNN, train_classifier
from hub.export import export_classifier
from hub.registry import ModelRegistry, ModelVersion
from hub.synthesis import Synthesizer, SyntheticSet


@dataclass(frozen=True)
class TrainConfig:
    """How the global classifier is trained on the synthetic set."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0


@dataclass
class RoundResult:
    """What a round produced."""

    model: SmallCNN
    label_names: tuple[str, ...]
    synthetic: SyntheticSet
    synthesis_s: float
    training_s: float


# progress(phase, done, total): called as a round advances ("synthesis": contributions, "training":
# epochs or contributions' statistics); the service turns it into log lines and a gauge.
Progress = Callable[[str, int, int], None]


def label_space(contributions: list[Contribution]) -> tuple[str, ...]:
    """Sorted union of the labels the contributions carry: the global model's classes."""
    return tuple(sorted({lp.label for c in contributions for lp in c.labels}))


def train_on_synthetic(
    synthetic: SyntheticSet,
    label_names: tuple[str, ...],
    image_size: int,
    cfg: TrainConfig,
    checkpoint: Callable[[], None] | None = None,
    progress: Progress | None = None,
) -> SmallCNN:
    """Train the global classifier on a synthetic set (classes balanced by loss weights)."""
    if len(synthetic.labels) == 0:
        raise ValueError("no synthetic samples to train on: every contribution was empty")
    if synthetic.images.shape[-1] != image_size:
        raise ValueError(f"synthetic images are {synthetic.images.shape[-1]} px wide, the model takes {image_size}")
    index = {name: i for i, name in enumerate(label_names)}
    y = np.array([index[label] for label in synthetic.labels], np.int64)
    return train_classifier(
        synthetic.images,
        y,
        len(label_names),
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=cfg.seed,
        checkpoint=checkpoint,
        on_epoch=None if progress is None else lambda done, total: progress("training", done, total),
    )  # fmt: skip  (the model is built by train_classifier after it seeds torch: same seed, same weights)


def run_round(
    contributions: list[Contribution],
    synthesizer: Synthesizer,
    cfg: TrainConfig,
    checkpoint: Callable[[], None] | None = None,
    progress: Progress | None = None,
) -> RoundResult:
    """Synthesize every contribution (in contribution-id order, so arrival order does not matter) and train.

    `checkpoint` is called between batches of both phases; it raises to abandon the round.
    """
    ordered = sorted(contributions, key=lambda c: c.contribution_id)
    t0 = time.perf_counter()
    parts = []
    for i, c in enumerate(ordered):
        parts.append(synthesizer.synthesize(c, checkpoint))
        if progress is not None:
            progress("synthesis", i + 1, len(ordered))
    synthetic = SyntheticSet.concat(parts)
    t1 = time.perf_counter()
    names = label_space(ordered)
    model = train_on_synthetic(synthetic, names, synthesizer.foundation.image_size, cfg, checkpoint, progress)
    return RoundResult(model, names, synthetic, t1 - t0, time.perf_counter() - t1)


def publish(
    result: RoundResult, registry: ModelRegistry, contributions: list[Contribution], extra: dict | None = None
) -> ModelVersion:
    """Export the round's model to ONNX and store it as a new version."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_classifier(result.model, path)
        data = path.read_bytes()
    meta = {
        "labels": list(result.label_names),
        "input": {"name": "image", "shape": [-1, 1, result.model.image_size, result.model.image_size], "range": [0, 1]},
        "output": {"name": "logits"},
        "contributions": sorted(c.contribution_id for c in contributions),
        "synthetic_samples": int(len(result.synthetic.labels)),
        "synthesis_s": round(result.synthesis_s, 2),
        "training_s": round(result.training_s, 2),
        **(extra or {}),
    }
    return registry.publish(data, meta)
