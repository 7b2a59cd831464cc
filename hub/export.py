"""ONNX export for everything the hub ships: encoders to the edges, global classifiers to the sites."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn

# The exporter logs progress at INFO and a warning per missing torchvision op; a service log needs neither.
for _name in ("onnxscript", "onnx_ir", "torch.onnx._internal.exporter._registration"):
    logging.getLogger(_name).setLevel(logging.ERROR)


def export_onnx(module: nn.Module, image_size: int, path: Path, output_name: str) -> None:
    """Write `module` as one ONNX file: input `image` [N, 1, S, S] (dynamic N), one output."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        # torch.export emits its own deprecation warnings on every export; they are not ours to fix.
        warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning))
        torch.onnx.export(
            module.eval(),
            (torch.rand(2, 1, image_size, image_size),),
            str(path),
            input_names=["image"],
            output_names=[output_name],
            dynamic_shapes=({0: batch},),
            dynamo=True,
            external_data=False,
            optimize=True,
            verbose=False,
        )


def export_classifier(model: nn.Module, path: Path) -> None:
    """The global classifier: `image` in [0, 1] -> `logits` [N, C]."""
    export_onnx(model, int(model.image_size), path, "logits")  # type: ignore[arg-type]
