"""Forget requests at a site: verified and persisted on arrival, then executed step by step until a signed receipt.

Intake (paho's network thread, before the broker gets its ack): bounds and JSON, the operator's
signature, the payload model, the site, the replay window; then the request is written to the store
(write-ahead) and the main loop is woken. A request id seen before with the same bytes is a
duplicate (its receipt, if there is one, is queued again); with other bytes it is refused.

Execution (main loop, after a rescan; on start for whatever has no receipt yet) moves a request
through the states of `edge.store.FORGET_STATES`, one transaction each:

1. received -> deleting: the selector is resolved against the index and the data folder; the files
   it covers are fixed in the request's row, so a resumed request never reaches data that arrived later.
2. deleting -> deleted: files unlinked (missing ones are fine), their rows dropped from metadata.csv
   (rewritten atomically), then their index rows (embeddings included) deleted with the state change.
3. deleted -> contributed: the store is compacted (no deleted bytes left in free pages or the
   write-ahead log), and the superseding contribution (a retraction when nothing is left) is queued.
4. contributed -> receipted: the signed receipt is queued after the contribution, and kept.

A crash anywhere resumes at the step that did not commit; every step is idempotent.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydantic import ValidationError

from contract import decode, signing
from contract.layout import SUFFIXES, LocalSample, scan
from contract.payloads import (
    SCHEMA_VERSION,
    Contribution,
    ErrorReport,
    ForgetReceipt,
    ForgetRequest,
    ForgetSelector,
    new_id,
    now,
)
from contract.topics import Topics
from edge.metrics import EdgeMetrics
from edge.store import EdgeStore, ForgetRow
from runtime.mqtt import Message
from runtime.outcomes import Outcome, Rejected

log = logging.getLogger("fedge.edge")

# 10,000 sample ids of up to 128 characters each, quoted, fit in 1.4 MB.
MAX_FORGET_REQUEST_BYTES = 2 << 20
# A request dated further ahead of the site's clock than this is refused as a replay.
MAX_CLOCK_SKEW_S = 300.0

Resolved = tuple[str, str, str]  # (sample_id, label, path)
# What the service gives the forgetter to build a superseding contribution: (contribution, fingerprint), or None
# when the encoded training set is exactly what the latest contribution was made from (or nothing to contribute).
BuildContribution = Callable[[], tuple[Contribution, str] | None]


def resolve(
    selector: ForgetSelector, indexed: list[tuple[str, str, str, datetime]], found: list[LocalSample]
) -> list[Resolved]:
    """The files a selector covers: indexed samples (held-out ones included) and files found in the folder.

    The folder scan also catches files the index does not hold: one that arrived since the last scan,
    or a second file with an id already taken (the index keeps only the first).
    """
    candidates: dict[str, tuple[str, str, datetime]] = {path: (sid, label, ts) for sid, label, path, ts in indexed}
    for s in found:
        candidates.setdefault(str(s.path), (s.sample_id, s.label, s.timestamp))
    ids = set(selector.sample_ids or ())

    def covered(sid: str, label: str, ts: datetime) -> bool:
        if selector.kind == "all":
            return True
        if selector.kind == "samples":
            return sid in ids
        if selector.kind == "label":
            return label == selector.label
        return (selector.since is None or ts >= selector.since) and (selector.until is None or ts < selector.until)

    return sorted((sid, label, path) for path, (sid, label, ts) in candidates.items() if covered(sid, label, ts))


def folder_candidates(data_dir: Path, selector: ForgetSelector) -> list[LocalSample]:
    """Files in the data folder a selector may cover, for `resolve`.

    Selectors by id or label need no timestamps, so only the folder listing is read (fast at thousands of files);
    time windows and `all` use the full scan, which reads metadata.csv for the timestamps.
    """
    if selector.kind in ("time_window", "all"):
        return scan(data_dir)
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    ids = set(selector.sample_ids or ())
    epoch = datetime.fromtimestamp(0, UTC)  # not used by these selectors
    out = []
    for label_dir in os.scandir(root):
        if not label_dir.is_dir() or (selector.kind == "label" and label_dir.name != selector.label):
            continue
        for f in os.scandir(label_dir.path):
            stem, suffix = os.path.splitext(f.name)
            if suffix.lower() in SUFFIXES and (selector.kind == "label" or stem in ids) and f.is_file():
                out.append(LocalSample(stem, label_dir.name, Path(f.path), epoch))
    return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def delete_files(data_dir: Path, resolved: list[Resolved]) -> None:
    """Unlink the files (already missing ones are fine), fsync their folders, remove label folders left empty."""
    root = Path(data_dir).resolve()
    folders: set[Path] = set()
    for _, _, path in resolved:
        p = Path(path)
        if not p.resolve().is_relative_to(root):
            raise ValueError(f"refusing to delete {p}: it is not under the data folder {root}")
        p.unlink(missing_ok=True)
        folders.add(p.parent)
    for folder in folders:
        if not folder.is_dir():
            continue
        _fsync_dir(folder)
        if folder != root and not any(folder.iterdir()):
            folder.rmdir()
    if folders:
        _fsync_dir(root)


def remove_metadata_rows(data_dir: Path, sample_ids: set[str]) -> int:
    """Drop the rows of `sample_ids` from `<data_dir>/metadata.csv`, rewritten atomically; the rows removed."""
    meta = Path(data_dir) / "metadata.csv"
    if not meta.is_file() or not sample_ids:
        return 0
    with open(meta, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows or "sample_id" not in rows[0]:
        return 0
    col = rows[0].index("sample_id")
    kept = [rows[0]] + [r for r in rows[1:] if not (len(r) > col and r[col] in sample_ids)]
    removed = len(rows) - len(kept)
    if removed:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(kept)
        tmp = meta.with_name(f".{meta.name}.tmp")
        with open(tmp, "w", newline="") as fh:
            fh.write(buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, meta)
        _fsync_dir(meta.parent)
    return removed


@dataclass
class ForgetContext:
    """What the forgetter needs of the site it runs in."""

    site_id: str
    data_dir: Path
    topics: Topics
    store: EdgeStore
    metrics: EdgeMetrics
    operator_keys: dict[str, signing.Ed25519PublicKey]
    site_key: signing.Ed25519PrivateKey
    max_age_s: float
    build_contribution: BuildContribution
    forgotten: Callable[[set[str]], None]  # drop deleted sample ids from in-memory caches
    publish_now: Callable[[str, bytes], None]  # not through the outbox: error reports
    wake_outbox: Callable[[], None]
    wake_main: Callable[[], None]


class Forgetter:
    """Forget requests of one site: `intake` on the network thread, `execute_pending` on the main loop."""

    def __init__(self, ctx: ForgetContext):
        self.ctx = ctx
        self.request_topic = ctx.topics.site(ctx.site_id, "forget/request")
        self.receipt_topic = ctx.topics.site(ctx.site_id, "forget/receipt")

    # --- intake (network thread) ---
    def intake(self, msg: Message) -> Outcome:
        """Verify a request and persist it before the broker is acknowledged; raises Rejected."""
        c = self.ctx
        if not msg.payload:
            return "accepted"  # a retained request being cleared: nothing to do
        body: dict = {}
        try:
            body = decode.loads(msg.payload, MAX_FORGET_REQUEST_BYTES, schema_version=SCHEMA_VERSION)
            problem = None
        except decode.PayloadError as err:
            problem = err
        rid = body.get("request_id")
        ref = rid if isinstance(rid, str) and len(rid) <= 64 else None
        if msg.retain:
            raise Rejected(
                "retained",
                "forget requests are never retained (a retained one is replayed on every subscribe); publish it "
                "without retain, and clear this one by publishing an empty retained message to the topic",
                ref,
            )
        if problem is not None:
            raise Rejected(problem.code, problem.reason)
        if not c.operator_keys:
            log.error(
                "forget request refused: no operator key is configured; list the operators' public keys (PEM) in "
                "operator_public_key_files (fedge-edge keygen --out operator.pem makes a pair)"
            )
            raise Rejected("unknown_key", "this site trusts no operator key (operator_public_key_files is empty)", ref)
        try:
            signing.verify(body, c.operator_keys)
        except signing.SignatureError as err:
            sig = body.get("signature")
            unknown = (
                isinstance(sig, dict) and sig.get("alg") == signing.ALG and sig.get("key_id") not in c.operator_keys
            )
            raise Rejected("unknown_key" if unknown else "signature", str(err), ref) from None
        try:
            request = ForgetRequest.model_validate(body)
        except ValidationError as err:
            e = err.errors()[0]
            where = ".".join(str(p) for p in e["loc"])
            raise Rejected("invalid", f"forget request: {where}: {e['msg']}", ref) from None
        if request.site_id != c.site_id:
            raise Rejected("site_mismatch", f"the request names site {request.site_id!r}, this is {c.site_id!r}", ref)
        received = now()
        seen = c.store.forget_row(request.request_id)
        if seen is None:
            age = (received - request.issued_at).total_seconds()
            if age > c.max_age_s:
                raise Rejected("replay", f"issued {age:.0f} s ago; this site accepts requests up to "
                               f"{c.max_age_s:.0f} s old (forget_max_age_s)", ref)  # fmt: skip
            if age < -MAX_CLOCK_SKEW_S:
                raise Rejected("replay", f"issued {-age:.0f} s in the future; at most {MAX_CLOCK_SKEW_S:.0f} s of "
                               "clock skew is accepted", ref)  # fmt: skip
        state = c.store.forget_record(
            request.request_id, msg.payload, request.issued_at.isoformat(), received.isoformat()
        )
        if state == "different":
            raise Rejected("duplicate_id", f"request id {request.request_id} was used before for another request", ref)
        if state == "same":
            row = c.store.forget_row(request.request_id)
            if row is not None and row.receipt is not None and row.receipt_id is not None:
                c.store.enqueue(row.receipt_id, "forget_receipt", self.receipt_topic, row.receipt)
                c.wake_outbox()
                log.info("forget request %s seen before: its receipt is queued again", request.request_id[:8])
            else:
                log.info("forget request %s seen before and still being executed", request.request_id[:8])
            return "duplicate"
        log.info(
            "forget request %s from %s persisted (%s selector): %s",
            request.request_id[:8], request.issuer, request.selector.kind, request.reason,
        )  # fmt: skip
        c.wake_main()
        return "accepted"

    def report(self, msg: Message, err: Rejected) -> None:
        """Answer a refused request on this site's own `errors` topic, where the operator listens."""
        report = ErrorReport(
            error_id=new_id(), site_id=self.ctx.site_id, at=now(), topic=msg.topic, code=err.code,  # type: ignore[arg-type]
            reason=err.reason, ref_id=err.ref_id, payload_sha256=hashlib.sha256(msg.payload).hexdigest(),
            payload_bytes=len(msg.payload),
        )  # fmt: skip
        self.ctx.publish_now(self.ctx.topics.site(self.ctx.site_id, "errors"), report.model_dump_json().encode())

    # --- execution (main loop) ---
    def execute_pending(self) -> int:
        """Run every request that has no receipt yet to its receipt, in the order received; how many were finished."""
        done = 0
        for row in self.ctx.store.forget_rows(unfinished=True):
            try:
                self.execute(row.request_id)
                done += 1
            except Exception:  # retried at the next scan; the request stays persisted at the step that failed
                self.ctx.metrics.forget_failures.inc()
                log.exception("forget request %s failed at state %s; retrying at the next scan",
                              row.request_id[:8], self.ctx.store.forget_row(row.request_id).state)  # type: ignore[union-attr]  # fmt: skip
        return done

    def execute(self, request_id: str) -> ForgetRow:
        """Run one request from the state it is in to its receipt."""
        while (row := self.step(request_id)).state != "receipted":
            pass
        return row

    def step(self, request_id: str) -> ForgetRow:
        """Advance a request by one state (one transaction); the row afterwards."""
        row = self.ctx.store.forget_row(request_id)
        if row is None:
            raise KeyError(f"no forget request {request_id}")
        if row.state == "received":
            self._resolve(row)
        elif row.state == "deleting":
            self._delete(row)
        elif row.state == "deleted":
            self._contribute(row)
        elif row.state == "contributed":
            self._receipt(row)
        return self.ctx.store.forget_row(request_id)  # type: ignore[return-value]

    def _resolve(self, row: ForgetRow) -> None:
        c = self.ctx
        request = ForgetRequest.model_validate_json(row.payload)
        resolved = resolve(request.selector, c.store.index_rows(), folder_candidates(c.data_dir, request.selector))
        if request.selector.kind == "samples":
            missing = len(set(request.selector.sample_ids or ()) - {sid for sid, _, _ in resolved})
            if missing:
                log.warning("forget request %s: %d of its sample ids are not at this site", row.request_id[:8], missing)
        c.store.forget_resolved(row.request_id, resolved)

    def _delete(self, row: ForgetRow) -> None:
        c = self.ctx
        resolved = row.resolved or []
        ids = {sid for sid, _, _ in resolved}
        delete_files(c.data_dir, resolved)
        remove_metadata_rows(c.data_dir, ids)
        c.store.forget_deleted(row.request_id, resolved, sorted({label for _, label, _ in resolved}))
        c.forgotten(ids)
        log.info("forget request %s: %d samples deleted (files, metadata.csv rows, index rows and embeddings)",
                 row.request_id[:8], len(resolved))  # fmt: skip

    def _contribute(self, row: ForgetRow) -> None:
        c = self.ctx
        c.store.compact()
        previous = c.store.get("contribution_id")
        built = c.build_contribution()
        if built is None:
            # The encoded training set is what the latest contribution was made from (only held-out or unencoded
            # samples were deleted, or nothing was): no contribution carried the deleted data.
            c.store.forget_contributed(row.request_id, None, previous, None)
            return
        contribution, fingerprint = built
        payload = contribution.to_json_bytes()
        meta = {"contribution_id": contribution.contribution_id, "contributed_fingerprint": fingerprint}
        c.store.forget_contributed(
            row.request_id, contribution.supersedes, contribution.contribution_id,
            (contribution.contribution_id, c.topics.site(c.site_id, "embeddings"), payload, meta),
        )  # fmt: skip
        c.metrics.contributions.inc()
        c.wake_outbox()
        log.info("forget request %s: contribution %s (%d labels) supersedes %s", row.request_id[:8],
                 contribution.contribution_id[:8], len(contribution.labels), (previous or "nothing")[:8])  # fmt: skip

    def _receipt(self, row: ForgetRow) -> None:
        c = self.ctx
        request = ForgetRequest.model_validate_json(row.payload)
        completed = now()
        body = {
            "schema_version": SCHEMA_VERSION, "receipt_id": new_id(), "request_id": row.request_id,
            "site_id": c.site_id, "request_issued_at": request.issued_at.isoformat(),
            "received_at": row.received_at, "completed_at": completed.isoformat(),
            "samples_deleted": row.samples_deleted or 0, "labels_affected": row.labels_affected or [],
            "superseded": row.superseded, "contribution_id": row.contribution_id,
            "public_key": signing.public_pem(c.site_key.public_key()),
        }  # fmt: skip
        signed = signing.sign(body, c.site_key)
        ForgetReceipt.model_validate(signed)  # what the hub will check, checked before it leaves
        payload = json.dumps(signed, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        c.store.forget_receipted(row.request_id, body["receipt_id"], self.receipt_topic, payload)
        c.wake_outbox()
        c.metrics.forgotten_samples.inc(row.samples_deleted or 0)
        took = (completed - datetime.fromisoformat(row.received_at)) / timedelta(seconds=1)
        c.metrics.forget_seconds.observe(max(0.0, took))
        log.info("forget request %s: receipt %s queued, %.3f s after the request was received",
                 row.request_id[:8], body["receipt_id"][:8], took)  # fmt: skip
