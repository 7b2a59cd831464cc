"""Service configuration: YAML, environment overrides, and `--validate-config` naming the offending key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from edge.config import EdgeSettings
from runtime.settings import load_settings


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
    conf.write_text("site_id: plant/a\ndata_dir: /data\nbroker:\n  password: secret\n")
    out = run("edge.cli", "run", "--config", str(conf), "--validate-config")
    assert out.returncode == 2
    assert "site_id" in out.stderr and "FEDGE_EDGE_SITE_ID" in out.stderr
    assert "password must be provided with username" in out.stderr
    conf.write_text("site_id: plant-a\ndata_dir: /data\n")
    ok = run("edge.cli", "run", "--config", str(conf), "--validate-config")
    assert ok.returncode == 0 and '"site_id": "plant-a"' in ok.stdout


def test_hub_validate_config_rejects_unknown_keys(tmp_path: Path) -> None:
    conf = tmp_path / "hub.yaml"
    conf.write_text("rounds:\n  min_site: 3\n")
    out = run("hub.cli", "run", "--config", str(conf), "--validate-config")
    assert out.returncode == 2 and "rounds.min_site" in out.stderr
