"""The hub's exactly unlearnable model: per-contribution statistics, cached on disk, summed in id order and solved.

A round asks `ExactTrainer.fit(contributions)`. Each contribution's statistics are computed once
(synthesis, then features of its own samples) and kept in `<stats_dir>/<feature key>/<id>.npz`;
later rounds, and every unlearning, only re-sum and re-solve. Dropping a contribution from the
list is therefore all that forgetting it takes, and the result is bit-identical to fitting from
scratch without it (hub/learning/closed_form.py says why). `refit_from_scratch` recomputes every
statistic from the synthetic images instead of the cache: the verification an unlearning
certificate reports.

With a bundle that has no image generator (the general bundle), or when configured
(`closed_form.synthesis: features`), the synthesizer is a `FeatureSynthesizer`
(hub/learning/feature_synthesis.py): each contribution's statistics are then the random features of
its synthetic embeddings, seeded by its id and the configured seed like image synthesis, so
forgetting is still dropping its statistics.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from contract.payloads import Contribution
from hub.learning.closed_form import (
    ClosedFormHead,
    ContributionStats,
    FeatureExtractor,
    FeatureMap,
    check_weights,
    solve,
    sum_stats,
    to_onnx,
)
from hub.learning.feature_synthesis import FeatureSynthesizer

if TYPE_CHECKING:  # hub.synthesis brings torch; a feature-space hub need not load it
    from hub.synthesis import Synthesizer


@dataclass(frozen=True)
class ExactConfig:
    """The closed-form model's settings (defaults chosen on validation data by `python -m bench.unlearning --select`)."""

    n_features: int = 1024
    bandwidth: float = 0.7
    variant: str = "ridge-balanced"
    lam: float = 1e-6
    seed: int = 0
    threads: int = 1


@dataclass
class ExactModel:
    """What a fit produced: the ONNX artifact and exactly what it was solved from."""

    onnx: bytes
    head: ClosedFormHead
    label_names: tuple[str, ...]
    trained_on: list[str]  # contribution ids, sorted (weighted fits: only those with weight > 0)
    stats_digests: dict[str, str]  # contribution id -> sha256 of its statistics
    training_digest: str
    synthetic_samples: int  # weighted fits: the rounded weighted count
    timings: dict[str, float] = field(default_factory=dict)
    weights: dict[str, float] | None = None  # contribution id -> weight (> 0) of a weighted fit; None = unweighted


def training_digest(stats_digests: dict[str, str], weights: Mapping[str, float] | None = None) -> str:
    """sha256 of what a model was solved from, as canonical JSON (no whitespace, UTF-8), in contribution-id order.

    Unweighted (`weights` None): the list [[contribution_id, statistics sha256], ...] (docs/unlearning.md).
    Weighted: the list [[contribution_id, statistics sha256, weight], ...] over the contributions with
    weight > 0 only, the weight written as Python's float.hex() string of the float64 (for example
    "0x1.0000000000000p+0" for 1.0), which is exact. All weights 1 therefore still give another digest
    than the unweighted fit: the digest says that the fit was weighted.
    """
    if weights is None:
        pairs = [[cid, stats_digests[cid]] for cid in sorted(stats_digests)]
        return hashlib.sha256(json.dumps(pairs, separators=(",", ":")).encode()).hexdigest()
    triples = [[cid, stats_digests[cid], float(weights[cid]).hex()] for cid in sorted(stats_digests)]
    return hashlib.sha256(json.dumps(triples, separators=(",", ":")).encode()).hexdigest()


