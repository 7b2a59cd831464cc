"""The wire contract shared by edge and hub: topics, payload models, array encoding.

Imports nothing heavier than numpy and pydantic, so both sides can depend on it.
"""

from contract.arrays import ArrayPayload
from contract.payloads import (
    SCHEMA_VERSION,
    Contribution,
    ErrorReport,
    Evaluation,
    HubStatus,
    LabelPrototypes,
    ModelChunk,
    ModelManifest,
    SiteStatus,
)
from contract.topics import DEFAULT_PREFIX, Topics

__all__ = [
    "DEFAULT_PREFIX",
    "SCHEMA_VERSION",
    "ArrayPayload",
    "Contribution",
    "ErrorReport",
    "Evaluation",
    "HubStatus",
    "LabelPrototypes",
    "ModelChunk",
    "ModelManifest",
    "SiteStatus",
    "Topics",
]
