"""A closed-form global model whose exact optimum depends only on additive per-contribution statistics.

image -> the bundle's fp32 encoder (ONNX) -> fixed random Fourier features (seeded) -> linear head.

Every contribution's synthetic samples are reduced to their feature Gram matrix, per-label feature
sums and per-label counts (float64). A contribution's statistics depend on that contribution alone
(its synthesis is seeded by its id and its features are computed on its own samples, in fixed
batches), so forgetting it is dropping its statistics and solving again. The remaining statistics
are always re-summed in contribution-id order rather than subtracted, so the unlearned head is
bit-identical to a head retrained from scratch without the forgotten contribution.

Memory per contribution: D^2 * 8 bytes for the Gram matrix (D = number of random features) plus
L * D * 8 for the sums of its L labels.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import onnx
import scipy.linalg
from onnx import TensorProto, helper, numpy_helper

from edge.encoder import InputSpec, OnnxEncoder
from runtime.files import fsync_write

if TYPE_CHECKING:  # hub.synthesis brings torch; the algorithm itself needs only numpy and onnxruntime
    from hub.synthesis import SyntheticSet

Variant = Literal["ridge", "ridge-balanced", "lda"]
VARIANTS: tuple[str, ...] = ("ridge", "ridge-balanced", "lda")

# Features are computed in fixed batches so that a sample's features never depend on which other
# samples shared its batch (onnxruntime's kernels may block differently for other batch shapes).
EMBED_BATCH = 256


def _rng(*parts: object) -> np.random.Generator:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


@dataclass(frozen=True)
class FeatureMap:
    """Random Fourier features of unit embeddings: sqrt(2/D) cos(x W + b), approximating an RBF kernel."""

    dim: int  # embedding dimension of the encoder
    # Defaults chosen on validation data by `python -m bench.unlearning --select`.
    n_features: int = 1024
    bandwidth: float = 0.7  # length scale of the approximated RBF kernel on unit-norm embeddings
    seed: int = 0

    @cached_property
    def params(self) -> tuple[np.ndarray, np.ndarray]:
        """(W [dim, D], b [D]), drawn from the seed and rounded to float32: the values the ONNX model holds."""
        rng = _rng("fedge/rff", self.seed, self.dim, self.n_features, self.bandwidth)
        w = (rng.standard_normal((self.dim, self.n_features)) / self.bandwidth).astype(np.float32)
        b = rng.uniform(0.0, 2.0 * np.pi, self.n_features).astype(np.float32)
        return w, b

    @property
    def scale(self) -> float:
        """The constant sqrt(2/D) in front of the cosines."""
        return float(np.sqrt(2.0 / self.n_features))

    def key(self) -> str:
        """Short hash of everything that changes the features: statistics of different maps never mix."""
        cfg = {"dim": self.dim, "n_features": self.n_features, "bandwidth": self.bandwidth, "seed": self.seed}
        return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]

    def transform(self, embeddings: np.ndarray) -> np.ndarray:
        """Features [n, D] in float64 of embeddings [n, dim]."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"expected embeddings [n, {self.dim}], got {list(embeddings.shape)}")
        w, b = self.params
        z = embeddings.astype(np.float64) @ w.astype(np.float64) + b.astype(np.float64)
        return self.scale * np.cos(z)


