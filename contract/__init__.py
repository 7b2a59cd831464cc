"""The wire contract shared by edge and hub: topics, payload models, array encoding.

Imports nothing heavier than numpy and pydantic, so both sides can depend on it.
"""

from contract.arrays import ArrayPayload
from contract.payloads import SCHEMA_VERSION, Contribution, LabelPrototypes

__all__ = ["SCHEMA_VERSION", "ArrayPayload", "Contribution", "LabelPrototypes"]
