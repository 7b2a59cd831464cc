"""Durable file writes: a directory appears complete (every file fsynced) or not at all."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` and fsync it."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def replace_file_atomically(path: Path, data: bytes) -> None:
    """Replace file `path` with `data`: a crash leaves the old file or the new one, never a partial one."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    fsync_write(tmp, data)
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_dir_atomically(final: Path, files: dict[str, bytes]) -> None:
    """Create directory `final` holding `files` (name -> bytes); a crash leaves no partial `final`."""
    final = Path(final)
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, data in files.items():
        fsync_write(tmp / name, data)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
