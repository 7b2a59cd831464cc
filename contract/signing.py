"""Ed25519 signatures over a canonical JSON encoding, as docs/mqtt.md specifies them for third parties.

A signed payload is a JSON object with a `signature` member:

    {"alg": "ed25519", "key_id": "<first 16 hex of sha256(raw public key)>", "value": "<base64 signature>"}

The signature covers `canonical(payload without "signature")`: the received JSON object re-encoded
with sorted keys, no whitespace, UTF-8 (non-ASCII characters as themselves). A verifier works on the
JSON object as received, never on a re-serialisation through its own models, so any language with a
JSON library reproduces the bytes. Keys are PEM files: PKCS#8 private keys and SubjectPublicKeyInfo
public keys, the formats `openssl genpkey -algorithm ed25519` and `openssl pkey -pubout` write.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALG = "ed25519"


class SignatureError(ValueError):
    """A payload whose signature is missing, malformed, by an unknown key, or does not verify."""


def canonical(obj: Any) -> bytes:
    """The bytes a signature covers: sorted keys, no whitespace, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short fingerprint of a public key: the first 16 hex digits of sha256 of its 32 raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public_key: Ed25519PublicKey) -> str:
    """A public key as PEM (SubjectPublicKeyInfo) text."""
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode(
        "ascii"
    )


def parse_public_pem(pem: str | bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM text; ValueError for anything else."""
    try:
        data = pem.encode("ascii") if isinstance(pem, str) else pem
        key = serialization.load_pem_public_key(data)
    except Exception as err:  # malformed PEM, non-ASCII text, or a key type cryptography does not support
        raise ValueError(f"not a PEM public key: {err}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file."""
    try:
        return parse_public_pem(Path(path).read_bytes())
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM (PKCS#8, unencrypted) file."""
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def write_keypair(private_path: Path, public_path: Path | None = None) -> Ed25519PrivateKey:
    """Generate a key pair: the private key with mode 0600, the public key beside it (`.pub.pem`)."""
    private_path = Path(private_path)
    public_path = Path(public_path) if public_path else private_path.with_suffix(".pub.pem")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())
    public_path.write_text(public_pem(key.public_key()))
    return key


def load_or_create_private_key(path: Path) -> tuple[Ed25519PrivateKey, bool]:
    """The key at `path`, generating it (and its `.pub.pem`) when the file does not exist; (key, created)."""
    if Path(path).is_file():
        return load_private_key(path), False
    return write_keypair(path), True


def sign(body: dict[str, Any], private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """`body` with a `signature` member over its canonical encoding (any old signature is replaced)."""
    unsigned = {k: v for k, v in body.items() if k != "signature"}
    value = private_key.sign(canonical(unsigned))
    return {
        **unsigned,
        "signature": {
            "alg": ALG,
            "key_id": key_id(private_key.public_key()),
            "value": base64.b64encode(value).decode("ascii"),
        },
    }


def verify(body: dict[str, Any], trusted: dict[str, Ed25519PublicKey]) -> str:
    """Check `body`'s signature against the trusted keys (key_id -> key); the signer's key_id, or SignatureError."""
    sig = body.get("signature")
    if not isinstance(sig, dict):
        raise SignatureError("the payload is not signed")
    if sig.get("alg") != ALG:
        raise SignatureError(f"signature algorithm {sig.get('alg')!r} is not supported; use {ALG!r}")
    kid = sig.get("key_id")
    if not isinstance(kid, str) or kid not in trusted:
        known = ", ".join(sorted(trusted)) or "none"
        raise SignatureError(f"signed by key {kid!r}, which is not trusted here (trusted: {known})")
    try:
        value = base64.b64decode(str(sig.get("value", "")), validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("signature value is not valid base64") from None
    unsigned = {k: v for k, v in body.items() if k != "signature"}
    try:
        trusted[kid].verify(value, canonical(unsigned))
    except (InvalidSignature, ValueError):
        raise SignatureError(f"signature by key {kid} does not verify") from None
    return kid
