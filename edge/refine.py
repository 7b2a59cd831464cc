"""The site's half of the refinement round: run the delivered model's feature output, send additive statistics.

No torch: onnxruntime runs the installed model (whose second output is the projected features the
hub asked for), numpy sums. Per label with at least `min_group_size` training samples: the count and
the sum of its features; over every counted sample, one Gram matrix Z^T Z, sent as its upper
triangle. All float64 while summing, float32 on the wire.
"""

from __future__ import annotations

import hashlib
import json
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


def statistics(
    features: np.ndarray, labels: list[str], min_group_size: int
) -> tuple[list[str], list[int], np.ndarray, np.ndarray] | None:
    """(labels, counts, sums [L, dim], Gram [dim, dim]) over the labels with >= min_group_size samples; None if none."""
    names = sorted(lab for lab, n in Counter(labels).items() if n >= min_group_size)
    if not names:
        return None
    lab = np.asarray(labels)
    keep = np.isin(lab, names)
    z = features[keep]
    sums = np.stack([features[lab == n].sum(axis=0) for n in names])
    counts = [int((lab == n).sum()) for n in names]
    return names, counts, sums, z.T @ z


def make_statistics(
    site_id: str, request: RefinementRequest, contribution_id: str, min_group_size: int,
    names: list[str], counts: list[int], sums: np.ndarray, gram: np.ndarray,
) -> RefinementStatistics:  # fmt: skip
    """The payload, its id derived from its content (the same statistics always get the same id)."""
    upper = gram[np.triu_indices(gram.shape[0])]
    body = {
        "feature_key": request.feature_key, "model_version": request.model_version, "site_id": site_id,
        "contribution_id": contribution_id, "min_group_size": min_group_size, "part": request.part,
        "labels": names, "counts": counts,
        "sums": ArrayPayload.from_numpy(sums, "float32").model_dump(),
        "gram": ArrayPayload.from_numpy(upper, "float32").model_dump(),
    }  # fmt: skip
    sid = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]
    return RefinementStatistics.model_validate({**body, "statistics_id": sid, "created_at": now()})
