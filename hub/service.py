"""`fedge-hub run`: ingest contributions from MQTT, run rounds by policy, deliver models, collect evaluations.

Threads: paho's network thread runs the message handlers (validate, write the ledger, then the
message is acknowledged); the main loop checks the round policy, runs rounds and publishes. Core
work (synthesis, training, registry) is the same code the core-loop demo and the benchmark run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from contract import signing
from contract.payloads import (
    Contribution,
    EncoderInfo,
    ErrorReport,
    GateDecision,
    HubStatus,
    ModelManifest,
    UnlearningCertificate,
    new_id,
    now,
)
from contract.scores import recalls
from contract.topics import Topics
from hub.config import HubSettings
from hub.delivery import clear_messages, model_messages
from hub.delivery.gate import Decision, choose, pooled
from hub.delivery.heads import add_linear_head, add_nearest_prototype, roles_with
from hub.intake import Rejected, parse_contribution, parse_evaluation, parse_site_status
from hub.learning.exact import ExactModel
from hub.ledger import Ledger
from hub.metrics import ROUND_PHASES, HubMetrics
from hub.refinement import Projection, RefinedModel, Refinement
from hub.registry import ModelRegistry, ModelVersion
from hub.unlearning import Unlearning
from runtime.mqtt import Bus, Message, NotConnected
from runtime.outcomes import Outcome, guarded

log = logging.getLogger("fedge.hub")
ROUND_RETRY_S = 60.0


class Stopping(Exception):
    """Raised at a safe point of a round when the service is asked to stop."""


def resolve_device(name: str) -> str:
    """`auto` is cuda when torch sees a GPU, else cpu."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cnn_parameters(image_size: int, n_classes: int) -> int:
    """Weights of the bench's SmallCNN for this task: what one FedAvg round would exchange instead of prototypes."""
    from hub.classifier import SmallCNN

    return int(sum(p.numel() for p in SmallCNN(image_size, n_classes).parameters()))


