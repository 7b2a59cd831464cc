"""Defensive JSON decoding for anything that arrives over MQTT, before a model ever sees it.

Bounds come first, on the raw bytes: size, then nesting depth (Python's decoder recurses, and a
deeply nested payload would raise RecursionError out of any handler). Then a strict decode: no
duplicate keys (which value would win is decoder-specific), no NaN or Infinity literals, and every
integer within SQLite's signed 64-bit range, so no number can fail later at the database.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

MAX_DEPTH = 16
INT64_MAX = 2**63 - 1
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)


class PayloadError(ValueError):
    """Bytes that cannot become a payload: `code` is an ErrorCode (oversize, not_json, non_finite, invalid)."""

    def __init__(self, code: str, reason: str):
        super().__init__(f"{code}: {reason}")
        self.code, self.reason = code, reason


def nesting_depth(payload: bytes) -> int:
    """Deepest bracket nesting of a JSON text, brackets inside strings not counted (linear time)."""
    stripped = _STRING.sub(b'""', payload)
    b = np.frombuffer(stripped, np.uint8)
    if not len(b):
        return 0
    step = np.isin(b, (ord("["), ord("{"))).astype(np.int64) - np.isin(b, (ord("]"), ord("}"))).astype(np.int64)
    return int(np.cumsum(step).max(initial=0))


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise PayloadError("invalid", f"key {k!r} appears twice in one object")
        out[k] = v
    return out


def _constant(name: str) -> float:
    raise PayloadError("non_finite", f"{name} is not a number JSON allows")


def _int(text: str) -> int:
    value = int(text)  # Python refuses more than 4,300 digits with ValueError, caught below
    if not -INT64_MAX - 1 <= value <= INT64_MAX:
        raise PayloadError("invalid", f"integer {text[:24]}{'…' if len(text) > 24 else ''} is out of the 64-bit range")
    return value


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise PayloadError("non_finite", f"number {text[:24]} overflows a float")
    return value


def loads(
    payload: bytes, max_bytes: int, max_depth: int = MAX_DEPTH, schema_version: int | None = None
) -> dict[str, Any]:
    """A JSON object from `payload`, or PayloadError with the reason it is refused.

    With `schema_version`, the object must state exactly that integer (`true` and `1.0` are not 1).
    """
    if len(payload) > max_bytes:
        raise PayloadError("oversize", f"payload is {len(payload)} bytes; at most {max_bytes} are accepted")
    if not payload:
        raise PayloadError("not_json", "payload is empty")
    depth = nesting_depth(payload)
    if depth > max_depth:
        raise PayloadError("invalid", f"JSON nests {depth} levels deep; at most {max_depth} are accepted")
    try:
        text = payload.decode("utf-8")
        body = json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant, parse_int=_int, parse_float=_float)
    except PayloadError:
        raise
    except UnicodeDecodeError as err:
        raise PayloadError("not_json", f"payload is not UTF-8: {err}") from None
    except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError; so is an over-long integer
        raise PayloadError("not_json", f"payload is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise PayloadError("invalid", f"payload must be a JSON object, got {type(body).__name__}")
    if schema_version is not None:
        version = body.get("schema_version")
        if type(version) is not int or version != schema_version:
            raise PayloadError("schema_version", f"schema_version {version!r} is not supported; {schema_version} is")
    return body
