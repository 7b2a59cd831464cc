"""Image encoder trained self-supervised (SimCLR): it never sees a label.

Its L2-normalised embeddings are what sites average into prototypes and what conditions the generator.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from hub.foundation.budget import StepBudget


class ConvEncoder(ModelMixin, ConfigMixin):
    """Small CNN: [N, 1, S, S] in [0, 1] -> unit-norm embedding [N, dim]."""

    @register_to_config
    def __init__(self, image_size: int = 8, dim: int = 32, channels: tuple[int, ...] = (32, 64)):
        super().__init__()
        layers: list[nn.Module] = []
        c_in, size = 1, image_size
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU()]
            layers.append(nn.MaxPool2d(2))
            c_in, size = c, size // 2
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Sequential(nn.Linear(c_in * size * size, 256), nn.ReLU(), nn.Linear(256, dim))

    def features_raw(self, x: torch.Tensor) -> torch.Tensor:
        """Embedding before normalisation (what the SimCLR projection head reads)."""
        return self.head(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm embedding."""
        return F.normalize(self.features_raw(x), dim=1)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random affine (rotate, scale, shift), contrast and noise: the views SimCLR must match."""
    n = x.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    angle = u(-15, 15) * math.pi / 180
    scale = u(0.85, 1.15)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    shift = 2.0 / x.shape[-1]  # about one pixel, in normalised coordinates
    theta = torch.stack(
        [torch.stack([cos, -sin, u(-shift, shift)], 1), torch.stack([sin, cos, u(-shift, shift)], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
    out = out * u(0.6, 1.0)[:, None, None, None]
    out = out + 0.05 * torch.randn(out.shape, generator=generator)
    return out.clamp(0, 1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised-temperature cross-entropy over 2N views."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    n = z1.shape[0]
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


def train_simclr(
    images: np.ndarray,
    dim: int = 32,
    channels: tuple[int, ...] = (32, 64),
    steps: int = 1500,
    batch_size: int = 256,
    lr: float = 1e-3,
    temperature: float = 0.2,
    seed: int = 0,
    log_every: int = 250,
    budget: StepBudget | None = None,
) -> ConvEncoder:
    """Train a ConvEncoder on unlabelled `images` [N, 1, S, S] with SimCLR.

    `budget` (hub/foundation/budget.py, for `steps`) stops it at a time limit, its cosine schedule
    planned over the steps the limit affords; the caller reads the steps done from it.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    enc = ConvEncoder(image_size=images.shape[-1], dim=dim, channels=channels)
    proj = nn.Sequential(nn.Linear(dim, 128), nn.ReLU(), nn.Linear(128, 64))
    opt = torch.optim.AdamW([*enc.parameters(), *proj.parameters()], lr=lr, weight_decay=1e-4)
    if budget is None:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    else:  # the same cosine, over the steps the time limit affords
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * budget.progress(s))))
    data = torch.from_numpy(images)
    enc.train()
    for step in range(steps):
        idx = torch.randint(0, len(data), (min(batch_size, len(data)),), generator=gen)
        x = data[idx]
        loss = nt_xent(proj(enc.features_raw(augment(x, gen))), proj(enc.features_raw(augment(x, gen))), temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        going = budget is None or budget.advance()
        if log_every and (step % log_every == 0 or step == steps - 1 or not going):
            print(f"  simclr step {step:5d}/{steps} loss {loss.item():.4f}", flush=True)
        if not going:
            break
    return enc.eval()


@torch.no_grad()
def embed(encoder: ConvEncoder, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Embeddings of `images` with the torch encoder (hub side; the edge uses ONNX)."""
    encoder.eval()
    out = [encoder(torch.from_numpy(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy()