class FeatureExtractor:
    """Images -> features at the hub, on the same fp32 encoder.onnx that the delivered model embeds.

    CPU only and a fixed thread count (default 1): the same images must give the same bits on every
    run, which is what makes a refit from scratch bit-identical to an unlearned model.
    """

    def __init__(self, encoder_onnx: Path, feature_map: FeatureMap, threads: int = 1, batch_size: int = EMBED_BATCH):
        self.encoder = OnnxEncoder(Path(encoder_onnx), prefer_cuda=False, threads=threads)
        self.feature_map, self.batch_size = feature_map, batch_size

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Encoder embeddings [n, dim] (float32)."""
        if not len(images):
            return np.zeros((0, self.feature_map.dim), np.float32)
        return self.encoder.encode(images, batch_size=self.batch_size)

    def features(self, images: np.ndarray) -> np.ndarray:
        """Random Fourier features [n, D] (float64) of images [n, 1, S, S]."""
        return self.feature_map.transform(self.embed(images))


def _digest(header: dict, arrays: Iterable[np.ndarray]) -> str:
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class ContributionStats:
    """Additive statistics of one contribution's synthetic samples: Gram, per-label sums and counts."""

    contribution_id: str
    feature_key: str
    labels: tuple[str, ...]  # sorted
    counts: np.ndarray  # [L] int64
    sums: np.ndarray  # [L, D] float64
    gram: np.ndarray  # [D, D] float64

    @classmethod
    def from_features(
        cls, contribution_id: str, feature_key: str, features: np.ndarray, labels: np.ndarray
    ) -> ContributionStats:
        """Statistics of feature rows [n, D] with their label names [n]."""
        features = np.ascontiguousarray(features, dtype=np.float64)
        labels = np.asarray(labels).astype(str)
        if len(features) != len(labels):
            raise ValueError(f"{len(features)} feature rows but {len(labels)} labels")
        names = tuple(sorted(set(labels.tolist())))
        counts = np.array([(labels == n).sum() for n in names], np.int64)
        sums = np.zeros((len(names), features.shape[1]))
        for i, n in enumerate(names):
            sums[i] = features[labels == n].sum(axis=0)
        return cls(contribution_id, feature_key, names, counts, sums, features.T @ features)

    @classmethod
    def from_synthetic(
        cls, synthetic: SyntheticSet, contribution_id: str, extractor: FeatureExtractor
    ) -> ContributionStats:
        """Statistics of the samples of `synthetic` tagged with `contribution_id` (and only those)."""
        mine = synthetic.tags == contribution_id
        if len(synthetic.tags) and not mine.any():
            raise ValueError(f"no synthetic sample is tagged with contribution {contribution_id}")
        features = extractor.features(synthetic.images[mine])
        return cls.from_features(contribution_id, extractor.feature_map.key(), features, synthetic.labels[mine])

    @property
    def n_samples(self) -> int:
        """Synthetic samples these statistics summarise."""
        return int(self.counts.sum())

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays in memory."""
        return int(self.counts.nbytes + self.sums.nbytes + self.gram.nbytes)

    def digest(self) -> str:
        """sha256 of the id, feature map and every array: names exactly what a model was trained from."""
        header = {"contribution_id": self.contribution_id, "feature_key": self.feature_key, "labels": self.labels}
        return _digest(header, (self.counts, self.sums, self.gram))

    def save(self, path: Path) -> None:
        """Write to `path` (.npz) atomically: a crash leaves the old file or the new one, never half."""
        path = Path(path)
        buf = io.BytesIO()
        # Only the upper triangle of the symmetric Gram matrix is stored: half the disk.
        iu = np.triu_indices(self.gram.shape[0])
        np.savez(
            buf,
            contribution_id=np.array(self.contribution_id),
            feature_key=np.array(self.feature_key),
            labels=np.array(self.labels, dtype=str),
            counts=self.counts,
            sums=self.sums,
            gram_upper=self.gram[iu],
            digest=np.array(self.digest()),
        )
        tmp = path.with_name(f".tmp-{path.name}")
        fsync_write(tmp, buf.getvalue())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> ContributionStats:
        """Read what `save` wrote, checking its digest."""
        with np.load(Path(path), allow_pickle=False) as z:
            sums = z["sums"]
            d = sums.shape[1]
            gram = np.zeros((d, d))
            iu = np.triu_indices(d)
            gram[iu] = z["gram_upper"]
            gram.T[iu] = z["gram_upper"]
            labels = tuple(str(x) for x in z["labels"].tolist())
            stats = cls(str(z["contribution_id"]), str(z["feature_key"]), labels, z["counts"], sums, gram)
            if stats.digest() != str(z["digest"]):
                raise ValueError(f"{path}: statistics do not match their recorded digest")
        return stats


@dataclass(frozen=True, eq=False)
class TotalStats:
    """The (weighted) sum of several contributions' statistics, over the sorted union of their labels."""

    contribution_ids: tuple[str, ...]  # in the order summed (sorted); weight-0 contributions are not here
    feature_key: str
    labels: tuple[str, ...]
    counts: np.ndarray  # [C] int64, or float64 (weighted counts) when `weights` is set
    sums: np.ndarray  # [C, D] float64
    gram: np.ndarray  # [D, D] float64
    weights: tuple[float, ...] | None = None  # per contribution id, in `contribution_ids` order; None = all 1

    @property
    def n_samples(self) -> int:
        """Synthetic samples summarised (the rounded weighted count when weighted)."""
        return int(round(float(self.counts.sum())))

    def digest(self) -> str:
        """sha256 of the contribution ids, their weights when weighted, and every array."""
        header: dict = {
            "contribution_ids": self.contribution_ids,
            "feature_key": self.feature_key,
            "labels": self.labels,
        }
        if self.weights is not None:
            # float.hex is exact: two weights that differ in the last bit give two digests.
            header["weights"] = [float(w).hex() for w in self.weights]
        return _digest(header, (self.counts, self.sums, self.gram))


