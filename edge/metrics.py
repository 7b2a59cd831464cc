"""The edge's Prometheus metrics (prefix `fedge_edge_`, base units). Label sets are initialised up front."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

SENT_KINDS = ("embeddings", "eval", "status", "forget_receipt", "errors", "refine")
RECEIVED_KINDS = ("model", "errors", "status", "forget", "refine")
MESSAGE_KINDS = ("hub_status", "model", "errors", "forget", "refine")
OUTCOMES = ("accepted", "duplicate", "rejected")


class EdgeMetrics:
    """Every metric the edge exports, on its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.sent_bytes = Counter(
            "fedge_edge_sent_bytes", "Payload bytes the broker acknowledged, by kind.", ["kind"], registry=r
        )
        self.received_bytes = Counter(
            "fedge_edge_received_bytes", "Payload bytes received, by kind.", ["kind"], registry=r
        )
        self.encode_seconds = Histogram(
            "fedge_edge_encode_seconds", "Time to encode one batch of new samples.",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60), registry=r,
        )  # fmt: skip
        self.encoded_samples = Counter("fedge_edge_encoded_samples", "Samples encoded.", registry=r)
        self.unreadable_samples = Counter(
            "fedge_edge_unreadable_samples", "Local files that could not be read.", registry=r
        )
        self.resized_samples = Counter(
            "fedge_edge_resized_samples", "Local images resized to the encoder's input (contract/layout.fit_image).",
            registry=r,
        )  # fmt: skip
        self.skipped_labels = Gauge(
            "fedge_edge_skipped_labels", "Labels left out of the contribution: fewer samples than min_group_size.",
            registry=r,
        )  # fmt: skip
        self.scan_failures = Counter(
            "fedge_edge_scan_failures", "Scans or contributions that failed unexpectedly (see the log).", registry=r
        )
        self.contributions = Counter("fedge_edge_contributions", "Contributions queued for publishing.", registry=r)
        self.hub_errors = Counter(
            "fedge_edge_hub_errors", "Rejections the hub reported for this site, by code.", ["code"], registry=r
        )
        self.model_rejections = Counter(
            "fedge_edge_model_rejections",
            "Delivered models, manifests or chunks refused (signature, hash, load).",
            registry=r,
        )
        self.messages = Counter(
            "fedge_edge_messages", "Messages from the hub, by kind and outcome.", ["kind", "result"], registry=r
        )
        self.rejections = Counter(
            "fedge_edge_rejections", "Hub messages refused, by kind and reason code.", ["kind", "code"], registry=r
        )
        self.handler_failures = Counter(
            "fedge_edge_handler_failures", "Messages whose handler failed unexpectedly (acknowledged; see the log).",
            registry=r,
        )  # fmt: skip
        self.forget_requests = Counter(
            "fedge_edge_forget_requests", "Forget requests, by outcome (rejections by code: fedge_edge_rejections_total).",
            ["result"], registry=r,
        )  # fmt: skip
        self.forget_seconds = Histogram(
            "fedge_edge_forget_seconds", "From a forget request persisted to its signed receipt queued for publishing.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600), registry=r,
        )  # fmt: skip
        self.forgotten_samples = Counter(
            "fedge_edge_forgotten_samples", "Samples deleted for forget requests (files, index rows, embeddings).",
            registry=r,
        )  # fmt: skip
        self.forget_failures = Counter(
            "fedge_edge_forget_failures", "Forget executions that failed and will be retried (see the log).", registry=r
        )
        self.outbox_depth = Gauge(
            "fedge_edge_outbox_depth", "Payloads waiting for the broker's acknowledgement.", registry=r
        )
        self.connected = Gauge("fedge_edge_broker_connected", "1 while connected to the broker.", registry=r)
        self.samples = Gauge("fedge_edge_samples", "Samples in the local index.", ["split"], registry=r)
        self.model_version = Gauge(
            "fedge_edge_model_version", "Version of the installed global model (0: none).", registry=r
        )
        self.local_accuracy = Gauge(
            "fedge_edge_local_accuracy", "Accuracy of the installed model on held-out local samples.", registry=r
        )
        for k in SENT_KINDS:
            self.sent_bytes.labels(k)
        for k in RECEIVED_KINDS:
            self.received_bytes.labels(k)
        for k in MESSAGE_KINDS:
            for res in OUTCOMES:
                self.messages.labels(k, res)
        for res in OUTCOMES:
            self.forget_requests.labels(res)
        for s in ("train", "holdout"):
            self.samples.labels(s)
