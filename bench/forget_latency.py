"""Forget request to receipt at a site over a local Mosquitto: a benchmark, not a timed test.

One `fedge-edge run` process holds 2,000 samples (digits, 8x8, written as .npy with metadata.csv);
a client signs and publishes forget requests one after another, each for a few sample ids, and
times each from just before its publish to the arrival of its signed receipt (which it verifies).
Every request deletes files, metadata rows and index rows, compacts the site's SQLite file and
queues a superseding contribution before the receipt: the whole path a real request takes.

    .venv/bin/python -m bench.forget_latency            # writes bench/results/forget_latency.{json,md,png}
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import queue
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from contract import signing
from contract.payloads import HubStatus, new_id, now
from contract.topics import Topics
from hub import datasets
from hub.demo import MOSQUITTO_CONF, free_port, wait_port
from runtime.mqtt import BrokerSettings, Bus

RESULTS = Path(__file__).parent / "results"
TOPICS = Topics()
SITE = "bench-site"


def write_site(data: Path, n: int, seed: int) -> list[str]:
    """`n` digits samples (cycled, with a little noise so no two files are equal) and metadata.csv; their ids."""
    d = datasets.load("digits")
    rng = np.random.default_rng(seed)
    ids = []
    data.mkdir(parents=True)
    with open(data / "metadata.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["sample_id", "label", "timestamp"])
        for i in range(n):
            j = i % len(d.labels)
            label, sid = d.label_names[d.labels[j]], f"s{i:05d}"
            (data / label).mkdir(exist_ok=True)
            img = np.clip(d.images[j, 0] + rng.normal(0, 0.01, d.images[j, 0].shape), 0, 1).astype(np.float32)
            np.save(data / label / f"{sid}.npy", img)
            w.writerow([sid, label, "2026-01-01T00:00:00+00:00"])
            ids.append(sid)
    return ids


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def run(requests: int, per_request: int, samples: int, seed: int, root: Path) -> dict:
    """Start a broker and a site, send the requests one by one, return the figures."""
    port = free_port()
    (root / "mosquitto.conf").write_text(MOSQUITTO_CONF.format(port=port))
    exe = next(p for p in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto") if Path(p).exists())
    broker_proc = subprocess.Popen([exe, "-c", str(root / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.STDOUT)  # fmt: skip
    edge = None
    client = None
    try:
        wait_port(port, 10)
        broker = BrokerSettings(port=port)
        ids = write_site(root / "data", samples, seed)
        operator = signing.write_keypair(root / "operator.pem")
        answers: queue.Queue[tuple[float, str, bytes]] = queue.Queue()
        client = Bus(f"bench-forget-{os.getpid()}", broker, persistent=False)
        for kind in ("forget/receipt", "errors", "embeddings"):
            client.subscribe(
                TOPICS.site(SITE, kind), lambda m, k=kind: answers.put((time.perf_counter(), k, m.payload))
            )
        client.start()
        if not client.wait_connected(10):
            raise RuntimeError("no connection to the benchmark's broker")
        status = HubStatus(message_id=new_id(), hub_id="hub", session_id=new_id(), state="online", at=now())
        client.publish(TOPICS.hub_status, status.model_dump_json().encode(), retain=True)
        env = {
            **os.environ, "FEDGE_EDGE_SITE_ID": SITE, "FEDGE_EDGE_DATA_DIR": str(root / "data"),
            "FEDGE_EDGE_STATE_DIR": str(root / "state"), "FEDGE_EDGE_BROKER__PORT": str(port),
            "FEDGE_EDGE_METRICS_PORT": "0", "FEDGE_EDGE_SETTLE_S": "0", "FEDGE_EDGE_PREFER_CUDA": "false",
            "FEDGE_EDGE_OPERATOR_PUBLIC_KEY_FILES": json.dumps([str(root / "operator.pub.pem")]),
        }  # fmt: skip
        log = open(root / "edge.log", "wb")  # noqa: SIM115 (closed with the process)
        edge = subprocess.Popen(
            [sys.executable, "-m", "edge.cli", "run"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        t_start = time.perf_counter()
        while True:  # the first contribution: the site has indexed and encoded everything
            _, kind, _ = answers.get(timeout=300)
            if kind == "embeddings":
                break
        ready_s = time.perf_counter() - t_start
        site_pub = signing.load_public_key(root / "state" / "keys" / "site.pub.pem")
        trusted = {signing.key_id(site_pub): site_pub}
        rng = np.random.default_rng(seed)
        order = [ids[i] for i in rng.permutation(len(ids))]
        latencies = []
        for r in range(requests):
            chosen = order[r * per_request : (r + 1) * per_request]
            body = {"schema_version": 1, "request_id": new_id(), "site_id": SITE,
                    "selector": {"kind": "samples", "sample_ids": chosen}, "reason": "benchmark",
                    "issued_at": now().isoformat(), "issuer": "bench"}  # fmt: skip
            payload = json.dumps(signing.sign(body, operator)).encode()
            t0 = time.perf_counter()
            client.publish(TOPICS.site(SITE, "forget/request"), payload)
            while True:
                t1, kind, raw = answers.get(timeout=60)
                if kind == "errors":
                    raise RuntimeError(f"request refused: {raw[:300]!r}")
                if kind == "forget/receipt" and json.loads(raw)["request_id"] == body["request_id"]:
                    break
            receipt = json.loads(raw)
            signing.verify(receipt, trusted)
            if receipt["samples_deleted"] != len(chosen):
                raise RuntimeError(f"receipt says {receipt['samples_deleted']} deleted, {len(chosen)} asked")
            latencies.append(t1 - t0)
        left = sum(1 for _ in (root / "data").rglob("*.npy"))
        db_bytes = sum(p.stat().st_size for p in (root / "state").glob("edge.sqlite*"))
    except Exception:
        if (root / "edge.log").exists():
            print((root / "edge.log").read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        if edge is not None:
            edge.send_signal(signal.SIGTERM)
            edge.wait(30)
        if client is not None:
            client.stop()
        broker_proc.terminate()
        broker_proc.wait(10)
    ms = [x * 1000 for x in latencies]
    return {
        "what": "forget request published -> signed receipt received, one site over a local Mosquitto",
        "site_samples": samples, "requests": requests, "samples_per_request": per_request, "seed": seed,
        "samples_left": left, "state_bytes_after": db_bytes, "site_ready_s": round(ready_s, 2),
        "latency_ms": {"p50": round(percentile(ms, 50), 1), "p95": round(percentile(ms, 95), 1),
                       "max": round(max(ms), 1), "min": round(min(ms), 1), "mean": round(float(np.mean(ms)), 1)},
        "acceptance_p95_ms": 500, "pass": percentile(ms, 95) <= 500,
        "each_ms": [round(x, 2) for x in ms],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }  # fmt: skip


def markdown(res: dict) -> str:
    lat = res["latency_ms"]
    return "\n".join([
        "# Forget request to receipt at a site",
        "",
        f"{res['what']}: {res['requests']} requests, each deleting {res['samples_per_request']} samples by id, "
        f"at a site holding {res['site_samples']} samples (seed {res['seed']}). Each request is verified, persisted, "
        "executed (files, metadata.csv rows, index rows, SQLite compaction, superseding contribution) and answered "
        "with a signed receipt, which the client verifies. `python -m bench.forget_latency`.",
        "",
        "| p50 | p95 | min | max | mean | bar (p95) |",
        "|---|---|---|---|---|---|",
        f"| {lat['p50']} ms | {lat['p95']} ms | {lat['min']} ms | {lat['max']} ms | {lat['mean']} ms | "
        f"{res['acceptance_p95_ms']} ms: {'met' if res['pass'] else 'NOT met'} |",
        "",
        f"Machine: {res['machine']['cpus']} CPUs, {res['machine']['platform']}, Python {res['machine']['python']}. "
        f"Samples left afterwards: {res['samples_left']}; the site's state file then {res['state_bytes_after']:,} bytes.",
        "",
    ])  # fmt: skip


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(range(1, len(res["each_ms"]) + 1), res["each_ms"], "o-", ms=3, label="request -> receipt")
    ax.axhline(res["latency_ms"]["p95"], color="tab:orange", ls="--", label=f"p95 {res['latency_ms']['p95']} ms")
    ax.axhline(res["acceptance_p95_ms"], color="tab:red", ls=":", label="bar 500 ms")
    ax.set_xlabel("request")
    ax.set_ylabel("ms")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Forget latency, site with {res['site_samples']} samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--per-request", type=int, default=3)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedge-forget-") as tmp:
        res = run(args.requests, args.per_request, args.samples, args.seed, Path(tmp))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "forget_latency.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / "forget_latency.md").write_text(markdown(res))
    plot(res, args.out / "forget_latency.png")
    print(markdown(res))
    return 0 if res["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