def check_weights(ids: Iterable[str], weights: Mapping[str, float]) -> None:
    """Raise ValueError unless `weights` gives every id in `ids` a finite weight >= 0."""
    for cid in ids:
        if cid not in weights:
            raise ValueError(f"no weight given for contribution {cid}")
        w = float(weights[cid])
        if not np.isfinite(w) or w < 0.0:
            raise ValueError(f"weight of contribution {cid} must be finite and >= 0, got {weights[cid]!r}")


def sum_stats(stats: Sequence[ContributionStats], weights: Mapping[str, float] | None = None) -> TotalStats:
    """Sum contributions' statistics, always in contribution-id order so that equal sets give equal bits.

    Args:
        stats: one entry per contribution.
        weights: optional weight per contribution id (finite, >= 0; every contribution needs one). The
            total is then sum_c w_c * S_c: scaling a contribution's statistics by w_c is weighting each
            of its synthetic samples by w_c in the ridge loss. A weight of 0 leaves the contribution out
            entirely, as if it were absent (its labels too). Counts become float64 (weighted counts).
            None is the plain sum, with int64 counts and the digest it always had.
    """
    if not stats:
        raise ValueError("no contribution statistics to sum")
    ordered = sorted(stats, key=lambda s: s.contribution_id)
    ids = tuple(s.contribution_id for s in ordered)
    if len(set(ids)) != len(ids):
        raise ValueError("a contribution appears more than once")
    if weights is not None:
        check_weights(ids, weights)
        ordered = [s for s in ordered if float(weights[s.contribution_id]) > 0.0]
        if not ordered:
            raise ValueError("every contribution has weight 0: nothing to sum")
        ids = tuple(s.contribution_id for s in ordered)
    keys = {s.feature_key for s in ordered}
    if len(keys) > 1:
        raise ValueError(f"statistics from different feature maps cannot be summed: {sorted(keys)}")
    labels = tuple(sorted({n for s in ordered for n in s.labels}))
    index = {n: i for i, n in enumerate(labels)}
    d = ordered[0].gram.shape[0]
    counts = np.zeros(len(labels), np.int64 if weights is None else np.float64)
    sums, gram = np.zeros((len(labels), d)), np.zeros((d, d))
    # Accumulate in place, one contribution after another: the float64 rounding is then fixed by the
    # id order alone. Subtracting a forgotten contribution instead would leave rounding residue.
    for s in ordered:
        if s.gram.shape != (d, d):
            raise ValueError(f"contribution {s.contribution_id} has {s.gram.shape[0]} features, expected {d}")
        if weights is None:
            gram += s.gram
            for i, n in enumerate(s.labels):
                counts[index[n]] += s.counts[i]
                sums[index[n]] += s.sums[i]
            continue
        w = float(weights[s.contribution_id])
        gram += w * s.gram
        for i, n in enumerate(s.labels):
            counts[index[n]] += w * float(s.counts[i])
            sums[index[n]] += w * s.sums[i]
    ws = None if weights is None else tuple(float(weights[c]) for c in ids)
    return TotalStats(ids, ordered[0].feature_key, labels, counts, sums, gram, ws)


