"""Embedding-conditioned diffusion generator (unCLIP-style), built from diffusers parts.

A diffusers `UNet2DModel` with `class_embed_type="identity"` receives a projection of the image
embedding added to its timestep embedding. Training drops the condition (10 %) so that
classifier-free guidance works at sampling time, and jitters it so that prototypes, which are
averages rather than embeddings of real images, still land on familiar ground.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.training_utils import EMAModel
from torch import nn

from hub.foundation.budget import StepBudget


class PrototypeConditionedUNet(ModelMixin, ConfigMixin):
    """UNet2DModel conditioned on a unit-norm embedding [N, cond_dim]; a learned null for CFG."""

    @register_to_config
    def __init__(
        self,
        sample_size: int = 8,
        cond_dim: int = 32,
        block_out_channels: tuple[int, ...] = (64, 128, 128),
        down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block: int = 2,
    ):
        super().__init__()
        self.unet = UNet2DModel(
            sample_size=sample_size,
            in_channels=1,
            out_channels=1,
            block_out_channels=tuple(block_out_channels),
            down_block_types=tuple(down_block_types),
            up_block_types=tuple(up_block_types),
            layers_per_block=layers_per_block,
            class_embed_type="identity",
            norm_num_groups=math.gcd(32, *block_out_channels),
        )
        time_dim = block_out_channels[0] * 4
        self.cond_proj = nn.Sequential(nn.Linear(cond_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.null_cond = nn.Parameter(torch.zeros(cond_dim))

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor, drop: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predicted noise. `drop` [N] bool replaces those rows' condition with the null condition."""
        if cond.ndim != 2 or cond.shape[1] != self.config.cond_dim:
            raise ValueError(f"cond must be [N, {self.config.cond_dim}], got {tuple(cond.shape)}")
        if drop is not None:
            cond = torch.where(drop[:, None], self.null_cond.expand_as(cond), cond)
        return self.unet(sample, timestep, class_labels=self.cond_proj(cond)).sample


def training_scheduler() -> DDPMScheduler:
    """The noise schedule the generator is trained with."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")


def jitter(cond: torch.Tensor, sigma: torch.Tensor | float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise of per-dimension scale `sigma` around unit-norm embeddings, back on the sphere."""
    noise = torch.randn(cond.shape, generator=generator)
    sig = sigma if isinstance(sigma, float) else sigma[:, None]
    return F.normalize(cond + sig * noise, dim=1)


def train_generator(
    images: np.ndarray,
    embeddings: np.ndarray,
    model: PrototypeConditionedUNet,
    steps: int,
    batch_size: int = 128,
    lr: float = 5e-4,
    cond_dropout: float = 0.1,
    max_jitter: float = 0.08,
    seed: int = 0,
    log_every: int = 250,
    time_budget_s: float | None = None,
) -> tuple[PrototypeConditionedUNet, int]:
    """Train `model` to denoise `images` [N,1,S,S] in [0,1] given `embeddings` [N,D]. Returns (EMA model, steps done).

    With `time_budget_s` the run stops at that many seconds; its cosine schedule is planned over the
    steps the budget affords at the measured rate (hub/foundation/budget.py), so it still decays.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    sched = training_scheduler()
    x0_all = torch.from_numpy(images) * 2 - 1
    e_all = torch.from_numpy(embeddings)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    budget = StepBudget(steps, time_budget_s)

    def lr_factor(s: int) -> float:
        warmup = min(200, budget.planned // 10)
        return min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (1 + np.cos(np.pi * budget.progress(s)))

    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    ema = EMAModel(model.parameters(), decay=0.999)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(x0_all), (batch_size,), generator=gen)
        x0, e = x0_all[idx], e_all[idx]
        cond = jitter(e, torch.rand(batch_size, generator=gen) * max_jitter, gen)
        drop = torch.rand(batch_size, generator=gen) < cond_dropout
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch_size,), generator=gen)
        loss = F.mse_loss(model(sched.add_noise(x0, noise, t), t, cond, drop), noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.step(model.parameters())
        going = budget.advance()
        if log_every and (step % log_every == 0 or not going):
            rate = budget.done / (time.perf_counter() - start)
            print(
                f"  diffusion step {step:5d}/{budget.planned} loss {loss.item():.4f} ({rate:.1f} steps/s)", flush=True
            )
        if not going:
            break
    if budget.stopped_by_budget:
        print(f"  time budget of {time_budget_s:g} s reached after {budget.done} of {steps} steps", flush=True)
    ema.copy_to(model.parameters())
    return model.eval(), budget.done


@torch.no_grad()
def sample(
    model: PrototypeConditionedUNet,
    scheduler: DDIMScheduler,
    cond: torch.Tensor,
    noise: torch.Tensor,
    steps: int = 25,
    guidance: float = 2.0,
    checkpoint: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Denoise `noise` [N,1,S,S] given `cond` [N, D] with DDIM and classifier-free guidance.

    Returns images [N,1,S,S] in [0,1]. Deterministic for a given `noise` (DDIM with eta = 0).
    `checkpoint` is called before each denoising step; it raises to abandon the work.
    """
    size = model.config.sample_size
    if noise.shape != (cond.shape[0], 1, size, size):
        raise ValueError(f"noise must be [{cond.shape[0]}, 1, {size}, {size}], got {tuple(noise.shape)}")
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    null = torch.ones(cond.shape[0], dtype=torch.bool)
    both_drop = torch.cat([torch.zeros_like(null), null])
    for t in scheduler.timesteps:
        if checkpoint is not None:
            checkpoint()
        if guidance == 1.0:  # the unconditional branch would cancel out: skip it, half the cost
            eps = model(scheduler.scale_model_input(x, t), t.expand(len(x)), cond)
        else:
            x_in = scheduler.scale_model_input(torch.cat([x, x]), t)
            eps_cond, eps_uncond = model(x_in, t.expand(2 * len(x)), torch.cat([cond, cond]), both_drop).chunk(2)
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        x = scheduler.step(eps, t, x).prev_sample
    return ((x.clamp(-1, 1) + 1) / 2).float()
