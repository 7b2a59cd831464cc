"""Metrics on both services, scraped over HTTP, linted by promtool, and queried by a real Prometheus."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hub.demo import free_port, run_demo, wait_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "fedge-overview.json"
SITES = ["site-1", "site-2", "site-3"]


def tool(name: str) -> str:
    """A binary from the OS's prometheus package; `.ci/run` installs it, so its absence is an error."""
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed; `bash .ci/run` installs it (apt-get install prometheus)")
    return path


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query in the dashboard."""
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def test_dashboard_uses_the_provisioned_datasource_and_only_fedge_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ds = (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    assert "uid: fedge-prometheus" in ds
    for p in dash["panels"]:
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "fedge-prometheus"
            assert "fedge_" in t["expr"]
    assert any(p["type"] == "row" and "Forget" in p["title"] for p in dash["panels"])


def test_metrics_scraped_linted_and_every_dashboard_query_returns_data(tmp_path: Path) -> None:
    ports = {"hub": free_port(), **{s: free_port() for s in SITES}}
    prom_port = free_port()
    # As deployed: Prometheus scrapes the hub only. The sites are behind factory firewalls; one edge
    # target is configured on a port nothing listens on, as an unreachable site would be. Every site
    # must still appear in the per-site panels, through the counters its status carries to the hub.
    unreachable = free_port()
    conf = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "fedge-hub", "static_configs": [{"targets": [f"127.0.0.1:{ports['hub']}"]}]},
            {"job_name": "fedge-edge", "static_configs": [
                {"targets": [f"127.0.0.1:{unreachable}"], "labels": {"site": SITES[0]}}
            ]},
        ],
    }  # fmt: skip
    (tmp_path / "prometheus.yml").write_text(json.dumps(conf))
    prom = subprocess.Popen(
        [tool("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    scraped: dict[str, dict] = {}
    answers: dict[str, list] = {}

    final: dict = {}

    def check(result: dict) -> None:
        final.update(result)
        # Both services over real HTTP: parse, lint with promtool, health.
        for name, port in ports.items():
            status, body = get(f"http://127.0.0.1:{port}/metrics")
            assert status == 200
            text = body.decode()
            scraped[name] = {
                s.name + json.dumps(s.labels, sort_keys=True): s.value
                for f in text_string_to_metric_families(text)
                for s in f.samples
            }
            lint = subprocess.run([tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True)
            assert lint.returncode == 0, f"{name}: {lint.stdout}{lint.stderr}"
            status, body = get(f"http://127.0.0.1:{port}/healthz")
            assert status == 200 and json.loads(body)["ok"] is True
        # Prometheus has scraped the hub through the round; every dashboard query must return data, and
        # every per-site query every site (none of them was scraped).
        api = f"http://127.0.0.1:{prom_port}/api/v1/query?query="
        for title, expr in dashboard_queries():
            per_site = expr.startswith(("max by (site", "sum by (site"))  # one series per site
            deadline = time.monotonic() + 60
            while True:
                status, body = get(api + urllib.parse.quote(expr))
                data = json.loads(body)
                assert status == 200 and data["status"] == "success", f"{title}: {expr}: {data}"
                result = data["data"]["result"]
                sites = {r["metric"].get("site") for r in result}
                if (result and (not per_site or set(SITES) <= sites)) or time.monotonic() > deadline:
                    break
                time.sleep(1)
            answers[expr] = result
            if per_site:
                assert set(SITES) <= sites, f"{title}: {expr} shows sites {sites}"
        # The re-exported counters follow the sites' statuses: each site runs model v2.
        expr = "max by (site) (fedge_hub_site_model_version)"
        deadline = time.monotonic() + 60
        while True:
            result = json.loads(get(api + urllib.parse.quote(expr))[1])["data"]["result"]
            versions = {r["metric"]["site"]: float(r["value"][1]) for r in result}
            if versions == {s: 2.0 for s in SITES} or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert versions == {s: 2.0 for s in SITES}
        targets = json.loads(get(f"http://127.0.0.1:{prom_port}/api/v1/targets")[1])["data"]["activeTargets"]
        assert {t["labels"]["job"]: t["health"] for t in targets} == {"fedge-hub": "up", "fedge-edge": "down"}

    try:
        wait_port(prom_port, 30)
        run_demo(tmp_path / "demo", ports=ports, while_running=check, log=lambda s: None)
    finally:
        prom.terminate()
        prom.wait(20)

    empty = [expr for expr, result in answers.items() if not result]
    assert not empty, f"dashboard queries without data: {empty}"
    hub = scraped["hub"]
    # The demo's forget request made model v2, certified; every site runs it.
    assert hub["fedge_hub_model_version{}"] == final["model_version"] == 2
    assert hub['fedge_hub_certificates_total{"reason": "forget_request"}'] == 1
    assert hub['fedge_hub_contributions{"state": "active"}'] == 3
    # Three sites' contributions, then site-1's superseding one after the forget request.
    assert hub['fedge_hub_messages_total{"kind": "embeddings", "result": "accepted"}'] == 4
    assert hub['fedge_hub_contributions{"state": "superseded"}'] == 1
    assert hub["fedge_hub_fedavg_round_bytes{}"] > 0
    # No round runs once v2 is delivered: the progress gauge is back to 0 for both phases.
    assert (
        hub['fedge_hub_round_progress{"phase": "synthesis"}']
        == hub['fedge_hub_round_progress{"phase": "training"}']
        == 0
    )
    for s in SITES:
        edge = scraped[s]
        assert edge["fedge_edge_model_version{}"] == 2
        assert 0 < edge['fedge_edge_sent_bytes_total{"kind": "embeddings"}'] < 20_000
        assert edge['fedge_edge_received_bytes_total{"kind": "model"}'] > 200_000
        assert edge["fedge_edge_broker_connected{}"] == 1
