"""The demo: a broker, the hub and three edge sites as separate processes, one round over MQTT.

    fedge-hub demo            (what `make demo` runs)

It starts Mosquitto when it is on PATH (else the embedded Python broker), writes each site a
Dirichlet(0.3) share of the digits private split in the local data layout, starts `fedge-hub run`
and three `fedge-edge run` with generated configs, and watches the broker: contributions go up
(prototypes only), the hub trains and publishes the model, every site fetches it, checks its sha256
and reports its accuracy on its own held-out samples. Then it prints the table and stops every
process it started (`--keep-running` leaves them up until Ctrl-C or SIGTERM, to look at /metrics).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

import bundled
from contract import signing
from contract.payloads import (
    Evaluation,
    ForgetReceipt,
    HubStatus,
    ModelManifest,
    SiteStatus,
    UnlearningCertificate,
    new_id,
    now,
)
from contract.topics import Topics
from edge.models import GlobalModel
from hub import datasets
from runtime.mqtt import BrokerSettings, Bus, Message


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


MOSQUITTO_CONF = """# Written by fedge-hub demo: loopback only, anonymous, nothing persisted.
listener {port} 127.0.0.1
allow_anonymous true
persistence false
# Mosquitto drops QoS 1 messages silently past max_queued_messages (default 1000): set it deliberately.
max_queued_messages 100000
max_inflight_messages 20
"""


class Broker:
    """Mosquitto in a subprocess when it is installed, else the embedded broker in this process."""

    def __init__(self, workdir: Path, log, choice: str = "auto"):
        self.port = free_port()
        self._proc: subprocess.Popen | None = None
        self._embedded = None
        exe = shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None
        )
        if choice == "mosquitto" and not exe:
            raise FileNotFoundError("mosquitto is not installed (Debian/Ubuntu: apt-get install mosquitto)")
        if exe and choice != "embedded":
            conf = workdir / "mosquitto.conf"
            conf.write_text(MOSQUITTO_CONF.format(port=self.port))
            self._proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            self.protocol, self.kind = "5", f"Mosquitto ({exe})"
            wait_port(self.port, 10)
        else:
            from hub.embedded_broker import EmbeddedBroker

            self._embedded = EmbeddedBroker("127.0.0.1", self.port)
            self._embedded.start()
            why = "as asked" if choice == "embedded" else "Mosquitto is not installed"
            self.protocol, self.kind = "3.1.1", f"the embedded Python broker (MQTT 3.1.1; {why})"
        log(f"broker: {self.kind} on 127.0.0.1:{self.port}")

    def settings(self) -> BrokerSettings:
        """How clients reach it."""
        return BrokerSettings(host="127.0.0.1", port=self.port, protocol=self.protocol)

    def stop(self) -> None:
        """Stop it."""
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(10)
        if self._embedded is not None:
            self._embedded.stop()


def wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout:.0f} s")


class RoundPhases:
    """Prints the phase a hub round is in, read from the hub's own `fedge_hub_round_progress` gauge."""

    def __init__(self, metrics_port: int, log: Callable[[str], None], t0: float):
        self.url, self.log, self.t0 = f"http://127.0.0.1:{metrics_port}/metrics", log, t0
        self.last: tuple | None = None
        self.next_poll = 0.0

    def show(self, hub_state: str | None) -> None:
        """While the hub trains, print its phase and progress when they move (polled at most every 2 s)."""
        if hub_state != "training" or time.monotonic() < self.next_poll:
            return
        self.next_poll = time.monotonic() + 2.0
        try:
            with urllib.request.urlopen(self.url, timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return
        done = {
            s.labels["phase"]: s.value
            for f in text_string_to_metric_families(text)
            if f.name == "fedge_hub_round_progress"
            for s in f.samples
        }
        phase = "training" if done.get("training", 0) > 0 else "synthesis"
        now_ = (phase, round(done.get(phase, 0.0), 2))
        if now_ != self.last:
            self.last = now_
            self.log(f"{time.monotonic() - self.t0:6.1f} s  hub: round in progress, {phase} {now_[1]:.0%} done")


@dataclass
class Observer:
    """Watches the broker the way Grafana or an operator would: statuses, evaluations, the model manifest."""

    statuses: dict[str, SiteStatus] = field(default_factory=dict)
    evals: dict[tuple[str, int], Evaluation] = field(default_factory=dict)
    manifest: ModelManifest | None = None
    receipts: dict[str, tuple[ForgetReceipt, float]] = field(default_factory=dict)  # request id -> (receipt, when)
    certificates: list[tuple[UnlearningCertificate, float]] = field(default_factory=list)
    hub_state: str | None = None
    changed: threading.Event = field(default_factory=threading.Event)

    def attach(self, bus: Bus, topics: Topics) -> None:
        bus.subscribe(topics.hub_status, self._hub_status)
        bus.subscribe(topics.all_sites("status"), self._status)
        bus.subscribe(topics.all_sites("eval"), self._eval)
        bus.subscribe(topics.hub_model, self._model)
        bus.subscribe(topics.all_sites("forget/receipt"), self._receipt)
        bus.subscribe(topics.hub_certificate, self._certificate)

    def _hub_status(self, msg: Message) -> None:
        if msg.payload:
            self.hub_state = HubStatus.model_validate_json(msg.payload).state
            self.changed.set()

    def _receipt(self, msg: Message) -> None:
        r = ForgetReceipt.model_validate_json(msg.payload)
        self.receipts[r.request_id] = (r, time.time())
        self.changed.set()

    def _certificate(self, msg: Message) -> None:
        self.certificates.append((UnlearningCertificate.model_validate_json(msg.payload), time.time()))
        self.changed.set()

    def _status(self, msg: Message) -> None:
        s = SiteStatus.model_validate_json(msg.payload)
        self.statuses[s.site_id] = s
        self.changed.set()

    def _eval(self, msg: Message) -> None:
        e = Evaluation.model_validate_json(msg.payload)
        self.evals[(e.site_id, e.model_version)] = e
        self.changed.set()

    def _model(self, msg: Message) -> None:
        if msg.payload:
            self.manifest = ModelManifest.model_validate_json(msg.payload)
            self.changed.set()

    def done(self, sites: list[str], version: int | None = None) -> bool:
        """Every site runs the current model (at least `version`), has reported on it and has an empty outbox, and
        the delivery gate has decided which of its heads they serve."""
        m = self.manifest
        if m is None or (version is not None and m.version < version) or (m.gate and m.gate.state == "pending"):
            return False
        return all(
            (s in self.statuses and self.statuses[s].model_version == m.version and self.statuses[s].outbox_depth == 0
             and (s, m.version) in self.evals)
            for s in sites
        )  # fmt: skip


def _yaml(d: dict) -> str:
    return json.dumps(d, indent=1) + "\n"  # JSON is valid YAML


@dataclass
class Services:
    """The processes the demo started."""

    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, args: list[str], log_path: Path) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log_path, "wb") as out:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT, env=env
            )

    def check(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with status {p.returncode}; see its log")

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def demo_split(n_sites: int, alpha: float, seed: int):
    """The digits data, its split (the bundled model's), and the private part spread over sites."""
    ds = bundled.manifest("digits")["dataset"]
    data = datasets.load("digits")
    sp = datasets.split(len(data.labels), ds["split_seed"], ds["public_frac"], ds["test_frac"])
    return data, sp, datasets.dirichlet_sites(data.labels, sp.private, n_sites, alpha, seed=seed)


def write_site_data(root: Path, n_sites: int, alpha: float, seed: int, data=None, parts=None) -> list[str]:
    """Write `<root>/site-N/data` for each demo site (the local data layout); the site ids."""
    if data is None or parts is None:
        data, _, parts = demo_split(n_sites, alpha, seed)
    sites = [f"site-{i + 1}" for i in range(n_sites)]
    for site_id, part in zip(sites, parts, strict=True):
        datasets.write_folder(Path(root) / site_id / "data", data, np.sort(part))
    return sites


def run_demo(
    workdir: Path, n_sites: int = 3, alpha: float = 0.3, k: int = 4, seed: int = 0, timeout_s: float = 600,
    keep_running: bool = False, broker: str = "auto", ports: dict[str, int] | None = None,
    while_running: Callable[[dict], None] | None = None, log=print, forget: bool = True, refine: bool = False,
) -> dict:  # fmt: skip
    """Run the demo in `workdir` (wiped first) and return its figures.

    `ports` fixes the /metrics ports ("hub", "site-1", ...); `while_running(result)` is called before
    the services are stopped (tests scrape them then).
    """
    shutil.rmtree(workdir, ignore_errors=True)
    (workdir / "logs").mkdir(parents=True)
    workdir = workdir.resolve()
    data, sp, parts = demo_split(n_sites, alpha, seed)
    sites = write_site_data(workdir, n_sites, alpha, seed, data, parts)

    broker = Broker(workdir, log, broker)
    services = Services()
    observer = Observer()
    topics = Topics()  # the default prefix, as the generated configs use
    watch = Bus(f"fedge-demo-observer-{os.getpid()}", broker.settings(), persistent=False)
    observer.attach(watch, topics)
    try:
        watch.start()
        if not watch.wait_connected(10):
            raise RuntimeError("could not connect to the broker")
        ports = ports or {"hub": free_port(), **{s: free_port() for s in sites}}
        b = broker.settings().model_dump(exclude_none=True)
        operator = signing.write_keypair(workdir / "keys" / "operator.pem")  # who may ask the sites to forget
        hub_conf = {"state_dir": str(workdir / "hub"), "broker": b, "metrics_host": "127.0.0.1", "metrics_port": ports["hub"],
                    "rounds": {"min_sites": n_sites, "refine": refine}, "synthesis": {"seed": seed}}  # fmt: skip
        (workdir / "hub.yaml").write_text(_yaml(hub_conf))
        services.start("hub", ["hub.cli", "run", "--config", str(workdir / "hub.yaml")], workdir / "logs" / "hub.log")
        for s in sites:
            conf = {"site_id": s, "data_dir": str(workdir / s / "data"), "state_dir": str(workdir / s / "state"), "k": k,
                    "broker": b, "metrics_host": "127.0.0.1", "metrics_port": ports[s],
                    "operator_public_key_files": [str(workdir / "keys" / "operator.pub.pem")]}  # fmt: skip
            (workdir / f"{s}.yaml").write_text(_yaml(conf))
            services.start(
                s, ["edge.cli", "run", "--config", str(workdir / f"{s}.yaml")], workdir / "logs" / f"{s}.log"
            )
        log(f"hub and {n_sites} sites started; logs in {workdir / 'logs'}")
        for name, port in ports.items():
            log(f"  {name:<7} http://127.0.0.1:{port}/metrics")

        t0, seen = time.monotonic(), set()
        phases = RoundPhases(ports["hub"], log, t0)
        # With refinement the sites' statistics make a second, refined model: the demo waits for that one.
        while not observer.done(sites) or (refine and (observer.manifest is None or observer.manifest.version < 2)):
            services.check()
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"no model delivered to every site within {timeout_s:.0f} s; see {workdir / 'logs'}")
            observer.changed.wait(1.0)
            observer.changed.clear()
            phases.show(observer.hub_state)
            for s, st in list(observer.statuses.items()):
                if st.contribution_id and (s, "c") not in seen and st.outbox_depth == 0:
                    seen.add((s, "c"))
                    log(
                        f"{time.monotonic() - t0:6.1f} s  {s}: contribution acknowledged ({st.bytes_sent.get('embeddings', 0):,} B of prototypes)"
                    )
                if "refine" in st.bytes_sent and (s, "r") not in seen and st.outbox_depth == 0:
                    seen.add((s, "r"))
                    log(
                        f"{time.monotonic() - t0:6.1f} s  {s}: refinement statistics acknowledged ({st.bytes_sent['refine']:,} B)"
                    )
            m = observer.manifest
            if m is not None and ("m", m.version) not in seen:
                seen.add(("m", m.version))
                log(
                    f"{time.monotonic() - t0:6.1f} s  hub: model v{m.version} published ({m.size_bytes:,} B ONNX in {len(m.chunks)} chunks)"
                )
            if m is not None and m.gate and m.gate.state != "pending" and ("g", m.version) not in seen:
                seen.add(("g", m.version))
                log(f"{time.monotonic() - t0:6.1f} s  hub: delivery gate on model v{m.version}: {m.gate.state}, "
                    f"{m.gate.reason}")  # fmt: skip
            for (s, v), e in list(observer.evals.items()):
                if (s, "e") not in seen:
                    seen.add((s, "e"))
                    log(
                        f"{time.monotonic() - t0:6.1f} s  {s}: model v{v} verified, {e.accuracy:.1%} on {e.samples} held-out samples"
                    )
        elapsed = time.monotonic() - t0
        services.check()  # a service that died after doing its part still fails the demo
        m = observer.manifest
        assert m is not None
        model_path = workdir / "hub" / "models" / f"v{m.version:04d}" / "model.onnx"
        model = GlobalModel.from_manifest(model_path, m)
        test_acc = model.accuracy(data.images[sp.test], [data.label_names[i] for i in data.labels[sp.test]])
        rows = []
        for s in sites:
            st, e = observer.statuses[s], observer.evals[(s, m.version)]
            rows.append({"site_id": s, "samples": st.samples, "held_out": e.samples,
                         "bytes_sent": sum(st.bytes_sent.get(x, 0) for x in ("embeddings", "eval", "refine")),
                         "bytes_sent_embeddings": st.bytes_sent.get("embeddings", 0),
                         "bytes_received": sum(st.bytes_received.values()), "local_accuracy": e.accuracy,
                         "encoder": st.encoder.model_dump() if st.encoder else None})  # fmt: skip
        result = {
            "sites": rows,
            "global_test_accuracy": test_acc,
            "model_version": m.version,
            "first_model_version": m.version,
            "model_path": str(model_path),
            "model_bytes": m.size_bytes,
            "fedavg_50_rounds_bytes_per_site": 50 * m.fedavg_round_bytes,
            "delivery_gate": {"serve": m.serve, **m.gate.model_dump(exclude={"decided_at"})} if m.gate else None,
            "round_trip_s": round(elapsed, 1),
            "broker": broker.kind,
            "metrics": {name: f"http://127.0.0.1:{port}/metrics" for name, port in ports.items()},
        }
        if forget:
            counts = np.bincount(data.labels[parts[0]], minlength=len(data.label_names))
            label = data.label_names[int(counts.argmax())]  # the first site's most frequent label
            result["forget"] = forget_step(
                watch, topics, observer, services, operator, sites, label, timeout_s, log, t0
            )
            m = observer.manifest
            assert m is not None
            model_path = workdir / "hub" / "models" / f"v{m.version:04d}" / "model.onnx"
            # The sites now run the certified model: it is the demo's model from here on.
            result.update(model_version=m.version, model_path=str(model_path), model_bytes=m.size_bytes)
            result["forget"]["global_test_accuracy_after"] = GlobalModel.from_manifest(model_path, m).accuracy(
                data.images[sp.test], [data.label_names[i] for i in data.labels[sp.test]]
            )
        if while_running is not None:
            while_running(result)
        if keep_running:
            print_table(result)
            log("services keep running; Ctrl-C stops them")
            try:
                while True:
                    services.check()
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        return result
    finally:
        services.stop()
        watch.stop()
        broker.stop()


