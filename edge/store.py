"""The edge's durable state in one SQLite file: the sample index, the outbox and a few facts (meta).

- samples: one row per local file (id, label, path, timestamp, content hash, held-out flag, embedding),
  kept in step with the data folder by `sync`.
- outbox: payloads to publish, kept until the broker acknowledged them. A contribution enters the
  outbox in the same transaction that records it as the site's latest, so a crash either loses the
  whole step (redone on restart from the same files) or keeps it whole (resent on restart).
- meta: the latest contribution, its fingerprint, the installed model version, byte counters.
- forget_requests: each forget request as received (write-ahead, before the broker's ack) and how far its
  execution got: received -> deleting (the samples it covers, resolved) -> deleted -> contributed -> receipted.
  Each step is one transaction, so a restart resumes at the step that did not commit (edge/forget.py).

Deleted rows must not linger in the file's bytes: `secure_delete` zeroes freed content, and `compact`
empties the write-ahead log and rebuilds the file after a forget.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from contract.layout import LocalSample
from runtime.sqlite import open_db, transaction

log = logging.getLogger("fedge.edge")

SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    sample_id TEXT PRIMARY KEY,
    label TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    timestamp TEXT NOT NULL,
    holdout INTEGER NOT NULL,
    caption TEXT,
    embedding BLOB
);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    msg_id TEXT UNIQUE NOT NULL,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_at TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS forget_requests (
    request_id TEXT PRIMARY KEY,
    payload BLOB NOT NULL,
    payload_sha256 TEXT NOT NULL,
    issued_at TEXT NOT NULL,
    received_at TEXT NOT NULL,
    state TEXT NOT NULL,
    resolved TEXT,
    samples_deleted INTEGER,
    labels_affected TEXT,
    superseded TEXT,
    contribution_id TEXT,
    receipt_id TEXT,
    receipt BLOB,
    updated_at TEXT NOT NULL
);
"""
FORGET_STATES = ("received", "deleting", "deleted", "contributed", "receipted")


def holdout_of(sample_id: str, fraction: float) -> bool:
    """Whether a sample is held out for evaluation: a stable function of its id, so it never flips."""
    h = int(hashlib.sha256(sample_id.encode()).hexdigest()[:8], 16)
    return h / 2**32 < fraction


@dataclass(frozen=True)
class IndexedSample:
    """A sample as the index holds it."""

    sample_id: str
    label: str
    path: Path
    sha256: str
    holdout: bool


@dataclass(frozen=True)
class ForgetRow:
    """A forget request as the store holds it, and how far its execution got."""

    request_id: str
    payload: bytes
    payload_sha256: str
    issued_at: str
    received_at: str
    state: str
    resolved: list[tuple[str, str, str]] | None  # (sample_id, label, path), while state is deleting
    samples_deleted: int | None
    labels_affected: list[str] | None
    superseded: str | None
    contribution_id: str | None
    receipt_id: str | None
    receipt: bytes | None


@dataclass(frozen=True)
class OutboxItem:
    """A payload waiting for the broker's acknowledgement."""

    seq: int
    msg_id: str
    kind: str
    topic: str
    payload: bytes


