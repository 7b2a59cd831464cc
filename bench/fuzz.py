"""bench/fuzz: every service handler against generated payloads; each must end accepted, duplicate or rejected.

Payloads are valid ones, valid ones mutated (a field dropped, retyped, made huge, nested deep, a key
duplicated, a time without zone, `schema_version: true`), and arbitrary bytes, on valid and invalid
topics, retained or not. Each case goes through the real handler of a real service object (its
SQLite ledger or store, its metrics) and is checked:

- exactly one outcome is counted, and it is never `internal` (an unexpected exception is a bug);
- a rejection is recorded (the hub's ledger) and leaves everything else as it was;
- an accepted message changes exactly what it should (one ledger row), a duplicate changes nothing.

    python -m bench.fuzz                  # 10,000 cases per handler: bench/results/fuzz.{json,md,png}
    python -m bench.fuzz --cases 500      # a quick look

tests/unit/test_fuzz_handlers.py runs the same harness with a few hundred cases per handler in CI.
"""

from __future__ import annotations

import argparse
import base64
import json
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from contract import signing
from contract.topics import Topics
from runtime.mqtt import Message

RESULTS = Path(__file__).resolve().parent / "results"
TOPICS = Topics()
SITES = ("site-a", "site-b")
RETAIN = st.sampled_from([False] * 7 + [True])  # now and then a retained replay
# Mostly fresh ids, sometimes one of a few reused ones: redeliveries and ids reused for other content.
IDS = st.one_of(st.text("0123456789abcdef", min_size=32, max_size=32), st.sampled_from(["ab" * 16, "cd" * 16]))

# --- payload strategies ---------------------------------------------------------------------------

_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
json_values = st.recursive(
    _leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12
)
# Literal texts no JSON encoder writes but a hostile client can: each once crashed or misled a parser somewhere.
NASTY_VALUES = [
    b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"9" * 5000, b"9" * 30, b"-" + b"9" * 25,
    b"true", b"1.0", b'"1"', b"[]", b"{}", b'"\\ud800"', b'"' + b"x" * 70_000 + b'"',
    b"[" * 5000 + b"]" * 5000, b'{"a":' * 3000 + b"1" + b"}" * 3000, b"[" * 40 + b"1" + b"]" * 40,
]  # fmt: skip


def _encode(body: dict) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def mutate(body: dict, draw) -> bytes:
    """One of several mutations of a valid payload, as bytes."""
    keys = sorted(body)
    kind = draw(st.sampled_from(["drop", "retype", "nasty", "dup_key", "extra", "nested", "zone", "version", "many"]))
    if kind == "drop":
        key = draw(st.sampled_from(keys))
        return _encode({k: v for k, v in body.items() if k != key})
    if kind == "retype":
        key = draw(st.sampled_from(keys))
        return _encode({**body, key: draw(json_values)})
    if kind == "nasty":
        key = draw(st.sampled_from(keys))
        raw = _encode({**body, key: "@@NASTY@@"})
        return raw.replace(b'"@@NASTY@@"', draw(st.sampled_from(NASTY_VALUES)))
    if kind == "dup_key":
        key = draw(st.sampled_from(keys))
        raw = _encode(body)
        return raw[:-1] + b"," + json.dumps(key).encode() + b":" + json.dumps(body[key]).encode() + b"}"
    if kind == "extra":
        return _encode({**body, draw(st.text(min_size=1, max_size=10)): draw(json_values)})
    if kind == "nested":
        key = draw(st.sampled_from(keys))
        depth = draw(st.integers(1, 60))
        return _encode({**body, key: json.loads("[" * depth + "1" + "]" * depth)})
    if kind == "zone":
        stamp = draw(st.sampled_from(["2026-11-22T03:21:54", "2026-11-22", "yesterday", "2026-13-40T99:99:99Z"]))
        return _encode({**body, **{k: stamp for k in keys if k in ("created_at", "at")}})
    if kind == "version":
        return _encode({**body, "schema_version": draw(st.sampled_from([True, 1.0, "1", 2, 0, None, [1]]))})
    # many: several labels or fields turned hostile at once
    out = dict(body)
    for key in draw(st.lists(st.sampled_from(keys), max_size=4)):
        out[key] = draw(json_values)
    return _encode(out)