def forget_step(
    bus: Bus, topics: Topics, observer: Observer, services: Services, operator, sites: list[str], label: str,
    timeout_s: float, log, t0: float,
) -> dict:  # fmt: skip
    """Ask the first site to forget every image of `label`, as its operator would; wait for the receipt, the
    certificate and every site running the certified model."""
    site = sites[0]
    status = observer.statuses[site]
    body = {
        "schema_version": 1, "request_id": new_id(), "site_id": site, "selector": {"kind": "label", "label": label},
        "reason": f"demo: the operator of {site} withdraws every image of label {label}", "issued_at": now().isoformat(),
        "issuer": "fedge demo operator",
    }  # fmt: skip
    payload = json.dumps(signing.sign(body, operator), separators=(",", ":")).encode()
    sent = time.time()
    bus.publish(topics.site(site, "forget/request"), payload)
    log(f"{time.monotonic() - t0:6.1f} s  operator: forget request {body['request_id'][:8]} sent to {site} "
        f"(label {label}, signed)")  # fmt: skip
    deadline = time.monotonic() + timeout_s
    rid = body["request_id"]

    def certified() -> UnlearningCertificate | None:
        return next((c for c, _ in observer.certificates if rid in c.request_ids), None)

    while True:
        services.check()
        cert = certified()
        if rid in observer.receipts and cert is not None and observer.done(sites, cert.model_version_after):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"the forget request was not certified and delivered within {timeout_s:.0f} s")
        observer.changed.wait(1.0)
        observer.changed.clear()
    receipt, receipt_at = observer.receipts[rid]
    cert_at = next(t for c, t in observer.certificates if rid in c.request_ids)
    log(f"{time.monotonic() - t0:6.1f} s  {site}: deleted {receipt.samples_deleted} samples, receipt signed "
        f"({receipt_at - sent:.2f} s after the request)")  # fmt: skip
    log(f"{time.monotonic() - t0:6.1f} s  hub: certificate {cert.certificate_id[:8]}: model v{cert.model_version_after} "
        f"no longer carries {cert.removed_contributions[0][:8]} ({cert_at - sent:.1f} s after the request); "
        "every site runs it")  # fmt: skip
    return {
        "site": site, "label": label, "samples_before": status.samples, "samples_deleted": receipt.samples_deleted,
        "request_to_receipt_s": round(receipt_at - sent, 2), "request_to_certificate_s": round(cert_at - sent, 2),
        "model_version_before": cert.model_version_before, "model_version_after": cert.model_version_after,
        "method": cert.method, "verification": cert.verification, "certificate_id": cert.certificate_id,
    }  # fmt: skip


