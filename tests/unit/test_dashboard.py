"""Every shipped Grafana dashboard against Grafana's own typed schema (grafana-foundation-sdk), and a lint.

The schema check decodes the JSON with the SDK's generated models (Grafana 11.3, the version
deploy/compose.yml runs), encodes it back and requires nothing to be lost or changed: a key the schema
does not know (a typo, a field of another Grafana version) is dropped by the decoder and reported.
Then every decoded value is checked against the model's type annotations, enums and literals included.
The lint adds what a dashboard needs to be useful here: titles, units, the provisioned data source,
unique panel ids, no unused template variables. Queries themselves are run against a real Prometheus
in tests/integration/test_observability.py.
"""

from __future__ import annotations

import copy
import enum
import json
import re
import types
import typing
from pathlib import Path

import pytest
from grafana_foundation_sdk.cog import plugins
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import units
from grafana_foundation_sdk.models.dashboard import Dashboard

ROOT = Path(__file__).parents[2]
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
DATASOURCE_UID = "fedge-prometheus"  # deploy/grafana/provisioning/datasources/prometheus.yml
KNOWN_UNITS = {v for k, v in vars(units).items() if not k.startswith("_") and isinstance(v, str)}
# Grafana's custom units: "suffix:x", "prefix:$", "si:g", "count:req", "currency:NZD", "time:HH:mm".
CUSTOM_UNIT = re.compile(r"^(suffix|prefix|si|count|currency|time):.+$")
NO_DATA_PANELS = {"row", "text"}  # a row or a text panel shows no query: no unit, no data source

plugins.register_default_plugins()


def _diff(original: object, encoded: object, path: str) -> list[str]:
    """Where the SDK's round trip lost or changed something of the original JSON."""
    if isinstance(original, dict):
        if not isinstance(encoded, dict):
            return [f"{path}: expected an object, the schema made it {type(encoded).__name__}"]
        problems = [f"{path}.{k}: not in Grafana's schema" for k in original if k not in encoded]
        return problems + [p for k in original if k in encoded for p in _diff(original[k], encoded[k], f"{path}.{k}")]
    if isinstance(original, list):
        if not isinstance(encoded, list) or len(encoded) != len(original):
            return [f"{path}: a list the schema does not read as one"]
        return [p for i, (a, b) in enumerate(zip(original, encoded, strict=True)) for p in _diff(a, b, f"{path}[{i}]")]
    if original != encoded or type(original) is not type(encoded):
        return [f"{path}: {original!r} came back as {encoded!r}"]
    return []


def _conforms(value: object, hint: object) -> bool:
    """Whether a decoded value fits a type annotation of the SDK's models."""
    if hint is typing.Any or hint is object:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (list, dict):
        if not isinstance(value, origin):
            return False
        if origin is list and typing.get_args(hint):
            return all(_conforms(v, typing.get_args(hint)[0]) for v in value)
        if origin is dict and typing.get_args(hint):
            return all(_conforms(v, typing.get_args(hint)[1]) for v in value.values())
        return True
    if hint is type(None):
        return value is None
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, hint) or value in {m.value for m in hint}
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # a construct the SDK does not use for data (type variables and the like)


def _type_errors(obj: object, path: str) -> list[str]:
    """Every attribute of every decoded model object checked against its annotation."""
    if isinstance(obj, list):
        return [e for i, v in enumerate(obj) for e in _type_errors(v, f"{path}[{i}]")]
    if isinstance(obj, dict):
        return [e for k, v in obj.items() for e in _type_errors(v, f"{path}.{k}")]
    if not hasattr(obj, "to_json") or isinstance(obj, enum.Enum):
        return []
    hints = typing.get_type_hints(type(obj))
    errors = []
    for name, value in vars(obj).items():
        if name in hints and not _conforms(value, hints[name]):
            errors.append(f"{path}.{name}: {value!r} is not {hints[name]}")
        errors += _type_errors(value, f"{path}.{name}")
    return errors


def schema_errors(dashboard: dict) -> list[str]:
    """What Grafana's typed dashboard schema (grafana-foundation-sdk) finds wrong with a dashboard JSON."""
    try:
        model = Dashboard.from_json(copy.deepcopy(dashboard))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        return [f"the schema cannot decode it: {err!r}"]
    encoded = json.loads(json.dumps(model, cls=JSONEncoder))
    return _diff(dashboard, encoded, "$") + _type_errors(model, "$")


def _all_panels(dashboard: dict) -> list[dict]:
    """Top-level panels and those folded inside collapsed rows."""
    return [q for p in dashboard.get("panels", []) for q in [p, *p.get("panels", [])]]


def _datasource_ok(ref: object, variables: set[str]) -> bool:
    if not isinstance(ref, dict):
        return False
    uid = str(ref.get("uid", ""))
    return uid == DATASOURCE_UID or any(uid in (f"${v}", f"${{{v}}}") for v in variables)