class HubService:
    """One hub worker."""

    def __init__(self, settings: HubSettings, metrics: HubMetrics | None = None):
        import bundled
        from hub.foundation.bundle import load as load_foundation
        from hub.rounds import TrainConfig
        from hub.synthesis import SynthesisConfig, Synthesizer

        self.settings = s = settings
        self.topics = Topics(s.topic_prefix)
        self.metrics = metrics or HubMetrics()
        self.ledger = Ledger(s.state_dir / "ledger.sqlite")
        self.registry = ModelRegistry(s.state_dir / "models")
        self.device = resolve_device(s.device)
        syn = s.synthesis
        synth_cfg = SynthesisConfig(
            samples_per_count=syn.samples_per_count, guidance=syn.guidance, steps=syn.steps, seed=syn.seed
        )
        cache = s.state_dir / "synthesis-cache"
        if s.backend == "stable-diffusion":
            from hub.foundation import stable_diffusion as sd

            assert s.stable_diffusion is not None  # the settings validator guarantees it
            c = s.stable_diffusion
            self.foundation = sd.load(c.model_dir, c.encoders_dir, self.device, c.image_size)
            self.synthesizer = sd.SDSynthesizer(self.foundation, synth_cfg, cache_dir=cache, progress=False)
        else:
            from hub.foundation.manifest import has_image_generator
            from hub.learning.feature_synthesis import FeatureSynthesisConfig, synthesizer_for_bundle

            path = bundled.resolve(s.foundation)
            if s.model == "cnn" and not has_image_generator(path):
                raise ValueError(
                    f"model cnn trains on synthetic images, and the bundle {path} has no image generator; "
                    "use model closed_form (it synthesizes in the encoder's feature space)"
                )
            # A bundle without an image generator (the general encoder), or `closed_form.synthesis: features`:
            # synthetic embeddings around the prototypes (hub/learning/feature_synthesis.py, docs/feature-synthesis.md).
            feats = None
            if s.model == "closed_form":
                fcfg = FeatureSynthesisConfig(samples_per_count=syn.samples_per_count, seed=syn.seed)
                cf = s.closed_form
                feats = synthesizer_for_bundle(path, cf.synthesis, syn.seed, cf.feature_generator, fcfg)
            if feats is not None:
                self.foundation, self.synthesizer = feats.foundation, feats
            else:
                self.foundation = load_foundation(path, device=self.device)
                self.synthesizer = Synthesizer(self.foundation, synth_cfg, cache_dir=cache, progress=False)
        self.encoders = {self.foundation.encoder_id: self.foundation.dim}
        self.train_config = TrainConfig(epochs=syn.epochs, seed=syn.seed)
        self.trainer = None  # the closed-form model (hub/learning/exact.py); None: the CNN, retrained each round
        if s.model == "closed_form":
            from hub.learning.exact import ExactConfig, ExactTrainer

            cf = s.closed_form
            cfg = ExactConfig(cf.n_features, cf.bandwidth, cf.variant, cf.lam, syn.seed, cf.threads)
            encoder_onnx = bundled.resolve(s.foundation) / "encoder.onnx"
            self.trainer = ExactTrainer(self.synthesizer, encoder_onnx, cfg, s.state_dir / "statistics")
        self.metrics.watch_ledger(self.ledger.counts_by_state)
        self.signing_key, created = signing.load_or_create_private_key(s.signing_key_path())
        self.key_id = signing.key_id(self.signing_key.public_key())
        self.refinement: Refinement | None = None  # the closed-form refinement round (rounds.refine)
        if s.rounds.refine and self.trainer is not None:
            r = s.rounds
            self.refinement = Refinement(
                self.ledger, Projection(self.trainer.feature_map, r.refine_dim, syn.seed, r.refine_features),
                self.trainer.encoder_onnx, self.foundation.encoder_id, self.signing_key, s.min_group_size,
                s.max_payload_bytes, r.refine_wait_s, s.closed_form.variant, r.refine_lam, tuple(r.refine_lams),
                r.refine_refit,
            )  # fmt: skip
        self.unlearning = Unlearning(
            self.ledger, self.signing_key, s.hub_id, self.trainer, s.site_keys_dir,
            verify_refit=s.closed_form.verify_refit, synthesizer=self.synthesizer, refinement=self.refinement,
        )  # fmt: skip
        from hub.framu.loop import FramuLoop

        self.framu = FramuLoop(s.framu, self.ledger, s.synthesis.seed, self.metrics)
        if created:
            log.warning("created the hub's signing key %s at %s (public half beside it: give it to the sites)",
                        self.key_id, s.signing_key_path())  # fmt: skip
        self.stop_event = threading.Event()
        self._republish = threading.Event()
        self._pending_since: float | None = None
        self._waiting_logged: int | None = None  # active sites when "waiting for sites" was last said
        self._failed: tuple[set[str], float] | None = None  # contributions of the last failed round, and when
        self._state = "online"
        self._round_id: int | None = None  # the round being trained, for progress lines
        self._gate_since: dict[int, float] = {}  # model version -> when it went out for the gate's evaluations
        self._gate_decided: int | None = None  # the newest version the gate has decided on
        self._progress_logged = 0.0
        self.session_id = new_id()
        self.bus = Bus(
            f"fedge-hub-{s.hub_id}",
            s.broker,
            will=(self.topics.hub_status, self._status("offline").model_dump_json().encode()),
            on_connect=self._on_connect,
            on_state=lambda up: self.metrics.connected.set(1 if up else 0),
            on_handler_error=lambda msg, err: self.metrics.rejections.labels("internal").inc(),
        )
        latest = self.registry.latest()
        self._latest_version = latest.version if latest else None  # kept here: the main loop asks every poll
        if latest is not None:
            self.metrics.model_version.set(latest.version)

    # --- status ---
    def _status(self, state: str) -> HubStatus:
        latest = self.registry.latest()
        return HubStatus(
            message_id=new_id(),
            hub_id=self.settings.hub_id,
            session_id=self.session_id,
            state=state,
            at=now(),
            model_version=latest.version if latest else None,
            active_contributions=self.ledger.counts_by_state()["active"],
            waiting_for_sites=self._waiting_for_sites(),
            encoders=[EncoderInfo(encoder_id=e, dim=d) for e, d in sorted(self.encoders.items())],
            min_group_size=self.settings.min_group_size,
            key_id=self.key_id,
            public_key=signing.public_pem(self.signing_key.public_key()),
            delivery=self._gate_status(latest.version) if latest else None,
        )

    def _gate_status(self, version: int) -> GateDecision | None:
        """The gate's word on model `version` for the hub status (None when the gate is off)."""
        if not self.settings.delivery.enabled:
            return None
        decided = self.ledger.gate_decision(version)
        if decided is None:
            return GateDecision(state="pending", reason="the sites are evaluating its heads")
        return GateDecision.model_validate({k: v for k, v in decided.items() if k in GateDecision.model_fields})

    def _publish_status(self, state: str) -> None:
        self._state = state
        payload = self._status(state).model_dump_json().encode()
        try:
            self.bus.publish(self.topics.hub_status, payload, retain=True)
            self.metrics.sent_bytes.labels("status").inc(len(payload))
        except NotConnected as err:
            log.warning("hub status not published: %s", err)

    def _waiting_for_sites(self) -> int | None:
        """Sites still missing before the policy starts a round on new input; None when nothing waits."""
        active = self.ledger.active_ids()
        if not active or active == (self.ledger.last_trained_set() or set()):
            return None
        return max(0, self.settings.rounds.min_sites - len(active)) or None

    def health(self) -> tuple[bool, dict]:
        """For /healthz: healthy while connected to the broker and no message has been stuck in intake too long."""
        latest = self.registry.latest()
        busy = self.bus.handler_busy_for()
        stalled = busy > self.settings.intake_stall_s
        return self.bus.connected and not stalled, {
            "broker_connected": self.bus.connected,
            "intake_stalled_s": round(busy, 1) if stalled else 0,
            "state": self._state,
            "model_version": latest.version if latest else None,
        }

    # --- inbound (paho network thread) ---
    def _on_connect(self) -> None:
        self.session_id = new_id()
        self._republish.set()  # the broker may have lost its retained messages: the main loop republishes

    def handlers(self) -> dict[str, Callable[[Message], None]]:
        """The intake handler of each site message kind the hub reads (bench/fuzz drives these directly)."""
        kinds = (
            ("embeddings", self._ingest_contribution), ("eval", self._ingest_evaluation),
            ("forget/receipt", self._ingest_receipt), ("refine", self._ingest_refinement),
        )  # fmt: skip
        guarded_handlers = {kind: guarded(kind, self._from_site(apply), self._report) for kind, apply in kinds}
        # A site's status is retained by design (and its last will too): read, never refused for that.
        guarded_handlers["status"] = guarded("status", self._site_status, self._report)
        return guarded_handlers

    def _subscribe(self) -> None:
        t, v5 = self.topics, self.bus.v5
        for kind, handler in self.handlers().items():
            f = t.all_sites(kind)
            # Every worker reads every site's status (each re-exports the sites' counters); the rest is shared.
            shared = v5 and kind != "status"
            self.bus.subscribe(t.shared(f, self.settings.share_group) if shared else f, handler)

    def _from_site(self, apply: Callable[[str, bytes], Outcome]) -> Callable[[Message], Outcome]:
        """Checks every site message needs before `apply(site_id, payload)`: a valid site topic, not a retained replay."""

        def checked(msg: Message) -> Outcome:
            parsed = self.topics.parse_site(msg.topic)
            if parsed is None:
                raise Rejected(
                    "invalid", f"{msg.topic[:200]!r} is not a valid site topic; no errors topic to answer on"
                )
            if msg.retain:
                raise Rejected(
                    "retained",
                    "a retained message on a site topic is replayed on every subscribe and is ignored; publish "
                    "without retain, and clear this one by publishing an empty retained message to the topic",
                )
            return apply(parsed[0], msg.payload)

        return checked

    def _report(self, kind: str, msg: Message, outcome: Outcome, err: Rejected | None) -> None:
        """Count every outcome; record a rejection in the ledger and answer it on the sender's `errors` topic."""
        self.metrics.received_bytes.labels(kind).inc(len(msg.payload))
        self.metrics.messages.labels(kind, outcome).inc()
        if err is None:
            return
        self.metrics.rejections.labels(err.code).inc()
        parsed = self.topics.parse_site(msg.topic)
        site_id = parsed[0] if parsed else None
        log.warning("rejected %s from %s: %s: %s", kind, site_id or msg.topic[:120], err.code, err.reason)
        sha = hashlib.sha256(msg.payload).hexdigest()
        ref = err.ref_id if err.ref_id and len(err.ref_id) <= 64 else None
        if site_id is None:
            self.ledger.reject_raw(new_id(), "", msg.topic, err.code, err.reason, ref, sha, len(msg.payload))
            return
        report = ErrorReport(
            error_id=new_id(), site_id=site_id, at=now(), topic=msg.topic, code=err.code, reason=err.reason,  # type: ignore[arg-type]
            ref_id=ref, payload_sha256=sha, payload_bytes=len(msg.payload),
        )  # fmt: skip
        body = report.model_dump_json().encode()
        try:
            self.ledger.reject(report)
        finally:  # the sender hears why even when the record could not be written
            self.bus.publish_nowait(self.topics.site(site_id, "errors"), body)
            self.metrics.sent_bytes.labels("errors").inc(len(body))

    def _site_status(self, msg: Message) -> Outcome:
        """A site's status: its counters are re-exported with a `site` label (hub/metrics.py: SiteCounters)."""
        parsed = self.topics.parse_site(msg.topic)
        if parsed is None:
            raise Rejected("invalid", f"{msg.topic[:200]!r} is not a valid site topic; no errors topic to answer on")
        if not msg.payload:  # its retained status cleared: the site was decommissioned
            self.metrics.sites.forget_site(parsed[0])
            return "accepted"
        status = parse_site_status(msg.payload, parsed[0])
        return "accepted" if self.metrics.sites.update(status) else "duplicate"

    def _ingest_contribution(self, site_id: str, payload: bytes) -> Outcome:
        s = self.settings
        c = parse_contribution(payload, site_id, self.encoders, s.max_payload_bytes, s.min_group_size)
        if not self.ledger.ingest(c, payload):
            return "duplicate"
        self.metrics.ingest_latency.observe(max(0.0, time.time() - c.created_at.timestamp()))
        log.info(
            "contribution %s from %s: %d labels, %d samples", c.contribution_id[:8], site_id, len(c.labels), c.n_samples
        )
        return "accepted"

    def _ingest_receipt(self, site_id: str, payload: bytes) -> Outcome:
        outcome, latency = self.unlearning.ingest_receipt(site_id, payload)
        if latency is not None:
            self.metrics.forget_to_receipt.observe(latency)
        return outcome

    def _ingest_refinement(self, site_id: str, payload: bytes) -> Outcome:
        if self.refinement is None:
            raise Rejected("stale", "this hub runs no refinement round (rounds.refine is off); nothing was recorded")
        return self.refinement.ingest(site_id, payload)

    def _ingest_evaluation(self, site_id: str, payload: bytes) -> Outcome:
        versions = set(self.registry.versions())
        # Each head's confusion matrix is labels^2 counts: evaluations may be as large as contributions.
        e = parse_evaluation(payload, site_id, versions, max(16 * 1024, self.settings.max_payload_bytes))
        if e.heads:
            meta = self.registry.get(e.model_version).manifest
            heads, n = set(meta.get("heads") or {"logits": "candidate"}), len(meta["labels"])
            unknown = sorted(set(e.heads) - heads)
            wrong = sorted(h for h, m in e.heads.items() if len(m) != n)
            if unknown or wrong:
                raise Rejected("invalid", f"evaluation of model v{e.model_version}: "
                               + (f"heads {unknown} are not the model's ({sorted(heads)})" if unknown else
                                  f"heads {wrong} are not {n}x{n} confusion matrices (the model's labels)"),
                               ref_id=e.eval_id)  # fmt: skip
        if not self.ledger.record_evaluation(e):
            return "duplicate"
        rows = [r for r in self.ledger.evaluations(e.model_version) if r["accuracy"] is not None and r["samples"]]
        if rows and e.model_version == max(versions):
            n = sum(r["samples"] for r in rows)
            self.metrics.federated_accuracy.set(sum(r["accuracy"] * r["samples"] for r in rows) / n)
        log.info(
            "evaluation from %s: model v%d, accuracy %s on %d samples", site_id, e.model_version, e.accuracy, e.samples
        )
        return "accepted"

    # --- rounds (main thread) ---
    def check_policy(self, now: float) -> str | None:
        """Request a round when the active contributions changed and the policy says so; the trigger or None."""
        active = self.ledger.active_ids()  # every poll: ids only, no payload parsing
        if active == (self.ledger.last_trained_set() or set()) or not active:
            self._pending_since = None
            return self._check_refinement(now, active)
        if self._failed is not None and self._failed[0] == active and now - self._failed[1] < ROUND_RETRY_S:
            return None  # the same contributions just failed a round: retry later, not every poll
        if self._pending_since is None:
            self._pending_since = now
        p = self.settings.rounds
        trigger = None
        last_trained = self.ledger.last_trained_set() or set()
        if self.unlearning.wants_round(active, last_trained):
            trigger = "forget"  # a forget request is honoured now, whatever the site minimum
        elif self.framu.wants_unlearning_round(last_trained):
            trigger = "framu"  # FRAMU unlearned a contribution the current model carries: now, likewise
        elif len(active) >= p.min_sites:
            trigger = "min_sites"
        elif p.deadline_s is not None and now - self._pending_since >= p.deadline_s:
            trigger = "deadline"
        if trigger:
            self.ledger.request_round(trigger)
        elif self._waiting_logged != len(active):
            self._waiting_logged = len(active)
            log.info("new input from %d site(s); waiting for %d more before a round (rounds.min_sites=%d%s)",
                     len(active), p.min_sites - len(active), p.min_sites,
                     f", or {p.deadline_s:g} s" if p.deadline_s else "; `fedge-hub round start` runs one now")  # fmt: skip
            self._publish_status(self._state)
        return trigger

    def _check_refinement(self, now: float, active: set[str]) -> str | None:
        """With the contributions unchanged: a round when new refinement statistics are ready (rounds.refine)."""
        if self.refinement is None or not active:
            return None
        if self._failed is not None and self._failed[0] == active and now - self._failed[1] < ROUND_RETRY_S:
            return None
        if not self.refinement.wants_round(now, self.ledger.active_sites()):
            return None
        self.ledger.request_round("refine")
        return "refine"

    def run_round(self, round_id: int) -> ModelVersion | None:
        """Train on the active contributions and publish the model (and any certificate); the ledger records it."""
        contributions = [c for c in self.ledger.active() if c.labels]
        ids = [c.contribution_id for c in contributions]
        if not contributions:
            self.ledger.finish_round(round_id, ids, None, "no active contribution carries samples")
            self.metrics.rounds.labels("failed").inc()
            return None
        before = self.registry.latest()
        trigger = self.ledger.round_trigger(round_id)
        relearn = trigger == "framu" and self.framu.mode == "auto"  # same data, new weights
        refine_ids = sorted(self.refinement.active_ids()) if self.refinement is not None else None
        refine_same = refine_ids is None or set(refine_ids) == self.ledger.last_refined_set()
        if before is not None and set(ids) == (self.ledger.last_trained_set() or set()) and not relearn and refine_same:
            # A second `round start` with nothing new would ship an identical model under a new version.
            log.info("round %d: nothing changed since model v%d; not retrained", round_id, before.version)
            self.ledger.finish_round(round_id, ids, before.version, refinements=refine_ids)
            return None
        self._publish_status("training")
        self._round_id, self._progress_logged = round_id, time.monotonic()
        started = time.perf_counter()
        log.info(
            "round %d: %d contributions from %d sites", round_id, len(ids), len({c.site_id for c in contributions})
        )
        weights, attention = self.framu.round_weights(round_id, contributions)
        try:
            version, exact = self._train(contributions, round_id, weights, attention)
        except Stopping:
            self._progress_idle()
            redo = self.ledger.interrupt_round(round_id, "hub stopped during the round; redone on the next start")
            log.warning("round %d interrupted by a stop; requested again as round %d", round_id, redo)
            return None
        except Exception as err:  # a failed round is recorded and reported, the hub keeps serving
            self._progress_idle()
            log.exception("round %d failed; the same contributions are retried in %d s", round_id, ROUND_RETRY_S)
            self._failed = (set(ids), time.monotonic())
            self.ledger.finish_round(round_id, ids, None, f"{type(err).__name__}: {err}", refine_ids)
            self.metrics.rounds.labels("failed").inc()
            self._publish_status("online")
            return None
        # A refined model is solved from the sites' refinement statistics only: those are what it was trained on.
        refined = isinstance(exact, RefinedModel)
        trained_on = exact.trained_on if refined else ids  # type: ignore[union-attr]
        self.ledger.record_model_version(
            version.version, version.manifest["method"], trained_on, exact.stats_digests if exact else None,
            exact.training_digest if exact else None, json.dumps(version.manifest).encode(),
            exact.weights if exact else None,
        )  # fmt: skip
        self.ledger.finish_round(
            round_id,
            ids,
            version.version,
            refinements=exact.trained_on if refined else refine_ids,  # type: ignore[union-attr]
        )
        self._progress_idle()
        self.metrics.rounds.labels("done").inc()
        self.metrics.model_version.set(version.version)
        self._latest_version = version.version
        # Certificates are signed and recorded before the model goes out, so that a delivery cut short
        # (the broker gone) loses none: they follow the model on the wire, now or when it is republished.
        v_before = before.version if before else None
        certified = [
            c
            for c, _ in self.unlearning.certify(
                version.version, version.sha256, v_before, trained_on, contributions, exact
            )
        ]
        certified += [c for c, _, _ in self.unlearning.certify_automatic(
            version.version, version.sha256, v_before, trained_on, contributions, exact)]  # fmt: skip
        for cert in certified:
            self.metrics.certificates.labels(cert.reason).inc()
            if cert.requested_at is not None:
                self.metrics.forget_to_certificate.observe((cert.issued_at - cert.requested_at).total_seconds())
            if exact is not None:
                self.metrics.unlearning_seconds.observe(cert.verification.get("unlearning_seconds", 0.0))
        # FRAMU's weights shape the synthesis model only; a refined model is solved from the statistics unweighted.
        self.framu.after_round(version.version, None if refined else weights, attention, contributions, trigger or "",
                               heads=version.manifest.get("heads"))  # fmt: skip
        self.deliver(version)
        self.metrics.round_seconds.observe(time.perf_counter() - started)
        self._publish_certificates(version.version)
        self._publish_status("online")
        return version

    def _publish_certificates(self, version: int) -> None:
        """Publish the certificates that name model `version` (after the model); tell FRAMU's sites why."""
        for body in self.ledger.certificates_for(version):
            self.bus.publish(self.topics.hub_certificate, body)
            self.metrics.sent_bytes.labels("certificate").inc(len(body))
            cert = UnlearningCertificate.model_validate_json(body)
            if cert.reason in ("outdated", "irrelevant"):
                self._tell_unlearned(cert)

    def _tell_unlearned(self, cert: UnlearningCertificate) -> None:
        """Tell a site, on its errors topic, that FRAMU unlearned its contribution, why, and with which figures."""
        cid = cert.removed_contributions[0]
        site = self.ledger.contribution_site(cid)
        if site is None:
            return
        figures = ", ".join(
            f"{k.removeprefix('framu_')} {v:.3g}"
            for k, v in sorted(cert.verification.items())
            if k.startswith("framu_")
        )
        reason = (
            f"FRAMU unlearned contribution {cid} as {cert.reason}: its attention stayed below the threshold "
            f"({figures}); model v{cert.model_version_after} no longer carries it (certificate "
            f"{cert.certificate_id}). Data that changed makes a new contribution, which is weighed afresh; an "
            "operator can pin a site (`fedge-hub framu pin`)."
        )
        sha, size = self.ledger.contribution_payload_info(cid) or ("0" * 64, 0)
        report = ErrorReport(
            error_id=new_id(), site_id=site, at=now(), topic=self.topics.site(site, "embeddings"), code="unlearned",
            reason=reason[:2000], ref_id=cid, payload_sha256=sha, payload_bytes=size,
        )  # fmt: skip
        body = report.model_dump_json().encode()
        self.bus.publish_nowait(self.topics.site(site, "errors"), body)
        self.metrics.sent_bytes.labels("errors").inc(len(body))

    def _train(
        self,
        contributions: list[Contribution],
        round_id: int,
        weights: dict[str, float] | None = None,
        attention: dict[str, float] | None = None,
    ) -> tuple[ModelVersion, ExactModel | None]:
        """A new model version from `contributions`: the closed-form model (weighted by FRAMU in mode auto), or
        the CNN retrained from scratch."""
        from hub.rounds import publish, run_round

        extra: dict = {"foundation": self.foundation.encoder_id, "round": round_id}
        if attention:
            extra["framu"] = {"mode": self.framu.mode, "attention": attention, "weights": weights}
        if self.trainer is None:
            result = run_round(contributions, self.synthesizer, self.train_config, self._checkpoint, self._progress)
            self._checkpoint()
            version = publish(result, self.registry, contributions, {**extra, "method": "retrain_exact"})
            self.metrics.synthesis.observe(result.synthesis_s)
            self.metrics.training.observe(result.training_s)
            log.info("round %d: model v%d (%d synthetic samples, %.1f s + %.1f s)", round_id, version.version,
                     len(result.synthetic.labels), result.synthesis_s, result.training_s)  # fmt: skip
            return version, None
        if self.refinement is not None:
            refined = self.refinement.fit({lp.label for c in contributions for lp in c.labels})
            if refined is not None:
                return self._publish_refined(refined, extra, round_id), refined
        # Each contribution's statistics (synthesis, then features) once, with progress; the fit then reads them.
        with_samples = sorted((c for c in contributions if c.labels), key=lambda c: c.contribution_id)
        for i, c in enumerate(with_samples):
            self.trainer.stats(c, self._checkpoint)
            self._progress("synthesis", i + 1, len(with_samples))
        exact = self.trainer.fit(contributions, self._checkpoint, weights=weights)
        if self.refinement is not None:  # sites run its projected features for the refinement round
            exact.onnx = self.refinement.prepare(exact.onnx)
            extra["refinement"] = self._refinement_meta()
        loo = self._with_loo_heads(exact, contributions, weights)
        exact.onnx = self._with_baselines(exact.onnx, contributions, exact.label_names, weights, extra, loo)
        self._progress("training", 1, 1)
        self._checkpoint()
        size = self.foundation.image_size
        meta = {
            **extra, "method": "closed_form_exact", "labels": list(exact.label_names),
            "input": {"name": "image", "shape": [-1, 1, size, size], "range": [0, 1]}, "output": {"name": "logits"},
            "contributions": exact.trained_on, "statistics": exact.stats_digests,
            "training_digest": exact.training_digest, "synthetic_samples": exact.synthetic_samples,
            "timings_s": {k: round(v, 4) for k, v in exact.timings.items()},
            "fedavg_reference_parameters": cnn_parameters(size, len(exact.label_names)),
        }  # fmt: skip
        version = self.registry.publish(exact.onnx, meta)
        t = exact.timings
        self.metrics.synthesis.observe(t.get("statistics_s", 0.0))
        self.metrics.training.observe(t.get("sum_s", 0.0) + t.get("solve_s", 0.0) + t.get("export_s", 0.0))
        log.info("round %d: model v%d, closed form over %d synthetic samples (statistics %.2f s, sum %.3f s, "
                 "solve %.3f s, export %.3f s)", round_id, version.version, exact.synthetic_samples,
                 t.get("statistics_s", 0), t["sum_s"], t["solve_s"], t["export_s"])  # fmt: skip
        return version, exact

    def _with_loo_heads(
        self, exact: ExactModel, contributions: list[Contribution], weights: dict[str, float] | None
    ) -> dict[str, str]:
        """FRAMU's leave-one-out heads (docs/framu.md) added to `exact.onnx`: head name -> `without:<id>`."""
        assert self.trainer is not None
        added: dict[str, str] = {}
        for cid in self.framu.loo_wanted(contributions):
            try:
                head = self.trainer.head_without(contributions, cid, weights, self._checkpoint)
            except ValueError as err:  # nothing would be left: no such head
                log.info("no leave-one-out head without %s: %s", cid[:8], err)
                continue
            name = f"head_loo_{len(added) + 1}"
            exact.onnx = add_linear_head(exact.onnx, name, head.weights, head.bias, head.label_names, exact.label_names)
            added[name] = f"without:{cid}"
        return added

    def _with_baselines(
        self,
        model: bytes,
        contributions: list[Contribution],
        labels,
        weights: dict[str, float] | None,
        extra: dict,
        known_roles: dict[str, str] | None = None,
    ) -> bytes:
        """The model with the nearest-prototype head of the same uploads added, its heads listed in `extra`
        (docs/delivery-gate.md); contributions FRAMU weighted 0 are left out of it as out of the candidate."""
        kept = [c for c in contributions if weights is None or weights.get(c.contribution_id, 1.0) > 0]
        model, info = add_nearest_prototype(model, kept, list(labels))
        extra["heads"] = roles_with(model, known_roles or {})
        if info:
            extra["nearest_prototype"] = info
        return model

    def _refinement_meta(self) -> dict:
        """What a model's registry manifest says about its feature output (hub/refinement)."""
        assert self.refinement is not None
        p = self.refinement.projection
        return {"feature_key": self.refinement.feature_key, "dim": p.dim, "output": "fedge_refine_features"}

    def _publish_refined(self, refined: RefinedModel, extra: dict, round_id: int) -> ModelVersion:
        """Store the refined model as a new version (its manifest says what it was solved from)."""
        size = self.foundation.image_size
        if "framu" in extra:
            extra = {**extra, "framu": {**extra["framu"], "weights": None}}  # not applied to the statistics
        extra = dict(extra)
        active = [c for c in self.ledger.active() if c.labels]
        refined.onnx = self._with_baselines(refined.onnx, active, refined.label_names, None, extra)
        meta = {
            **extra, "method": "closed_form_exact", "labels": list(refined.label_names),
            "input": {"name": "image", "shape": [-1, 1, size, size], "range": [0, 1]}, "output": {"name": "logits"},
            "contributions": refined.trained_on, "statistics": refined.stats_digests,
            "training_digest": refined.training_digest, "refinement": {
                **self._refinement_meta(), "sites": list(refined.sites), "samples": refined.synthetic_samples,
                "lam": refined.head.lam, "heads": refined.head_outputs(), "stage": refined.stage,
                **({"refit": refined.refit} if refined.refit else {})},
            "timings_s": {k: round(v, 4) for k, v in refined.timings.items()},
            "fedavg_reference_parameters": cnn_parameters(size, len(refined.label_names)),
        }  # fmt: skip
        version = self.registry.publish(refined.onnx, meta)
        t = refined.timings
        self.metrics.training.observe(t.get("sum_s", 0.0) + t.get("solve_s", 0.0) + t.get("export_s", 0.0))
        log.info("round %d: model v%d, refined head solved from %d sites' statistics over %d samples (sum %.3f s, "
                 "solve %.3f s, export %.3f s)", round_id, version.version, len(refined.sites),
                 refined.synthetic_samples, t["sum_s"], t["solve_s"], t["export_s"])  # fmt: skip
        return version

    def _progress(self, phase: str, done: int, total: int) -> None:
        """A round advanced: the gauge always, a log line at the end of a phase and at most every 15 s."""
        self.metrics.round_progress.labels(phase).set(done / total if total else 1.0)
        t = time.monotonic()
        if done >= total or t - self._progress_logged >= 15:
            self._progress_logged = t
            unit = "contributions" if phase == "synthesis" else "epochs" if self.trainer is None else "solve"
            log.info("round %s: %s %d/%d %s", self._round_id, phase, done, total, unit)

    def _progress_idle(self) -> None:
        for phase in ROUND_PHASES:
            self.metrics.round_progress.labels(phase).set(0)

    def _checkpoint(self) -> None:
        """Called between batches of a round: abandon it when the service is stopping."""
        if self.stop_event.is_set():
            raise Stopping

    def _gate_fields(self, version: int) -> tuple[str | None, dict | None]:
        """(serve, gate) for model `version`'s manifest: the gate's recorded decision, else pending."""
        if not self.settings.delivery.enabled:
            return "logits", None
        decided = self.ledger.gate_decision(version)
        if decided is not None:
            return decided["serve"], {k: v for k, v in decided.items() if k in GateDecision.model_fields}
        self._gate_since.setdefault(version, time.monotonic())
        # While the sites evaluate, they keep serving their previous model, unless it carries data this one forgot.
        withdraw = bool(self.ledger.certificates_for(version))
        reason = "the sites evaluate its heads" + (
            "; the candidate serves meanwhile: the previous model carries forgotten data" if withdraw else
            "; the previous model serves meanwhile")  # fmt: skip
        return ("logits" if withdraw else None), {"state": "pending", "reason": reason}

    def check_gate(self, t: float) -> Decision | None:
        """Decide which head of the newest model the sites serve once every site with an active contribution has
        evaluated it, or `delivery.wait_s` after it went out; publish the decision (docs/delivery-gate.md)."""
        g, v = self.settings.delivery, self._latest_version
        if not g.enabled or v is None or v == self._gate_decided:
            return None
        if self.ledger.gate_decision(v) is not None:
            self._gate_decided = v
            return None
        version = self.registry.get(v)
        refinement = version.manifest.get("refinement") or {}
        rows = self.ledger.evaluations(v)
        waited = t - self._gate_since.setdefault(v, t)
        refit = refinement.get("refit") if refinement.get("stage") == "refit" else None
        if refit is None and not self.ledger.active_sites() <= {r["site_id"] for r in rows} and waited < g.wait_s:
            return None
        if refit is not None:  # the held-out samples chose it and are now in its training set: not scored again
            decision = Decision("logits", "served", (
                f"refit of v{refit['version']}'s {refit['head']} (lambda {refit['lam']:g}), which the gate served on "
                f"held-out samples ({refit.get('balanced_accuracy') or 0:.3f} balanced accuracy), solved again from the training "
                "and held-out statistics; its own held-out evaluations would be in-sample, so it is not scored again"),
                {}, 0)  # fmt: skip
        else:
            # FRAMU's leave-one-out heads are probes, never served: the candidate and the baselines compete.
            roles = version.manifest.get("heads") or {"logits": "candidate"}
            heads = [h for h, role in roles.items() if not role.startswith("without:")]
            conf = pooled([r["heads"] or {} for r in rows], heads, len(version.manifest["labels"]))
            decision = choose(conf, heads, g.chance_margin, withdraw_previous=bool(self.ledger.certificates_for(v)))
        record = {**decision.as_dict(), "decided_at": now().isoformat()}
        choice = self._refit_choice(version, decision)
        if choice is not None:
            record["refit"] = choice
        gate = {k: val for k, val in record.items() if k in GateDecision.model_fields}
        _, body, _ = model_messages(version, self.topics, self.foundation.encoder_id, self.signing_key,
                                    self.settings.chunk_bytes, serve=decision.serve, gate=gate)  # fmt: skip
        self._gate_decided = v
        if not self.ledger.record_gate(v, record, body):  # durable before the sites hear of it
            return None  # another hub worker decided first, and publishes its decision
        self._note_gate(version, decision)
        try:
            self.bus.publish(self.topics.hub_model, body, retain=True)
            self.metrics.sent_bytes.labels("model").inc(len(body))
            if choice is not None:
                self._request_refinement(version)
        except NotConnected as err:
            log.warning("gate decision on model v%d not published yet: %s", v, err)
            self._republish.set()
        self._publish_status(self._state)
        return decision

    def _refit_choice(self, version: ModelVersion, decision: Decision) -> dict | None:
        """When the gate serves a refined head of a model solved from the training statistics (and rounds.refine_refit
        is on): that head's lambda and what it was chosen on, for the refit from every sample (hub/refinement)."""
        meta = version.manifest.get("refinement") or {}
        if self.refinement is None or not self.refinement.refit or meta.get("stage") != "select":
            return None
        lams = {"logits": meta.get("lam"), **{h: x["lam"] for h, x in (meta.get("heads") or {}).items()}}
        if decision.serve not in lams or lams[decision.serve] is None or decision.state != "served":
            return None
        return {"version": version.version, "head": decision.serve, "lam": lams[decision.serve],
                "balanced_accuracy": decision.scores.get(decision.serve), "statistics": sorted(version.manifest["contributions"])}  # fmt: skip

    def _request_refinement(self, version: ModelVersion) -> None:
        """Publish (retained) the refinement request for `version`: its training part, or its held-out part once the
        gate has chosen one of its refined heads for the refit."""
        assert self.refinement is not None
        decided = self.ledger.gate_decision(version.version) or {}
        part = "held_out" if decided.get("refit") else "train"
        request = self.refinement.request(version.version, version.sha256, part)
        self.bus.publish(self.topics.hub_refine, request, retain=True)
        self.metrics.sent_bytes.labels("refine_request").inc(len(request))

    def _note_gate(self, version: ModelVersion, decision: Decision) -> None:
        """Metrics and the operator's log line for a gate decision."""
        self.metrics.gate_decisions.labels(decision.state).inc()
        if decision.state == "served" and not decision.scores:
            log.info("model v%d: delivery gate %s: %s", version.version, decision.state, decision.reason)
            return  # a refit, not scored again: the federated scores shown stay those of the head it refits
        self.metrics.federated_balanced_accuracy.clear()
        for head, score in decision.scores.items():
            if score is not None:
                self.metrics.federated_balanced_accuracy.labels(head, "1" if head == decision.serve else "0").set(score)
        self.metrics.federated_recall.clear()
        if decision.confusion is not None:
            for label, r in zip(version.manifest["labels"], recalls(decision.confusion), strict=True):
                if r is not None:
                    self.metrics.federated_recall.labels(label).set(r)
        level = logging.INFO if decision.state == "served" else logging.WARNING
        log.log(level, "model v%d: delivery gate %s: %s", version.version, decision.state, decision.reason)

    def deliver(self, version: ModelVersion) -> ModelManifest:
        """Publish a model's chunks, then its signed manifest (all retained), and retire chunks two versions back."""
        serve, gate = self._gate_fields(version.version)
        manifest, body, chunks = model_messages(
            version, self.topics, self.foundation.encoder_id, self.signing_key, self.settings.chunk_bytes, serve, gate
        )
        for topic, payload in chunks:
            self.bus.publish(topic, payload, retain=True)
            self.metrics.sent_bytes.labels("model").inc(len(payload))
        self.bus.publish(self.topics.hub_model, body, retain=True)
        self.metrics.sent_bytes.labels("model").inc(len(body))
        meta = version.manifest.get("refinement") or {}
        if self.refinement is not None and meta.get("feature_key") == self.refinement.feature_key:
            self._request_refinement(version)
        self.metrics.fedavg_round_bytes.set(manifest.fedavg_round_bytes)
        old = version.version - 2
        if old >= 1 and old in self.registry.versions():
            for topic in clear_messages(self.registry.get(old), self.topics, self.settings.chunk_bytes):
                self.bus.publish(topic, b"", retain=True)
        log.info("model v%d delivered: %d chunks, %d bytes", version.version, len(chunks), manifest.size_bytes)
        return manifest

    # --- lifecycle ---
    def run(self, ready: threading.Event | None = None) -> None:
        """Serve until `stop_event` is set."""
        redone = self.ledger.redo_interrupted_rounds()
        if redone:
            log.warning("round(s) %s were interrupted by a stop or a crash; requested again", redone)
        self._subscribe()
        self.bus.start()
        if ready is not None:
            ready.set()
        poll = self.settings.rounds.poll_s
        try:
            while not self.stop_event.is_set():
                if self.bus.connected and self._republish.is_set():
                    self._republish.clear()
                    self._publish_status("online")
                    latest = self.registry.latest()
                    if latest is not None:
                        try:
                            self.deliver(latest)
                            self._publish_certificates(latest.version)
                        except NotConnected as err:
                            log.warning("could not republish model v%d: %s", latest.version, err)
                            self._republish.set()
                self.check_policy(time.monotonic())
                if self.bus.connected:
                    self.check_gate(time.monotonic())
                if self.framu.poll(self._latest_version):
                    self.ledger.request_round("framu")
                if self.bus.connected:
                    round_id = self.ledger.claim_round()
                    if round_id is not None:
                        try:
                            self.run_round(round_id)
                        except NotConnected as err:
                            # The model is durable in the registry; delivery is retried after reconnecting.
                            log.warning("delivery interrupted: %s", err)
                            self._republish.set()
                self.stop_event.wait(poll)
        finally:
            self.bus.stop(final=(self.topics.hub_status, self._status("stopped").model_dump_json().encode()))
            self.ledger.close()


def state_dir_ledger(state_dir: Path) -> Ledger:
    """The ledger of a hub state directory (for CLI commands next to a running hub)."""
    return Ledger(Path(state_dir) / "ledger.sqlite")
