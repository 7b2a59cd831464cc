"""Field tables for docs/mqtt.md, generated from the payload models so the page cannot drift from the code.

    python -m contract.schema_doc            # print every table (paste into docs/mqtt.md)

tests/unit/test_mqtt_doc.py checks that the page carries exactly these tables.
"""

from __future__ import annotations

import sys
from typing import Any

from pydantic import BaseModel


def _type(spec: dict[str, Any], defs: dict[str, Any]) -> tuple[str, list[str], dict[str, Any] | None]:
    """(type text, constraints, nested object schema or None) of one JSON-schema property."""
    if "$ref" in spec:
        return "object", [], defs[spec["$ref"].rsplit("/", 1)[-1]]
    if "anyOf" in spec:
        options = [o for o in spec["anyOf"] if o.get("type") != "null"]
        text, cons, nested = (
            _type(options[0], defs)
            if len(options) == 1
            else (" or ".join(o.get("type", "?") for o in options), [], None)
        )
        return text + " or null", cons, nested
    cons = []
    if "const" in spec:
        cons.append(f"exactly `{spec['const']}`")
    if "enum" in spec:
        cons.append("one of " + ", ".join(f"`{e}`" for e in spec["enum"]))
    if "pattern" in spec:
        cons.append(f"pattern `{spec['pattern']}`")
    for key, word in (("minimum", "≥"), ("maximum", "≤"), ("minLength", "length ≥"), ("maxLength", "length ≤"),
                      ("minItems", "items ≥"), ("maxItems", "items ≤")):  # fmt: skip
        if key in spec:
            cons.append(f"{word} {spec[key]:,}" if isinstance(spec[key], int) else f"{word} {spec[key]}")
    if spec.get("format") == "date-time":
        return "string (ISO 8601 time with a zone)", cons, None
    t = spec.get("type", "any")
    if t == "array":
        inner, icons, nested = _type(spec.get("items", {}), defs)
        return f"array of {inner}", cons + [f"each {c}" for c in icons], nested
    if t == "object" and "additionalProperties" in spec and isinstance(spec["additionalProperties"], dict):
        inner, icons, _ = _type(spec["additionalProperties"], defs)
        return f"object of {inner}", cons + [f"each {c}" for c in icons], None
    return str(t), cons, None


def _rows(schema: dict[str, Any], defs: dict[str, Any], prefix: str = "") -> list[str]:
    rows = []
    required = set(schema.get("required", []))
    for name, spec in schema.get("properties", {}).items():
        text, cons, nested = _type(spec, defs)
        desc = (spec.get("description") or (nested or {}).get("description") or "").replace("|", "\\|")
        # schema_version has a default for senders' convenience, but receivers refuse a payload without it.
        need = "yes" if name in required or name == "schema_version" else "no"
        limits = "; ".join(cons).replace("|", "\\|") or "—"
        rows.append(f"| `{prefix}{name}` | {text} | {need} | {limits} | {desc} |")
        if nested is not None:
            sep = "[]." if text.startswith("array") else "."
            rows += _rows(nested, defs, f"{prefix}{name}{sep}")
    return rows


def field_table(model: type[BaseModel]) -> str:
    """A Markdown table of every field of `model` (nested objects flattened): type, required, limits, meaning."""
    schema = model.model_json_schema()
    head = ["| field | type | required | limits | meaning |", "|---|---|---|---|---|"]
    return "\n".join(head + _rows(schema, schema.get("$defs", {})))


def main() -> int:
    """Print the table of every wire model."""
    from contract import payloads

    for name in payloads.WIRE_MODELS:
        print(f"<!-- fields: {name} -->\n{field_table(getattr(payloads, name))}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
