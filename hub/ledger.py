"""The hub's durable ledger (SQLite): contributions, rejections, evaluations, rounds and every decision.

Each change is one transaction, committed (WAL, synchronous=FULL) before the MQTT message that caused
it is acknowledged. Contributions are immutable; only their state moves:

    active --(newer contribution from the same site)--> superseded

Several hub workers on one host may share the file: SQLite serialises the writers, and a round is
claimed with a conditional UPDATE, so only one worker runs it.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from contract.payloads import Contribution, ErrorReport, Evaluation, ForgetReceipt, RefinementStatistics
from hub.intake import Rejected
from runtime.sqlite import open_db, transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS contributions (
    contribution_id TEXT PRIMARY KEY,
    site_id TEXT NOT NULL,
    encoder_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    received_at TEXT NOT NULL,
    supersedes TEXT,
    payload_sha256 TEXT NOT NULL,
    payload BLOB NOT NULL,
    samples INTEGER NOT NULL,
    labels INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('active', 'superseded')),
    superseded_by TEXT,
    purged_at TEXT
);
CREATE INDEX IF NOT EXISTS contributions_site ON contributions (site_id, state);
CREATE TABLE IF NOT EXISTS rejections (
    error_id TEXT PRIMARY KEY,
    at TEXT NOT NULL,
    site_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    code TEXT NOT NULL,
    reason TEXT NOT NULL,
    ref_id TEXT,
    payload_sha256 TEXT NOT NULL,
    payload_bytes INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS evaluations (
    eval_id TEXT PRIMARY KEY,
    site_id TEXT NOT NULL,
    model_version INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    accuracy REAL,
    at TEXT NOT NULL,
    received_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    round_id INTEGER PRIMARY KEY AUTOINCREMENT,
    requested_at TEXT NOT NULL,
    trigger TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('requested', 'running', 'done', 'failed')),
    started_at TEXT,
    finished_at TEXT,
    contributions TEXT,
    model_version INTEGER,
    error TEXT,
    refinements TEXT
);
CREATE TABLE IF NOT EXISTS refinements (
    statistics_id TEXT PRIMARY KEY,
    site_id TEXT NOT NULL,
    contribution_id TEXT NOT NULL,
    feature_key TEXT NOT NULL,
    created_at TEXT NOT NULL,
    received_at TEXT NOT NULL,
    payload_sha256 TEXT NOT NULL,
    payload BLOB NOT NULL,
    samples INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('active', 'superseded')),
    superseded_by TEXT,
    purged_at TEXT,
    part TEXT NOT NULL DEFAULT 'train'
);
CREATE INDEX IF NOT EXISTS refinements_site ON refinements (site_id, state);
CREATE TABLE IF NOT EXISTS site_keys (
    site_id TEXT PRIMARY KEY,
    key_id TEXT NOT NULL,
    public_key TEXT NOT NULL,
    pinned_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS forget_receipts (
    receipt_id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL,
    site_id TEXT NOT NULL,
    superseded TEXT,
    contribution_id TEXT,
    request_issued_at TEXT NOT NULL,
    received_at TEXT NOT NULL,
    payload BLOB NOT NULL,
    certificate_id TEXT
);
CREATE TABLE IF NOT EXISTS certificates (
    certificate_id TEXT PRIMARY KEY,
    issued_at TEXT NOT NULL,
    model_version_after INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS model_versions (
    version INTEGER PRIMARY KEY,
    created_at TEXT NOT NULL,
    method TEXT NOT NULL,
    trained_on TEXT NOT NULL,
    stats_digests TEXT,
    training_digest TEXT,
    manifest BLOB,
    weights TEXT
);
CREATE TABLE IF NOT EXISTS framu_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    state TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS framu_pins (
    subject TEXT PRIMARY KEY,
    pinned_at TEXT NOT NULL,
    note TEXT
);
CREATE TABLE IF NOT EXISTS framu_rounds (
    model_version INTEGER PRIMARY KEY,
    mode TEXT NOT NULL,
    weights TEXT,
    attention TEXT NOT NULL,
    recorded_at TEXT NOT NULL,
    reward REAL,
    td_error REAL,
    rewarded_at TEXT
);
CREATE TABLE IF NOT EXISTS automatic_unlearning (
    contribution_id TEXT PRIMARY KEY,
    site_id TEXT NOT NULL,
    reason TEXT NOT NULL CHECK (reason IN ('outdated', 'irrelevant')),
    figures TEXT NOT NULL,
    decided_at TEXT NOT NULL,
    certificate_id TEXT
);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    detail TEXT NOT NULL
);
"""


