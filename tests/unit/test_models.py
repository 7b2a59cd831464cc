"""Model delivery: signed manifests, chunks verified one by one and as a whole, and a model installed only once it runs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from contract import signing
from contract.payloads import ModelChunk
from contract.topics import Topics
from edge.models import ChunkAssembler, ModelRejected, ModelStore
from hub.delivery import model_messages
from hub.registry import ModelRegistry
from tests.fixtures.onnx_models import tiny_classifier


@pytest.fixture
def key(tmp_path: Path) -> signing.Ed25519PrivateKey:
    return signing.write_keypair(tmp_path / "hub.pem")


def publish(tmp_path: Path, data: bytes, key: signing.Ed25519PrivateKey, chunk_bytes: int = 256):
    meta = {"labels": ["0", "1"], "input": {"name": "image", "shape": [-1, 1, 8, 8]}, "contributions": []}
    version = ModelRegistry(tmp_path / "hub").publish(data, meta)
    return model_messages(version, Topics(), "enc", key, chunk_bytes=chunk_bytes)


def test_chunks_reassemble_to_the_verified_model(tmp_path: Path, key) -> None:
    data = tiny_classifier()
    manifest, body, chunks = publish(tmp_path, data, key)
    assert signing.verify(json.loads(body), {signing.key_id(key.public_key()): key.public_key()})
    assert len(chunks) == len(manifest.chunks) > 1
    asm = ChunkAssembler(manifest)
    done = [asm.add(payload) for _, payload in reversed(chunks)]  # any order
    assert done[-1] and not any(done[:-1])
    path = ModelStore(tmp_path / "site").install(manifest, asm.assemble())
    assert path.read_bytes() == data
    assert ModelStore(tmp_path / "site").current()[1].version == 1


def test_a_tampered_chunk_or_manifest_is_refused(tmp_path: Path, key) -> None:
    manifest, body, chunks = publish(tmp_path, tiny_classifier(), key)
    chunk = json.loads(chunks[0][1])
    chunk["data"] = ModelChunk(version=1, index=0, count=1, data="AAAA").data
    with pytest.raises(ModelRejected, match="sha256"):
        ChunkAssembler(manifest).add(json.dumps(chunk).encode())
    with pytest.raises(ModelRejected, match="sha256"):
        ModelStore(tmp_path / "site").install(manifest, b"not the model")
    assert ModelStore(tmp_path / "site").current() is None
    trusted = {signing.key_id(key.public_key()): key.public_key()}
    forged = {**json.loads(body), "sha256": "0" * 64}
    with pytest.raises(signing.SignatureError, match="does not verify"):
        signing.verify(forged, trusted)
    other = signing.write_keypair(tmp_path / "other.pem")
    with pytest.raises(signing.SignatureError, match="not trusted"):
        signing.verify(signing.sign(json.loads(body), other), trusted)


def test_a_model_that_matches_its_hash_but_does_not_run_is_not_installed(tmp_path: Path, key) -> None:
    store = ModelStore(tmp_path / "site")
    good_manifest, _, _ = publish(tmp_path / "a", tiny_classifier(), key)
    store.install(good_manifest, tiny_classifier())
    for bad in (b"\x08\x07 this is not an onnx model", tiny_classifier(n_classes=3)):
        manifest = good_manifest.model_copy(
            update={"version": 2, "sha256": hashlib.sha256(bad).hexdigest(), "size_bytes": len(bad)}
        )
        with pytest.raises(ModelRejected, match="onnxruntime|shape"):
            store.install(manifest, bad)
    assert store.versions() == [1]  # the previous model keeps serving


def test_a_stored_model_that_no_longer_loads_is_set_aside(tmp_path: Path, key) -> None:
    store = ModelStore(tmp_path / "site")
    for v in (1, 2):
        manifest, _, _ = publish(tmp_path / f"h{v}", tiny_classifier(), key)
        store.install(manifest.model_copy(update={"version": v}), tiny_classifier())
    (tmp_path / "site" / "v0002" / "model.onnx").write_bytes(b"corrupted on disk")
    reasons = store.set_aside_unloadable()
    assert len(reasons) == 1 and "v2" in reasons[0]
    assert store.versions() == [1] and store.current()[1].version == 1
    assert (tmp_path / "site" / "unloadable-v0002").is_dir()
