"""Synthesis: turn each contribution's prototypes into labelled images, tagged with the contribution.

Each contribution is synthesized on its own, with seeds derived from its id, so its samples do not
depend on any other contribution. That independence is what makes unlearning exact: forgetting a
contribution drops exactly its samples, and what remains is what a retrain without it would see.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from contract.payloads import Contribution
from hub.foundation.bundle import Foundation
from hub.foundation.generator import jitter, sample


@dataclass(frozen=True)
class SynthesisConfig:
    """How many samples per prototype and how they are drawn."""

    samples_per_count: float = 4.0  # synthetic samples per real sample a prototype stands for
    min_per_prototype: int = 8
    max_per_prototype: int = 256
    # 1.0 = no classifier-free guidance. Higher scales raise class fidelity (bundled manifests,
    # quality.guidance_sweep) but cost diversity; the downstream classifier did best at 1.0
    # (bench/results/tune_synthesis-digits.json).
    guidance: float = 1.0
    steps: int = 15
    jitter_scale: float = 1.0  # multiplies the site-reported spread around each prototype
    batch_size: int = 512
    seed: int = 0

    def key(self) -> str:
        """Short hash of everything that changes the output (batch size included: it changes float sums)."""
        return hashlib.sha256(json.dumps(self.__dict__, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class SyntheticSet:
    """Images with their label names and the contribution each one came from."""

    images: np.ndarray  # [n, 1, S, S] float32 in [0, 1]
    labels: np.ndarray  # [n] str
    tags: np.ndarray  # [n] str: contribution_id
    info: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def concat(parts: list[SyntheticSet]) -> SyntheticSet:
        """Concatenate sets (in the given order)."""
        if not parts:
            return SyntheticSet(np.zeros((0, 1, 1, 1), np.float32), np.array([], str), np.array([], str))
        return SyntheticSet(
            np.concatenate([p.images for p in parts]),
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.tags for p in parts]),
        )

    def without(self, contribution_ids: set[str]) -> SyntheticSet:
        """The set minus every sample tagged with one of `contribution_ids`."""
        keep = ~np.isin(self.tags, list(contribution_ids))
        return SyntheticSet(self.images[keep], self.labels[keep], self.tags[keep])


def samples_for(count: int, cfg: SynthesisConfig) -> int:
    """Synthetic samples drawn for a prototype that averages `count` real samples."""
    return int(min(cfg.max_per_prototype, max(cfg.min_per_prototype, math.ceil(count * cfg.samples_per_count))))


def _seed(*parts: object) -> int:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class Synthesizer:
    """Synthesizes contributions with a foundation model, caching each result on disk."""

    def __init__(
        self, foundation: Foundation, config: SynthesisConfig, cache_dir: Path | None = None, progress: bool = True
    ):
        self.foundation, self.config, self.progress = foundation, config, progress
        self.cache_dir = Path(cache_dir) / foundation.encoder_id / config.key() if cache_dir else None

    def _cache_path(self, contribution: Contribution) -> Path | None:
        return self.cache_dir / f"{contribution.contribution_id}.npz" if self.cache_dir else None

    def synthesize(self, contribution: Contribution, checkpoint: Callable[[], None] | None = None) -> SyntheticSet:
        """Samples for one contribution, from the cache when present.

        `checkpoint` is called between batches; it raises to abandon the work (a service stopping).
        """
        if contribution.encoder_id != self.foundation.encoder_id:
            raise ValueError(
                f"contribution {contribution.contribution_id} was encoded by {contribution.encoder_id!r}, "
                f"but the foundation model understands {self.foundation.encoder_id!r}"
            )
        contribution.check_dim(self.foundation.dim)
        cache = self._cache_path(contribution)
        if cache is not None and cache.is_file():
            with np.load(cache, allow_pickle=False) as z:
                return SyntheticSet(z["images"].astype(np.float32), z["labels"], z["tags"])
        result = self._run(contribution, checkpoint)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp.npz")
            np.savez_compressed(tmp, images=result.images.astype(np.float16), labels=result.labels, tags=result.tags)
            tmp.replace(cache)  # atomic: a crash never leaves half a cache entry
            # What was cached is float16; return the same values so cached and fresh runs agree.
            result.images = result.images.astype(np.float16).astype(np.float32)
        return result

    def forget(self, contribution_id: str) -> None:
        """Delete the cached synthetic samples of a contribution that must never be trained on again."""
        if self.cache_dir is not None:
            (self.cache_dir / f"{contribution_id}.npz").unlink(missing_ok=True)

    def synthesize_all(
        self, contributions: list[Contribution], checkpoint: Callable[[], None] | None = None
    ) -> SyntheticSet:
        """Samples of several contributions, concatenated in order."""
        return SyntheticSet.concat([self.synthesize(c, checkpoint) for c in contributions])

    def _run(self, contribution: Contribution, checkpoint: Callable[[], None] | None = None) -> SyntheticSet:
        cfg, fm = self.config, self.foundation
        dim, size = fm.dim, fm.image_size
        conds, noises, labels = [], [], []
        for lp in contribution.labels:
            vectors = torch.from_numpy(lp.vectors.to_numpy())
            for j, (count, spread) in enumerate(zip(lp.counts, lp.spreads, strict=True)):
                n = samples_for(count, cfg)
                gen = torch.Generator().manual_seed(_seed(cfg.seed, contribution.contribution_id, lp.label, j))
                centre = torch.nn.functional.normalize(vectors[j : j + 1], dim=1).expand(n, dim)
                conds.append(jitter(centre, cfg.jitter_scale * spread / math.sqrt(dim), gen))
                noises.append(torch.randn((n, 1, size, size), generator=gen))
                labels += [lp.label] * n
        if not conds:
            return SyntheticSet(np.zeros((0, 1, size, size), np.float32), np.array([], str), np.array([], str))
        cond, noise = torch.cat(conds), torch.cat(noises)
        out = []
        batches = range(0, len(cond), cfg.batch_size)
        for i in tqdm(
            batches, desc=f"synthesize {contribution.contribution_id[:8]}", disable=not self.progress, leave=False
        ):
            sl = slice(i, i + cfg.batch_size)
            out.append(sample(fm.generator, fm.scheduler, cond[sl], noise[sl], steps=cfg.steps, guidance=cfg.guidance,
                              checkpoint=checkpoint))  # fmt: skip
        images = torch.cat(out).numpy()
        return SyntheticSet(images, np.array(labels), np.array([contribution.contribution_id] * len(labels)))