def weights_from_hex(text: str | None) -> dict[str, float] | None:
    """A model version's recorded FRAMU weights (stored as float.hex() strings, exact), or None for uniform."""
    return None if not text else {k: float.fromhex(v) for k, v in json.loads(text).items()}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class RoundRow:
    """One round as the ledger records it."""

    round_id: int
    trigger: str
    state: str
    contributions: list[str]
    model_version: int | None
    error: str | None


class Ledger:
    """Thread-safe access to one ledger file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._db = open_db(self.path, SCHEMA)
        self._lock = threading.Lock()
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(contributions)")}
        if "purged_at" not in columns:  # a ledger written before forgetting existed
            self._db.execute("ALTER TABLE contributions ADD COLUMN purged_at TEXT")
        if "weights" not in {r[1] for r in self._db.execute("PRAGMA table_info(model_versions)")}:
            self._db.execute("ALTER TABLE model_versions ADD COLUMN weights TEXT")  # written before FRAMU
        if "refinements" not in {r[1] for r in self._db.execute("PRAGMA table_info(rounds)")}:
            self._db.execute("ALTER TABLE rounds ADD COLUMN refinements TEXT")  # written before refinement rounds
        if "part" not in {r[1] for r in self._db.execute("PRAGMA table_info(refinements)")}:
            # written before the refit: every statistics record summed a site's training samples
            self._db.execute("ALTER TABLE refinements ADD COLUMN part TEXT NOT NULL DEFAULT 'train'")
        if "heads" not in {r[1] for r in self._db.execute("PRAGMA table_info(evaluations)")}:
            # written before the delivery gate: evaluations carried one accuracy
            self._db.execute("ALTER TABLE evaluations ADD COLUMN balanced_accuracy REAL")
            self._db.execute("ALTER TABLE evaluations ADD COLUMN heads TEXT")

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._db.close()

    def _tx(self):
        return transaction(self._db, self._lock)

    def _decide(self, kind: str, subject: str, detail: dict) -> None:
        self._db.execute(
            "INSERT INTO decisions (at, kind, subject, detail) VALUES (?, ?, ?, ?)",
            (_now(), kind, subject, json.dumps(detail, sort_keys=True)),
        )

    # --- contributions ---
    def ingest(self, c: Contribution, payload: bytes) -> bool:
        """Record a validated contribution; True if new, False for a harmless redelivery.

        Raises Rejected for an id reused with different content, or a `supersedes` that names no
        earlier contribution of the same site. Nothing is written then.
        """
        sha = hashlib.sha256(payload).hexdigest()
        with self._tx():
            row = self._db.execute(
                "SELECT payload_sha256, site_id, payload FROM contributions WHERE contribution_id = ?",
                (c.contribution_id,),
            ).fetchone()
            if row is not None:
                same = row[0] == sha or (
                    bool(row[2]) and Contribution.model_validate_json(row[2]).content_sha256() == c.content_sha256()
                )
                if same and row[1] == c.site_id:
                    return False
                raise Rejected(
                    "duplicate_id",
                    f"contribution_id {c.contribution_id} was already used for different content; ids are never reused",
                    c.contribution_id,
                )
            if c.supersedes is not None:
                prev = self._db.execute(
                    "SELECT 1 FROM contributions WHERE contribution_id = ? AND site_id = ?", (c.supersedes, c.site_id)
                ).fetchone()
                if prev is None:
                    raise Rejected(
                        "unknown_supersedes",
                        f"supersedes {c.supersedes}, which is no contribution of site {c.site_id}",
                        c.contribution_id,
                    )
            replaced = [
                r[0]
                for r in self._db.execute(
                    "SELECT contribution_id FROM contributions WHERE site_id = ? AND state = 'active'", (c.site_id,)
                )
            ]
            self._db.execute(
                "INSERT INTO contributions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'active', NULL, NULL)",
                (
                    c.contribution_id, c.site_id, c.encoder_id, c.created_at.isoformat(), _now(), c.supersedes, sha,
                    payload, c.n_samples, len(c.labels),
                ),
            )  # fmt: skip
            for old in replaced:
                self._db.execute(
                    "UPDATE contributions SET state = 'superseded', superseded_by = ? WHERE contribution_id = ?",
                    (c.contribution_id, old),
                )
            self._decide("ingest", c.contribution_id, {"site": c.site_id, "supersedes": replaced})
        return True

    def active(self) -> list[Contribution]:
        """The active contribution of every site (unless FRAMU unlearned it), in contribution-id order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT payload FROM contributions WHERE state = 'active' AND contribution_id NOT IN (SELECT contribution_id FROM automatic_unlearning) "
                "ORDER BY contribution_id"
            ).fetchall()
        return [Contribution.model_validate_json(r[0]) for r in rows]

    def active_ids(self) -> set[str]:
        """Ids of the active contributions that carry samples (what a round would train on), without parsing them."""
        with self._lock:
            rows = self._db.execute(
                "SELECT contribution_id FROM contributions WHERE state = 'active' AND labels > 0 AND contribution_id NOT IN (SELECT contribution_id FROM automatic_unlearning)"
            )
            return {r[0] for r in rows}

    def active_sites(self) -> set[str]:
        """Sites whose active contribution carries samples (what a round would train on)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT site_id FROM contributions WHERE state = 'active' AND labels > 0 AND contribution_id "
                "NOT IN (SELECT contribution_id FROM automatic_unlearning)"
            )
            return {r[0] for r in rows}

    def counts_by_state(self) -> dict[str, int]:
        """Number of contributions per state."""
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM contributions GROUP BY state").fetchall()
            unlearned = self._db.execute(
                "SELECT COUNT(*) FROM automatic_unlearning a JOIN contributions c USING (contribution_id) "
                "WHERE c.state = 'active'"
            ).fetchone()[0]
        counts = {"active": 0, "superseded": 0, **dict(rows)}
        # A contribution FRAMU unlearned stays its site's latest, but is no longer trained on.
        counts["active"] -= unlearned
        counts["unlearned"] = unlearned
        return counts

    def contribution_ids(self, site_id: str | None = None) -> list[str]:
        """Every contribution id ever ingested (optionally of one site), oldest first."""
        q = "SELECT contribution_id FROM contributions"
        args: tuple = ()
        if site_id is not None:
            q, args = q + " WHERE site_id = ?", (site_id,)
        with self._lock:
            return [r[0] for r in self._db.execute(q + " ORDER BY received_at, contribution_id", args)]

    # --- rejections and evaluations ---
    def reject(self, report: ErrorReport) -> None:
        """Record why a payload was refused."""
        self.reject_raw(report.error_id, report.site_id, report.topic, report.code, report.reason, report.ref_id,
                        report.payload_sha256, report.payload_bytes)  # fmt: skip

    def reject_raw(
        self, error_id: str, site_id: str, topic: str, code: str, reason: str, ref_id: str | None, sha: str, n: int
    ) -> None:
        """Record a refusal that has no ErrorReport (a topic no site may use has no site id and no errors topic)."""
        with self._tx():
            self._db.execute(
                "INSERT OR IGNORE INTO rejections VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (error_id, _now(), site_id, topic[:512], code, reason[:2000], ref_id, sha, n),
            )

    def rejections(self) -> list[dict]:
        """Every recorded rejection, oldest first."""
        with self._lock:
            cur = self._db.execute("SELECT site_id, topic, code, reason, ref_id FROM rejections ORDER BY at")
            return [dict(zip(("site_id", "topic", "code", "reason", "ref_id"), r, strict=True)) for r in cur]

    def record_evaluation(self, e: Evaluation) -> bool:
        """Store a site's federated evaluation; False for a redelivery."""
        with self._tx():
            cur = self._db.execute(
                "INSERT OR IGNORE INTO evaluations (eval_id, site_id, model_version, samples, accuracy, at, received_at,"
                " balanced_accuracy, heads) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (e.eval_id, e.site_id, e.model_version, e.samples, e.accuracy, e.at.isoformat(), _now(),
                 e.balanced_accuracy, json.dumps(e.heads, sort_keys=True) if e.heads else None),
            )  # fmt: skip
            return cur.rowcount == 1

    def evaluations(self, model_version: int | None = None) -> list[dict]:
        """Federated evaluations (latest per site and version); `heads`: each head's confusion matrix, or None."""
        q = "SELECT site_id, model_version, samples, accuracy, balanced_accuracy, heads FROM evaluations"
        args: tuple = ()
        if model_version is not None:
            q, args = q + " WHERE model_version = ?", (model_version,)
        with self._lock:
            cur = self._db.execute(q + " ORDER BY received_at", args)
            latest = {(r[0], r[1]): r for r in cur}
        keys = ("site_id", "model_version", "samples", "accuracy", "balanced_accuracy", "heads")
        rows = [dict(zip(keys, r, strict=True)) for r in latest.values()]
        for r in rows:
            r["heads"] = json.loads(r["heads"]) if r["heads"] else None
        return rows

    # --- the delivery gate ---
    def record_gate(self, version: int, decision: dict, signed_manifest: bytes) -> bool:
        """The delivery gate's decision on model `version`, with the signed manifest that told the sites; False
        (nothing written) when another hub worker recorded one first."""
        with self._tx():
            taken = self._db.execute(
                "SELECT 1 FROM decisions WHERE kind = 'delivery_gate' AND subject = ?", (f"v{version}",)
            ).fetchone()
            if taken:
                return False
            self._decide("delivery_gate", f"v{version}", {**decision, "signed_manifest": signed_manifest.decode()})
            return True

    def gate_decision(self, version: int) -> dict | None:
        """The latest recorded gate decision on model `version` (with its signed manifest), or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT detail FROM decisions WHERE kind = 'delivery_gate' AND subject = ? ORDER BY id DESC LIMIT 1",
                (f"v{version}",),
            ).fetchone()
        return json.loads(row[0]) if row else None

    # --- rounds ---
    def request_round(self, trigger: str) -> int:
        """Ask for a round (the CLI's `round start`, or the policy); returns its id."""
        with self._tx():
            open_ = self._db.execute("SELECT round_id FROM rounds WHERE state = 'requested'").fetchone()
            if open_ is not None:
                return int(open_[0])
            cur = self._db.execute(
                "INSERT INTO rounds (requested_at, trigger, state) VALUES (?, ?, 'requested')", (_now(), trigger)
            )
            return int(cur.lastrowid)

    def claim_round(self) -> int | None:
        """Move the oldest requested round to running, if no round is running; its id, or None."""
        with self._tx():
            if self._db.execute("SELECT 1 FROM rounds WHERE state = 'running'").fetchone():
                return None
            row = self._db.execute("SELECT round_id FROM rounds WHERE state = 'requested' ORDER BY round_id").fetchone()
            if row is None:
                return None
            self._db.execute(
                "UPDATE rounds SET state = 'running', started_at = ? WHERE round_id = ? AND state = 'requested'",
                (_now(), row[0]),
            )
            return int(row[0])

    def finish_round(
        self, round_id: int, contributions: list[str], model_version: int | None, error: str | None = None,
        refinements: list[str] | None = None,
    ) -> None:  # fmt: skip
        """Close a running round as done (with its model version) or failed (with the error).

        `refinements`: the refinement statistics the round's model was solved from (None: not a refined model).
        """
        with self._tx():
            self._db.execute(
                "UPDATE rounds SET state = ?, finished_at = ?, contributions = ?, model_version = ?, error = ?, "
                "refinements = ? WHERE round_id = ?",
                ("failed" if error else "done", _now(), json.dumps(contributions), model_version, error,
                 None if refinements is None else json.dumps(sorted(refinements)), round_id),
            )  # fmt: skip
            self._decide("round", str(round_id), {"model_version": model_version, "error": error})

    def interrupt_round(self, round_id: int, reason: str) -> int:
        """Record a running round as failed by a stop and request it again; the new round's id."""
        with self._tx():
            self._db.execute(
                "UPDATE rounds SET state = 'failed', finished_at = ?, error = ? WHERE round_id = ? AND state = 'running'",
                (_now(), reason, round_id),
            )
            open_ = self._db.execute("SELECT round_id FROM rounds WHERE state = 'requested'").fetchone()
            if open_ is not None:
                redo = int(open_[0])
            else:
                redo = int(self._db.execute(
                    "INSERT INTO rounds (requested_at, trigger, state) VALUES (?, ?, 'requested')",
                    (_now(), f"redo:{round_id}"),
                ).lastrowid)  # fmt: skip
            self._decide("round", str(round_id), {"interrupted": reason, "redo": redo})
            return redo

    def redo_interrupted_rounds(self) -> list[int]:
        """On start: rounds left 'running' by a crash or a stop are failed and requested again; their ids."""
        with self._lock:
            ids = [int(r[0]) for r in self._db.execute("SELECT round_id FROM rounds WHERE state = 'running'")]
        for round_id in ids:
            self.interrupt_round(round_id, "hub stopped during the round; redone on the next start")
        return ids

    def rounds(self) -> list[RoundRow]:
        """Every round, oldest first."""
        with self._lock:
            cur = self._db.execute(
                "SELECT round_id, trigger, state, contributions, model_version, error FROM rounds ORDER BY round_id"
            )
            return [RoundRow(r[0], r[1], r[2], json.loads(r[3] or "[]"), r[4], r[5]) for r in cur]

    def round_trigger(self, round_id: int) -> str | None:
        """What asked for a round (min_sites, deadline, forget, framu, manual, redo:N)."""
        with self._lock:
            row = self._db.execute("SELECT trigger FROM rounds WHERE round_id = ?", (round_id,)).fetchone()
        return None if row is None else str(row[0])

    def contribution_payload_info(self, contribution_id: str) -> tuple[str, int] | None:
        """(payload sha256, payload bytes) of a contribution, for messages that refer to it."""
        with self._lock:
            row = self._db.execute(
                "SELECT payload_sha256, LENGTH(payload) FROM contributions WHERE contribution_id = ?",
                (contribution_id,),
            ).fetchone()
        return None if row is None else (str(row[0]), int(row[1]))

    def last_trained_set(self) -> set[str] | None:
        """Contribution ids of the last successful round, or None before the first."""
        with self._lock:
            row = self._db.execute(
                "SELECT contributions FROM rounds WHERE state = 'done' ORDER BY round_id DESC LIMIT 1"
            ).fetchone()
        return None if row is None else set(json.loads(row[0]))

    def last_refined_set(self) -> set[str]:
        """Refinement statistics ids of the last successful round's model (empty when it was not refined)."""
        with self._lock:
            row = self._db.execute(
                "SELECT refinements FROM rounds WHERE state = 'done' ORDER BY round_id DESC LIMIT 1"
            ).fetchone()
        return set(json.loads(row[0])) if row and row[0] else set()

    # --- refinement statistics (hub/refinement): one active record per site and part, tied to its contribution ---
    _ACTIVE_BASIS = (
        "contribution_id IN (SELECT contribution_id FROM contributions WHERE state = 'active') AND contribution_id "
        "NOT IN (SELECT contribution_id FROM automatic_unlearning)"
    )

    def ingest_refinement(self, st: RefinementStatistics, payload: bytes) -> bool:
        """Record a site's validated refinement statistics; True if new, False for a harmless redelivery.

        Raises Rejected (nothing written) for an id reused with other content, or statistics whose
        contribution is not the site's active one (`stale`: they would describe data the site has replaced).
        """
        sha = hashlib.sha256(payload).hexdigest()
        ref = st.statistics_id
        with self._tx():
            row = self._db.execute(
                "SELECT payload_sha256, site_id FROM refinements WHERE statistics_id = ?", (ref,)
            ).fetchone()
            if row is not None:
                if row[0] == sha and row[1] == st.site_id:
                    return False
                raise Rejected("duplicate_id", f"statistics_id {ref} was already used for different content", ref)
            basis = self._db.execute(
                f"SELECT 1 FROM contributions WHERE contribution_id = ? AND site_id = ? AND {self._ACTIVE_BASIS}",  # noqa: S608
                (st.contribution_id, st.site_id),
            ).fetchone()
            if basis is None:
                raise Rejected(
                    "stale",
                    f"contribution {st.contribution_id} is not the active contribution of site {st.site_id}; "
                    "statistics go with the site's latest contribution",
                    ref,
                )
            replaced = [r[0] for r in self._db.execute(
                "SELECT statistics_id FROM refinements WHERE site_id = ? AND part = ? AND state = 'active'",
                (st.site_id, st.part))]  # fmt: skip
            self._db.execute(
                "INSERT INTO refinements VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'active', NULL, NULL, ?)",
                (ref, st.site_id, st.contribution_id, st.feature_key, st.created_at.isoformat(), _now(), sha, payload,
                 st.n_samples, st.part),
            )  # fmt: skip
            self._db.executemany(
                "UPDATE refinements SET state = 'superseded', superseded_by = ? WHERE statistics_id = ?",
                [(ref, old) for old in replaced],
            )
            self._decide("refinement", ref, {"site": st.site_id, "contribution": st.contribution_id, "part": st.part,
                                             "supersedes": replaced})  # fmt: skip
        return True

    def active_refinements(self, feature_key: str, part: str = "train") -> list[tuple[str, str, bytes]]:
        """(statistics id, site, payload) of every site's active statistics of `part` for `feature_key` whose
        contribution is still active (a superseded or unlearned contribution takes its statistics with it), in id
        order."""
        with self._lock:
            cur = self._db.execute(
                f"SELECT statistics_id, site_id, payload FROM refinements WHERE state = 'active' AND feature_key = ? "  # noqa: S608
                f"AND part = ? AND {self._ACTIVE_BASIS} ORDER BY statistics_id",
                (feature_key, part),
            )
            return [(r[0], r[1], bytes(r[2])) for r in cur]

    def refit_choice(self) -> dict | None:
        """The newest delivery-gate decision that chose a refined head to be solved again from every sample (its
        `refit`: lambda, head, version and the training statistics it was chosen on), or None."""
        with self._lock:
            rows = self._db.execute(
                "SELECT detail FROM decisions WHERE kind = 'delivery_gate' AND detail LIKE '%\"refit\"%' "
                "ORDER BY id DESC"
            )
            for (detail,) in rows:  # the text filter only narrows; the key decides
                refit = json.loads(detail).get("refit")
                if refit:
                    return refit
        return None

    def refinement_payloads(self, statistics_ids: list[str]) -> dict[str, bytes]:
        """Stored payloads of refinement statistics (purged ones are empty)."""
        with self._lock:
            return {
                r[0]: bytes(r[1])
                for sid in statistics_ids
                for r in self._db.execute(
                    "SELECT statistics_id, payload FROM refinements WHERE statistics_id = ?", (sid,)
                )
            }

    def refinements_based_on(self, contribution_ids: list[str]) -> list[str]:
        """Ids of the refinement statistics that went with these contributions."""
        with self._lock:
            return sorted(
                r[0]
                for cid in contribution_ids
                for r in self._db.execute("SELECT statistics_id FROM refinements WHERE contribution_id = ?", (cid,))
            )

    # --- forgetting: site keys, receipts, model versions, certificates ---
    def site_key(self, site_id: str) -> str | None:
        """The public key (PEM) pinned for a site, if any."""
        with self._lock:
            row = self._db.execute("SELECT public_key FROM site_keys WHERE site_id = ?", (site_id,)).fetchone()
        return row[0] if row else None

    def record_receipt(self, receipt: ForgetReceipt, payload: bytes, key_id: str) -> bool:
        """Store a verified receipt (pinning the site's key on its first one); False for a redelivery."""
        with self._tx():
            if self._db.execute("SELECT 1 FROM forget_receipts WHERE receipt_id = ?", (receipt.receipt_id,)).fetchone():
                return False
            self._db.execute(
                "INSERT OR IGNORE INTO site_keys VALUES (?, ?, ?, ?)",
                (receipt.site_id, key_id, receipt.public_key, _now()),
            )
            self._db.execute(
                "INSERT INTO forget_receipts VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                (receipt.receipt_id, receipt.request_id, receipt.site_id, receipt.superseded, receipt.contribution_id,
                 receipt.request_issued_at.isoformat(), _now(), payload),
            )  # fmt: skip
            self._decide("forget_receipt", receipt.request_id, {"site": receipt.site_id, "superseded": receipt.superseded,
                                                                "contribution": receipt.contribution_id})  # fmt: skip
        return True

    def open_receipts(self) -> list[dict]:
        """Receipts not yet covered by a certificate, oldest first."""
        with self._lock:
            cur = self._db.execute(
                "SELECT receipt_id, request_id, site_id, superseded, contribution_id, request_issued_at "
                "FROM forget_receipts WHERE certificate_id IS NULL ORDER BY received_at"
            )
            keys = ("receipt_id", "request_id", "site_id", "superseded", "contribution_id", "request_issued_at")
            return [dict(zip(keys, r, strict=True)) for r in cur]

    def has_contribution(self, contribution_id: str) -> bool:
        """Whether a contribution id was ever ingested."""
        with self._lock:
            q = "SELECT 1 FROM contributions WHERE contribution_id = ?"
            return self._db.execute(q, (contribution_id,)).fetchone() is not None

    def record_model_version(self, version: int, method: str, trained_on: list[str], stats_digests: dict | None,
                             digest: str | None, manifest: bytes | None,
                             weights: dict[str, float] | None = None) -> None:  # fmt: skip
        """What a published model version was trained on (the audit trail's answer to 'which data is in v3?').

        `weights`: each contribution's weight in a weighted fit (FRAMU, mode auto), None for uniform.
        """
        with self._tx():
            self._db.execute(
                "INSERT OR REPLACE INTO model_versions (version, created_at, method, trained_on, stats_digests, "
                "training_digest, manifest, weights) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (version, _now(), method, json.dumps(sorted(trained_on)),
                 json.dumps(stats_digests, sort_keys=True) if stats_digests is not None else None, digest, manifest,
                 None if weights is None else json.dumps({k: float(v).hex() for k, v in sorted(weights.items())})),
            )  # fmt: skip

    def model_versions(self) -> list[dict]:
        """Every recorded model version, oldest first."""
        with self._lock:
            cur = self._db.execute(
                "SELECT version, created_at, method, trained_on, stats_digests, training_digest, weights "
                "FROM model_versions ORDER BY version"
            )
            return [
                {"version": r[0], "created_at": r[1], "method": r[2], "trained_on": json.loads(r[3]),
                 "stats_digests": json.loads(r[4]) if r[4] else None, "training_digest": r[5],
                 "weights": weights_from_hex(r[6])}
                for r in cur
            ]  # fmt: skip

    def record_certificate(self, certificate_id: str, version: int, payload: bytes, receipt_ids: list[str],
                           purge: list[str]) -> None:  # fmt: skip
        """Store a signed certificate, close its receipts and purge the removed contributions' payloads, at once.

        The ledger keeps a removed contribution's id, site, sha256 and history for the audit trail; its
        prototypes, derived from data that was deleted, go.
        """
        with self._tx():
            self._db.execute(
                "INSERT OR IGNORE INTO certificates VALUES (?, ?, ?, ?)", (certificate_id, _now(), version, payload)
            )
            self._db.executemany(
                "UPDATE forget_receipts SET certificate_id = ? WHERE receipt_id = ?",
                [(certificate_id, r) for r in receipt_ids],
            )
            self._db.executemany(
                "UPDATE contributions SET payload = X'', purged_at = ? WHERE contribution_id = ? AND state = 'superseded'",
                [(_now(), c) for c in purge],
            )
            # Refinement statistics of a removed contribution: derived from deleted data too.
            self._db.executemany(
                "UPDATE refinements SET payload = X'', purged_at = ? WHERE statistics_id = ? AND contribution_id IN "
                "(SELECT contribution_id FROM contributions WHERE state = 'superseded')",
                [(_now(), c) for c in purge],
            )
            self._decide("certificate", certificate_id, {"model_version": version, "receipts": receipt_ids,
                                                         "purged": purge})  # fmt: skip

    def certificates_for(self, version: int) -> list[bytes]:
        """The certificates that name model `version` as their model after, as signed, oldest first."""
        with self._lock:
            cur = self._db.execute(
                "SELECT payload FROM certificates WHERE model_version_after = ? AND LENGTH(payload) > 0 "
                "ORDER BY issued_at, certificate_id",
                (version,),
            )
            return [bytes(r[0]) for r in cur]

    def contribution_site(self, contribution_id: str) -> str | None:
        """The site a contribution came from."""
        with self._lock:
            row = self._db.execute(
                "SELECT site_id FROM contributions WHERE contribution_id = ?", (contribution_id,)
            ).fetchone()
        return None if row is None else str(row[0])

    def certificates(self) -> list[bytes]:
        """Every certificate as published, oldest first."""
        with self._lock:
            return [bytes(r[0]) for r in self._db.execute("SELECT payload FROM certificates ORDER BY issued_at")]

    # --- FRAMU: its learning state, operator pins, weights per model version, automatic unlearning ---
    def framu_state(self) -> dict | None:
        """FRAMU's persisted learning state, or None before its first round."""
        with self._lock:
            row = self._db.execute("SELECT state FROM framu_state WHERE id = 1").fetchone()
        return None if row is None else json.loads(row[0])

    def save_framu(self, state: dict, model_version: int | None = None, mode: str | None = None,
                   weights: dict[str, float] | None = None, attention: dict[str, float] | None = None,
                   reward: tuple[float, float] | None = None) -> None:  # fmt: skip
        """Persist FRAMU's state with what it did, in one transaction: a round's weights, or a model's reward."""
        with self._tx():
            self._db.execute(
                "INSERT OR REPLACE INTO framu_state VALUES (1, ?, ?)", (json.dumps(state, sort_keys=True), _now())
            )
            if model_version is not None and attention is not None:
                self._db.execute(
                    "INSERT OR REPLACE INTO framu_rounds (model_version, mode, weights, attention, recorded_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (model_version, mode, None if weights is None else json.dumps(weights, sort_keys=True),
                     json.dumps(attention, sort_keys=True), _now()),
                )  # fmt: skip
            if model_version is not None and reward is not None:
                self._db.execute(
                    "UPDATE framu_rounds SET reward = ?, td_error = ?, rewarded_at = ? WHERE model_version = ?",
                    (reward[0], reward[1], _now(), model_version),
                )

    def framu_rounds(self) -> list[dict]:
        """FRAMU's record per model version, oldest first."""
        with self._lock:
            cur = self._db.execute(
                "SELECT model_version, mode, weights, attention, reward, td_error FROM framu_rounds ORDER BY model_version"
            )
            return [
                {"model_version": r[0], "mode": r[1], "weights": json.loads(r[2]) if r[2] else None,
                 "attention": json.loads(r[3]), "reward": r[4], "td_error": r[5]}
                for r in cur
            ]  # fmt: skip

    def decisions(self, kind_prefix: str, limit: int) -> list[dict]:
        """The newest `limit` decisions whose kind starts with `kind_prefix`, oldest first."""
        with self._lock:
            cur = self._db.execute(
                "SELECT id, at, kind, subject, detail FROM decisions WHERE kind LIKE ? ORDER BY id DESC LIMIT ?",
                (kind_prefix + "%", limit),
            )
            rows = [{"id": r[0], "at": r[1], "kind": r[2], "subject": r[3], "detail": r[4]} for r in cur]
        return rows[::-1]

    def pin(self, subject: str, note: str = "") -> bool:
        """Pin a contribution id or a site id: FRAMU never unlearns it automatically. False if already pinned."""
        with self._tx():
            cur = self._db.execute("INSERT OR IGNORE INTO framu_pins VALUES (?, ?, ?)", (subject, _now(), note))
            if cur.rowcount:
                self._decide("framu_pin", subject, {"note": note})
            return bool(cur.rowcount)

    def unpin(self, subject: str) -> bool:
        """Remove a pin; False if there was none."""
        with self._tx():
            cur = self._db.execute("DELETE FROM framu_pins WHERE subject = ?", (subject,))
            if cur.rowcount:
                self._decide("framu_unpin", subject, {})
            return bool(cur.rowcount)

    def pins(self) -> set[str]:
        """Pinned contribution and site ids."""
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT subject FROM framu_pins")}

    def unlearn_automatically(self, decisions: list[tuple[str, str, str, dict]]) -> list[str]:
        """Record FRAMU decisions (contribution id, site, reason, figures) as unlearned; the ids newly recorded.

        From this commit on the contributions are out of `active()`: the next round trains without them.
        """
        new = []
        with self._tx():
            for cid, site, reason, figures in decisions:
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO automatic_unlearning VALUES (?, ?, ?, ?, ?, NULL)",
                    (cid, site, reason, json.dumps(figures, sort_keys=True), _now()),
                )
                if cur.rowcount:
                    new.append(cid)
                    self._decide("framu_unlearn", cid, {"site": site, "reason": reason, "figures": figures})
        return new

    def record_recommendations(self, decisions: list[tuple[str, str, str, dict]]) -> None:
        """What FRAMU would unlearn in mode auto (mode recommend): recorded for the operator and the audit trail."""
        with self._tx():
            for cid, site, reason, figures in decisions:
                self._decide("framu_recommend", cid, {"site": site, "reason": reason, "figures": figures})

    def uncertified_unlearning(self) -> list[dict]:
        """FRAMU's unlearned contributions no certificate covers yet, oldest first."""
        with self._lock:
            cur = self._db.execute(
                "SELECT contribution_id, site_id, reason, figures, decided_at FROM automatic_unlearning "
                "WHERE certificate_id IS NULL ORDER BY decided_at, contribution_id"
            )
            return [
                {"contribution_id": r[0], "site_id": r[1], "reason": r[2], "figures": json.loads(r[3]),
                 "decided_at": r[4]}
                for r in cur
            ]  # fmt: skip

    def certify_unlearning(
        self, certificate_id: str, version: int, payload: bytes, contribution_ids: list[str]
    ) -> None:
        """Store a certificate of automatic unlearning and mark the contributions it covers, at once."""
        with self._tx():
            self._db.execute(
                "INSERT OR IGNORE INTO certificates VALUES (?, ?, ?, ?)", (certificate_id, _now(), version, payload)
            )
            self._db.executemany(
                "UPDATE automatic_unlearning SET certificate_id = ? WHERE contribution_id = ?",
                [(certificate_id, c) for c in contribution_ids],
            )
            self._decide("certificate", certificate_id, {"model_version": version, "automatic": contribution_ids})

    def audit_rows(self) -> dict[str, list[dict]]:
        """Everything the audit export holds, table by table (payload blobs as text where they are JSON)."""
        out: dict[str, list[dict]] = {}
        with self._lock:
            for table in ("contributions", "forget_receipts", "certificates", "model_versions", "rounds", "rejections",
                          "site_keys", "decisions", "automatic_unlearning", "framu_rounds", "framu_pins",
                          "refinements"):  # fmt: skip
                cur = self._db.execute(f"SELECT * FROM {table}")  # noqa: S608 (fixed table names)
                cols = [d[0] for d in cur.description]
                rows = []
                for r in cur:
                    row = dict(zip(cols, r, strict=True))
                    for k, v in row.items():
                        if isinstance(v, bytes):
                            row[k] = v.decode("utf-8") if v else None
                    rows.append(row)
                out[table] = rows
        return out