@st.composite
def payloads(draw, valid: Callable[[object], dict]) -> bytes:
    """Valid, mutated valid, or arbitrary bytes."""
    which = draw(st.sampled_from(["valid", "valid", "mutated", "mutated", "mutated", "bytes", "nasty"]))
    if which == "valid":
        return _encode(valid(draw))
    if which == "mutated":
        return mutate(valid(draw), draw)
    if which == "nasty":
        return draw(st.sampled_from(NASTY_VALUES))
    return draw(st.binary(max_size=300))


@st.composite
def topics_for(draw, kind: str) -> tuple[str, str | None]:
    """(topic, the site it names or None): mostly the right site topic, sometimes one no site may use."""
    which = draw(st.sampled_from(["site", "site", "site", "bad"]))
    if which == "site":
        site = draw(st.sampled_from(SITES))
        return TOPICS.site(site, kind), site
    bad = draw(st.sampled_from(["bad.site", "", "x" * 80, "a/b", "+", "#"]))
    return f"{TOPICS.prefix}/site/{bad}/{kind}", None


# --- harnesses --------------------------------------------------------------------------------------


@dataclass
class Tally:
    """Outcomes per handler, and every problem found."""

    outcomes: dict[str, Counter] = field(default_factory=dict)
    codes: dict[str, Counter] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def add(self, handler: str, outcome: str, code: str | None) -> None:
        """Count one case."""
        self.outcomes.setdefault(handler, Counter())[outcome] += 1
        if code:
            self.codes.setdefault(handler, Counter())[code] += 1


def _sign_object(payload: bytes, key) -> bytes:
    """Sign what parses as a JSON object (a mutated one too: the mutation must then fail on its own merits)."""
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError):
        return payload
    if not isinstance(body, dict):
        return payload
    try:
        return json.dumps(signing.sign(body, key)).encode()
    except (TypeError, ValueError):  # values the canonical encoding refuses (NaN): left unsigned
        return payload