def print_table(result: dict) -> None:
    """The demo's closing table."""
    print()
    print(
        f"{'site':<8} {'samples':>7} {'held-out':>8} {'bytes sent':>11} {'bytes received':>15} {'local accuracy':>15}"
    )
    for s in result["sites"]:
        print(
            f"{s['site_id']:<8} {s['samples']:>7} {s['held_out']:>8} {s['bytes_sent']:>11,} "
            f"{s['bytes_received']:>15,} {s['local_accuracy']:>15.1%}"
        )
    sent = np.mean([s["bytes_sent"] for s in result["sites"]])
    both = np.mean([s["bytes_sent"] + s["bytes_received"] for s in result["sites"]])
    fed = result["fedavg_50_rounds_bytes_per_site"]
    print()
    print(
        f"global test accuracy:            {result['global_test_accuracy']:.1%}  (model v{result['first_model_version']})"
    )
    print(
        f"bytes sent per site:             {sent:,.0f} B (prototypes, evaluation and any refinement statistics); "
        "no image left a site"
    )
    print(f"traffic per site, up and down:   {both:,.0f} B (the signed model is most of it)")
    print(f"FedAvg, 50 rounds of the CNN:    {fed:,} B per site, up and down ({fed / both:,.1f}x that traffic, "
          f"{fed / sent:,.0f}x the upload)")  # fmt: skip
    print(f"from start to every site running the model: {result['round_trip_s']} s, over {result['broker']}")
    g = result.get("delivery_gate")
    if g:
        served = g["balanced_accuracy"].get(g["serve"]) if g["serve"] else None
        print(f"delivery gate: {g['state']}, serving {g['serve'] or 'nothing new'}"
              + (f" (balanced accuracy {served:.1%} on {g['samples']} pooled held-out samples)" if served else ""))  # fmt: skip
    f = result.get("forget")
    if f:
        print()
        print(
            f"forget request at {f['site']}: every image of label {f['label']} ({f['samples_deleted']} samples deleted)"
        )
        print(
            f"  signed receipt after {f['request_to_receipt_s']} s; certificate after {f['request_to_certificate_s']} s"
        )
        v = f["verification"]
        print(f"  model v{f['model_version_before']} -> v{f['model_version_after']} ({f['method']}): refit from scratch "
              f"differs by {v.get('refit_max_abs_diff', float('nan')):g} (bit-identical: {bool(v.get('refit_bit_identical'))}); "
              f"re-solve {v.get('unlearning_seconds', float('nan')):.2f} s")  # fmt: skip
        print(f"  global test accuracy after forgetting: {f['global_test_accuracy_after']:.1%} (model v{f['model_version_after']}; "
              f"the label is now learnt from the other sites' data only)")  # fmt: skip
    print("metrics endpoints (up while the services run; `fedge-hub demo --keep-running` keeps them):")
    for name, url in result["metrics"].items():
        print(f"  {name:<7} {url}")