class ExactTrainer:
    """Fits the closed-form model over a bundle's fp32 encoder from contributions, caching their statistics."""

    def __init__(
        self, synthesizer: Synthesizer | FeatureSynthesizer, encoder_onnx: Path, config: ExactConfig, stats_dir: Path
    ):
        fm = synthesizer.foundation
        self.synthesizer, self.encoder_onnx, self.config = synthesizer, Path(encoder_onnx), config
        self.feature_map = FeatureMap(fm.dim, config.n_features, config.bandwidth, config.seed)
        self._extractor: FeatureExtractor | None = None  # images -> features; unused in feature space
        # Statistics depend on the synthesis settings too: a different synthesis config is another cache.
        self.stats_dir = Path(stats_dir) / f"{self.feature_map.key()}-{synthesizer.config.key()}"
        self.stats_dir.mkdir(parents=True, exist_ok=True)

    def _path(self, contribution_id: str) -> Path:
        return self.stats_dir / f"{contribution_id}.npz"

    @property
    def feature_space(self) -> bool:
        """True when statistics come from synthetic embeddings (feature-space synthesis), not images."""
        return isinstance(self.synthesizer, FeatureSynthesizer)

    @property
    def extractor(self) -> FeatureExtractor:
        """The hub's encoder session for synthetic images (opened on first use)."""
        if self._extractor is None:
            self._extractor = FeatureExtractor(self.encoder_onnx, self.feature_map, threads=self.config.threads)
        return self._extractor

    def compute_stats(self, c: Contribution, checkpoint: Callable[[], None] | None = None) -> ContributionStats:
        """Statistics of one contribution from its (cached) synthesis, never from the statistics cache."""
        if isinstance(self.synthesizer, FeatureSynthesizer):
            syn = self.synthesizer.synthesize(c, checkpoint)
            if checkpoint is not None:
                checkpoint()
            features = self.feature_map.transform(syn.embeddings)
            return ContributionStats.from_features(c.contribution_id, self.feature_map.key(), features, syn.labels)
        synthetic = self.synthesizer.synthesize(c, checkpoint)
        if checkpoint is not None:
            checkpoint()
        return ContributionStats.from_synthetic(synthetic, c.contribution_id, self.extractor)

    def stats(self, c: Contribution, checkpoint: Callable[[], None] | None = None) -> ContributionStats:
        """Statistics of one contribution, from the cache when present (computed and stored otherwise)."""
        path = self._path(c.contribution_id)
        if path.is_file():
            return ContributionStats.load(path)
        s = self.compute_stats(c, checkpoint)
        s.save(path)
        return s

    def _fit(self, all_stats: list[ContributionStats], weights: dict[str, float] | None) -> ExactModel:
        t0 = time.perf_counter()
        total = sum_stats(all_stats, weights)
        t1 = time.perf_counter()
        head = solve(total, variant=self.config.variant, lam=self.config.lam)  # type: ignore[arg-type]
        t2 = time.perf_counter()
        digests = {s.contribution_id: s.digest() for s in all_stats}
        model = ExactModel(
            onnx=to_onnx(self.encoder_onnx, self.feature_map, head),
            head=head,
            label_names=head.label_names,
            trained_on=sorted(digests),
            stats_digests=digests,
            training_digest=training_digest(digests, weights),
            synthetic_samples=total.n_samples,
            weights=weights,
        )
        model.timings.update(sum_s=t1 - t0, solve_s=t2 - t1, export_s=time.perf_counter() - t2)
        return model

    @staticmethod
    def _plan(
        contributions: list[Contribution], weights: Mapping[str, float] | None
    ) -> tuple[list[Contribution], dict[str, float] | None]:
        """The contributions to sum (with samples; weight > 0 when weighted), in id order, and their weights."""
        ordered = sorted((c for c in contributions if c.labels), key=lambda c: c.contribution_id)
        if weights is None:
            return ordered, None
        check_weights((c.contribution_id for c in ordered), weights)
        kept = [c for c in ordered if float(weights[c.contribution_id]) > 0.0]
        return kept, {c.contribution_id: float(weights[c.contribution_id]) for c in kept}

    def fit(
        self,
        contributions: list[Contribution],
        checkpoint: Callable[[], None] | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> ExactModel:
        """The model of `contributions` (those without samples are skipped): cached statistics, summed, solved.

        Args:
            contributions: the active contributions.
            checkpoint: called between batches of any synthesis needed; raises to abandon the work.
            weights: optional weight per contribution id (finite, >= 0, one for each contribution with
                samples): each contribution's statistics are scaled by its weight, i.e. its synthetic
                samples count w times in the ridge loss. Weight 0 leaves a contribution out exactly as
                if it were absent (its statistics are not even computed). None: the unweighted fit,
                bit-identical to what it always was.
        """
        t0 = time.perf_counter()
        ordered, ws = self._plan(contributions, weights)
        if not ordered:
            raise ValueError("no contribution carries samples (with weight > 0): nothing to train on")
        all_stats = [self.stats(c, checkpoint) for c in ordered]
        t1 = time.perf_counter()
        model = self._fit(all_stats, ws)
        model.timings["statistics_s"] = t1 - t0
        return model

    def head_without(
        self,
        contributions: list[Contribution],
        left_out: str,
        weights: Mapping[str, float] | None = None,
        checkpoint: Callable[[], None] | None = None,
    ) -> ClosedFormHead:
        """The head `fit` would solve with contribution `left_out` at weight 0 (exactly as if it were absent), for
        FRAMU's leave-one-out heads; the statistics are the cached ones, nothing is exported."""
        base = dict(weights) if weights is not None else {c.contribution_id: 1.0 for c in contributions if c.labels}
        ordered, ws = self._plan(contributions, {**base, left_out: 0.0})
        if not ordered:
            raise ValueError(f"nothing is left without contribution {left_out}")
        total = sum_stats([self.stats(c, checkpoint) for c in ordered], ws if weights is not None else None)
        return solve(total, variant=self.config.variant, lam=self.config.lam)  # type: ignore[arg-type]

    def refit_from_scratch(
        self,
        contributions: list[Contribution],
        checkpoint: Callable[[], None] | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> ExactModel:
        """The same model with every statistic recomputed from the synthetic images: what a retrain would give."""
        t0 = time.perf_counter()
        ordered, ws = self._plan(contributions, weights)
        model = self._fit([self.compute_stats(c, checkpoint) for c in ordered], ws)
        model.timings["refit_s"] = time.perf_counter() - t0
        return model

    def forget(self, contribution_ids: set[str]) -> None:
        """Delete the cached statistics of contributions that must never be trained on again."""
        for cid in contribution_ids:
            self._path(cid).unlink(missing_ok=True)


def max_abs_diff(a: ClosedFormHead, b: ClosedFormHead) -> float:
    """Largest absolute difference between two heads' weights and biases (0.0 when bit-identical)."""
    if a.label_names != b.label_names or a.weights.shape != b.weights.shape:
        return float("inf")
    return float(max(np.abs(a.weights - b.weights).max(), np.abs(a.bias - b.bias).max()))