@dataclass(frozen=True, eq=False)
class ClosedFormHead:
    """A linear head over the random features: logits = features @ weights + bias."""

    weights: np.ndarray  # [D, C] float64
    bias: np.ndarray  # [C] float64
    label_names: tuple[str, ...]
    variant: str
    lam: float
    trained_on: str  # digest of the TotalStats it was solved from

    def logits(self, features: np.ndarray) -> np.ndarray:
        """Class scores [n, C] (float64) of features [n, D]."""
        return features @ self.weights + self.bias

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Predicted class indices into `label_names`."""
        return self.logits(features).argmax(axis=1)

    def digest(self) -> str:
        """sha256 of the weights, bias, labels and how they were solved."""
        header = {"labels": self.label_names, "variant": self.variant, "lam": self.lam, "trained_on": self.trained_on}
        return _digest(header, (self.weights, self.bias))


def solve(
    total: TotalStats, label_names: Sequence[str] | None = None, variant: Variant = "ridge-balanced", lam: float = 1e-6
) -> ClosedFormHead:
    """The exact head for `total` (one linear solve of size D); `lam` regularises G/N (trace about 1).

    Variants (N samples, n_c and mu_c the count and mean features of class c, G the Gram matrix):
      ridge           least squares on one-hot targets with an intercept: follows the synthetic
                      class frequencies, so it leans to frequent classes under label skew.
      ridge-balanced  the same with class c's target scaled by 1/n_c (the right-hand side becomes the
                      class means): estimates p(x|c)/p(x) instead of p(c|x), i.e. uniform priors.
      lda             shared within-class covariance S_w = (G - sum_c n_c mu_c mu_c^T) / N, class means,
                      uniform priors: w_c = (S_w + lam I)^-1 mu_c, b_c = -mu_c^T w_c / 2.
    """
    names = tuple(label_names) if label_names is not None else total.labels
    missing = [n for n in names if n not in total.labels]
    if missing:
        raise ValueError(f"no synthetic samples for label(s) {missing}: the head cannot score them")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    rows = [total.labels.index(n) for n in names]
    counts, sums = total.counts[rows].astype(np.float64), total.sums[rows]
    n = float(total.counts.sum())
    d = total.gram.shape[0]
    means = sums / counts[:, None]  # [C, D]
    if variant == "lda":
        scatter = total.gram - (sums.T / counts) @ sums  # sum_c s_c s_c^T / n_c
        a = scatter / n + lam * np.eye(d)
        w = scipy.linalg.solve(a, means.T, assume_a="pos")
        bias = -0.5 * np.einsum("cd,dc->c", means, w)
        return ClosedFormHead(w, bias, names, variant, lam, total.digest())
    # Ridge with an unregularised intercept: the augmented system [[G/N + lam I, m], [m^T, 1]].
    m = total.sums.sum(axis=0) / n
    a = np.zeros((d + 1, d + 1))
    a[:d, :d] = total.gram / n + lam * np.eye(d)
    a[:d, d] = a[d, :d] = m
    a[d, d] = 1.0
    if variant == "ridge":
        rhs = np.vstack([sums.T / n, counts[None] / n])
    else:
        rhs = np.vstack([means.T, np.ones((1, len(names)))])
    sol = scipy.linalg.solve(a, rhs, assume_a="pos")
    return ClosedFormHead(sol[:d], sol[d], names, variant, lam, total.digest())


def _take_site_images(graph: onnx.GraphProto, spec: InputSpec) -> None:
    """Prepend the bundle's input step (edge/encoder.py InputSpec.prepare) so the model takes site images [N, 1, S, S].

    The general bundle's encoder wants normalised RGB; the edge runs delivered models on its grayscale
    images in [0, 1] as they are, so the replication and (x - mean) / std become the graph's first nodes.
    """
    if spec.identity:
        return
    old = graph.input[0]
    inner = "fedge_encoder_input"
    for node in graph.node:
        node.input[:] = [inner if name == old.name else name for name in node.input]
    dims = [d.dim_param or d.dim_value or None for d in old.type.tensor_type.shape.dim]
    pre = [helper.make_node("Concat", [old.name] * spec.channels, ["fedge_channels"], axis=1)]
    last = "fedge_channels"
    if spec.mean is not None and spec.std is not None:
        shape = (1, spec.channels, 1, 1)
        graph.initializer.extend([
            numpy_helper.from_array(np.asarray(spec.mean, np.float32).reshape(shape), "fedge_input_mean"),
            numpy_helper.from_array(np.asarray(spec.std, np.float32).reshape(shape), "fedge_input_std"),
        ])  # fmt: skip
        pre += [helper.make_node("Sub", [last, "fedge_input_mean"], ["fedge_centred"]),
                helper.make_node("Div", ["fedge_centred", "fedge_input_std"], [inner])]  # fmt: skip
    else:
        pre[0].output[:] = [inner]
    nodes = [*pre, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    site = helper.make_tensor_value_info(old.name, TensorProto.FLOAT, [dims[0], 1, *dims[2:]])
    graph.input[0].CopyFrom(site)


def encoder_graph(encoder_onnx: Path, new_names: Iterable[str]) -> tuple[onnx.ModelProto, str]:
    """The encoder's ONNX model, taking site images, and its embedding output's name; ValueError if it has more
    than one output or already uses one of `new_names` (what the caller will add)."""
    model = onnx.load(str(encoder_onnx))
    graph = model.graph
    if len(graph.output) != 1:
        raise ValueError(f"{encoder_onnx}: expected an encoder with one output, got {len(graph.output)}")
    emb = graph.output[0].name
    _take_site_images(graph, InputSpec.for_bundle(Path(encoder_onnx).parent))
    taken = {i.name for i in graph.initializer} | {n for node in graph.node for n in node.output}
    clash = sorted(taken & set(new_names))
    if clash:
        raise ValueError(f"{encoder_onnx}: names {clash} already exist in the encoder graph")
    return model, emb


EMBEDDING = "fedge_embedding"  # the encoder's embedding, named, in a refined model over the embedding (hub/refinement)


def embedding_in(graph: onnx.GraphProto) -> str | None:
    """The encoder embedding inside a model this module or the refinement composed: the tensor named
    `fedge_embedding`, else the first input of the random features' MatMul; None if neither is there."""
    for node in graph.node:
        if EMBEDDING in node.output:
            return EMBEDDING
    for node in graph.node:
        if "fedge_rff_proj" in node.output:
            return node.input[0]
    return None


