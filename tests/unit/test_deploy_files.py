"""Deployment files: compose validates, every Dockerfile COPY source exists, entrypoints are real, no torch at the edge."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_SETS = [
    ["compose.yml"],
    ["compose.yml", "compose.cpu.yml"],
    ["compose.yml", "compose.tls.yml"],
    ["compose.yml", "compose.cpu.yml", "compose.tls.yml", "compose.cpu-tls.yml"],
]


def compose_client() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def merge(base: dict, overlay: dict) -> None:
    """Compose's overlay rules, as far as these files use them: maps merge by key, lists add up."""
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        elif isinstance(value, list) and isinstance(base.get(key), list):
            base[key] = base[key] + [v for v in value if v not in base[key]]
        else:
            base[key] = value


@pytest.mark.parametrize("files", COMPOSE_SETS, ids=["+".join(f) for f in COMPOSE_SETS])
def test_compose_files_validate(files: list[str]) -> None:
    cli = compose_client()
    if cli is not None:  # the real client, offline
        args = [a for f in files for a in ("-f", str(DEPLOY / f))]
        out = subprocess.run([*cli, *args, "config", "-q"], capture_output=True, text=True, cwd=DEPLOY)
        assert out.returncode == 0, out.stderr
    # And a structural check that needs no client: references resolve, files exist, nothing unpinned.
    merged: dict = {}
    for f in files:
        doc = yaml.safe_load((DEPLOY / f).read_text())
        for key, value in doc.items():
            if isinstance(value, dict) and not key.startswith("x-"):
                for name, body in value.items():
                    merge(merged.setdefault(key, {}).setdefault(name, {}), body or {})
    services, secrets, volumes = merged["services"], merged.get("secrets", {}), merged.get("volumes", {})
    for name, svc in services.items():
        assert "image" in svc, name
        assert not svc["image"].endswith(":latest") and ":" in svc["image"], f"{name}: pin the image tag"
        for s in svc.get("secrets", []):
            assert s in secrets, f"{name}: undefined secret {s}"
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("."):
                if "demo-data" not in src:  # created by the operator
                    assert (DEPLOY / src).exists(), f"{name}: {src} missing"
            else:
                assert src in volumes, f"{name}: undefined volume {src}"
        env = svc.get("environment", {})
        assert not any("PASSWORD" in k and not k.endswith("_FILE") for k in env), f"{name}: passwords come from files"
    for s in secrets.values():
        assert s["file"].startswith("./secrets/")
    assert services["hub"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    if "compose.tls.yml" in files:  # every fedge service reaches the broker over TLS, with the CA as a secret
        fedge = [n for n in services if n.startswith(("hub", "edge"))]
        assert ("hub-cpu" in fedge) == ("compose.cpu.yml" in files)
        for name in fedge:
            env, prefix = services[name]["environment"], "FEDGE_HUB" if name.startswith("hub") else "FEDGE_EDGE"
            assert env[f"{prefix}_BROKER__PORT"] == "8883", name
            assert env[f"{prefix}_BROKER__TLS__CA_FILE"] == "/run/secrets/mqtt_ca", name
            assert "mqtt_ca" in services[name]["secrets"], name
        assert "./mosquitto/tls.conf:/mosquitto/config/mosquitto.conf:ro" in services["mosquitto"]["volumes"]


def test_the_tls_broker_config_keeps_every_setting_of_the_plain_one() -> None:
    """tls.conf replaces mosquitto.conf under the TLS switch: only the listener may differ."""

    def settings(name: str) -> list[str]:
        lines = (DEPLOY / "mosquitto" / name).read_text().splitlines()
        return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]

    plain, tls = settings("mosquitto.conf"), settings("tls.conf")
    assert [s for s in plain if not s.startswith("listener")] == tls[: tls.index("listener 8883")]
    assert {"require_certificate false", "cafile /run/secrets/mqtt_ca"} <= set(tls)


def dockerfile_instructions(name: str) -> list[tuple[str, str]]:
    text = (ROOT / name).read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


@pytest.mark.parametrize("name", ["Dockerfile.edge", "Dockerfile.hub"])
def test_dockerfiles_copy_existing_sources_run_non_root_and_check_health(name: str) -> None:
    ins = dockerfile_instructions(name)
    for op, arg in ins:
        if op == "COPY" and "--from=" not in arg:
            parts = [p for p in arg.split() if not p.startswith("--")]
            for src in parts[:-1]:
                assert (ROOT / src).exists(), f"{name}: COPY source {src} does not exist"
    users = [arg for op, arg in ins if op == "USER"]
    assert users and not users[-1].startswith(("0", "root")), f"{name}: must run as a fixed non-root UID"
    assert any(op == "HEALTHCHECK" for op, _ in ins)
    entry = json.loads(next(arg for op, arg in ins if op == "ENTRYPOINT"))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entry[0] in scripts, f"{name}: entrypoint {entry[0]} is not a console script"
    assert shutil.which(entry[0], path=str(Path(sys.executable).parent)), f"{entry[0]} is not installed"
    assert not any(re.search(r":latest\b", arg) for op, arg in ins if op in ("FROM", "ARG"))


def test_the_edge_image_carries_no_torch() -> None:
    edge = " ".join(arg for op, arg in dockerfile_instructions("Dockerfile.edge") if op == "RUN")
    args = [arg for op, arg in dockerfile_instructions("Dockerfile.edge") if op == "ARG"]
    assert "EXTRAS=edge" in args and '".[${EXTRAS}]"' in edge and "hub" not in edge
    copied = " ".join(arg for op, arg in dockerfile_instructions("Dockerfile.edge") if op == "COPY")
    assert "hub" not in copied.split()  # the hub package (torch, diffusers) never enters the image


@pytest.mark.parametrize("extras", ["edge", "edge,edge-sd"])
def test_edge_install_set_holds_no_torch(tmp_path: Path, extras: str) -> None:
    """Resolve `pip install .[edge]` from the package index, as the edge image does, and list what it installs."""
    report = tmp_path / "report.json"
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
         "-c", str(ROOT / "constraints.txt"), f"{ROOT}[{extras}]"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    names = {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}
    assert "onnxruntime" in names and "paho-mqtt" in names
    assert ("tokenizers" in names) == ("edge-sd" in extras)  # the default edge carries no tokenizers stack
    assert not names & {"torch", "torchvision", "diffusers", "triton", "flwr"}, sorted(names)
    assert not any(n.startswith("nvidia-") for n in names), sorted(names)


def test_demo_data_writes_the_three_sites_compose_mounts(tmp_path: Path) -> None:
    from hub.cli import main

    assert main(["demo-data", str(tmp_path)]) == 0
    compose = (DEPLOY / "compose.yml").read_text()
    for site in ("site-1", "site-2", "site-3"):
        assert f"./demo-data/{site}:/data" in compose
        assert len(list((tmp_path / site).glob("*/*.npy"))) > 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site-1", "site-2", "site-3"]
