"""`fedge-edge run`: keep the sample index in step with the data folder, publish contributions, install models.

Threads: paho's network thread runs the message handlers (they only parse, verify and queue work);
the outbox thread publishes what the store holds until the broker acknowledges it; the main loop
scans, encodes, carries out forget requests (edge/forget.py), contributes, installs delivered models and
evaluates them, and answers the hub's refinement requests (edge/refine.py). No torch anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError
from tenacity import RetryError, Retrying, retry_if_exception_type, stop_when_event_set, wait_exponential

import bundled
from contract import decode, signing
from contract.layout import fit_image, read_image, scan
from contract.payloads import (
    SCHEMA_VERSION,
    Contribution,
    EncoderStatus,
    ErrorReport,
    Evaluation,
    HubStatus,
    ModelManifest,
    RefinementRequest,
    SiteStatus,
    new_id,
    now,
)
from contract.scores import balanced_accuracy
from contract.topics import Topics
from edge.clip import OnnxClipImageEncoder, OnnxTextEncoder, prompt_for
from edge.config import EdgeSettings
from edge.contribution import contribution_id_for, make_contribution
from edge.encoder import EncoderChoice, choose_encoder
from edge.forget import ForgetContext, Forgetter
from edge.metrics import EdgeMetrics
from edge.models import ChunkAssembler, GlobalModel, ModelRejected, ModelStore
from edge.refine import make_statistics, projected_features, wire_statistics
from edge.store import EdgeStore, IndexedSample
from runtime.mqtt import Bus, Message, NotConnected
from runtime.outcomes import Outcome, Rejected, guarded

# Hub messages a site reads are small (a manifest of a large model lists a few hundred chunks).
MAX_HUB_MESSAGE_BYTES = 1 << 20
MAX_CHUNK_MESSAGE_BYTES = 64 << 20

log = logging.getLogger("fedge.edge")
M = TypeVar("M", bound=BaseModel)


class EdgeService:
    """One site."""

    def __init__(self, settings: EdgeSettings, metrics: EdgeMetrics | None = None):
        self.settings = s = settings
        self.topics = Topics(s.topic_prefix)
        self.metrics = metrics or EdgeMetrics()
        self.store = EdgeStore(s.state_dir / "edge.sqlite")
        self.models = ModelStore(s.state_dir / "models")
        self.bundle = bundled.resolve(s.bundle)
        manifest = json.loads((self.bundle / "manifest.json").read_text())
        self.image_size = int(manifest["image_size"])
        self.bundle_encoder_id = str(manifest["encoder_id"])  # before the encoder variant is chosen
        self.encoder: EncoderChoice | None = None
        # Stable Diffusion hubs: prompt embeddings (text) or CLIP image embeddings (unCLIP) instead of the bundle's.
        self.text_encoder = None
        self.clip_image = None
        if s.sd_encoders_dir is not None and s.sd_conditioning == "text":
            self.text_encoder = OnnxTextEncoder(s.sd_encoders_dir, s.prefer_cuda)
        elif s.sd_encoders_dir is not None:
            self.clip_image = OnnxClipImageEncoder(s.sd_encoders_dir, s.prefer_cuda)
        self.stop_event = threading.Event()
        self._jobs: queue.Queue[tuple[str, object]] = queue.Queue()
        self._outbox_wake = threading.Event()
        self._status_dirty = threading.Event()
        self._assembler: ChunkAssembler | None = None
        self._assembler_lock = threading.Lock()
        self._bad_files: set[tuple[str, str]] = set()
        self._skipped_labels: list[str] = []  # labels with too few samples for one prototype
        self._last_change = 0.0
        # Set once any hub status (retained) has arrived: until a hub has ever subscribed, publishing
        # would reach nobody, so the outbox holds everything.
        self._hub_seen = threading.Event()
        # Keys that may sign model manifests: the configured file, else the hub key pinned on first use.
        self._trusted: dict[str, signing.Ed25519PublicKey] = {}
        if s.hub_public_key_file is not None:
            key = signing.load_public_key(s.hub_public_key_file)
            self._trusted[signing.key_id(key)] = key
        elif (pinned := self.store.get("hub_public_key")) is not None:
            key = signing.parse_public_pem(pinned)
            self._trusted[signing.key_id(key)] = key
        # Signed retained hub messages ("model" manifest, "refine" request) that came before any trusted key.
        self._unverified: dict[str, bytes] = {}
        self.site_key = self._site_key()
        operators = {signing.key_id(k): k for k in map(signing.load_public_key, s.operator_public_key_files)}
        if not operators:
            log.warning("no operator key is configured: every forget request will be refused (unknown_key); list the "
                        "operators' public keys in operator_public_key_files")  # fmt: skip
        self.forgetter = Forgetter(ForgetContext(
            site_id=s.site_id, data_dir=s.data_dir, topics=self.topics, store=self.store, metrics=self.metrics,
            operator_keys=operators, site_key=self.site_key, max_age_s=s.forget_max_age_s,
            build_contribution=self._next_contribution, forgotten=self._forgotten, publish_now=self._publish_now,
            wake_outbox=self._outbox_wake.set, wake_main=lambda: self._jobs.put(("forget", None)),
        ))  # fmt: skip
        self.bus = Bus(
            f"fedge-edge-{s.site_id}",
            s.broker,
            will=(
                self.topics.site(s.site_id, "status"),
                SiteStatus(message_id=new_id(), site_id=s.site_id, state="offline", at=now())
                .model_dump_json()
                .encode(),
            ),
            on_connect=self._status_dirty.set,
            on_state=self._on_state,
            on_handler_error=lambda msg, err: self.metrics.handler_failures.inc(),
        )
        for reason in self.models.set_aside_unloadable():
            self.metrics.model_rejections.inc()
            self.store.set("model_error", reason)
        current = self.models.current()
        self.metrics.model_version.set(current[1].version if current else 0)

    def _site_key(self) -> signing.Ed25519PrivateKey:
        """The key that signs this site's receipts, created under state_dir on first start unless configured."""
        path = self.settings.site_key_path
        key, created = signing.load_or_create_private_key(path)
        kid = signing.key_id(key.public_key())
        if created:
            log.warning("created the site's receipt-signing key %s at %s (public half: %s)", kid, path,
                        path.with_suffix(".pub.pem"))  # fmt: skip
        else:
            log.info("receipts are signed with the site's key %s (%s)", kid, path)
        return key

    def _forgotten(self, sample_ids: set[str]) -> None:
        """Deleted samples leave every in-memory cache too."""
        self._bad_files = {k for k in self._bad_files if k[0] not in sample_ids}
        self.metrics.samples.labels("train").set(self.store.sample_count(holdout=False))
        self.metrics.samples.labels("holdout").set(self.store.sample_count(holdout=True))
        self._status_dirty.set()

    def _publish_now(self, topic: str, payload: bytes) -> None:
        """Queue a publish on the network thread without the outbox (error reports: best effort, like the hub's)."""
        self.bus.publish_nowait(topic, payload)
        self.metrics.sent_bytes.labels("errors").inc(len(payload))

    # --- status and health ---
    def _on_state(self, up: bool) -> None:
        self.metrics.connected.set(1 if up else 0)
        if up:
            self._outbox_wake.set()

    def status(self, state: str = "online") -> SiteStatus:
        """The site's status message."""
        current, serving = self.models.current(), self.models.serving()
        enc = self.text_encoder or self.clip_image or self.encoder
        return SiteStatus(
            message_id=new_id(),
            site_id=self.settings.site_id,
            state=state,
            at=now(),
            model_error=self.store.get("model_error"),
            unreadable_samples=len(self._bad_files),
            skipped_labels=self._skipped_labels,
            encoder=EncoderStatus(encoder_id=enc.encoder_id, variant=enc.variant, provider=enc.provider)
            if enc
            else None,
            samples=self.store.sample_count(),
            contribution_id=self.store.get("contribution_id"),
            model_version=current[1].version if current else None,
            serving_version=serving[1].version if serving else None,
            serving_head=serving[1].serve if serving else None,
            outbox_depth=self.store.outbox_depth(),
            bytes_sent=self.store.counters("bytes_sent"),
            bytes_received=self.store.counters("bytes_received"),
            **self._counters(),
        )

    def _counters(self) -> dict:
        """This process's counters that the status carries to the hub (which re-exports them per site)."""
        reg = self.metrics.registry
        accuracy = self.store.get("local_accuracy")  # of the last evaluated model, kept across restarts
        return {
            "local_accuracy": float(accuracy) if accuracy else None,
            "encoded_batches": int(reg.get_sample_value("fedge_edge_encode_seconds_count") or 0),
            "encode_seconds": float(reg.get_sample_value("fedge_edge_encode_seconds_sum") or 0.0),
            "forget_requests": {
                r: int(reg.get_sample_value("fedge_edge_forget_requests_total", {"result": r}) or 0)
                for r in ("accepted", "duplicate", "rejected")
            },
        }

    def health(self) -> tuple[bool, dict]:
        """For /healthz: healthy while connected (an offline edge still keeps its data and outbox safe)."""
        current = self.models.current()
        return self.bus.connected, {
            "broker_connected": self.bus.connected,
            "outbox_depth": self.store.outbox_depth(),
            "model_version": current[1].version if current else None,
        }

    def _publish_status(self) -> None:
        payload = self.status().model_dump_json().encode()
        try:
            self.bus.publish(self.topics.site(self.settings.site_id, "status"), payload, retain=True)
        except NotConnected:
            self._status_dirty.set()
            return
        self.metrics.sent_bytes.labels("status").inc(len(payload))

    # --- inbound (paho network thread: parse, verify, queue) ---
    def handlers(self) -> dict[str, Callable[[Message], None]]:
        """The handler of each hub message kind the site reads, in subscription order (bench/fuzz drives these)."""
        return {
            "hub_status": guarded("hub_status", self._on_hub_status, self._report),
            "model": guarded("model", self._on_manifest, self._report),
            "errors": guarded("errors", self._on_error, self._report),
            "forget": guarded("forget", self.forgetter.intake, self._report),
            "refine": guarded("refine", self._on_refine, self._report),
        }

    def _subscribe(self) -> None:
        t, h = self.topics, self.handlers()
        # hub/status first: its retained message carries the key that manifests are checked against.
        self.bus.subscribe(t.hub_status, h["hub_status"])
        self.bus.subscribe(t.hub_model, h["model"])
        self.bus.subscribe(t.site(self.settings.site_id, "errors"), h["errors"])
        self.bus.subscribe(t.site(self.settings.site_id, "forget/request"), h["forget"])
        self.bus.subscribe(t.hub_refine, h["refine"])

    def _report(self, kind: str, msg: Message, outcome: Outcome, err: Rejected | None) -> None:
        """Every hub message ends accepted, duplicate or rejected (counted, logged; a refused model is in the status)."""
        received = kind if kind in ("model", "errors", "forget", "refine") else "status"
        self.metrics.received_bytes.labels(received).inc(len(msg.payload))
        self.store.add_bytes("bytes_received", received, len(msg.payload))
        self.metrics.messages.labels(kind, outcome).inc()
        if kind == "forget":
            self.metrics.forget_requests.labels(outcome).inc()
        if err is None:
            return
        self.metrics.rejections.labels(kind, err.code).inc()
        log.error("refused %s message on %s: %s: %s", kind, msg.topic[:200], err.code, err.reason)
        if kind == "forget":
            self.forgetter.report(msg, err)
        if kind == "model":
            self.metrics.model_rejections.inc()
            self.store.set("model_error", err.reason)
            self._status_dirty.set()

    @staticmethod
    def _decode(payload: bytes, max_bytes: int = MAX_HUB_MESSAGE_BYTES) -> dict:
        try:
            return decode.loads(payload, max_bytes, schema_version=SCHEMA_VERSION)
        except decode.PayloadError as err:
            raise Rejected(err.code, err.reason) from None

    def _on_hub_status(self, msg: Message) -> Outcome:
        """A hub that comes online may have missed what was published before it subscribed: resend the latest."""
        if not msg.payload:
            return "accepted"  # a retained status being cleared
        try:
            status = HubStatus.model_validate(self._decode(msg.payload))
        except ValidationError as err:
            raise Rejected("invalid", f"hub status: {err.errors()[0]['msg']}") from None
        self._trust_on_first_use(status)
        if status.state == "online" and status.session_id != self.store.get("hub_session"):
            self.store.set("hub_session", status.session_id)
            resent = self.store.requeue_latest()  # before the outbox opens, so nothing goes out twice
            if resent:
                log.info("hub %s is online: resending the latest %s", status.hub_id, " and ".join(resent))
        self._hub_seen.set()
        self._outbox_wake.set()
        waiting = (
            ("model", self._on_manifest, self.topics.hub_model),
            ("refine", self._on_refine, self.topics.hub_refine),
        )
        for kind, handler, topic in waiting:
            pending = self._unverified.pop(kind, None)
            if pending is not None and self._trusted:
                guarded(kind, handler, self._report)(Message(topic, pending))
        return "accepted"

    def _trust_on_first_use(self, status: HubStatus) -> None:
        """Pin the hub's key from its status when no key is configured and none is pinned yet."""
        if status.public_key is None or self._trusted:
            if status.key_id is not None and self._trusted and status.key_id not in self._trusted:
                log.error(
                    "the hub now signs with key %s, which this site does not trust (trusted: %s); its models will be "
                    "refused until hub_public_key_file names the new key", status.key_id, ", ".join(self._trusted),
                )  # fmt: skip
            return
        try:
            key = signing.parse_public_pem(status.public_key)
        except ValueError as err:
            log.error("hub status carries an unusable public key: %s", err)
            return
        self.store.set("hub_public_key", status.public_key)
        self._trusted[signing.key_id(key)] = key
        log.warning(
            "trusting the hub's key %s on first use (pinned in the site's state); set hub_public_key_file to name it",
            signing.key_id(key),
        )

    def _signed(self, body: dict, model: type[M], what: str) -> M:
        """`body` as `model`, once its signature by a trusted hub key is checked; Rejected otherwise."""
        try:
            signing.verify(body, self._trusted)
        except signing.SignatureError as err:
            raise Rejected("signature", f"{what} refused: {err}") from None
        try:
            return model.model_validate(body)
        except ValidationError as err:
            raise Rejected("invalid", f"{what} refused: {err.errors()[0]['msg']}") from None

    def _on_manifest(self, msg: Message) -> Outcome:
        if not msg.payload:
            return "accepted"  # a retained manifest being cleared
        body = self._decode(msg.payload)
        if not self._trusted:
            self._unverified["model"] = msg.payload  # checked once hub/status brings a key to pin
            log.info("a model manifest arrived before any trusted hub key; it waits for the hub's status")
            return "accepted"
        manifest = self._signed(body, ModelManifest, "model manifest")
        current = self.models.current()
        if current is not None and manifest.version in self.models.versions():
            return self._gate_decided(manifest)
        if current is not None and manifest.version < current[1].version:
            return "duplicate"
        if self.store.get("rejected_model") == f"{manifest.version}:{manifest.sha256}":
            return "duplicate"  # refused once already; the retained manifest comes back on every reconnect
        with self._assembler_lock:
            asm = self._assembler
            if asm is not None and (asm.manifest.version, asm.manifest.sha256) == (manifest.version, manifest.sha256):
                if (asm.manifest.serve, asm.manifest.gate) == (manifest.serve, manifest.gate):
                    return "duplicate"
                asm.manifest = manifest  # the gate decided while the chunks were on their way
                return "accepted"
            if self._assembler is not None and self._assembler.manifest.version >= manifest.version:
                return "duplicate"
            if self._assembler is not None:
                self.bus.unsubscribe(self.topics.model_chunks(self._assembler.manifest.version))
            self._assembler = ChunkAssembler(manifest)
        log.info(
            "model v%d announced (%d bytes in %d chunks); fetching",
            manifest.version,
            manifest.size_bytes,
            len(manifest.chunks),
        )
        self.bus.subscribe(self.topics.model_chunks(manifest.version), guarded("model", self._on_chunk, self._report))
        return "accepted"

    def _gate_decided(self, manifest: ModelManifest) -> Outcome:
        """The manifest of an installed version again: the delivery gate's decision on which head to serve."""
        try:
            changed = self.models.update_gate(manifest)
        except ModelRejected as err:
            raise Rejected("invalid", str(err)) from None
        if not changed:
            return "duplicate"
        g = manifest.gate
        serving = self.models.serving()
        log.info("model v%d: delivery gate %s (%s); serving %s", manifest.version, g.state if g else "none",
                 g.reason if g else "", f"v{serving[1].version} head {serving[1].serve}" if serving else "nothing")  # fmt: skip
        self._status_dirty.set()
        return "accepted"

    def _on_chunk(self, msg: Message) -> Outcome:
        if not msg.payload:
            return "accepted"  # a retired chunk being cleared
        with self._assembler_lock:
            asm = self._assembler
            if asm is None:
                return "duplicate"
            if len(msg.payload) > MAX_CHUNK_MESSAGE_BYTES:
                raise Rejected("oversize", f"chunk message of {len(msg.payload)} bytes is larger than any chunk")
            try:
                complete = asm.add(msg.payload)
            except ModelRejected as err:
                raise Rejected("invalid", str(err)) from None
            except ValidationError as err:
                raise Rejected("invalid", f"model chunk: {err.errors()[0]['msg']}") from None
            if complete:
                self._assembler = None
                self.bus.unsubscribe(self.topics.model_chunks(asm.manifest.version))
                self._jobs.put(("install", asm))
        return "accepted"

    def _on_refine(self, msg: Message) -> Outcome:
        """The hub's refinement request (retained, signed): kept, and answered from the main loop (`maybe_refine`)."""
        if not msg.payload:
            return "accepted"  # a retained request being cleared
        body = self._decode(msg.payload)
        if not self._trusted:
            self._unverified["refine"] = msg.payload  # checked once hub/status brings a key to pin
            return "accepted"
        request = self._signed(body, RefinementRequest, "refinement request")
        kept = self.store.get("refine_request")
        if kept is not None and RefinementRequest.model_validate_json(kept).request_id == request.request_id:
            return "duplicate"
        self.store.set("refine_request", request.model_dump_json())
        self._jobs.put(("refine", None))
        return "accepted"

    def maybe_refine(self) -> bool:
        """Queue refinement statistics when the hub asks for them, the model it names is the one installed, and the
        site's contribution changed since it last sent statistics of the part asked for (its training samples, or
        its held-out ones once the delivery gate has chosen a refined head); True if queued."""
        kept = self.store.get("refine_request")
        current = self.models.current()
        contribution = self.store.get("contribution_id")
        if kept is None or current is None or contribution is None:
            return False
        request = RefinementRequest.model_validate_json(kept)
        path, manifest = current
        if (manifest.version, manifest.sha256) != (request.model_version, request.model_sha256):
            return False  # another model is installed (or on its way): the request for it follows
        done_key = f"{request.feature_key}:{contribution}"
        done_as = "refined_for" if request.part == "train" else "refined_held_out_for"  # one record per part
        if self.store.get(done_as) == done_key:
            return False
        min_group = max(request.min_group_size, self.settings.min_group_size)
        held_out = request.part == "held_out"
        samples, images = self._read(self.store.samples(holdout=held_out), manifest.input_shape[-1])
        t = time.perf_counter()
        feats = projected_features(path, manifest.input_name, request.output_name, images, self.settings.threads)
        stats = wire_statistics(feats, [x.label for x in samples], min_group) if len(samples) else None
        if stats is None:
            self.store.set(done_as, done_key)  # nothing to count: no label has enough samples
            return False
        st = make_statistics(self.settings.site_id, request, contribution, min_group, *stats)
        payload = st.model_dump_json().encode()
        self.store.enqueue(st.statistics_id, "refine", self.topics.site(self.settings.site_id, "refine"), payload,
                           meta={done_as: done_key})  # fmt: skip
        self._outbox_wake.set()
        log.info("refinement statistics %s (%s samples) queued: %d samples, %d labels, dim %d, %d bytes (%.2f s)",
                 st.statistics_id[:8], request.part, st.n_samples, len(st.labels), st.dim, len(payload),
                 time.perf_counter() - t)  # fmt: skip
        return True

    def _reject_model(self, reason: str, manifest: ModelManifest) -> None:
        """A received model that is not installed: counted, logged, shown in the status; the previous one serves."""
        self.metrics.model_rejections.inc()
        log.error("%s; the installed model keeps serving", reason)
        self.store.set("model_error", reason)
        self.store.set("rejected_model", f"{manifest.version}:{manifest.sha256}")
        self._status_dirty.set()

    def _on_error(self, msg: Message) -> Outcome:
        try:
            report = ErrorReport.model_validate(self._decode(msg.payload))
        except ValidationError as err:
            raise Rejected("invalid", f"error report: {err.errors()[0]['msg']}") from None
        if report.topic == self.forgetter.request_topic:
            return "accepted"  # this site's own answer to a refused forget request, heard back on its errors topic
        self.metrics.hub_errors.labels(report.code).inc()
        if report.code == "unlearned":  # not a rejection: FRAMU at the hub stopped training on a contribution
            log.warning("hub: %s", report.reason)
            return "accepted"
        log.error("hub rejected %s: %s: %s", report.ref_id or "a message", report.code, report.reason)
        return "accepted"

    # --- outbox thread ---
    def _outbox_loop(self) -> None:
        while not self.stop_event.is_set():
            items = self.store.pending() if self._hub_seen.is_set() else []
            self.metrics.outbox_depth.set(self.store.outbox_depth())
            if not items:
                self._outbox_wake.wait(1.0)
                self._outbox_wake.clear()
                continue
            for item in items:
                try:
                    for attempt in Retrying(
                        retry=retry_if_exception_type(NotConnected),
                        wait=wait_exponential(multiplier=0.5, max=30),
                        stop=stop_when_event_set(self.stop_event),
                        sleep=self.stop_event.wait,
                    ):
                        with attempt:
                            if attempt.retry_state.attempt_number > 1:
                                self.store.attempted(item.seq)
                            self.bus.publish(item.topic, item.payload)
                except RetryError:
                    return  # stopping; the item stays in the outbox for the next start
                self.store.acknowledged(item)
                self.metrics.sent_bytes.labels(item.kind).inc(len(item.payload))
                log.info("%s %s acknowledged by the broker (%d bytes)", item.kind, item.msg_id[:8], len(item.payload))
                self._status_dirty.set()

    # --- main loop work ---
    def _load(self, samples: list[IndexedSample], size: int | None) -> tuple[list[IndexedSample], list[np.ndarray]]:
        """Images of `samples` that can be read, resized to side `size` when given (contract/layout.fit_image: the
        whole image, grayscale); unreadable ones are logged once, counted and reported in the status, and skipped."""
        ok, images = [], []
        for smp in samples:
            key = (smp.sample_id, smp.sha256)
            if key in self._bad_files:
                continue
            try:
                im = read_image(smp.path)
                if size is not None and im.shape != (size, size):
                    im = fit_image(im, size)
                    self.metrics.resized_samples.inc()
            except (OSError, ValueError) as err:
                self._bad_files.add(key)
                self.metrics.unreadable_samples.inc()
                self._status_dirty.set()
                log.error("skipping sample %s (%s): %s", smp.sample_id, smp.path, err)
                continue
            ok.append(smp)
            images.append(im)
        return ok, images

    def _read(self, samples: list[IndexedSample], size: int | None = None) -> tuple[list[IndexedSample], np.ndarray]:
        """Like `_load`, stacked to [N, 1, S, S]; S defaults to the bundled encoder's input size."""
        size = size or self.image_size
        ok, images = self._load(samples, size)
        return ok, np.stack(images)[:, None] if images else np.zeros((0, 1, size, size), np.float32)

    def sync(self) -> bool:
        """Rescan the data folder and encode new training samples; True if anything changed."""
        s = self.settings
        added, changed, removed = self.store.sync(scan(s.data_dir), s.holdout_fraction)
        if added or changed or removed:
            self._last_change = time.monotonic()
            log.info("data folder: %d added, %d changed, %d removed", len(added), len(changed), len(removed))
            self.metrics.samples.labels("train").set(self.store.sample_count(holdout=False))
            self.metrics.samples.labels("holdout").set(self.store.sample_count(holdout=True))
            self._status_dirty.set()
        missing = self.store.missing_embeddings() if self.text_encoder is None else []
        if missing and self.clip_image is not None:
            ok, images = self._load(missing, None)  # CLIP resizes and crops each image itself
            if ok:
                t = time.perf_counter()
                emb = self.clip_image.encode(images)
                self.metrics.encode_seconds.observe(time.perf_counter() - t)
                self.metrics.encoded_samples.inc(len(ok))
                self.store.put_embeddings([(smp.sample_id, smp.sha256, e) for smp, e in zip(ok, emb, strict=True)])
        elif missing:
            ok, images = self._read(missing)
            if len(ok):
                enc = self._encoder(images)
                t = time.perf_counter()
                emb = enc.encoder.encode(images)
                self.metrics.encode_seconds.observe(time.perf_counter() - t)
                self.metrics.encoded_samples.inc(len(ok))
                self.store.put_embeddings([(smp.sample_id, smp.sha256, e) for smp, e in zip(ok, emb, strict=True)])
        return bool(added or changed or removed)

    def _encoder(self, sample: np.ndarray) -> EncoderChoice:
        if self.encoder is None:
            self.encoder = choose_encoder(
                self.bundle, sample[:64], prefer_cuda=self.settings.prefer_cuda, threads=self.settings.threads
            )
            log.info("encoder %s: %s on %s", self.encoder.encoder_id, self.encoder.variant, self.encoder.provider)
        return self.encoder

    def maybe_contribute(self) -> Contribution | None:
        """Queue a new contribution when the encoded training set differs from the last one contributed."""
        s = self.settings
        if time.monotonic() - self._last_change < s.settle_s:
            return None
        if self.text_encoder is None and any(
            (m.sample_id, m.sha256) not in self._bad_files for m in self.store.missing_embeddings()
        ):
            return None  # encoding still to do
        built = self._next_contribution()
        if built is None:
            return None
        c, fingerprint = built
        payload = c.to_json_bytes()
        self.store.enqueue(
            c.contribution_id, "embeddings", self.topics.site(s.site_id, "embeddings"), payload,
            meta={"contribution_id": c.contribution_id, "contributed_fingerprint": fingerprint},
        )  # fmt: skip
        self.metrics.contributions.inc()
        self._outbox_wake.set()
        self._status_dirty.set()
        log.info("contribution %s queued: %d samples, %d labels, %d bytes", c.contribution_id[:8], c.n_samples,
                 len(c.labels), len(payload))  # fmt: skip
        return c

    def _next_contribution(self) -> tuple[Contribution, str] | None:
        """The contribution the encoded training set makes now and its fingerprint (shared by contributing and
        forgetting); None when that set is the one last contributed, or when there is nothing to contribute or retract.
        """
        s = self.settings
        if self.text_encoder is not None:
            # Stable Diffusion hub: prompt embeddings of captions (or class-name prompts); no image is read.
            ids, labels, captions, fp = self.store.training_captions()
            encoder_id = self.text_encoder.encoder_id
            fp = f"{fp}|{s.prompt_template}"
        else:
            ids, labels, emb, fp = self.store.training_set()
            if self.clip_image is not None:
                encoder_id = self.clip_image.encoder_id
            elif self.encoder is not None:
                encoder_id = self.encoder.encoder_id
            else:
                encoder_id = self.bundle_encoder_id
        fingerprint = hashlib.sha256(f"{fp}|{encoder_id}|{s.k}|{s.min_group_size}".encode()).hexdigest()
        if fingerprint == self.store.get("contributed_fingerprint"):
            return None
        previous = self.store.get("contribution_id")
        if not ids and previous is None:
            return None
        if self.text_encoder is not None:
            t = time.perf_counter()
            emb = self.text_encoder.encode(
                [prompt_for(lab, cap, s.prompt_template) for lab, cap in zip(labels, captions, strict=True)]
            )
            self.metrics.encode_seconds.observe(time.perf_counter() - t)
        counts: dict[str, int] = {}
        for lab in labels:
            counts[lab] = counts.get(lab, 0) + 1
        small = sorted(lab for lab, n in counts.items() if n < s.min_group_size)
        if small != self._skipped_labels:
            self._skipped_labels = small
            self.metrics.skipped_labels.set(len(small))
            self._status_dirty.set()
            if small:
                log.warning("label(s) %s have fewer than %d training samples: no prototype can average them, so they "
                            "are not contributed (min_group_size)", ", ".join(small), s.min_group_size)  # fmt: skip
        if ids:
            c = make_contribution(
                s.site_id, encoder_id, emb, labels, k=s.k, min_group_size=s.min_group_size, supersedes=previous
            )
        else:
            cid = contribution_id_for(s.site_id, encoder_id, s.k, s.min_group_size, previous, [])
            c = Contribution(contribution_id=cid, site_id=s.site_id, encoder_id=encoder_id, created_at=now(), k=s.k,
                             min_group_size=s.min_group_size, supersedes=previous, labels=[])  # fmt: skip
        return c, fingerprint

    def install(self, asm: ChunkAssembler) -> None:
        """Verify and install a fully received model, then evaluate it."""
        try:
            path = self.models.install(asm.manifest, asm.assemble())
        except ModelRejected as err:
            self._reject_model(str(err), asm.manifest)
            return
        self.store.delete("model_error")
        self._status_dirty.set()
        self.metrics.model_version.set(asm.manifest.version)
        log.info(
            "model v%d verified (sha256 %s…) and installed at %s", asm.manifest.version, asm.manifest.sha256[:12], path
        )
        self.evaluate_current()

    def evaluate_current(self) -> Evaluation | None:
        """Evaluate the installed model on the held-out samples and queue the result for the hub (once per version)."""
        current = self.models.current()
        if current is None or self.store.get("evaluated_version") == str(current[1].version):
            return None
        path, manifest = current
        samples, images = self._read(self.store.samples(holdout=True), manifest.input_shape[-1])
        truth = [x.label for x in samples]
        model = GlobalModel.from_manifest(path, manifest)
        acc = model.accuracy(images, truth)
        # Every head the manifest names, in one run: the hub's delivery gate pools these over the sites.
        conf = model.confusions(images, truth, sorted(manifest.heads)) if samples else {}
        served = conf.get(model.serve)
        e = Evaluation(
            eval_id=new_id(), site_id=self.settings.site_id, model_version=manifest.version, at=now(),
            samples=len(samples), accuracy=acc, balanced_accuracy=None if served is None else balanced_accuracy(served),
            heads={h: m.tolist() for h, m in conf.items()},
        )  # fmt: skip
        self.store.enqueue(e.eval_id, "eval", self.topics.site(self.settings.site_id, "eval"), e.model_dump_json().encode(),
                           meta={"evaluated_version": str(manifest.version), "local_accuracy": "" if acc is None else repr(acc)})  # fmt: skip
        if acc is not None:
            self.metrics.local_accuracy.set(acc)
        self._outbox_wake.set()
        self._status_dirty.set()
        log.info(
            "model v%d: accuracy %s on %d held-out samples",
            manifest.version,
            "n/a" if acc is None else f"{acc:.3f}",
            len(samples),
        )
        return e

    # --- lifecycle ---
    def run(self, ready: threading.Event | None = None) -> None:
        """Serve until `stop_event` is set."""
        s = self.settings
        self._subscribe()
        self.bus.start()
        outbox = threading.Thread(target=self._outbox_loop, name="outbox", daemon=True)
        outbox.start()
        self.evaluate_current()  # a model installed just before a stop is evaluated now
        self.forgetter.execute_pending()  # a request persisted or half-done before a stop (or a crash) finishes first
        if ready is not None:
            ready.set()
        next_scan = 0.0
        try:
            while not self.stop_event.is_set():
                try:
                    kind, job = self._jobs.get(timeout=0.2)
                except queue.Empty:
                    kind = None
                if kind == "forget":
                    # Carried out at once: resolving the selector reads the data folder itself, so the index
                    # need not be rescanned first (a failure is logged and retried at the next scan).
                    self.forgetter.execute_pending()
                now = time.monotonic()
                if now >= next_scan:
                    try:
                        self.sync()
                        self.forgetter.execute_pending()
                        self.maybe_contribute()
                        self.maybe_refine()
                    except FileNotFoundError as err:
                        log.error("%s", err)
                    except Exception:  # one bad scan must not stop the site; logged with its traceback, retried
                        self.metrics.scan_failures.inc()
                        log.exception("scan or contribution failed; retrying in %.0f s", s.scan_interval_s)
                    next_scan = now + s.scan_interval_s
                if kind == "install":
                    self.install(job)  # type: ignore[arg-type]
                if kind in ("install", "refine"):
                    try:
                        self.maybe_refine()
                    except Exception:  # retried at the next scan, like a failed contribution
                        self.metrics.scan_failures.inc()
                        log.exception("refinement statistics failed; retrying at the next scan")
                if self._status_dirty.is_set() and self.bus.connected:
                    self._status_dirty.clear()
                    self._publish_status()
        finally:
            self.stop_event.set()
            self._outbox_wake.set()
            outbox.join(timeout=10)
            final = (self.topics.site(s.site_id, "status"), self.status("stopped").model_dump_json().encode())
            self.bus.stop(final=final)
            self.store.close()
