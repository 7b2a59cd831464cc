"""Synthesis in the encoder's feature space: per-label prototypes -> synthetic embeddings, tagged by contribution.

A bundle without an image generator (the general EfficientNet-Lite0 bundle, docs/general-encoder.md)
cannot turn prototypes into images, and the closed-form head needs only embeddings anyway. Every
prototype (a centroid c of `count` site embeddings with RMS distance `spread` to it) becomes samples

    x = c + scale * spread / sqrt(dim) * r,     E|r|^2 = dim,

so that the samples' RMS distance to c is scale * spread, as the site measured. What differs between
the generators is the shape of r (the "standardised residual"):

    gaussian     r ~ N(0, I): isotropic, needs nothing but the upload. The behaviour without public data.
    covariance   r ~ N(0, S): S is the within-cluster covariance of public embeddings (k-means groups of
                 the sizes sites form), shrunk towards the identity and scaled to trace dim.
    diffusion    r from a small MLP denoiser (diffusers DDPM training, DDIM sampling) conditioned on the
                 prototype and its log spread, trained on the same public groups.

The two trained generators learn from an unlabelled flat folder of public images, encoded with the
bundle's own encoder (`encode_folder`), in a time budget on a set thread count (`train_generator`).
Every prototype's samples are drawn from a generator seeded by (seed, contribution id, label, index)
and computed for that prototype alone, so a contribution's samples depend on nothing else: forgetting
it stays a subtraction of its statistics (hub/learning/exact.py). Which generator the hub uses was
measured by bench/feature_synthesis.py (docs/feature-synthesis.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from contract.payloads import Contribution
from hub.foundation.manifest import EncoderBundle, has_image_generator, load_encoder_bundle
from hub.learning.closed_form import _rng
from runtime.files import sha256_file

Kind = Literal["gaussian", "covariance", "diffusion"]
KINDS: tuple[str, ...] = ("gaussian", "covariance", "diffusion")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy")
# Sizes of the k-means groups a generator learns from: the sizes sites' prototypes average (at least
# the minimum group of 5; a label of n samples at k = 4 gives groups of about n / 4).
GROUP_SIZES = (5, 10, 20, 40)


def uses_feature_synthesis(bundle_dir: Path, mode: str = "auto") -> bool:
    """The closed-form model's synthesis: `features` or `images` as configured; `auto` = features without a generator."""
    if mode not in ("auto", "features", "images"):
        raise ValueError(f"synthesis must be auto, features or images, got {mode!r}")
    if mode == "images" and not has_image_generator(bundle_dir):
        raise ValueError(f"synthesis images needs an image generator, and the bundle {bundle_dir} has none")
    return mode == "features" or (mode == "auto" and not has_image_generator(bundle_dir))


# --- public embeddings: grouped as sites group theirs --------------------------------------------


def encode_folder(folder: Path, bundle_dir: Path, threads: int = 1, batch_size: int = 64) -> np.ndarray:
    """Embeddings [n, dim] of every image under `folder` (flat or nested, labels ignored), as an edge encodes them."""
    from contract.layout import fit_image, read_image
    from edge.encoder import OnnxEncoder

    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no image (.png, .jpg, .npy) found")
    enc = OnnxEncoder(Path(bundle_dir) / "encoder.onnx", prefer_cuda=False, threads=threads)
    out = []
    for i in range(0, len(files), batch_size):
        batch = np.stack([fit_image(read_image(p), enc.image_size)[None] for p in files[i : i + batch_size]])
        out.append(enc.encode(batch, batch_size=batch_size))
    return np.concatenate(out)


@dataclass(frozen=True)
class Groups:
    """Public embeddings grouped by k-means: each member's centroid, the group's spread and its standardised residual."""

    centres: np.ndarray  # [n, dim] float32: the centroid of the member's group
    spreads: np.ndarray  # [n] float32: RMS distance of the group's members to it
    residuals: np.ndarray  # [n, dim] float32: (x - centre) * sqrt(dim) / spread


