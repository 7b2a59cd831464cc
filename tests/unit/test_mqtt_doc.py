"""docs/mqtt.md is the contract third parties read: its examples must validate and it must list every topic."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

import contract.payloads as payloads
from contract import signing
from contract.schema_doc import field_table
from contract.topics import SITE_KINDS, Topics

DOC = (Path(__file__).parents[2] / "docs" / "mqtt.md").read_text()
EXAMPLES = re.findall(r"<!-- payload: (\w+) -->\s*```json\n(.*?)```", DOC, re.S)


def test_every_payload_model_has_an_example() -> None:
    documented = {name for name, _ in EXAMPLES}
    assert documented == set(payloads.WIRE_MODELS)


@pytest.mark.parametrize("name", payloads.WIRE_MODELS)
def test_every_field_is_documented_with_its_type_and_limits(name: str) -> None:
    """The field tables are generated from the models (`python -m contract.schema_doc`); the page must match."""
    assert f"<!-- fields: {name} -->\n{field_table(getattr(payloads, name))}\n" in DOC


SIGNED = ("ModelManifest", "ForgetRequest", "ForgetReceipt", "UnlearningCertificate")


@pytest.mark.parametrize("name", SIGNED)
def test_signed_examples_can_be_rebuilt_and_verified_from_the_page_alone(name: str) -> None:
    """A third party signs the example's fields with the documented key and the canonical encoding the page gives,
    and gets the very signature printed there (Ed25519 is deterministic); the documented public key verifies it."""
    from cryptography.hazmat.primitives import serialization

    part = DOC.split("## Signatures")[1]
    private = re.search(r"-----BEGIN PRIVATE KEY-----.*?-----END PRIVATE KEY-----\n", part, re.S).group(0)
    public = re.search(r"-----BEGIN PUBLIC KEY-----.*?-----END PUBLIC KEY-----\n", part, re.S).group(0)
    key = serialization.load_pem_private_key(private.encode(), password=None)
    body = json.loads(dict(EXAMPLES)[name])
    unsigned = {k: v for k, v in body.items() if k != "signature"}
    canonical = json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert base64.b64encode(key.sign(canonical)).decode() == body["signature"]["value"]
    pub = signing.parse_public_pem(public)
    assert signing.verify(body, {signing.key_id(pub): pub}) == body["signature"]["key_id"]
    with pytest.raises(signing.SignatureError):
        signing.verify({**body, "schema_version": 2}, {signing.key_id(pub): pub})


@pytest.mark.parametrize(("name", "body"), EXAMPLES, ids=[n for n, _ in EXAMPLES])
def test_examples_validate_against_the_models(name: str, body: str) -> None:
    getattr(payloads, name).model_validate_json(body)


def test_every_topic_is_documented() -> None:
    t = Topics("<prefix>")
    topics = [t.site("SITE", k).replace("SITE", "<site_id>") for k in SITE_KINDS]
    topics += [t.hub_status, t.hub_model, t.model_chunk(1, 0).replace("/1/0", "/<version>/<index>"), t.hub_certificate]
    for topic in topics:
        assert f"`{topic}`" in DOC, topic


def test_every_error_code_is_documented() -> None:
    for code in payloads.ErrorCode.__args__:
        assert f"`{code}`" in DOC, code
