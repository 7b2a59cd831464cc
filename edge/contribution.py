"""Turn local embeddings into the contribution payload a site publishes."""

from __future__ import annotations

import numpy as np

from contract.arrays import ArrayPayload, WireDtype
from contract.payloads import Contribution, LabelPrototypes
from edge.prototypes import build_prototypes


def make_contribution(
    site_id: str,
    encoder_id: str,
    embeddings: np.ndarray,
    labels: list[str] | np.ndarray,
    k: int,
    min_group_size: int = 5,
    seed: int = 0,
    dtype: WireDtype = "float16",
    supersedes: str | None = None,
) -> Contribution:
    """Prototypes of `embeddings` per label, as a validated Contribution."""
    protos = build_prototypes(embeddings, labels, k=k, min_group_size=min_group_size, seed=seed)
    return Contribution(
        site_id=site_id,
        encoder_id=encoder_id,
        k=k,
        min_group_size=min_group_size,
        supersedes=supersedes,
        labels=[
            LabelPrototypes(
                label=p.label,
                vectors=ArrayPayload.from_numpy(p.vectors, dtype),
                counts=p.counts.tolist(),
                spreads=[round(float(s), 4) for s in p.spreads],
            )
            for p in protos
        ],
    )