class HubHarness:
    """A real HubService (ledger, registry, metrics) whose intake handlers are driven directly."""

    def __init__(self, root: Path, bundle: Path):
        from hub.config import HubSettings
        from hub.service import HubService

        settings = HubSettings(
            state_dir=root / "hub", foundation=str(bundle), metrics_port=None, device="cpu",
            rounds={"refine": True, "refine_dim": 8},
        )  # fmt: skip
        self.hub = HubService(settings)
        # One published version, so that valid evaluations have a model to name.
        meta = {"labels": ["0", "1"], "input": {"name": "image", "shape": [-1, 1, 8, 8]}, "contributions": []}
        self.hub.registry.publish(b"not needed to be a model for evaluations", meta)
        self.dim = self.hub.foundation.dim
        self.encoder_id = self.hub.foundation.encoder_id
        self.handlers = self.hub.handlers()
        self.site_key = signing.write_keypair(root / "site.pem")
        self.site_pem = signing.public_pem(self.site_key.public_key())

    def close(self) -> None:
        """Release the ledger file."""
        self.hub.ledger.close()

    def valid_contribution(self, draw) -> dict:
        """A valid contribution body (its site is fixed by the topic later)."""
        n_labels = draw(st.integers(0, 3))
        k = draw(st.integers(1, 3))
        labels = []
        for j in range(n_labels):
            rows = draw(st.integers(1, k))
            vec = np.asarray(draw(st.lists(st.floats(-1, 1), min_size=rows * self.dim, max_size=rows * self.dim)))
            labels.append({
                "label": str(j), "counts": [draw(st.integers(5, 50)) for _ in range(rows)],
                "spreads": [round(draw(st.floats(0, 2)), 3) for _ in range(rows)],
                "vectors": {"dtype": "float32", "shape": [rows, self.dim],
                            "data": base64.b64encode(vec.astype("<f4").tobytes()).decode()},
            })  # fmt: skip
        return {
            "schema_version": 1, "contribution_id": draw(IDS),
            "site_id": "SITE", "encoder_id": self.encoder_id, "created_at": "2026-11-22T03:21:54.725428Z",
            "k": k, "min_group_size": 5, "labels": labels,
        }  # fmt: skip

    def valid_evaluation(self, draw) -> dict:
        """A valid evaluation body."""
        return {
            "schema_version": 1, "eval_id": draw(IDS), "site_id": "SITE",
            "model_version": draw(st.sampled_from([1, 1, 2])), "at": "2026-11-22T03:11:08.137Z",
            "samples": draw(st.integers(0, 100)), "accuracy": draw(st.one_of(st.none(), st.floats(0, 1))),
        }  # fmt: skip

    def valid_receipt(self, draw) -> dict:
        """A forget receipt signed by the site's key (pinned on first use; mutations break it)."""
        body = {
            "schema_version": 1, "receipt_id": draw(IDS), "request_id": draw(IDS), "site_id": "SITE",
            "request_issued_at": "2026-11-22T09:00:00+00:00", "received_at": "2026-11-22T09:00:00.1+00:00",
            "completed_at": "2026-11-22T09:00:00.3+00:00", "samples_deleted": draw(st.integers(0, 100)),
            "labels_affected": ["7"], "superseded": draw(st.one_of(st.none(), IDS)),
            "contribution_id": draw(st.one_of(st.none(), IDS)), "public_key": self.site_pem,
        }  # fmt: skip
        return body

    def valid_refinement(self, draw) -> dict:
        """Valid refinement statistics; "BASIS" becomes the site's active contribution (when it has one) at run time."""
        assert self.hub.refinement is not None
        d = self.hub.refinement.projection.dim
        n = draw(st.integers(1, 3))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

        def arr(a: np.ndarray) -> dict:
            return {
                "dtype": "float32",
                "shape": list(a.shape),
                "data": base64.b64encode(a.astype("<f4").tobytes()).decode(),
            }

        counts = [draw(st.integers(5, 50)) for _ in range(n)]
        r = draw(st.integers(1, min(d, sum(counts))))
        return {
            "schema_version": 1, "statistics_id": draw(IDS), "site_id": "SITE", "created_at": "2026-11-22T03:21:55Z",
            "feature_key": self.hub.refinement.feature_key, "model_version": 1, "contribution_id": "BASIS",
            "min_group_size": 5, "labels": [str(j) for j in range(n)], "counts": counts,
            "sums": arr(rng.normal(size=(n, d))), "sums_scale": 2.0 ** draw(st.integers(-8, 8)),
            "root": arr(rng.normal(size=r * d - r * (r - 1) // 2)), "root_rows": r, "root_scale": 2.0 ** draw(st.integers(-8, 8)),
        }  # fmt: skip

    def valid_site_status(self, draw) -> dict:
        """A valid site status (retained by design), with a time that may be older than the one kept."""
        return {
            "schema_version": 1, "message_id": draw(IDS), "site_id": "SITE",
            "state": draw(st.sampled_from(["online", "offline", "stopped"])),
            "at": f"2026-11-22T03:{draw(st.integers(0, 59)):02d}:00Z", "samples": draw(st.integers(0, 1000)),
            "model_version": draw(st.one_of(st.none(), st.integers(1, 3))),
            "bytes_sent": {"embeddings": draw(st.integers(0, 10**6)), "status": draw(st.integers(0, 10**6))},
            "bytes_received": {"model": draw(st.integers(0, 10**7))},
            "local_accuracy": draw(st.one_of(st.none(), st.floats(0, 1))),
            "encoded_batches": draw(st.integers(0, 100)), "encode_seconds": draw(st.floats(0, 100)),
            "forget_requests": {"accepted": draw(st.integers(0, 5))},
        }  # fmt: skip

    def state(self) -> tuple[int, int, int, int, int]:
        """(contributions, evaluations, rejections, forget receipts, refinement statistics) rows in the ledger."""
        db = self.hub.ledger._db
        with self.hub.ledger._lock:
            return tuple(db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("contributions", "evaluations", "rejections", "forget_receipts", "refinements"))  # type: ignore[return-value]  # fmt: skip

    def outcome_counts(self, kind: str) -> dict[str, float]:
        """The service's own outcome counters for `kind`."""
        reg = self.hub.metrics.registry
        return {
            r: reg.get_sample_value("fedge_hub_messages_total", {"kind": kind, "result": r}) or 0.0
            for r in ("accepted", "duplicate", "rejected")
        }

    def run(self, kind: str, topic: str, site: str | None, payload: bytes, retain: bool, tally: Tally) -> None:
        """Drive one case and check the invariants."""
        if site is not None:
            payload = payload.replace(b'"SITE"', json.dumps(site).encode())
        if kind == "forget/receipt":
            payload = _sign_object(payload, self.site_key)
        if kind == "refine" and site is not None:
            with self.hub.ledger._lock:
                row = self.hub.ledger._db.execute(
                    "SELECT contribution_id FROM contributions WHERE site_id = ? AND state = 'active'", (site,)
                ).fetchone()
            payload = payload.replace(b'"BASIS"', json.dumps(row[0] if row else "ef" * 16).encode())
        before, counts = self.state(), self.outcome_counts(kind)
        internal = self.hub.metrics.registry.get_sample_value("fedge_hub_rejections_total", {"code": "internal"}) or 0
        self.handlers[kind](Message(topic, payload, retain))
        after, new_counts = self.state(), self.outcome_counts(kind)
        moved = [r for r in counts if new_counts[r] != counts[r]]
        name = f"hub/{kind}"
        if len(moved) != 1 or new_counts[moved[0]] - counts[moved[0]] != 1:
            tally.problems.append(f"{name}: {len(moved)} outcomes counted for {payload[:80]!r}")
            return
        outcome = moved[0]
        code = None
        if outcome == "rejected":
            row = self.hub.ledger._db.execute("SELECT code FROM rejections ORDER BY rowid DESC LIMIT 1").fetchone()
            code = row[0] if row else None
        tally.add(name, outcome, code)
        if (
            self.hub.metrics.registry.get_sample_value("fedge_hub_rejections_total", {"code": "internal"}) or 0
        ) > internal:
            tally.problems.append(f"{name}: internal error on {payload[:120]!r} (topic {topic!r})")
        expected = {
            "accepted": (
                before[0] + (kind == "embeddings"),
                before[1] + (kind == "eval"),
                before[2],
                before[3] + (kind == "forget/receipt"),
                before[4] + (kind == "refine"),
            ),
            "duplicate": before,
            "rejected": (before[0], before[1], before[2] + 1, before[3], before[4]),
        }[outcome]
        if after != expected:
            tally.problems.append(f"{name}: {outcome} left the ledger at {after}, expected {expected}")


class EdgeHarness:
    """A real EdgeService (store, model store, metrics) whose hub-message handlers are driven directly."""

    def __init__(self, root: Path, bundle: Path):
        from edge.config import EdgeSettings
        from edge.service import EdgeService

        self.key = signing.write_keypair(root / "hub.pem")
        self.operator = signing.write_keypair(root / "operator.pem")
        (root / "data").mkdir(parents=True, exist_ok=True)
        settings = EdgeSettings(
            site_id="site-a", data_dir=root / "data", state_dir=root / "edge", bundle=str(bundle),
            hub_public_key_file=root / "hub.pub.pem", operator_public_key_files=[root / "operator.pub.pem"],
            metrics_port=None,
        )  # fmt: skip
        self.edge = EdgeService(settings)
        self.handlers = self.edge.handlers()

    def close(self) -> None:
        """Release the store."""
        self.edge.store.close()

    def valid_status(self, draw) -> dict:
        """A valid hub status."""
        return {
            "schema_version": 1, "message_id": "aa" * 16, "hub_id": "hub", "session_id": draw(st.sampled_from(["01", "02"])) * 16,
            "state": draw(st.sampled_from(["online", "offline", "training"])), "at": "2026-11-22T03:10:37.000Z",
            "model_version": 1, "active_contributions": 3, "encoders": [{"encoder_id": "enc", "dim": 32}],
            "min_group_size": 5,
        }  # fmt: skip

    def valid_forget(self, draw) -> dict:
        """A forget request for this site (signed by the operator once the case is drawn, mutations included)."""
        selector = draw(st.sampled_from([
            {"kind": "label", "label": "7"}, {"kind": "all"}, {"kind": "samples", "sample_ids": ["s1", "s2"]},
            {"kind": "time_window", "since": "2026-01-01T00:00:00+00:00"},
        ]))  # fmt: skip
        return {
            "schema_version": 1, "request_id": draw(IDS), "site_id": "site-a", "selector": selector,
            "reason": "fuzz", "issued_at": datetime.now(UTC).isoformat(), "issuer": "bench/fuzz",
        }  # fmt: skip

    def valid_manifest(self, draw) -> dict:
        """A manifest signed by the trusted key (mutations then break the signature or the fields)."""
        body = {
            "schema_version": 1, "message_id": "bb" * 16, "version": draw(st.integers(1, 5)),
            "created_at": "2026-11-22T03:11:08Z", "format": "onnx", "sha256": "85" * 32, "size_bytes": 100,
            "chunks": [{"index": 0, "size_bytes": 100, "sha256": "00" * 32}], "labels": ["0", "1"],
            "input_name": "image", "input_shape": [-1, 1, 8, 8], "encoder_id": "enc", "contributions": [],
            "fedavg_round_bytes": 1000,
        }  # fmt: skip
        return signing.sign(body, self.key)

    def valid_refine_request(self, draw) -> dict:
        """A refinement request signed by the trusted key (mutations then break the signature or the fields)."""
        body = {
            "schema_version": 1, "request_id": draw(IDS), "created_at": "2026-11-22T03:11:09Z",
            "feature_key": "0123456789abcdef", "model_version": draw(st.integers(1, 5)), "model_sha256": "85" * 32,
            "output_name": "fedge_refine_features", "dim": 8, "min_group_size": 5,
        }  # fmt: skip
        return signing.sign(body, self.key)

    def valid_error(self, draw) -> dict:
        """A valid error report."""
        return {
            "schema_version": 1, "error_id": "0f" * 16, "site_id": "site-a", "at": "2026-11-22T03:12:00.000Z",
            "topic": "fedge/v1/site/site-a/embeddings", "code": draw(st.sampled_from(["dimension", "internal"])),
            "reason": "r", "payload_sha256": "3b" * 32, "payload_bytes": 612,
        }  # fmt: skip

    def _codes(self, kind: str) -> dict[str, float]:
        """Rejections counted so far for `kind`, by code."""
        return {
            s.labels["code"]: s.value
            for m in self.edge.metrics.rejections.collect()
            for s in m.samples
            if s.name.endswith("_total") and s.labels["kind"] == kind
        }

    def run(self, kind: str, topic: str, payload: bytes, retain: bool, tally: Tally) -> None:
        """Drive one case and check that exactly one non-internal outcome is counted."""
        reg = self.edge.metrics.registry
        before = {r: reg.get_sample_value("fedge_edge_messages_total", {"kind": kind, "result": r}) or 0.0
                  for r in ("accepted", "duplicate", "rejected")}  # fmt: skip
        if kind == "forget":
            payload = _sign_object(payload, self.operator)
        codes = self._codes(kind)
        versions = self.edge.models.versions()
        self.handlers[kind](Message(topic, payload, retain))
        after = {
            r: reg.get_sample_value("fedge_edge_messages_total", {"kind": kind, "result": r}) or 0.0 for r in before
        }
        moved = [r for r in before if after[r] != before[r]]
        name = f"edge/{kind}"
        if len(moved) != 1 or after[moved[0]] - before[moved[0]] != 1:
            tally.problems.append(f"{name}: {len(moved)} outcomes counted for {payload[:80]!r}")
            return
        codes_after = self._codes(kind)
        code = next((c for c, n in codes_after.items() if n > codes.get(c, 0)), None)
        tally.add(name, moved[0], code)
        if code == "internal":
            tally.problems.append(f"{name}: internal error on {payload[:120]!r}")
        if self.edge.models.versions() != versions:
            tally.problems.append(f"{name}: a hub message installed a model without chunks")


# --- running ------------------------------------------------------------------------------------------


def run_all(cases: int, bundle: Path, root: Path, base_seed: int = 0, log: Callable[[str], None] = print) -> Tally:
    """Drive every handler with `cases` generated cases each (hypothesis, seeded); the tally."""
    tally = Tally()
    cfg = settings(
        max_examples=cases, database=None, deadline=None, derandomize=False,
        suppress_health_check=list(HealthCheck), phases=[Phase.generate],
    )  # fmt: skip
    hub = HubHarness(root / "hub", bundle)
    edge = EdgeHarness(root / "edge", bundle)
    drivers: list[tuple[str, Callable[[], None]]] = []
    hub_kinds = (
        ("embeddings", hub.valid_contribution), ("eval", hub.valid_evaluation), ("forget/receipt", hub.valid_receipt),
        ("status", hub.valid_site_status), ("refine", hub.valid_refinement),
    )  # fmt: skip
    for i, (kind, valid) in enumerate(hub_kinds):
        drivers.append((f"hub/{kind}", _hub_driver(hub, kind, valid, cfg, base_seed + i, tally)))
    edge_cases = (
        ("hub_status", TOPICS.hub_status, edge.valid_status),
        ("model", TOPICS.hub_model, edge.valid_manifest),
        ("errors", TOPICS.site("site-a", "errors"), edge.valid_error),
        ("forget", TOPICS.site("site-a", "forget/request"), edge.valid_forget),
        ("refine", TOPICS.hub_refine, edge.valid_refine_request),
    )
    for i, (kind, topic, valid) in enumerate(edge_cases):
        drivers.append((f"edge/{kind}", _edge_driver(edge, kind, topic, valid, cfg, base_seed + 10 + i, tally)))
    try:
        for name, drive in drivers:
            t = time.perf_counter()
            drive()
            log(f"{name}: {sum(tally.outcomes.get(name, Counter()).values())} cases in {time.perf_counter() - t:.1f} s")
    finally:
        hub.close()
        edge.close()
    return tally


def _hub_driver(hub: HubHarness, kind: str, valid, cfg, case_seed: int, tally: Tally) -> Callable[[], None]:
    @seed(case_seed)
    @cfg
    @given(tp=topics_for(kind), payload=payloads(valid), retain=RETAIN)
    def drive(tp, payload, retain) -> None:
        hub.run(kind, tp[0], tp[1], payload, retain, tally)

    return drive


def _edge_driver(
    edge: EdgeHarness, kind: str, topic: str, valid, cfg, case_seed: int, tally: Tally
) -> Callable[[], None]:
    @seed(case_seed)
    @cfg
    @given(payload=payloads(valid), retain=RETAIN)
    def drive(payload, retain) -> None:
        edge.run(kind, topic, payload, retain, tally)

    return drive


def markdown(result: dict) -> str:
    """The committed table."""
    lines = [
        "# bench/fuzz: every handler, generated payloads",
        "",
        f"`{result['command']}`: {result['cases_per_handler']:,} cases per handler, seed {result['seed']}, "
        f"{result['wall_s']:.0f} s. A case passes when exactly one outcome is counted, it is not `internal`, and the "
        "ledger changed exactly as that outcome says.",
        "",
        "| handler | cases | accepted | duplicate | rejected | rejection codes | problems |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for h, counts in result["outcomes"].items():
        codes = ", ".join(f"{c} {n}" for c, n in sorted(result["codes"].get(h, {}).items(), key=lambda x: -x[1]))
        probs = sum(1 for p in result["problems"] if p.startswith(h + ":"))
        lines.append(
            f"| {h} | {sum(counts.values()):,} | {counts.get('accepted', 0):,} | {counts.get('duplicate', 0):,} | "
            f"{counts.get('rejected', 0):,} | {codes} | {probs} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Stacked bars of outcomes per handler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["outcomes"])
    fig, ax = plt.subplots(figsize=(8, 3.5))
    bottom = np.zeros(len(names))
    for outcome, colour in (("accepted", "#2a9d8f"), ("duplicate", "#8ab17d"), ("rejected", "#e76f51")):
        vals = np.array([result["outcomes"][n].get(outcome, 0) for n in names], float)
        ax.bar(names, vals, bottom=bottom, label=outcome, color=colour)
        bottom += vals
    ax.set_ylabel("cases")
    ax.set_title(f"bench/fuzz: outcome of every generated case ({len(result['problems'])} problems)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run the fuzz bench and write bench/results/fuzz.{json,md,png}."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=10_000, help="generated cases per handler")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bundle", default="digits", help="bundled foundation model (its encoder id and dimension)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    import logging

    import bundled

    logging.basicConfig(level=logging.CRITICAL)  # every case is counted; thousands of rejection lines help nobody
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tally = run_all(args.cases, bundled.resolve(args.bundle), Path(tmp), args.seed)
    result = {
        "command": f"python -m bench.fuzz --cases {args.cases} --seed {args.seed}",
        "cases_per_handler": args.cases,
        "seed": args.seed,
        "wall_s": round(time.perf_counter() - t, 1),
        "outcomes": {h: dict(c) for h, c in tally.outcomes.items()},
        "codes": {h: dict(c) for h, c in tally.codes.items()},
        "problems": tally.problems[:200],
        "problem_count": len(tally.problems),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fuzz.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "fuzz.md").write_text(markdown(result))
    plot(result, args.out / "fuzz.png")
    print(markdown(result))
    for p in tally.problems[:20]:
        print("PROBLEM", p)
    return 1 if tally.problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