class EdgeStore:
    """Thread-safe access to the edge's state file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._db = open_db(self.path, SCHEMA)
        # Freed pages are overwritten with zeros, so a deleted sample's row does not linger in free pages.
        self._db.execute("PRAGMA secure_delete=ON")
        self._lock = threading.RLock()

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._db.close()

    # --- meta ---
    def get(self, key: str, default: str | None = None) -> str | None:
        """A meta value."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def _set(self, key: str, value: str) -> None:
        self._db.execute(
            "INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value)
        )

    def set(self, key: str, value: str) -> None:
        """Set a meta value durably."""
        with self._lock:
            self._set(key, value)

    def delete(self, key: str) -> None:
        """Remove a meta value."""
        with self._lock:
            self._db.execute("DELETE FROM meta WHERE key = ?", (key,))

    def counters(self, name: str) -> dict[str, int]:
        """A JSON dict of byte counters kept in meta."""
        return json.loads(self.get(name, "{}") or "{}")

    def add_bytes(self, name: str, kind: str, n: int) -> None:
        """Add `n` to counter `kind` of `name` (bytes_sent or bytes_received)."""
        with transaction(self._db, self._lock):
            c = self.counters(name)
            c[kind] = c.get(kind, 0) + n
            self._set(name, json.dumps(c, sort_keys=True))

    # --- sample index ---
    def sync(self, found: list[LocalSample], holdout_fraction: float) -> tuple[list[str], list[str], list[str]]:
        """Bring the index in line with the files found: (added, changed, removed) sample ids.

        A file is re-hashed only when its size or modification time changed. Changed files lose
        their embedding. A sample id found twice (the same stem under two labels) keeps its first
        file; the other is logged as ignored, every scan, until someone renames it.
        """
        added, changed, removed = [], [], []
        with self._lock:
            known = {
                r[0]: r[1:]
                for r in self._db.execute("SELECT sample_id, label, path, size, mtime_ns, caption FROM samples")
            }
            seen: set[str] = set()
            rows = []
            for s in found:
                if s.sample_id in seen:
                    log.warning(
                        "sample id %s is also at %s; ids must be unique, this file is ignored", s.sample_id, s.path
                    )
                    continue
                seen.add(s.sample_id)
                st = s.path.stat()
                prev = known.get(s.sample_id)
                if prev is not None and prev == (s.label, str(s.path), st.st_size, st.st_mtime_ns, s.caption):
                    continue
                sha = hashlib.sha256(s.path.read_bytes()).hexdigest()
                rows.append((s, st, sha))
                (changed if prev is not None else added).append(s.sample_id)
            removed = sorted(set(known) - seen)
            if not rows and not removed:
                return [], [], []
            with transaction(self._db, self._lock):
                for s, st, sha in rows:
                    self._db.execute(
                        "INSERT INTO samples VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL) ON CONFLICT (sample_id) DO UPDATE SET "
                        "label = excluded.label, path = excluded.path, size = excluded.size, mtime_ns = excluded.mtime_ns, "
                        "sha256 = excluded.sha256, timestamp = excluded.timestamp, caption = excluded.caption, embedding = NULL",
                        (s.sample_id, s.label, str(s.path), st.st_size, st.st_mtime_ns, sha, s.timestamp.astimezone(UTC).isoformat(),
                         int(holdout_of(s.sample_id, holdout_fraction)), s.caption),
                    )  # fmt: skip
                self._db.executemany("DELETE FROM samples WHERE sample_id = ?", [(r,) for r in removed])
        return added, changed, removed

    def samples(self, holdout: bool | None = None) -> list[IndexedSample]:
        """Indexed samples (all, training only, or held out only), by sample id."""
        q = "SELECT sample_id, label, path, sha256, holdout FROM samples"
        args: tuple = ()
        if holdout is not None:
            q, args = q + " WHERE holdout = ?", (int(holdout),)
        with self._lock:
            cur = self._db.execute(q + " ORDER BY sample_id", args)
            return [IndexedSample(r[0], r[1], Path(r[2]), r[3], bool(r[4])) for r in cur]

    def sample_count(self, holdout: bool | None = None) -> int:
        """Number of indexed samples (all, training only, or held out only)."""
        q, args = "SELECT COUNT(*) FROM samples", ()
        if holdout is not None:
            q, args = q + " WHERE holdout = ?", (int(holdout),)
        with self._lock:
            return int(self._db.execute(q, args).fetchone()[0])

    def index_rows(self) -> list[tuple[str, str, str, datetime]]:
        """(sample_id, label, path, timestamp) of every indexed sample, held-out ones included."""
        with self._lock:
            rows = self._db.execute(
                "SELECT sample_id, label, path, timestamp FROM samples ORDER BY sample_id"
            ).fetchall()
        return [(r[0], r[1], r[2], datetime.fromisoformat(r[3])) for r in rows]

    def missing_embeddings(self) -> list[IndexedSample]:
        """Training samples not encoded yet."""
        with self._lock:
            cur = self._db.execute(
                "SELECT sample_id, label, path, sha256, holdout FROM samples WHERE embedding IS NULL AND holdout = 0 "
                "ORDER BY sample_id"
            )
            return [IndexedSample(r[0], r[1], Path(r[2]), r[3], bool(r[4])) for r in cur]

    def put_embeddings(self, items: list[tuple[str, str, np.ndarray]]) -> None:
        """Store embeddings for (sample_id, sha256 it was computed from, vector); stale ones are dropped."""
        with transaction(self._db, self._lock):
            self._db.executemany(
                "UPDATE samples SET embedding = ? WHERE sample_id = ? AND sha256 = ?",
                [(np.asarray(v, "<f4").tobytes(), sid, sha) for sid, sha, v in items],
            )

    def training_set(self) -> tuple[list[str], list[str], np.ndarray, str]:
        """(sample ids, labels, embeddings [n, d], fingerprint) of the encoded training samples."""
        with self._lock:
            rows = self._db.execute(
                "SELECT sample_id, label, sha256, embedding FROM samples WHERE holdout = 0 AND embedding IS NOT NULL "
                "ORDER BY sample_id"
            ).fetchall()
        h = hashlib.sha256()
        for sid, label, sha, _ in rows:
            h.update(f"{sid}\0{label}\0{sha}\n".encode())
        emb = np.stack([np.frombuffer(r[3], "<f4") for r in rows]) if rows else np.zeros((0, 0), np.float32)
        return [r[0] for r in rows], [r[1] for r in rows], emb, h.hexdigest()

    def training_captions(self) -> tuple[list[str], list[str], list[str | None], str]:
        """(sample ids, labels, captions, fingerprint) of all training samples: the text path needs no image."""
        with self._lock:
            rows = self._db.execute(
                "SELECT sample_id, label, sha256, caption FROM samples WHERE holdout = 0 ORDER BY sample_id"
            ).fetchall()
        h = hashlib.sha256()
        for sid, label, sha, caption in rows:
            h.update(f"{sid}\0{label}\0{sha}\0{caption or ''}\n".encode())
        return [r[0] for r in rows], [r[1] for r in rows], [r[3] for r in rows], h.hexdigest()

    # --- outbox ---
    def enqueue(self, msg_id: str, kind: str, topic: str, payload: bytes, meta: dict[str, str] | None = None) -> bool:
        """Durably queue a payload (and set `meta` in the same transaction); False if `msg_id` was queued before."""
        with transaction(self._db, self._lock):
            return self._enqueue(msg_id, kind, topic, payload, meta)

    def _enqueue(self, msg_id: str, kind: str, topic: str, payload: bytes, meta: dict[str, str] | None = None) -> bool:
        """`enqueue` inside the caller's transaction."""
        cur = self._db.execute(
            "INSERT OR IGNORE INTO outbox (msg_id, kind, topic, payload, created_at) VALUES (?, ?, ?, ?, ?)",
            (msg_id, kind, topic, payload, datetime.now(UTC).isoformat()),
        )
        for k, v in (meta or {}).items():
            self._set(k, v)
        if kind in ("embeddings", "eval"):
            latest = {"msg_id": msg_id, "topic": topic, "payload": payload.decode()}
            self._set(f"latest_{kind}", json.dumps(latest))
        return cur.rowcount == 1

    def requeue_latest(self, kinds: tuple[str, ...] = ("embeddings", "eval")) -> list[str]:
        """Queue the latest payload of each kind again (unless it is still queued); the kinds requeued.

        The hub deduplicates by payload id, so a resend is harmless; it covers a hub that was not yet
        subscribed, or lost its session, when the payload was first acknowledged by the broker.
        """
        done = []
        for kind in kinds:
            raw = self.get(f"latest_{kind}")
            if raw is None:
                continue
            latest = json.loads(raw)
            if self.enqueue(latest["msg_id"], kind, latest["topic"], latest["payload"].encode()):
                done.append(kind)
        return done

    def pending(self, limit: int = 50) -> list[OutboxItem]:
        """Oldest payloads not yet acknowledged."""
        with self._lock:
            cur = self._db.execute(
                "SELECT seq, msg_id, kind, topic, payload FROM outbox ORDER BY seq LIMIT ?", (limit,)
            )
            return [OutboxItem(r[0], r[1], r[2], r[3], bytes(r[4])) for r in cur]

    def outbox_depth(self) -> int:
        """Payloads waiting for the broker."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def attempted(self, seq: int) -> None:
        """Count a failed publish attempt."""
        with self._lock:
            self._db.execute("UPDATE outbox SET attempts = attempts + 1 WHERE seq = ?", (seq,))

    def acknowledged(self, item: OutboxItem) -> None:
        """The broker has it: drop it from the outbox and count its bytes, in one transaction."""
        with transaction(self._db, self._lock):
            self._db.execute("DELETE FROM outbox WHERE seq = ?", (item.seq,))
            c = self.counters("bytes_sent")
            c[item.kind] = c.get(item.kind, 0) + len(item.payload)
            self._set("bytes_sent", json.dumps(c, sort_keys=True))

    # --- forget requests (edge/forget.py drives the steps) ---
    def forget_record(self, request_id: str, payload: bytes, issued_at: str, received_at: str) -> str:
        """Persist a verified request before it is acknowledged: `new`, `same` (these bytes seen) or `different`."""
        sha = hashlib.sha256(payload).hexdigest()
        with transaction(self._db, self._lock):
            row = self._db.execute(
                "SELECT payload_sha256 FROM forget_requests WHERE request_id = ?", (request_id,)
            ).fetchone()
            if row is not None:
                return "same" if row[0] == sha else "different"
            self._db.execute(
                "INSERT INTO forget_requests (request_id, payload, payload_sha256, issued_at, received_at, state, "
                "updated_at) VALUES (?, ?, ?, ?, ?, 'received', ?)",
                (request_id, payload, sha, issued_at, received_at, datetime.now(UTC).isoformat()),
            )
        return "new"

    def forget_row(self, request_id: str) -> ForgetRow | None:
        """One forget request, or None."""
        rows = self._forget_rows("WHERE request_id = ?", (request_id,))
        return rows[0] if rows else None

    def forget_rows(self, unfinished: bool = False) -> list[ForgetRow]:
        """Forget requests in the order they were received (only those without a receipt, with `unfinished`)."""
        return self._forget_rows("WHERE state != 'receipted'" if unfinished else "", ())

    def _forget_rows(self, where: str, args: tuple) -> list[ForgetRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT request_id, payload, payload_sha256, issued_at, received_at, state, resolved, samples_deleted, "
                f"labels_affected, superseded, contribution_id, receipt_id, receipt FROM forget_requests {where} "
                "ORDER BY rowid",
                args,
            ).fetchall()
        return [
            ForgetRow(r[0], bytes(r[1]), r[2], r[3], r[4], r[5],
                      [tuple(x) for x in json.loads(r[6])] if r[6] is not None else None,  # type: ignore[misc]
                      r[7], json.loads(r[8]) if r[8] is not None else None, r[9], r[10], r[11],
                      bytes(r[12]) if r[12] is not None else None)
            for r in rows
        ]  # fmt: skip

    def _forget_state(self, request_id: str, expected: str, new: str, **fields: object) -> None:
        """Move a request from `expected` to `new` (setting `fields`) inside the caller's transaction."""
        cols = "".join(f", {k} = ?" for k in fields)
        cur = self._db.execute(
            f"UPDATE forget_requests SET state = ?, updated_at = ?{cols} WHERE request_id = ? AND state = ?",
            (new, datetime.now(UTC).isoformat(), *fields.values(), request_id, expected),
        )
        if cur.rowcount != 1:
            raise RuntimeError(f"forget request {request_id} is not in state {expected!r}")

    def forget_resolved(self, request_id: str, resolved: list[tuple[str, str, str]]) -> None:
        """received -> deleting: the (sample_id, label, path) the request covers, fixed before anything is deleted."""
        with transaction(self._db, self._lock):
            self._forget_state(request_id, "received", "deleting", resolved=json.dumps(resolved))

    def forget_deleted(self, request_id: str, resolved: list[tuple[str, str, str]], labels: list[str]) -> None:
        """deleting -> deleted: the index rows (embeddings included) go in the same transaction as the state.

        The resolved list (sample ids and paths) is cleared: once deleted, the site keeps only the count and labels.
        """
        with transaction(self._db, self._lock):
            self._db.executemany(
                "DELETE FROM samples WHERE sample_id = ? AND path = ?", [(sid, path) for sid, _, path in resolved]
            )
            self._forget_state(request_id, "deleting", "deleted", resolved=None, samples_deleted=len(resolved),
                               labels_affected=json.dumps(labels))  # fmt: skip

    def forget_contributed(
        self,
        request_id: str,
        superseded: str | None,
        contribution_id: str | None,
        message: tuple[str, str, bytes, dict[str, str]] | None,
    ) -> None:
        """deleted -> contributed: the superseding contribution (msg_id, topic, payload, meta) enters the outbox too."""
        with transaction(self._db, self._lock):
            if message is not None:
                msg_id, topic, payload, meta = message
                self._enqueue(msg_id, "embeddings", topic, payload, meta)
            self._forget_state(request_id, "deleted", "contributed", superseded=superseded,
                               contribution_id=contribution_id)  # fmt: skip

    def forget_receipted(self, request_id: str, receipt_id: str, topic: str, receipt: bytes) -> None:
        """contributed -> receipted: the signed receipt enters the outbox (after the contribution) and is kept."""
        with transaction(self._db, self._lock):
            self._enqueue(receipt_id, "forget_receipt", topic, receipt)
            self._forget_state(request_id, "contributed", "receipted", receipt_id=receipt_id, receipt=receipt)

    def compact(self, attempts: int = 10) -> None:
        """Rewrite the file without free pages and empty the write-ahead log, so deleted rows leave no bytes behind.

        A checkpoint cannot reset the log while another connection reads an older snapshot; it is retried
        briefly, then RuntimeError (the forget step is retried later, and its receipt waits for it).
        """
        with self._lock:
            for i in range(attempts):
                busy = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                if not busy:
                    self._db.execute("VACUUM")
                    if not self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]:
                        return
                time.sleep(0.05 * (i + 1))
        raise RuntimeError(f"{self.path}: could not checkpoint the write-ahead log (another reader holds it)")
