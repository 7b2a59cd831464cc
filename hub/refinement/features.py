"""The refinement round's feature part: what the sites' statistics are computed over, and the refined model's graph.

Every model a refining hub delivers carries a second ONNX output, `fedge_refine_features` [N, dim]:
a fixed Gaussian projection P [D_in, dim] (entries N(0, 1/dim), drawn from the seed and held as float32
in the model) of one of three inputs (`rounds.refine_features`; `auto`, the default, takes the embedding
when it has at least `dim` dimensions, else the random features: `resolve_kind`):

  rff            the random Fourier features phi [N, 1024] that the closed-form model already computes
                 (bandwidth and count from hub/learning/closed_form.FeatureMap): a kernel head;
  embedding      the encoder's embedding e [N, E] itself (unit norm): a linear head, as Fed3R and the
                 bench's closed-form row do;
  embedding+rff  both: z = [e, phi P'], the embedding kept whole in the first E columns (P's upper
                 block is the identity) and the random features projected to the other dim - E
                 (P' entries N(0, 1/(dim - E))): a linear plus a kernel head, for a narrow encoder
                 whose embedding alone is too coarse and whose kernel alone needs many dimensions.

A site runs its installed model with onnxruntime and reads that output whatever its input is; it
never needs torch or the projection's seed. The refined model is the encoder followed by the head
solved over z = x P, folded as logits = x (P A) + c (x = phi or e), plus the feature output again,
plus one more output of logits per extra ridge lambda (`rounds.refine_lams`): `head_refined_<i>` =
z A_i + c_i for the i-th lambda, all solved from the same summed statistics, so the delivery gate
can choose lambda on the sites' held-out evaluations (hub/delivery/gate.py). Output order:
`logits`, `fedge_refine_features`, `head_refined_0`, `head_refined_1`, ...
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hub.learning.closed_form import (
    EMBEDDING,
    ClosedFormHead,
    FeatureMap,
    embedding_in,
    encoder_graph,
    finish_head_model,
    to_onnx,
)

FEATURES = "fedge_features"  # the random features phi inside the closed-form model (hub/learning/closed_form.py)
OUTPUT = "fedge_refine_features"
HEAD_PREFIX = "head_refined_"  # extra heads: head_refined_<i> for the i-th of rounds.refine_lams
MIXED_IN = "fedge_refine_in"  # [e, phi] inside a model whose refinement features are embedding+rff
Kind = Literal["auto", "rff", "embedding", "embedding+rff"]
KINDS: tuple[str, ...] = ("auto", "rff", "embedding", "embedding+rff")


def resolve_kind(kind: str, embedding_dim: int, dim: int) -> str:
    """`auto`: the embedding when it is at least as wide as the projection (a wide pretrained encoder such as the
    general bundle's 1,280 dims, where a linear head is enough), else the random features (a narrow encoder such as
    the bundled digits one, whose embedding a projection to `dim` could only pad). Chosen on validation carves:
    docs/evaluate.md."""
    if kind == "auto":
        return "embedding" if embedding_dim >= dim else "rff"
    return kind


def head_name(i: int) -> str:
    """The ONNX output of the refined model's head for the i-th extra lambda."""
    return f"{HEAD_PREFIX}{i}"


def _rng(*parts: object) -> np.random.Generator:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


