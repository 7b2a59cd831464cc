"""The site's half of the refinement round: run the delivered model's feature output, send additive statistics.

No torch: onnxruntime runs the installed model (whose second output is the projected features the
hub asked for), numpy sums. Per label with at least `min_group_size` training samples: the count and
the sum of its features; over every counted sample, the scatter of the features about their mean,
sent as its square root: the upper-triangular R of a QR decomposition of the centered features
(R^T R = sum (z - mean)(z - mean)^T; `min(n, dim)` rows). The hub rebuilds the Gram matrix as
R^T R + s s^T / n from what arrived (s: the sum of the sent per-label sums), which is positive
semi-definite whatever the rounding, so every ridge solve over summed statistics stays well posed
(the ridge variants; lda's within-class scatter is not covered, and a refining hub refuses lda).
All float64 while summing; on the wire float16, the sums and R each divided by one power of two
(`sums_scale`, `root_scale`) that brings their largest value into [0.5, 1): half the bytes of
float32, and the solved heads scored the same on the bench's validation cells (docs/bench-fgl.md).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort

from contract.arrays import ArrayPayload
from contract.payloads import RefinementRequest, RefinementStatistics, now

BATCH = 256


def projected_features(
    model_path: Path, input_name: str, output_name: str, images: np.ndarray, threads: int = 1
) -> np.ndarray:
    """The model's `output_name` [n, dim] for images [n, C, S, S], in fixed batches, as float64."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    out = [
        session.run([output_name], {input_name: images[i : i + BATCH].astype(np.float32)})[0]
        for i in range(0, len(images), BATCH)
    ]
    return np.concatenate(out).astype(np.float64)


def _counted(
    features: np.ndarray, labels: list[str], min_group_size: int
) -> tuple[list[str], list[int], np.ndarray, np.ndarray] | None:
    """(labels, counts, sums [L, dim], the counted features [n, dim]) over the labels with >= min_group_size samples."""
    names = sorted(lab for lab, n in Counter(labels).items() if n >= min_group_size)
    if not names:
        return None
    lab = np.asarray(labels)
    sums = np.stack([features[lab == n].sum(axis=0) for n in names])
    counts = [int((lab == n).sum()) for n in names]
    return names, counts, sums, features[np.isin(lab, names)]


def statistics(
    features: np.ndarray, labels: list[str], min_group_size: int
) -> tuple[list[str], list[int], np.ndarray, np.ndarray] | None:
    """(labels, counts, sums [L, dim], Gram [dim, dim]) over the labels with >= min_group_size samples; None if none."""
    out = _counted(features, labels, min_group_size)
    if out is None:
        return None
    names, counts, sums, z = out
    return names, counts, sums, z.T @ z


def wire_statistics(
    features: np.ndarray, labels: list[str], min_group_size: int
) -> tuple[list[str], list[int], np.ndarray, np.ndarray] | None:
    """(labels, counts, sums [L, dim], R [min(n, dim), dim]): what a site sends, R upper triangular with
    R^T R the scatter of the counted features about their mean; None if no label has enough samples."""
    out = _counted(features, labels, min_group_size)
    if out is None:
        return None
    names, counts, sums, z = out
    return names, counts, sums, np.linalg.qr(z - z.mean(axis=0), mode="r")


def wire_scale(largest: float) -> float:
    """The power of two that brings `largest` (the largest absolute statistic) into [0.5, 1): float16 then holds
    every value with its full precision down to 2^-14 of the largest; 1.0 for all-zero statistics. Kept within
    the contract's [2^-64, 2^64]: above it float16 refuses the values (ValueError: the features are broken);
    below it (largest values under about 1e-19, no real model's features) they round to zero."""
    if largest <= 0.0:
        return 1.0
    return float(2.0 ** min(max(math.frexp(largest)[1], -64), 64))


def make_statistics(
    site_id: str, request: RefinementRequest, contribution_id: str, min_group_size: int,
    names: list[str], counts: list[int], sums: np.ndarray, root: np.ndarray,
) -> RefinementStatistics:  # fmt: skip
    """The payload of `wire_statistics`' output, its id derived from its content (the same statistics, the same id)."""
    rows, dim = root.shape
    packed = root[np.triu_indices(rows, m=dim)]
    sums_scale = wire_scale(float(np.abs(sums).max()))
    root_scale = wire_scale(float(np.abs(packed).max()))
    body = {
        "feature_key": request.feature_key, "model_version": request.model_version, "site_id": site_id,
        "contribution_id": contribution_id, "min_group_size": min_group_size, "part": request.part,
        "labels": names, "counts": counts,
        "sums": ArrayPayload.from_numpy(sums / sums_scale, "float16").model_dump(), "sums_scale": sums_scale,
        "root": ArrayPayload.from_numpy(packed / root_scale, "float16").model_dump(), "root_rows": rows,
        "root_scale": root_scale,
    }  # fmt: skip
    sid = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]
    return RefinementStatistics.model_validate({**body, "statistics_id": sid, "created_at": now()})
