"""The refinement round's feature part: the delivered model's random features, projected to `dim` by a seeded matrix.

Every model a refining hub delivers carries a second ONNX output, `fedge_refine_features` [N, dim]:
the random Fourier features phi [N, D] that the closed-form model already computes, times a fixed
Gaussian projection P [D, dim] (entries N(0, 1/dim), drawn from the seed and held as float32 in the
model). A site runs its installed model with onnxruntime and reads that output; it never needs torch
or the projection's seed. The refined model is the same graph with the head solved over z = phi P:
logits = z A + c = phi (P A) + c, so it is written with the closed-form model's own ONNX composer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hub.learning.closed_form import ClosedFormHead, FeatureMap, to_onnx

FEATURES = "fedge_features"  # the random features phi inside the closed-form model (hub/learning/closed_form.py)
OUTPUT = "fedge_refine_features"


def _rng(*parts: object) -> np.random.Generator:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


@dataclass(frozen=True)
class Projection:
    """A seeded Gaussian projection of the D random features to `dim` dimensions."""

    feature_map: FeatureMap
    dim: int = 96
    seed: int = 0

    @cached_property
    def matrix(self) -> np.ndarray:
        """P [D, dim], float32: the values the ONNX model holds."""
        d_in = self.feature_map.n_features
        rng = _rng("fedge/refine-projection", self.seed, self.feature_map.key(), self.dim)
        return (rng.standard_normal((d_in, self.dim)) / np.sqrt(self.dim)).astype(np.float32)

    def key(self, encoder_id: str) -> str:
        """Names everything that changes a site's statistics: the encoder, the feature map, the projection."""
        cfg = {"encoder": encoder_id, "features": self.feature_map.key(), "dim": self.dim, "seed": self.seed}
        return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]

    def transform(self, features: np.ndarray) -> np.ndarray:
        """z [n, dim] (float64) of random features phi [n, D] (the hub-side twin of the ONNX output, for tests)."""
        return np.asarray(features, np.float64) @ self.matrix.astype(np.float64)


def with_feature_output(model_bytes: bytes, projection: Projection) -> bytes:
    """The closed-form model with `fedge_refine_features` = phi P added as a second output (logits stay first)."""
    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    produced = {o for node in graph.node for o in node.output}
    if FEATURES not in produced:
        raise ValueError(f"the model has no {FEATURES!r} tensor: only closed-form models can be refined")
    if OUTPUT in produced:
        return model_bytes
    graph.initializer.append(numpy_helper.from_array(projection.matrix, name="fedge_refine_p"))
    graph.node.append(helper.make_node("MatMul", [FEATURES, "fedge_refine_p"], [OUTPUT]))
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    graph.output.append(
        helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [batch.dim_param or None, projection.dim])
    )
    onnx.checker.check_model(model)
    return model.SerializeToString()


def refined_onnx(encoder_onnx: Path, projection: Projection, head: ClosedFormHead) -> bytes:
    """The refined model: encoder -> random features -> (P, head over z) -> logits, plus the feature output."""
    folded = ClosedFormHead(
        projection.matrix.astype(np.float64) @ head.weights, head.bias, head.label_names, head.variant, head.lam,
        head.trained_on,
    )  # fmt: skip
    return with_feature_output(to_onnx(encoder_onnx, projection.feature_map, folded), projection)