@dataclass(frozen=True)
class Projection:
    """A seeded Gaussian projection of the random features (`rff`) or of the embedding (`embedding`) to `dim`."""

    feature_map: FeatureMap
    dim: int = 96
    seed: int = 0
    kind: Kind = "rff"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown refinement features {self.kind!r}; expected one of {KINDS}")
        object.__setattr__(self, "kind", resolve_kind(self.kind, self.feature_map.dim, self.dim))
        if self.kind == "embedding+rff" and self.dim <= self.feature_map.dim:
            raise ValueError(
                f"embedding+rff needs dim above the embedding's {self.feature_map.dim} dimensions, got {self.dim}"
            )

    @property
    def d_in(self) -> int:
        """Dimension of what is projected: D random features, the embedding's E, or both (E + D)."""
        fm = self.feature_map
        return {"rff": fm.n_features, "embedding": fm.dim}.get(self.kind, fm.dim + fm.n_features)

    @cached_property
    def matrix(self) -> np.ndarray:
        """P [D_in, dim], float32: the values the ONNX model holds."""
        extra = () if self.kind == "rff" else (self.kind,)  # rff keeps the matrix (and key) it always had
        rng = _rng("fedge/refine-projection", self.seed, self.feature_map.key(), self.dim, *extra)
        if self.kind != "embedding+rff":
            return (rng.standard_normal((self.d_in, self.dim)) / np.sqrt(self.dim)).astype(np.float32)
        e, rest = self.feature_map.dim, self.dim - self.feature_map.dim
        p = np.zeros((self.d_in, self.dim), np.float32)
        p[:e, :e] = np.eye(e, dtype=np.float32)
        p[e:, e:] = rng.standard_normal((self.feature_map.n_features, rest)) / np.sqrt(rest)
        return p

    def key(self, encoder_id: str) -> str:
        """Names everything that changes a site's statistics: the encoder, the feature map, the projection."""
        cfg = {"encoder": encoder_id, "features": self.feature_map.key(), "dim": self.dim, "seed": self.seed}
        if self.kind != "rff":
            cfg["kind"] = self.kind
        return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]

    def transform(self, inputs: np.ndarray) -> np.ndarray:
        """z [n, dim] (float64) of what is projected: phi [n, D] (rff), embeddings [n, E] or both [n, E + D]."""
        return np.asarray(inputs, np.float64) @ self.matrix.astype(np.float64)

    def features(self, embeddings: np.ndarray) -> np.ndarray:
        """z [n, dim] (float64) of encoder embeddings [n, E]: the hub-side twin of the ONNX output a site reads."""
        if self.kind == "rff":
            return self.transform(self.feature_map.transform(embeddings))
        if self.kind == "embedding+rff":
            e = np.asarray(embeddings, np.float64)
            return self.transform(np.hstack([e, self.feature_map.transform(e)]))
        return self.transform(embeddings)


def _source(graph: onnx.GraphProto, kind: str) -> str:
    """The tensor the projection multiplies: phi (rff), the embedding, or their concatenation (added to `graph` if
    missing), found in a closed-form or refined graph."""
    produced = {o for node in graph.node for o in node.output}
    if kind in ("rff", "embedding+rff") and FEATURES not in produced:
        raise ValueError(f"the model has no {FEATURES!r} tensor: only closed-form models can be refined")
    if kind == "rff":
        return FEATURES
    emb = embedding_in(graph)
    if emb is None:
        raise ValueError(
            "the model has no embedding the refinement can project: only closed-form models can be refined"
        )
    if kind == "embedding+rff" and MIXED_IN not in produced:
        graph.node.append(helper.make_node("Concat", [emb, FEATURES], [MIXED_IN], axis=1))
    return MIXED_IN if kind == "embedding+rff" else emb


def with_feature_output(model_bytes: bytes, projection: Projection) -> bytes:
    """The model with `fedge_refine_features` = x P added as its second output (logits stay first)."""
    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    if OUTPUT in {o for node in graph.node for o in node.output}:
        return model_bytes
    src = _source(graph, projection.kind)
    graph.initializer.append(numpy_helper.from_array(projection.matrix, name="fedge_refine_p"))
    graph.node.append(helper.make_node("MatMul", [src, "fedge_refine_p"], [OUTPUT]))
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    graph.output.insert(
        1, helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [batch.dim_param or None, projection.dim])
    )
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _linear_onnx(encoder_onnx: Path, head: ClosedFormHead) -> bytes:
    """encoder -> embedding (`fedge_embedding`) -> logits = e W + b: the closed-form composer without random features."""
    inits = {"fedge_head_w": head.weights.astype(np.float32), "fedge_head_b": head.bias.astype(np.float32)}
    model, emb = encoder_graph(encoder_onnx, [*inits, "logits", EMBEDDING])
    graph = model.graph
    graph.initializer.extend(numpy_helper.from_array(v, name=k) for k, v in inits.items())
    graph.node.extend([
        helper.make_node("Identity", [emb], [EMBEDDING]),
        helper.make_node("MatMul", [EMBEDDING, "fedge_head_w"], ["fedge_head_proj"]),
        helper.make_node("Add", ["fedge_head_proj", "fedge_head_b"], ["logits"]),
    ])  # fmt: skip
    return finish_head_model(model, head)


