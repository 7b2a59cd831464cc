"""Model versions: numbered, hashed, never half-written."""

import hashlib
from pathlib import Path

from hub.registry import ModelRegistry


def test_versions_increase_and_hash_matches(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path)
    assert reg.latest() is None
    v1 = reg.publish(b"one", {"labels": ["a"]})
    v2 = reg.publish(b"two", {"labels": ["a"]})
    assert (v1.version, v2.version) == (1, 2)
    assert reg.latest().sha256 == hashlib.sha256(b"two").hexdigest()
    assert reg.get(1).path.read_bytes() == b"one"


def test_leftover_temporary_directory_is_not_a_version(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path)
    (tmp_path / ".tmp-v0001").mkdir()  # what a crash mid-publish leaves
    assert reg.versions() == []
    assert reg.publish(b"x", {}).version == 1
