"""Model delivery over MQTT: a retained manifest on `hub/model` and retained base64 chunks beside it.

Chosen over HTTP so that a site needs one outbound connection (the broker, with its TLS and ACLs)
and nothing listening at the hub; a site that joins late still finds the current model retained.
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import datetime

import numpy as np
import onnx

from contract import signing
from contract.payloads import ChunkRef, ModelChunk, ModelManifest, new_id
from contract.topics import Topics
from hub.registry import ModelVersion

DEFAULT_CHUNK_BYTES = 64 * 1024


def onnx_parameters(model_bytes: bytes) -> int:
    """Number of weights in an ONNX model (its initializers)."""
    graph = onnx.load_from_string(model_bytes).graph
    return int(sum(int(np.prod(t.dims)) for t in graph.initializer))


def model_messages(
    version: ModelVersion,
    topics: Topics,
    encoder_id: str,
    signing_key: signing.Ed25519PrivateKey,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    serve: str | None = "logits",
    gate: dict | None = None,
) -> tuple[ModelManifest, bytes, list[tuple[str, bytes]]]:
    """The signed manifest (as a model and as the exact bytes to publish) and the chunk messages of one version;
    `serve` and `gate`: the delivery gate's word on which head the sites serve (docs/delivery-gate.md)."""
    data = version.path.read_bytes()
    if hashlib.sha256(data).hexdigest() != version.sha256:
        raise RuntimeError(f"model v{version.version} on disk does not match its registry sha256")
    pieces = [data[i : i + chunk_bytes] for i in range(0, len(data), chunk_bytes)]
    messages = [
        (
            topics.model_chunk(version.version, i),
            ModelChunk(version=version.version, index=i, count=len(pieces), data=base64.b64encode(p).decode("ascii"))
            .model_dump_json()
            .encode(),
        )
        for i, p in enumerate(pieces)
    ]
    meta = version.manifest
    body = {
        "schema_version": 1,
        "message_id": new_id(),
        "version": version.version,
        "created_at": datetime.fromisoformat(meta["created_at"]).isoformat(),
        "format": "onnx",
        "sha256": version.sha256,
        "size_bytes": len(data),
        "chunks": [
            ChunkRef(index=i, size_bytes=len(p), sha256=hashlib.sha256(p).hexdigest()).model_dump()
            for i, p in enumerate(pieces)
        ],
        "labels": meta["labels"],
        "input_name": meta["input"]["name"],
        "input_shape": meta["input"]["shape"],
        "encoder_id": encoder_id,
        "contributions": meta["contributions"],
        # float32 weights, up and down, of the model FedAvg would train: the bench's CNN when the delivered model is
        # the closed-form head (whose frozen encoder and random features no FedAvg round would send), else this one.
        "fedavg_round_bytes": 2 * 4 * int(meta.get("fedavg_reference_parameters") or onnx_parameters(data)),
        "heads": meta.get("heads") or {"logits": "candidate"},
        "serve": serve,
        "gate": gate,
    }
    signed = signing.sign(body, signing_key)
    manifest = ModelManifest.model_validate(signed)  # the exact object signed, checked against the contract
    return manifest, json.dumps(signed, separators=(",", ":")).encode(), messages


def clear_messages(version: ModelVersion, topics: Topics, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[str]:
    """Topics whose retained chunks must be cleared (empty retained payload) to retire `version`."""
    n = max(1, -(-int(version.manifest["size_bytes"]) // chunk_bytes))
    return [topics.model_chunk(version.version, i) for i in range(n)]
