"""docs/mqtt.md is the contract third parties read: its examples must validate and it must list every topic."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import contract.payloads as payloads
from contract.topics import SITE_KINDS, Topics

DOC = (Path(__file__).parents[2] / "docs" / "mqtt.md").read_text()
EXAMPLES = re.findall(r"<!-- payload: (\w+) -->\s*```json\n(.*?)```", DOC, re.S)


def test_every_payload_model_has_an_example() -> None:
    documented = {name for name, _ in EXAMPLES}
    wire = {"SiteStatus", "Contribution", "Evaluation", "ErrorReport", "HubStatus", "ModelManifest", "ModelChunk"}
    assert documented == wire


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