def data_main(argv: list[str] | None = None) -> int:
    """Entry for `fedge-hub demo-data DIR`: the demo sites' data folders, for deploy/compose.yml."""
    ap = argparse.ArgumentParser(prog="fedge-hub demo-data", description=data_main.__doc__)
    ap.add_argument("out", type=Path, help="writes OUT/site-1 ... OUT/site-N (each the local data layout)")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    tmp = args.out / ".tmp"
    sites = write_site_data(tmp, args.sites, args.alpha, args.seed)
    for s in sites:
        shutil.rmtree(args.out / s, ignore_errors=True)
        (tmp / s / "data").rename(args.out / s)
    shutil.rmtree(tmp)
    print(f"wrote {', '.join(str(args.out / s) for s in sites)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry for `fedge-hub demo`."""
    ap = argparse.ArgumentParser(
        prog="fedge-hub demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workdir", type=Path, default=Path("var/demo"))
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--broker", choices=["auto", "mosquitto", "embedded"], default="auto",
                    help="auto: Mosquitto when installed, else the embedded Python broker")  # fmt: skip
    ap.add_argument("--keep-running", action="store_true", help="leave the services up until Ctrl-C or SIGTERM")
    ap.add_argument("--no-forget", action="store_true", help="skip the forget request after the first model")
    ap.add_argument("--refine", action="store_true", help="run the closed-form refinement round (rounds.refine)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds each phase may take before the demo gives up")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = ap.parse_args(argv)

    def stop(signum, frame):  # SIGTERM (docker stop, kill, a supervisor) stops the demo as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        result = run_demo(args.workdir, k=args.k, keep_running=args.keep_running, broker=args.broker,
                          forget=not args.no_forget, timeout_s=args.timeout, refine=args.refine)  # fmt: skip
    except KeyboardInterrupt:
        print("demo stopped before it finished; its services are stopped", file=sys.stderr)
        return 130
    except (TimeoutError, RuntimeError) as err:
        print(f"demo failed: {err}", file=sys.stderr)
        return 1
    if not args.keep_running:
        print_table(result)
    if args.json:
        print(json.dumps(result, indent=1))
    return 0