def public_groups(embeddings: np.ndarray, group_sizes: Sequence[int] = GROUP_SIZES, seed: int = 0) -> Groups:
    """k-means of the public embeddings at k = n / g for each group size g (seeded); one row per member and k."""
    from sklearn.cluster import KMeans

    x = np.asarray(embeddings, np.float64)
    n, dim = x.shape
    centres, spreads, residuals = [], [], []
    for g in group_sizes:
        k = n // g
        if k < 1:
            continue
        assign = np.zeros(n, np.int64) if k == 1 else KMeans(k, n_init=1, random_state=seed).fit_predict(x)
        for j in np.unique(assign):
            members = x[assign == j]
            if len(members) < 2:  # a lone sample has no spread: no residual to learn from
                continue
            c = members.mean(0)
            s = float(np.sqrt(((members - c) ** 2).sum(1).mean()))
            if s <= 0.0:
                continue
            centres.append(np.repeat(c[None], len(members), 0))
            spreads.append(np.full(len(members), s))
            residuals.append((members - c) * math.sqrt(dim) / s)
    if not centres:
        raise ValueError(f"{n} public embeddings are too few to group (need at least {min(group_sizes)})")
    return Groups(
        np.concatenate(centres).astype(np.float32),
        np.concatenate(spreads).astype(np.float32),
        np.concatenate(residuals).astype(np.float32),
    )


# --- generators of standardised residuals --------------------------------------------------------


class Generator:
    """Draws standardised residuals r [n, dim] around one prototype (E|r|^2 = dim)."""

    kind: str = "gaussian"

    def residuals(self, centre: np.ndarray, spread: float, n: int, seed: int) -> np.ndarray:
        """n residuals for a prototype (`seed` fixes them)."""
        return np.random.default_rng(seed).standard_normal((n, len(centre)))

    def digest(self) -> str:
        """What identifies this generator's output: part of the statistics cache key."""
        return self.kind


class CovarianceGenerator(Generator):
    """r ~ N(0, S), S the shrunk within-group covariance of public embeddings, trace dim."""

    kind = "covariance"

    def __init__(self, factor: np.ndarray, info: dict[str, Any] | None = None):
        self.factor = np.asarray(factor, np.float64)  # [dim, dim]: S = factor @ factor.T
        self.info = info or {}

    @classmethod
    def fit(cls, groups: Groups, shrinkage: float = 0.5) -> CovarianceGenerator:
        """Covariance of the residuals, (1 - shrinkage) S + shrinkage I, scaled to trace dim."""
        r = groups.residuals.astype(np.float64)
        dim = r.shape[1]
        cov = (1.0 - shrinkage) * (r.T @ r / len(r)) + shrinkage * np.eye(dim)
        cov *= dim / np.trace(cov)
        vals, vecs = np.linalg.eigh(cov)
        return cls(vecs * np.sqrt(np.clip(vals, 0.0, None)), {"shrinkage": shrinkage, "rows": len(r)})

    def residuals(self, centre: np.ndarray, spread: float, n: int, seed: int) -> np.ndarray:
        """n draws of N(0, S)."""
        z = np.random.default_rng(seed).standard_normal((n, self.factor.shape[1]))
        return z @ self.factor.T

    def digest(self) -> str:
        """sha256 of the factor."""
        return "covariance-" + hashlib.sha256(np.ascontiguousarray(self.factor).tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class DiffusionTraining:
    """How the diffusion generator is trained (the constructor arguments of its denoiser are saved with it)."""

    hidden: int = 512
    blocks: int = 3
    lr: float = 1e-3
    batch_size: int = 256
    max_steps: int = 4000
    time_budget_s: float = 900.0  # the bound: 15 minutes on 2 cores
    threads: int = 2
    seed: int = 0


class DiffusionGenerator(Generator):
    """r from a denoiser over residuals conditioned on (prototype, log spread): DDPM-trained, DDIM-sampled."""

    kind = "diffusion"

    def __init__(self, denoiser: Any, scheduler_config: dict[str, Any], steps: int = 20, info: dict | None = None):
        self.denoiser, self.scheduler_config, self.steps = denoiser.eval(), dict(scheduler_config), steps
        self.info = info or {}

    def residuals(self, centre: np.ndarray, spread: float, n: int, seed: int) -> np.ndarray:
        """n residuals by DDIM (eta 0) from noise seeded by `seed`, for this prototype alone."""
        import torch
        from diffusers import DDIMScheduler

        dim = len(centre)
        sched = DDIMScheduler.from_config(self.scheduler_config)
        sched.set_timesteps(self.steps)
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn((n, dim), generator=gen)
        cond = torch.from_numpy(np.asarray(centre, np.float32)[None]).expand(n, dim)
        log_s = torch.full((n,), math.log(max(spread, 1e-6)))
        with torch.no_grad():
            for t in sched.timesteps:
                eps = self.denoiser(x, t.expand(n), cond, log_s)
                x = sched.step(eps, t, x).prev_sample
        return x.numpy().astype(np.float64)

    def digest(self) -> str:
        """sha256 of the denoiser's weights and the sampling settings."""
        h = hashlib.sha256(json.dumps({"steps": self.steps, "sched": self.scheduler_config}, sort_keys=True,
                                      default=str).encode())  # fmt: skip
        for p in self.denoiser.state_dict().values():
            h.update(p.detach().cpu().numpy().tobytes())
        return "diffusion-" + h.hexdigest()[:16]


def _denoiser_class():  # -> type: torch and diffusers are imported only when a diffusion model is used
    import torch
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.models.embeddings import TimestepEmbedding, Timesteps
    from diffusers.models.modeling_utils import ModelMixin
    from torch import nn

    class ResidualDenoiser(ModelMixin, ConfigMixin):
        """MLP predicting the noise in standardised residuals [N, dim], given timestep, prototype and log spread."""

        @register_to_config
        def __init__(self, dim: int = 1280, hidden: int = 512, blocks: int = 3):
            super().__init__()
            self.time_proj = Timesteps(128, flip_sin_to_cos=True, downscale_freq_shift=0)
            self.time_emb = TimestepEmbedding(128, hidden)
            self.cond = nn.Sequential(nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            self.inp = nn.Linear(dim, hidden)
            self.mlp = nn.ModuleList(
                nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(blocks)
            )
            self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, dim))
            nn.init.zeros_(self.out[-1].weight)
            nn.init.zeros_(self.out[-1].bias)

        def forward(
            self, sample: torch.Tensor, timestep: torch.Tensor, prototype: torch.Tensor, log_spread: torch.Tensor
        ) -> torch.Tensor:
            """Predicted noise [N, dim]."""
            h = self.inp(sample) + self.time_emb(self.time_proj(timestep).to(sample.dtype))
            h = h + self.cond(torch.cat([prototype, log_spread[:, None]], dim=1))
            for block in self.mlp:
                h = h + block(h)
            return self.out(h)

    return ResidualDenoiser


