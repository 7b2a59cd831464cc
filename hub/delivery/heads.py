"""The heads a delivered model carries beside its candidate `logits`, for the delivery gate (docs/delivery-gate.md).

Every head is an ONNX output of logits over the model's labels, computed from the same encoder
embedding the model already computes, so a site evaluates all of them in one run:
- `head_nearest_prototype`: the nearest-prototype classifier of the same uploads. Logit of a label =
  the highest cosine between the embedding and that label's prototypes (every prototype of every
  contribution the round trained on). It is a function of those uploads only, so forgetting a
  contribution removes it from this head as from the candidate.
- `head_refined_*`: closed-form heads of the refinement round (hub/refinement), one per ridge lambda.
- `head_loo_*`: FRAMU's leave-one-out heads (hub/framu): the candidate without one contribution.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from contract.payloads import Contribution
from hub.learning.closed_form import embedding_in

NEAREST_PROTOTYPE = "head_nearest_prototype"
MASK = 1e4  # added to other labels' cosines before the max: far below any cosine in [-1, 1]


def roles(model_bytes: bytes) -> dict[str, str]:
    """Each head (ONNX output named `logits` or `head_*`) and its role, candidate first."""
    names = [o.name for o in onnx.load_from_string(model_bytes).graph.output]
    out = {"logits": "candidate"} if "logits" in names else {}
    for n in names:
        if n.startswith("head_"):
            role = n.removeprefix("head_")
            out[n] = (
                "refined" if role.startswith("refined") else "nearest_prototype" if n == NEAREST_PROTOTYPE else role
            )
    return out


def roles_with(model_bytes: bytes, given: dict[str, str]) -> dict[str, str]:
    """`roles`, with the roles the caller knows better (FRAMU's `without:<contribution id>`) in their place."""
    out = roles(model_bytes)
    out.update({k: v for k, v in given.items() if k in out})
    return out


def prototype_matrix(contributions: list[Contribution], labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(unit prototypes [P, dim] float32, label index of each [P]) in contribution-id order."""
    vecs, labs = [], []
    for c in sorted(contributions, key=lambda c: c.contribution_id):
        for lp in c.labels:
            if lp.label not in labels:
                continue
            v = lp.vectors.to_numpy().astype(np.float64)
            vecs.append(v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12))
            labs += [labels.index(lp.label)] * len(v)
    if not vecs:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return np.concatenate(vecs).astype(np.float32), np.asarray(labs, np.int64)


def add_nearest_prototype(
    model_bytes: bytes, contributions: list[Contribution], labels: list[str]
) -> tuple[bytes, dict]:
    """The model with `head_nearest_prototype` added (unchanged if it has no embedding inside or no prototype);
    what the head was built from, for the registry manifest."""
    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    emb = embedding_in(graph)
    protos, labs = prototype_matrix(contributions, labels)
    if emb is None or not len(protos) or NEAREST_PROTOTYPE in {o.name for o in graph.output}:
        return model_bytes, {}
    mask = np.full((len(labels), len(protos)), -MASK, np.float32)
    mask[labs, np.arange(len(protos))] = 0.0
    graph.initializer.extend([
        numpy_helper.from_array(protos.T.copy(), "fedge_np_protos"),
        numpy_helper.from_array(mask, "fedge_np_mask"),
        numpy_helper.from_array(np.asarray([1], np.int64), "fedge_np_axes_mid"),
    ])  # fmt: skip
    graph.node.extend([
        # cosine: the embedding over its norm, times the unit prototypes
        _reduce(model, "ReduceL2", emb, "fedge_np_norm", -1, keepdims=1),
        helper.make_node("Div", [emb, "fedge_np_norm"], ["fedge_np_unit"]),
        helper.make_node("MatMul", ["fedge_np_unit", "fedge_np_protos"], ["fedge_np_cos"]),  # [N, P]
        # per label, the best of its prototypes: [N, 1, P] + mask [L, P] -> max over P -> [N, L]
        helper.make_node("Unsqueeze", ["fedge_np_cos", "fedge_np_axes_mid"], ["fedge_np_cos3"]),
        helper.make_node("Add", ["fedge_np_cos3", "fedge_np_mask"], ["fedge_np_masked"]),
        _reduce(model, "ReduceMax", "fedge_np_masked", NEAREST_PROTOTYPE, 2, keepdims=0),
    ])  # fmt: skip
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    graph.output.append(helper.make_tensor_value_info(NEAREST_PROTOTYPE, TensorProto.FLOAT,
                                                      [batch.dim_param or None, len(labels)]))  # fmt: skip
    onnx.checker.check_model(model)
    digest = hashlib.sha256(protos.tobytes() + labs.tobytes()).hexdigest()
    ids = sorted(c.contribution_id for c in contributions if c.labels)
    return model.SerializeToString(), {"prototypes": len(protos), "contributions": ids, "digest": digest}


def _reduce(model: onnx.ModelProto, op: str, x: str, y: str, axis: int, keepdims: int) -> onnx.NodeProto:
    """A Reduce* node over one axis in the form the model's opset takes (axes an input from opset 18)."""
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset >= 18:
        name = f"{y}_axes"
        model.graph.initializer.append(numpy_helper.from_array(np.asarray([axis], np.int64), name))
        return helper.make_node(op, [x, name], [y], keepdims=keepdims)
    return helper.make_node(op, [x], [y], axes=[axis], keepdims=keepdims)


FEATURES = "fedge_features"  # the closed-form model's random features (hub/learning/closed_form.py: to_onnx)


def add_linear_head(model_bytes: bytes, name: str, weights: np.ndarray, bias: np.ndarray, head_labels, labels) -> bytes:
    """The model with output `name` = features @ weights + bias over the model's `labels` (a label the head lacks
    gets logit -1e4: it is never predicted); FRAMU's leave-one-out heads over the candidate's random features."""
    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    if FEATURES not in {o for node in graph.node for o in node.output}:
        raise ValueError(f"the model has no {FEATURES!r} tensor: only closed-form models carry linear heads")
    w = np.zeros((weights.shape[0], len(labels)), np.float32)
    b = np.full(len(labels), -MASK, np.float32)
    for j, lab in enumerate(head_labels):
        w[:, list(labels).index(lab)] = weights[:, j]
        b[list(labels).index(lab)] = bias[j]
    graph.initializer.extend(
        [numpy_helper.from_array(w, f"fedge_{name}_w"), numpy_helper.from_array(b, f"fedge_{name}_b")]
    )
    graph.node.extend([
        helper.make_node("MatMul", [FEATURES, f"fedge_{name}_w"], [f"fedge_{name}_proj"]),
        helper.make_node("Add", [f"fedge_{name}_proj", f"fedge_{name}_b"], [name]),
    ])  # fmt: skip
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch.dim_param or None, len(labels)]))
    onnx.checker.check_model(model)
    return model.SerializeToString()
