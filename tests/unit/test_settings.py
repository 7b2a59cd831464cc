"""Service configuration: YAML, environment overrides, and `--validate-config` naming the offending key."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel
from pydantic_settings import BaseSettings

from contract import signing
from edge.config import EdgeSettings
from hub.config import HubSettings
from runtime.settings import ConfigFileError, load_settings, path_problems


def test_environment_overrides_yaml(tmp_path: Path, monkeypatch) -> None:
    conf = tmp_path / "edge.yaml"
    conf.write_text("site_id: plant-a\ndata_dir: /data\nbroker:\n  host: broker.local\n  port: 1883\n")
    monkeypatch.setenv("FEDGE_EDGE_BROKER__PORT", "8883")
    s = load_settings(EdgeSettings, conf)
    assert (s.site_id, s.broker.host, s.broker.port) == ("plant-a", "broker.local", 8883)


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env)


def test_validate_config_exits_non_zero_with_the_key(tmp_path: Path) -> None:
    conf = tmp_path / "edge.yaml"
    data = tmp_path / "data"
    data.mkdir()
    conf.write_text(f"site_id: plant/a\ndata_dir: {data}\nbroker:\n  password: secret\n")
    out = run("edge.cli", "run", "--config", str(conf), "--validate-config")
    assert out.returncode == 2
    assert "site_id" in out.stderr and "FEDGE_EDGE_SITE_ID" in out.stderr
    assert "password must be provided with username" in out.stderr
    conf.write_text(f"site_id: plant-a\ndata_dir: {data}\nstate_dir: {tmp_path / 'state'}\n")
    ok = run("edge.cli", "run", "--config", str(conf), "--validate-config")
    assert ok.returncode == 0 and '"site_id": "plant-a"' in ok.stdout


def test_hub_validate_config_rejects_unknown_keys(tmp_path: Path) -> None:
    conf = tmp_path / "hub.yaml"
    conf.write_text("rounds:\n  min_site: 3\n")
    out = run("hub.cli", "run", "--config", str(conf), "--validate-config")
    assert out.returncode == 2 and "rounds.min_site" in out.stderr


# --- --validate-config: every file and folder the settings name ------------------------------------------------

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def hub_conf(tmp_path: Path, **extra: object) -> Path:
    conf = tmp_path / "hub.yaml"
    conf.write_text(json.dumps({"state_dir": str(tmp_path / "state"), **extra}))  # JSON is YAML
    return conf


def test_validate_config_names_a_missing_nested_file(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_text("x")
    conf = hub_conf(tmp_path, broker={"username": "hub", "password_file": str(tmp_path / "pw"),
                                      "tls": {"ca_file": str(tmp_path / "ca.crt")}})  # fmt: skip

    out = run("hub.cli", "run", "--config", str(conf), "--validate-config")

    assert out.returncode == 2
    assert f"broker.password_file: {tmp_path / 'pw'} does not exist" in out.stderr
    assert "FEDGE_HUB_BROKER__PASSWORD_FILE" in out.stderr
    assert "ca_file" not in out.stderr and "Traceback" not in out.stderr


def test_every_path_the_settings_name_is_checked(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    hub = HubSettings(
        state_dir=tmp_path / "new" / "state",  # created on start: fine
        foundation=str(tmp_path / "bundle"),
        backend="stable-diffusion",
        stable_diffusion={"model_dir": missing / "sd", "encoders_dir": missing / "enc"},
        broker={"username": "hub", "password_file": missing / "pw",
                "tls": {"ca_file": missing / "ca", "cert_file": missing / "crt", "key_file": missing / "key"}},
        site_keys_dir=missing / "site-keys",
        signing_key_file=missing / "keys" / "hub.pem",  # created on start, with its folders: fine
    )  # fmt: skip
    assert {key for key, _ in path_problems(hub)} == {
        "foundation", "stable_diffusion.model_dir", "stable_diffusion.encoders_dir", "broker.password_file",
        "broker.tls.ca_file", "broker.tls.cert_file", "broker.tls.key_file", "site_keys_dir",
    }  # fmt: skip
    (tmp_path / "file").write_text("x")
    edge = EdgeSettings(site_id="s", data_dir=tmp_path / "file", hub_public_key_file=tmp_path, bundle="nosuch")
    assert dict(path_problems(edge)) == {
        "data_dir": f"{tmp_path / 'file'} is not a folder",
        "hub_public_key_file": f"{tmp_path} is not a file",
        "bundle": dict(path_problems(edge))["bundle"],
    }
    assert "no foundation bundle 'nosuch'" in dict(path_problems(edge))["bundle"]


def test_unreadable_files_and_unwritable_parents_are_reported(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "pw").write_text("x")
    (tmp_path / "keys").mkdir()
    real_access = os.access
    denied = {tmp_path / "pw", tmp_path / "keys"}  # as root every file is readable: pretend, for the test
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) not in denied and real_access(p, mode))
    hub = HubSettings(
        state_dir=tmp_path / "state",
        broker={"username": "hub", "password_file": tmp_path / "pw"},
        signing_key_file=tmp_path / "keys" / "deep" / "hub.pem",
    )
    assert dict(path_problems(hub)) == {
        "broker.password_file": f"{tmp_path / 'pw'} is not readable by this user",
        "signing_key_file": f"{tmp_path / 'keys' / 'deep' / 'hub.pem'} does not exist and cannot be created: "
        f"{tmp_path / 'keys'} is not a writable folder",
    }


def test_a_yaml_syntax_error_is_reported_with_its_line_not_a_traceback(tmp_path: Path) -> None:
    conf = tmp_path / "hub.yaml"
    conf.write_text("hub_id: hub-1\nrounds:\n  min_sites: [3\n  poll_s: 1\n")

    out = run("hub.cli", "run", "--config", str(conf), "--validate-config")

    assert out.returncode == 2
    assert f"{conf}:4:9: YAML syntax error" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    conf.write_text("- a list\n")
    with pytest.raises(ConfigFileError, match="must be a mapping"):
        load_settings(HubSettings, conf)


def _materialize(node: object, key: str = "") -> None:
    """Create what an example names: folders for *_dir keys, a key pair for .pub.pem files, other files."""
    if isinstance(node, dict):
        for k, v in node.items():
            _materialize(v, k)
    elif isinstance(node, list):
        for v in node:
            _materialize(v, key)
    elif isinstance(node, str) and key.endswith(("_file", "_files", "_dir")):
        path = Path(node)
        if key == "signing_key_file":
            path.parent.mkdir(parents=True, exist_ok=True)  # the hub creates the key itself
        elif key.endswith("_dir"):
            path.mkdir(parents=True, exist_ok=True)
        elif node.endswith(".pub.pem"):
            path.parent.mkdir(parents=True, exist_ok=True)
            signing.write_keypair(path.with_name(path.name.replace(".pub.pem", ".pem")), path)
        elif node.endswith(".pem"):
            path.parent.mkdir(parents=True, exist_ok=True)
            signing.write_keypair(path, path.with_name(path.name.replace(".pem", ".site-pub.pem")))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("x\n")


def _field_names(model: type[BaseModel]) -> set[str]:
    names = set()
    for name, field in model.model_fields.items():
        names.add(name)
        for arg in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                names |= _field_names(arg)
    return names


@pytest.mark.parametrize(("example", "cls"), [("site.yaml", EdgeSettings), ("hub.yaml", HubSettings)])
def test_the_examples_load_and_name_every_setting(example: str, cls: type[BaseSettings], tmp_path: Path) -> None:
    text = (EXAMPLES / example).read_text()
    roots = sorted(
        {"/" + "/".join(p.split("/")[1:3]) for p in re.findall(r"(?<![\w.])/(?:etc|srv|var)/[\w./-]+", text)}
    )
    for root in roots:  # the examples' absolute paths, moved under tmp_path
        text = text.replace(root + "/", f"{tmp_path}{root}/")
    conf = tmp_path / example
    conf.write_text(text)
    _materialize(yaml.safe_load(text))

    settings = load_settings(cls, conf)

    assert path_problems(settings) == []
    documented = set(re.findall(r"^\s*#?\s*([a-z_]+):", text, re.MULTILINE))
    assert _field_names(cls) - documented == set(), f"settings that examples/{example} does not mention"