def train_diffusion(
    groups: Groups, cfg: DiffusionTraining = DiffusionTraining(), steps: int = 20,
    checkpoint: Callable[[], None] | None = None,
) -> DiffusionGenerator:  # fmt: skip
    """Train the residual denoiser on public groups for `cfg.max_steps` or until `cfg.time_budget_s` has passed."""
    import torch
    from diffusers import DDPMScheduler

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    dim = groups.residuals.shape[1]
    model = _denoiser_class()(dim=dim, hidden=cfg.hidden, blocks=cfg.blocks)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    lr = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.max_steps)
    r, c = torch.from_numpy(groups.residuals), torch.from_numpy(groups.centres)
    log_s = torch.from_numpy(np.log(groups.spreads))
    gen = torch.Generator().manual_seed(cfg.seed)
    t0, step, losses = time.perf_counter(), 0, []
    model.train()
    while step < cfg.max_steps and time.perf_counter() - t0 < cfg.time_budget_s:
        idx = torch.randint(0, len(r), (cfg.batch_size,), generator=gen)
        noise = torch.randn((cfg.batch_size, dim), generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
        loss = torch.nn.functional.mse_loss(model(sched.add_noise(r[idx], noise, t), t, c[idx], log_s[idx]), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        lr.step()
        losses.append(float(loss.detach()))
        step += 1
        if checkpoint is not None and step % 100 == 0:
            checkpoint()
    info = {"steps": step, "train_s": round(time.perf_counter() - t0, 1), "rows": len(r), "training": asdict(cfg),
            "final_loss": float(np.mean(losses[-100:])) if losses else None}  # fmt: skip
    return DiffusionGenerator(model, dict(sched.config), steps=steps, info=info)


def train_generator(
    kind: Kind, embeddings: np.ndarray, seed: int = 0, shrinkage: float = 0.5,
    training: DiffusionTraining | None = None, steps: int = 20,
) -> Generator:  # fmt: skip
    """A generator of `kind` from public embeddings (gaussian needs none: the behaviour without public data)."""
    if kind == "gaussian":
        return Generator()
    groups = public_groups(embeddings, seed=seed)
    if kind == "covariance":
        return CovarianceGenerator.fit(groups, shrinkage)
    if kind == "diffusion":
        return train_diffusion(groups, training or DiffusionTraining(seed=seed), steps)
    raise ValueError(f"unknown generator {kind!r}; expected one of {KINDS}")


def save_generator(gen: Generator, out: Path, encoder_id: str) -> None:
    """Write a generator folder: generator.json (kind, encoder id, how it was made) and its parameters."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"kind": gen.kind, "encoder_id": encoder_id, "digest": gen.digest()}
    if isinstance(gen, CovarianceGenerator):
        np.save(out / "factor.npy", gen.factor)
        meta["info"] = gen.info
    elif isinstance(gen, DiffusionGenerator):
        gen.denoiser.save_pretrained(str(out / "denoiser"))
        meta |= {"info": gen.info, "sampling_steps": gen.steps, "scheduler": gen.scheduler_config}
    meta["files"] = {str(p.relative_to(out)): sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file()
                     and p.name != "generator.json"}  # fmt: skip
    (out / "generator.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")


def load_generator(folder: Path | None, encoder_id: str | None = None) -> Generator:
    """The generator saved in `folder`; None (no public data) is the Gaussian generator."""
    if folder is None:
        return Generator()
    folder = Path(folder)
    meta = json.loads((folder / "generator.json").read_text())
    if encoder_id is not None and meta["encoder_id"] != encoder_id:
        raise ValueError(f"{folder}: generator made for encoder {meta['encoder_id']!r}, not {encoder_id!r}")
    if meta["kind"] == "gaussian":
        return Generator()
    if meta["kind"] == "covariance":
        return CovarianceGenerator(np.load(folder / "factor.npy"), meta.get("info"))
    if meta["kind"] == "diffusion":
        model = _denoiser_class().from_pretrained(str(folder / "denoiser"), low_cpu_mem_usage=False)
        return DiffusionGenerator(model, meta["scheduler"], meta["sampling_steps"], meta.get("info"))
    raise ValueError(f"{folder}: unknown generator kind {meta['kind']!r}")


# --- synthesis of contributions ------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureSynthesisConfig:
    """How many embeddings per prototype and how far they spread (chosen by bench/feature_synthesis.py)."""

    samples_per_count: float = 4.0  # synthetic samples per real sample a prototype stands for
    min_per_prototype: int = 8
    max_per_prototype: int = 256
    spread_scale: float = 1.0  # multiplies the site-reported spread
    normalise: bool = False  # put samples back on the unit sphere (the encoder's embeddings are unit-norm)
    seed: int = 0

    def key(self) -> str:
        """Short hash of these settings (the generator's digest is added by FeatureSynthesizer)."""
        return hashlib.sha256(json.dumps({"features": asdict(self)}, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class SyntheticEmbeddings:
    """Embeddings with their label names and the contribution each came from."""

    embeddings: np.ndarray  # [n, dim] float32
    labels: np.ndarray  # [n] str
    tags: np.ndarray  # [n] str: contribution id
    info: dict[str, float] = field(default_factory=dict)


def samples_for(count: int, cfg: FeatureSynthesisConfig) -> int:
    """Synthetic embeddings drawn for a prototype that averages `count` real samples."""
    return int(min(cfg.max_per_prototype, max(cfg.min_per_prototype, math.ceil(count * cfg.samples_per_count))))


class FeatureSynthesizer:
    """Turns a contribution's prototypes into synthetic embeddings, deterministically from its id and the seed."""

    def __init__(self, bundle: EncoderBundle, config: FeatureSynthesisConfig, generator: Generator | None = None):
        self.bundle, self.generator = bundle, generator or Generator()
        self.foundation = bundle  # what ExactTrainer reads: encoder_id, dim
        self._config = config

    @property
    def config(self) -> _KeyedConfig:
        """The settings, keyed together with the generator (a statistics cache per generator)."""
        return _KeyedConfig(self._config, self.generator.digest())

    def synthesize(
        self, contribution: Contribution, checkpoint: Callable[[], None] | None = None
    ) -> SyntheticEmbeddings:
        """Synthetic embeddings of one contribution; `checkpoint` is called between prototypes (raise to abandon)."""
        cfg, dim = self._config, self.bundle.dim
        if contribution.encoder_id != self.bundle.encoder_id:
            raise ValueError(
                f"contribution {contribution.contribution_id} was encoded by {contribution.encoder_id!r}, "
                f"but this hub's encoder is {self.bundle.encoder_id!r}"
            )
        contribution.check_dim(dim)
        parts, labels = [], []
        for lp in contribution.labels:
            vectors = lp.vectors.to_numpy().astype(np.float64)
            for j, (count, spread) in enumerate(zip(lp.counts, lp.spreads, strict=True)):
                n = samples_for(count, cfg)
                seed = int(_rng("fedge/feature-synthesis", cfg.seed, contribution.contribution_id, lp.label, j)
                           .integers(2**63))  # fmt: skip
                r = self.generator.residuals(vectors[j], float(spread), n, seed)
                x = vectors[j] + (cfg.spread_scale * float(spread) / math.sqrt(dim)) * r
                if cfg.normalise:
                    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
                parts.append(x.astype(np.float32))
                labels += [lp.label] * n
                if checkpoint is not None:
                    checkpoint()
        emb = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
        return SyntheticEmbeddings(
            emb, np.array(labels, dtype=str), np.array([contribution.contribution_id] * len(labels), dtype=str)
        )

    def forget(self, contribution_id: str) -> None:
        """Nothing is cached here (the statistics cache is the trainer's): kept for the unlearning engine's call."""


@dataclass(frozen=True)
class _KeyedConfig:
    settings: FeatureSynthesisConfig
    generator: str

    def key(self) -> str:
        return hashlib.sha256(f"{self.settings.key()}/{self.generator}".encode()).hexdigest()[:12]


def synthesizer_for_bundle(
    bundle_dir: Path, mode: str = "auto", seed: int = 0, generator_dir: Path | None = None,
    config: FeatureSynthesisConfig | None = None,
) -> FeatureSynthesizer | None:  # fmt: skip
    """The feature synthesizer the hub uses for `bundle_dir` under `mode` (auto|features|images); None: images."""
    if not uses_feature_synthesis(bundle_dir, mode):
        return None
    bundle = load_encoder_bundle(bundle_dir)
    cfg = config or FeatureSynthesisConfig(seed=seed)
    return FeatureSynthesizer(bundle, cfg, load_generator(generator_dir, bundle.encoder_id))


def main(argv: list[str] | None = None) -> int:
    """`python -m hub.learning.feature_synthesis --bundle DIR --public FOLDER --out DIR`: train a feature generator."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(
        prog="python -m hub.learning.feature_synthesis",
        description="Train a feature-space generator from an unlabelled (flat or nested) folder of public images, "
        "encoded with the bundle's encoder. Without public data, configure no generator: the hub samples "
        "Gaussians around the prototypes.",
    )
    ap.add_argument("--bundle", type=Path, required=True, help="bundle folder (its encoder.onnx and manifest.json)")
    ap.add_argument("--public", type=Path, required=True, help="folder of public images (labels, if any, ignored)")
    ap.add_argument("--out", type=Path, required=True, help="generator folder to write")
    ap.add_argument("--kind", choices=("covariance", "diffusion"), default="covariance")
    ap.add_argument("--shrinkage", type=float, default=0.2, help="covariance: weight of the identity")
    ap.add_argument("--time-budget-s", type=float, default=900.0, help="diffusion: training time limit (wall)")
    ap.add_argument("--max-steps", type=int, default=DiffusionTraining.max_steps, help="diffusion: training steps")
    ap.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    bundle = load_encoder_bundle(args.bundle)
    try:
        emb = encode_folder(args.public, args.bundle, threads=args.threads)
        training = DiffusionTraining(max_steps=args.max_steps, time_budget_s=args.time_budget_s, threads=args.threads,
                                     seed=args.seed)  # fmt: skip
        gen = train_generator(args.kind, emb, args.seed, shrinkage=args.shrinkage, training=training)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    save_generator(gen, args.out, bundle.encoder_id)
    print(json.dumps({"out": str(args.out), "kind": gen.kind, "public_images": len(emb), "digest": gen.digest(),
                      "wall_s": round(time.perf_counter() - t0, 1), **getattr(gen, "info", {})}, default=str))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