def _mixed_onnx(encoder_onnx: Path, feature_map: FeatureMap, head: ClosedFormHead) -> bytes:
    """encoder -> e -> logits = e W_e + phi(e) W_phi + b for a head over [e, phi] (W [E + D, C]): the closed-form
    composer with the embedding's part of the head added to its logits."""
    e = feature_map.dim
    rff_part = ClosedFormHead(head.weights[e:], head.bias, head.label_names, head.variant, head.lam, head.trained_on)
    model = onnx.load_from_string(to_onnx(encoder_onnx, feature_map, rff_part))
    graph = model.graph
    emb = embedding_in(graph)
    assert emb is not None  # to_onnx's random features read the embedding
    for node in graph.node:
        if list(node.output) == ["logits"]:
            node.output[0] = "fedge_head_rff_logits"
    graph.initializer.append(numpy_helper.from_array(head.weights[:e].astype(np.float32), "fedge_head_we"))
    graph.node.extend([
        helper.make_node("MatMul", [emb, "fedge_head_we"], ["fedge_head_emb"]),
        helper.make_node("Add", ["fedge_head_rff_logits", "fedge_head_emb"], ["logits"]),
    ])  # fmt: skip
    props = {p.key: p.value for p in model.metadata_props}
    props["fedge.head"] = json.dumps(
        {"variant": head.variant, "lam": head.lam, "digest": head.digest()}
    )  # the whole head
    del model.metadata_props[:]
    helper.set_model_props(model, props)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def refined_onnx(
    encoder_onnx: Path, projection: Projection, head: ClosedFormHead, extra: Sequence[ClosedFormHead] = ()
) -> bytes:
    """The refined model: encoder -> (phi, embedding or both) -> (P A) + c = `logits`, the feature output, and one
    `head_refined_<i>` output (logits over the same labels, z A_i + c_i) per head in `extra`."""
    folded = ClosedFormHead(
        projection.matrix.astype(np.float64) @ head.weights, head.bias, head.label_names, head.variant, head.lam,
        head.trained_on,
    )  # fmt: skip
    if projection.kind == "rff":
        base = to_onnx(encoder_onnx, projection.feature_map, folded)
    elif projection.kind == "embedding":
        base = _linear_onnx(encoder_onnx, folded)
    else:
        base = _mixed_onnx(encoder_onnx, projection.feature_map, folded)
    data = with_feature_output(base, projection)
    if not extra:
        return data
    model = onnx.load_from_string(data)
    graph = model.graph
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    described = []
    for i, h in enumerate(extra):
        if tuple(h.label_names) != tuple(head.label_names):
            raise ValueError(f"extra head {i} has labels {h.label_names}; the model's are {head.label_names}")
        w, b, name = f"fedge_refined_w{i}", f"fedge_refined_b{i}", head_name(i)
        graph.initializer.extend([numpy_helper.from_array(h.weights.astype(np.float32), w),
                                  numpy_helper.from_array(h.bias.astype(np.float32), b)])  # fmt: skip
        graph.node.extend([helper.make_node("MatMul", [OUTPUT, w], [f"{name}_proj"]),
                           helper.make_node("Add", [f"{name}_proj", b], [name])])  # fmt: skip
        graph.output.append(
            helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch.dim_param or None, len(h.label_names)])
        )
        described.append({"output": name, "variant": h.variant, "lam": h.lam, "digest": h.digest()})
    props = {p.key: p.value for p in model.metadata_props}
    props["fedge.refined_heads"] = json.dumps(described)
    del model.metadata_props[:]
    helper.set_model_props(model, props)
    onnx.checker.check_model(model)
    return model.SerializeToString()
