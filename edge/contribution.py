"""Turn local embeddings into the contribution payload a site publishes."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from contract.arrays import ArrayPayload, WireDtype
from contract.payloads import Contribution, LabelPrototypes, now
from edge.prototypes import build_prototypes


def contribution_id_for(
    site_id: str, encoder_id: str, k: int, min_group_size: int, supersedes: str | None, labels: list[LabelPrototypes]
) -> str:
    """A contribution id derived from its content: the same upload gets the same id, and no random call is involved.

    `supersedes` is part of it, so the same data contributed again after a change is a new contribution.
    """
    body = {
        "site_id": site_id, "encoder_id": encoder_id, "k": k, "min_group_size": min_group_size,
        "supersedes": supersedes, "labels": [lp.model_dump(mode="json") for lp in labels],
    }  # fmt: skip
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


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
    contribution_id: str | None = None,
) -> Contribution:
    """Prototypes of `embeddings` per label, as a validated Contribution; its id is derived from its content."""
    protos = build_prototypes(embeddings, labels, k=k, min_group_size=min_group_size, seed=seed)
    label_protos = [
        LabelPrototypes(
            label=p.label,
            vectors=ArrayPayload.from_numpy(p.vectors, dtype),
            counts=p.counts.tolist(),
            spreads=[round(float(s), 4) for s in p.spreads],
        )
        for p in protos
    ]
    return Contribution(
        contribution_id=contribution_id
        or contribution_id_for(site_id, encoder_id, k, min_group_size, supersedes, label_protos),
        site_id=site_id,
        encoder_id=encoder_id,
        created_at=now(),
        k=k,
        min_group_size=min_group_size,
        supersedes=supersedes,
        labels=label_protos,
    )
