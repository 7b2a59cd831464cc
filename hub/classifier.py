"""The global classifier (the same architecture for fedge and every baseline) and its training loop."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class SmallCNN(nn.Module):
    """Two conv stages and an MLP head: [N, 1, S, S] in [0, 1] -> logits [N, n_classes]."""

    def __init__(self, image_size: int, n_classes: int, channels: tuple[int, int] = (32, 64), hidden: int = 128):
        super().__init__()
        self.image_size, self.n_classes = image_size, n_classes
        s = image_size // 4
        self.net = nn.Sequential(
            nn.Conv2d(1, channels[0], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(channels[0], channels[1], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(channels[1] * s * s, hidden), nn.ReLU(), nn.Dropout(0.2),
            nn.Linear(hidden, n_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        return self.net(x)


def shift_augment(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random translation by up to `max_shift` pixels (zero padded), the only augmentation used."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(n, 1, h, w + 2 * max_shift)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :].expand(n, 1, h, w)
    return out.gather(3, cols)


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    balance: bool = True,
    model: SmallCNN | None = None,
    augment: bool = True,
    checkpoint: Callable[[], None] | None = None,
    on_epoch: Callable[[int, int], None] | None = None,
) -> SmallCNN:
    """Train (or continue training) a SmallCNN; `balance` weights classes inversely to frequency.

    `checkpoint` is called between batches; it raises to abandon training (a service stopping).
    `on_epoch(done, epochs)` is called after each epoch (progress reporting).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = model or SmallCNN(images.shape[-1], n_classes)
    x, y = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)), torch.from_numpy(labels.astype(np.int64))
    weight = None
    if balance:
        freq = torch.bincount(y, minlength=n_classes).float()
        weight = torch.where(freq > 0, freq.sum() / (freq.clamp(min=1) * (freq > 0).sum()), torch.zeros_like(freq))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = max(1, epochs * int(np.ceil(len(x) / batch_size)))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            if checkpoint is not None:
                checkpoint()
            idx = order[i : i + batch_size]
            xb = shift_augment(x[idx], gen) if augment else x[idx]
            loss = F.cross_entropy(model(xb), y[idx], weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if on_epoch is not None:
            on_epoch(epoch + 1, epochs)
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Predicted class indices."""
    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    return torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]).numpy()


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy."""
    return float((predict(model, images) == labels).mean())