def finish_head_model(model: onnx.ModelProto, head: ClosedFormHead) -> bytes:
    """`logits` [N, C] as the model's only output, the head's metadata, checked and serialized."""
    graph = model.graph
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch.dim_param or None, len(head.label_names)])
    del graph.output[:]
    graph.output.append(out)
    del model.metadata_props[:]
    onnx.helper.set_model_props(
        model,
        {
            "fedge.labels": json.dumps(list(head.label_names)),
            "fedge.head": json.dumps({"variant": head.variant, "lam": head.lam, "digest": head.digest()}),
            "fedge.trained_on": head.trained_on,
        },
    )
    model.producer_name, model.producer_version = "fedge", "closed-form"
    onnx.checker.check_model(model)
    return model.SerializeToString()


def to_onnx(encoder_onnx: Path, feature_map: FeatureMap, head: ClosedFormHead) -> bytes:
    """One ONNX model: `image` [N, 1, S, S] -> encoder -> random features -> head -> `logits` [N, C], float32.

    The encoder graph is taken as it is and the feature map and head are appended as plain
    MatMul/Add/Cos/Mul nodes, so sites run it exactly like today's model.
    """
    w, b = feature_map.params
    inits = {
        "fedge_rff_w": w,
        "fedge_rff_b": b,
        "fedge_rff_scale": np.array(feature_map.scale, np.float32),
        "fedge_head_w": head.weights.astype(np.float32),
        "fedge_head_b": head.bias.astype(np.float32),
    }
    model, emb = encoder_graph(encoder_onnx, [*inits, "logits"])
    graph = model.graph
    graph.initializer.extend(numpy_helper.from_array(v, name=k) for k, v in inits.items())
    graph.node.extend(
        [
            helper.make_node("MatMul", [emb, "fedge_rff_w"], ["fedge_rff_proj"]),
            helper.make_node("Add", ["fedge_rff_proj", "fedge_rff_b"], ["fedge_rff_phase"]),
            helper.make_node("Cos", ["fedge_rff_phase"], ["fedge_rff_cos"]),
            helper.make_node("Mul", ["fedge_rff_cos", "fedge_rff_scale"], ["fedge_features"]),
            helper.make_node("MatMul", ["fedge_features", "fedge_head_w"], ["fedge_head_proj"]),
            helper.make_node("Add", ["fedge_head_proj", "fedge_head_b"], ["logits"]),
        ]
    )
    return finish_head_model(model, head)
