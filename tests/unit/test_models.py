"""Model delivery: chunks are verified one by one and as a whole; a tampered model is never installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contract.payloads import ModelChunk
from contract.topics import Topics
from edge.models import ChunkAssembler, ModelRejected, ModelStore
from hub.delivery import model_messages
from hub.registry import ModelRegistry


@pytest.fixture
def published(tmp_path: Path, digits_bundle: Path):
    # Any ONNX file will do: the bundled encoder stands in for a global model.
    data = (digits_bundle / "encoder.onnx").read_bytes()
    meta = {"labels": ["0", "1"], "input": {"name": "image", "shape": [-1, 1, 8, 8]}, "contributions": []}
    version = ModelRegistry(tmp_path / "hub").publish(data, meta)
    return data, *model_messages(version, Topics(), "enc", chunk_bytes=4096)


def test_chunks_reassemble_to_the_verified_model(published, tmp_path: Path) -> None:
    data, manifest, chunks = published
    assert len(chunks) == len(manifest.chunks) > 1
    asm = ChunkAssembler(manifest)
    done = [asm.add(payload) for _, payload in reversed(chunks)]  # any order
    assert done[-1] and not any(done[:-1])
    path = ModelStore(tmp_path / "site").install(manifest, asm.assemble())
    assert path.read_bytes() == data
    assert ModelStore(tmp_path / "site").current()[1].version == 1


def test_a_tampered_chunk_is_refused(published, tmp_path: Path) -> None:
    _, manifest, chunks = published
    chunk = json.loads(chunks[0][1])
    chunk["data"] = ModelChunk(version=1, index=0, count=1, data="AAAA").data
    with pytest.raises(ModelRejected, match="sha256"):
        ChunkAssembler(manifest).add(json.dumps(chunk).encode())
    with pytest.raises(ModelRejected, match="sha256"):
        ModelStore(tmp_path / "site").install(manifest, b"not the model")
    assert ModelStore(tmp_path / "site").current() is None