def lint(dashboard: dict) -> list[str]:
    """The house rules: titles, units, the provisioned data source, unique ids, no unused variables."""
    problems = []
    panels = _all_panels(dashboard)
    variables = {v["name"] for v in dashboard.get("templating", {}).get("list", [])}
    ids = [p.get("id") for p in panels]
    problems += [f"panel id {i} is used {ids.count(i)} times" for i in sorted({i for i in ids if ids.count(i) > 1})]
    problems += [f"a panel has no id: {p.get('title')!r}" for p in panels if p.get("id") is None]
    for p in panels:
        name = f"panel {p.get('id')} ({p.get('type')}, {p.get('title')!r})"
        if not str(p.get("title", "")).strip():
            problems.append(f"{name}: no title")
        if p.get("type") in NO_DATA_PANELS:
            if p.get("targets"):
                problems.append(f"{name}: a {p['type']} panel with queries")
            continue
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit")
        if not unit:
            problems.append(f"{name}: no unit (fieldConfig.defaults.unit)")
        elif unit not in KNOWN_UNITS and not CUSTOM_UNIT.match(unit):
            problems.append(f"{name}: unit {unit!r} is neither a Grafana unit nor a custom one (suffix:..)")
        if not _datasource_ok(p.get("datasource"), variables):
            problems.append(f"{name}: data source is not {DATASOURCE_UID!r} or a variable")
        if not p.get("targets"):
            problems.append(f"{name}: no query")
        for t in p.get("targets", []):
            if not _datasource_ok(t.get("datasource"), variables):
                problems.append(f"{name} query {t.get('refId')}: data source is not {DATASOURCE_UID!r} or a variable")
    # A variable is used when a panel, or another variable's query, names it: $v, ${v...} or [[v]].
    for v in sorted(variables):
        others = [x for x in dashboard.get("templating", {}).get("list", []) if x.get("name") != v]
        text = json.dumps(panels) + json.dumps(others)
        if not re.search(rf"\$({re.escape(v)}\b|\{{{re.escape(v)}[}}:])|\[\[{re.escape(v)}\]\]", text):
            problems.append(f"template variable {v!r} is never used")
    return problems


def test_there_are_dashboards_to_check() -> None:
    assert [p.name for p in DASHBOARDS] == ["fedge-overview.json"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.name for p in DASHBOARDS])
def test_dashboard_matches_grafana_s_schema(path: Path) -> None:
    assert schema_errors(json.loads(path.read_text())) == []


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.name for p in DASHBOARDS])
def test_dashboard_lint(path: Path) -> None:
    assert lint(json.loads(path.read_text())) == []


# The checks themselves: each rule catches what it is for, on a copy of the shipped dashboard.
SHIPPED = json.loads((ROOT / "deploy/grafana/dashboards/fedge-overview.json").read_text())


def first_data_panel(d: dict) -> dict:
    return next(p for p in d["panels"] if p["type"] not in NO_DATA_PANELS)


def test_schema_check_catches_an_unknown_key_a_wrong_type_and_a_bad_enum() -> None:
    d = copy.deepcopy(SHIPPED)
    first_data_panel(d)["fieldconfig"] = {"defaults": {"unit": "s"}}  # misspelt fieldConfig
    assert any("fieldconfig: not in Grafana's schema" in e for e in schema_errors(d))
    d = copy.deepcopy(SHIPPED)
    first_data_panel(d)["gridPos"]["w"] = "12"
    assert any("gridPos.w" in e or "grid_pos.w" in e for e in schema_errors(d))
    d = copy.deepcopy(SHIPPED)
    d["graphTooltip"] = 7  # DashboardCursorSync has 0, 1, 2
    assert schema_errors(d)
    d = copy.deepcopy(SHIPPED)
    first_data_panel(d)["targets"][0]["datasource"] = "fedge-prometheus"  # an object in Grafana's schema
    assert schema_errors(d)


def test_lint_catches_missing_title_unit_datasource_duplicate_ids_and_unused_variables() -> None:
    d = copy.deepcopy(SHIPPED)
    p = first_data_panel(d)
    p["title"] = ""
    del p["fieldConfig"]["defaults"]["unit"]
    p["datasource"] = {"type": "prometheus", "uid": "someone-else"}
    d["panels"][-1]["id"] = d["panels"][0]["id"]
    d["templating"]["list"] = [{"name": "site", "type": "query", "query": "label_values(fedge_edge_up, site)"}]
    found = "\n".join(lint(d))
    for expected in ("no title", "no unit", "data source is not", "is used 2 times", "'site' is never used"):
        assert expected in found, found
    # A variable that a query uses, and a data source given as a variable, are fine.
    d = copy.deepcopy(SHIPPED)
    d["templating"]["list"] = [{"name": "ds", "type": "datasource", "query": "prometheus"}]
    p = first_data_panel(d)
    p["datasource"] = {"type": "prometheus", "uid": "${ds}"}
    assert lint(d) == []
    first_data_panel(d)["fieldConfig"]["defaults"]["unit"] = "bananas"
    assert any("neither a Grafana unit" in e for e in lint(d))
