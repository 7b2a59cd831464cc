"""The hub's Prometheus metrics (prefix `fedge_hub_`, base units). Label sets are initialised up front."""

from __future__ import annotations

import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from contract.payloads import ErrorCode, SiteStatus

INGEST_KINDS = ("embeddings", "eval", "forget/receipt", "status", "refine")
SENT_KINDS = ("model", "errors", "status", "certificate", "refine_request")
ROUND_PHASES = ("synthesis", "training")
CERTIFICATE_REASONS = ("forget_request", "outdated", "irrelevant")
FORGET_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
ERROR_CODES: tuple[str, ...] = ErrorCode.__args__  # type: ignore[attr-defined]
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
WORK_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class _LedgerCollector(Collector):
    def __init__(self, counts: Callable[[], dict[str, int]]):
        self.counts = counts

    def collect(self):
        g = GaugeMetricFamily("fedge_hub_contributions", "Contributions in the ledger, by state.", labels=["state"])
        for state, n in sorted(self.counts().items()):
            g.add_metric([state], n)
        yield g


class SiteCounters(Collector):
    """The sites' own counters, from their latest retained status, re-exported with a `site` label.

    A site behind a factory firewall has one outbound connection (to the broker) and is never scraped;
    its status carries its counters, so the dashboard reads every site from the hub alone. Values are
    those of the site's latest status (published when they change), not of the scrape's instant.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sites: dict[str, SiteStatus] = {}

    def update(self, status: SiteStatus) -> bool:
        """Keep `status` unless a newer one from its site is already kept; whether it was kept."""
        with self._lock:
            old = self._sites.get(status.site_id)
            if old is not None and old.at >= status.at:
                return False
            self._sites[status.site_id] = status
            return True

    def forget_site(self, site_id: str) -> None:
        """Its retained status was cleared: the site is gone."""
        with self._lock:
            self._sites.pop(site_id, None)

    def collect(self):
        with self._lock:
            sites = sorted(self._sites.items())
        p = "fedge_hub_site_"
        sent = CounterMetricFamily(
            p + "sent_bytes", "Payload bytes a site published, by kind (its status).", labels=["site", "kind"]
        )
        recv = CounterMetricFamily(
            p + "received_bytes", "Payload bytes a site received, by kind (its status).", labels=["site", "kind"]
        )
        batches = CounterMetricFamily(
            p + "encoded_batches", "Batches a site encoded since it started.", labels=["site"]
        )
        enc_s = CounterMetricFamily(
            p + "encode_seconds", "Seconds a site spent encoding those batches.", labels=["site"]
        )
        forget = CounterMetricFamily(
            p + "forget_requests", "Forget requests at a site since it started, by outcome.", labels=["site", "result"]
        )
        online = GaugeMetricFamily(
            p + "online", "1 while the site's status says online (its last will says offline).", labels=["site"]
        )
        version = GaugeMetricFamily(
            p + "model_version", "Global model version the site runs (0: none).", labels=["site"]
        )
        accuracy = GaugeMetricFamily(
            p + "local_accuracy", "Accuracy of the site's model on its held-out samples.", labels=["site"]
        )
        outbox = GaugeMetricFamily(
            p + "outbox_depth", "Payloads the site holds that the broker has not acknowledged.", labels=["site"]
        )
        samples = GaugeMetricFamily(p + "samples", "Samples in the site's local index.", labels=["site"])
        unreadable = GaugeMetricFamily(
            p + "unreadable_samples", "Local files the site could not read.", labels=["site"]
        )
        at = GaugeMetricFamily(
            p + "status_timestamp_seconds", "When the site's latest status was written (Unix time).", labels=["site"]
        )
        for site, st in sites:
            for kind, n in sorted(st.bytes_sent.items()):
                sent.add_metric([site, kind], n)
            for kind, n in sorted(st.bytes_received.items()):
                recv.add_metric([site, kind], n)
            batches.add_metric([site], st.encoded_batches)
            enc_s.add_metric([site], st.encode_seconds)
            for result, n in sorted(st.forget_requests.items()):
                forget.add_metric([site, result], n)
            online.add_metric([site], 1.0 if st.state == "online" else 0.0)
            version.add_metric([site], st.model_version or 0)
            if st.local_accuracy is not None:
                accuracy.add_metric([site], st.local_accuracy)
            if st.outbox_depth is not None:
                outbox.add_metric([site], st.outbox_depth)
            if st.samples is not None:
                samples.add_metric([site], st.samples)
            unreadable.add_metric([site], st.unreadable_samples)
            at.add_metric([site], st.at.timestamp())
        yield from (sent, recv, batches, enc_s, forget, online, version, accuracy, outbox, samples, unreadable, at)


class HubMetrics:
    """Every metric the hub exports, on its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.messages = Counter(
            "fedge_hub_messages", "Messages from sites, by kind and outcome.", ["kind", "result"], registry=r
        )
        self.rejections = Counter("fedge_hub_rejections", "Rejected messages, by reason code.", ["code"], registry=r)
        self.received_bytes = Counter(
            "fedge_hub_received_bytes", "Payload bytes received, by kind.", ["kind"], registry=r
        )
        self.sent_bytes = Counter("fedge_hub_sent_bytes", "Payload bytes published, by kind.", ["kind"], registry=r)
        self.ingest_latency = Histogram(
            "fedge_hub_publish_to_ingest_seconds", "From a contribution's created_at to its durable ingest.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.synthesis = Histogram(
            "fedge_hub_synthesis_seconds", "Synthesis time per round.", buckets=WORK_BUCKETS, registry=r
        )
        self.training = Histogram(
            "fedge_hub_training_seconds", "Training time per round.", buckets=WORK_BUCKETS, registry=r
        )
        self.round_seconds = Histogram(
            "fedge_hub_round_seconds", "From the start of a round to its model delivered to the broker.",
            buckets=WORK_BUCKETS, registry=r,
        )  # fmt: skip
        self.rounds = Counter("fedge_hub_rounds", "Rounds finished, by result.", ["result"], registry=r)
        self.round_progress = Gauge(
            "fedge_hub_round_progress", "Fraction of the running round's phase done (0 when no round runs).",
            ["phase"], registry=r,
        )  # fmt: skip
        self.model_version = Gauge("fedge_hub_model_version", "Version of the published global model.", registry=r)
        self.connected = Gauge("fedge_hub_broker_connected", "1 while connected to the broker.", registry=r)
        self.fedavg_round_bytes = Gauge(
            "fedge_hub_fedavg_round_bytes", "Bytes one FedAvg round of the current model would cost a site (up + down).",
            registry=r,
        )  # fmt: skip
        self.federated_accuracy = Gauge(
            "fedge_hub_federated_accuracy", "Accuracy of the current model on sites' held-out samples, sample-weighted.",
            registry=r,
        )  # fmt: skip
        # The delivery gate (docs/delivery-gate.md): pooled over the sites' held-out samples.
        self.federated_balanced_accuracy = Gauge(
            "fedge_hub_federated_balanced_accuracy",
            "Balanced accuracy (mean recall over labels) of each head of the newest model, pooled over the sites' "
            "held-out samples; `served` says which head the sites serve (1) and which not (0).",
            ["head", "served"], registry=r,
        )  # fmt: skip
        self.federated_recall = Gauge(
            "fedge_hub_federated_recall", "Recall of each label by the served head, pooled over the sites' held-out "
            "samples.", ["label"], registry=r,
        )  # fmt: skip
        self.gate_decisions = Counter(
            "fedge_hub_delivery_gate_total", "Delivery gate decisions by state (served, at_chance, unchecked).",
            ["state"], registry=r,
        )  # fmt: skip
        self.forget_to_receipt = Histogram(
            "fedge_hub_forget_request_to_receipt_seconds", "From a forget request's issued_at to the site's receipt.",
            buckets=FORGET_BUCKETS, registry=r,
        )  # fmt: skip
        self.forget_to_certificate = Histogram(
            "fedge_hub_forget_request_to_certificate_seconds",
            "From a forget request's issued_at to the certificate of a model without its data.",
            buckets=FORGET_BUCKETS, registry=r,
        )  # fmt: skip
        self.unlearning_seconds = Histogram(
            "fedge_hub_unlearning_seconds", "Time to re-solve the model without the forgotten contributions.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.framu_attention = Gauge(
            "fedge_hub_framu_attention", "FRAMU's noise-free attention of each site's active contribution (0 to 1).",
            ["site"], registry=r,
        )  # fmt: skip
        self.framu_decisions = Counter(
            "fedge_hub_framu_decisions", "FRAMU's decisions, by reason and action (unlearned in auto, recommended).",
            ["reason", "action"], registry=r,
        )  # fmt: skip
        self.framu_reward = Gauge(
            "fedge_hub_framu_reward", "The sites' reported accuracy of the newest model, aggregated as FRAMU's reward (docs/framu.md).",
            registry=r,
        )  # fmt: skip
        self.framu_td_error = Gauge("fedge_hub_framu_td_error", "TD error of FRAMU's last update.", registry=r)
        for reason in ("outdated", "irrelevant"):
            for action in ("unlearned", "recommended"):
                self.framu_decisions.labels(reason, action)
        self.certificates = Counter(
            "fedge_hub_certificates", "Unlearning certificates published, by reason.", ["reason"], registry=r
        )
        self.sites = SiteCounters()
        r.register(self.sites)
        for reason in CERTIFICATE_REASONS:
            self.certificates.labels(reason)
        for k in INGEST_KINDS:
            self.received_bytes.labels(k)
            for res in ("accepted", "duplicate", "rejected"):
                self.messages.labels(k, res)
        for k in SENT_KINDS:
            self.sent_bytes.labels(k)
        for c in ERROR_CODES:
            self.rejections.labels(c)
        for res in ("done", "failed"):
            self.rounds.labels(res)
        for phase in ROUND_PHASES:
            self.round_progress.labels(phase)

    def watch_ledger(self, counts: Callable[[], dict[str, int]]) -> None:
        """Export contributions by state straight from the ledger at scrape time."""
        self.registry.register(_LedgerCollector(counts))
