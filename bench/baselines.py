"""Baselines for bench/fgl: centralized (two recipes), local-only, Flower FedAvg (from scratch, linear probe, after fedge), nearest prototype."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from flwr.common import (
    Code,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.strategy import FedAvg
from torch import nn

from contract.payloads import Contribution
from hub.classifier import SmallCNN, accuracy, train_classifier


@dataclass
class FedAvgResult:
    """Final accuracy, bytes per site and accuracy by round."""

    accuracy: float
    bytes_up_per_site: float
    bytes_down_per_site: float
    wall_s: float
    curve: list[tuple[int, float]]


def parameters_bytes(params: Parameters) -> int:
    """Bytes Flower puts on the wire for these parameters (its serialized tensors)."""
    return sum(len(t) for t in params.tensors)


def get_weights(model: nn.Module) -> list[np.ndarray]:
    """Model parameters as numpy arrays, in state-dict order."""
    return [v.detach().cpu().numpy().copy() for v in model.state_dict().values()]


def set_weights(model: nn.Module, weights: list[np.ndarray]) -> None:
    """Load numpy arrays into `model` in state-dict order."""
    keys = list(model.state_dict().keys())
    model.load_state_dict({k: torch.from_numpy(np.asarray(w)) for k, w in zip(keys, weights, strict=True)})


def local_sgd(
    model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float, batch_size: int, seed: int
) -> None:
    """Plain local SGD with momentum, the FedAvg client update."""
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


def run_fedavg(
    make_model: Callable[[], nn.Module],
    sites: list[tuple[np.ndarray, np.ndarray]],
    test: tuple[np.ndarray, np.ndarray],
    rounds: int,
    local_epochs: int,
    lr: float,
    batch_size: int = 32,
    seed: int = 0,
    eval_every: int = 5,
    initial: nn.Module | None = None,
) -> FedAvgResult:
    """Flower's FedAvg strategy over in-process clients, every client every round, bytes counted both ways.

    The strategy object (`flwr.server.strategy.FedAvg`) does the aggregation, weighted by examples,
    exactly as in a Flower deployment; only the transport is replaced by function calls, which
    keeps the grid's FedAvg runs inside the time budget (Flower's Ray simulation costs seconds per
    round here). Each round every site downloads the global model and uploads its update. `initial`
    starts from a given model's weights (fedge's model, for the paper's multi-round variant) instead
    of a fresh one; its architecture must be `make_model()`'s.
    """
    torch.manual_seed(seed)
    start = time.perf_counter()
    global_model = make_model()
    if initial is not None:
        set_weights(global_model, get_weights(initial))
    params = ndarrays_to_parameters(get_weights(global_model))
    strategy = FedAvg(
        fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=len(sites),
        min_available_clients=len(sites), initial_parameters=params,
    )  # fmt: skip
    up = down = 0
    curve = []
    client = make_model()
    for rnd in range(1, rounds + 1):
        weights = parameters_to_ndarrays(params)
        down += parameters_bytes(params) * len(sites)  # every site downloads the global model
        results = []
        for s, (x, y) in enumerate(sites):
            set_weights(client, weights)
            local_sgd(client, x, y, local_epochs, lr, batch_size, seed=seed * 100_003 + rnd * 1009 + s)
            reply = ndarrays_to_parameters(get_weights(client))
            up += parameters_bytes(reply)
            results.append((None, FitRes(Status(Code.OK, ""), reply, len(x), {})))
        new_params, _ = strategy.aggregate_fit(rnd, results, [])
        if new_params is None:
            raise RuntimeError(f"Flower FedAvg returned no parameters in round {rnd}")
        params = new_params
        if rnd % eval_every == 0 or rnd == rounds:
            set_weights(global_model, parameters_to_ndarrays(params))
            curve.append((rnd, accuracy(global_model, *test)))
    n = len(sites)
    return FedAvgResult(curve[-1][1], up / n, down / n, time.perf_counter() - start, curve)


def widen_classes(
    model: SmallCNN, names: tuple[str, ...], label_names: tuple[str, ...], image_size: int, seed: int
) -> SmallCNN:
    """`model` (classes `names`) as a SmallCNN over every class of `label_names`, in that order.

    Every weight is copied; a class the model never saw (no site uploaded a prototype of it) keeps
    a freshly initialised (seeded) output row, which FedAvg rounds on real data can then train.
    """
    torch.manual_seed(seed)
    wide = SmallCNN(image_size, len(label_names))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out_w, out_b = list(state)[-2:]  # the last Linear layer
    w, b = wide.state_dict()[out_w].clone(), wide.state_dict()[out_b].clone()
    for i, name in enumerate(names):
        w[label_names.index(name)], b[label_names.index(name)] = state[out_w][i], state[out_b][i]
    state[out_w], state[out_b] = w, b
    wide.load_state_dict(state)
    return wide.eval()


def centralized_sgd(
    images: np.ndarray, labels: np.ndarray, n_classes: int, rounds: int, local_epochs: int, lr: float, seed: int
) -> nn.Module:
    """FedAvg's recipe on the pooled data: one site holding everything, `rounds` x `local_epochs` epochs of SGD."""
    torch.manual_seed(seed)
    model = SmallCNN(images.shape[-1], n_classes)
    for rnd in range(1, rounds + 1):
        local_sgd(model, images, labels, local_epochs, lr, 32, seed=seed * 100_003 + rnd * 1009)
    return model


class LinearHead(nn.Module):
    """Softmax regression on frozen embeddings."""

    def __init__(self, dim: int, n_classes: int):
        super().__init__()
        self.fc = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits."""
        return self.fc(x)


def local_only(
    sites: list[tuple[np.ndarray, np.ndarray]],
    test: tuple[np.ndarray, np.ndarray],
    n_classes: int,
    epochs: int,
    seed: int = 0,
) -> tuple[float, float]:
    """Each site trains alone; returns (mean, std) of their test accuracies."""
    accs = [
        accuracy(train_classifier(x, y, n_classes, epochs=epochs, seed=seed + s, balance=False), *test)
        for s, (x, y) in enumerate(sites)
    ]
    return float(np.mean(accs)), float(np.std(accs))


def nearest_prototype(
    contributions: list[Contribution],
    test_embeddings: np.ndarray,
    test_labels: np.ndarray,
    label_names: tuple[str, ...],
) -> float:
    """Label of the nearest uploaded prototype (cosine), from exactly the uploads fedge gets."""
    vecs, labs = [], []
    for c in contributions:
        for lp in c.labels:
            v = lp.vectors.to_numpy()
            vecs.append(v / np.linalg.norm(v, axis=1, keepdims=True))
            labs += [lp.label] * len(v)
    protos = np.concatenate(vecs)
    pred = np.array(labs)[(test_embeddings @ protos.T).argmax(1)]
    return float((pred == np.array(label_names)[test_labels]).mean())
