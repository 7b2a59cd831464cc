"""The audit trail for a data-protection officer: export it (JSONL + CSV), and verify every signature and digest in it.

`fedge-hub audit export --config hub.yaml --out DIR` writes, from the hub's ledger:

    DIR/audit.jsonl       one JSON object per line: {"table": ..., "row": {...}}, every table below
    DIR/<table>.csv       the same rows, one file per table
    DIR/keys.json         the hub's public key and every site key pinned from receipts

Tables: contributions (ids, sites, states, payload sha256; the prototypes of contributions removed by
a certificate are purged, their sha256 stays), forget_receipts (as the sites signed them),
certificates (as the hub signed them), model_versions (which contributions, which statistics and,
with FRAMU in mode auto, which weights each version was trained on), rounds, rejections, site_keys,
decisions (among them the delivery gate's, each with the signed manifest that told the sites which head to
serve), automatic_unlearning (FRAMU's decisions: reason and figures), framu_rounds (attention,
weights, reward and TD error per model version), framu_pins, refinements (the sites' refinement statistics: ids,
sites, the contribution each went with, payload sha256; purged like contributions when a certificate removes them).

`fedge-hub audit verify DIR [--hub-key hub.pub.pem]` checks, without the hub: every certificate's
signature (against --hub-key when given, which a DPO should take from the hub's operator rather than
from the export), every receipt's signature against its site's pinned key, that no certificate's
model was trained on a contribution it removed, that each certificate's training digest is the one
recomputed from its model version's statistics, every unpurged contribution's (and refinement
statistics') sha256, and that every delivery gate decision's manifest is signed by the hub and says
what the record says.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

from contract import signing
from hub.learning.exact import training_digest
from hub.ledger import Ledger, weights_from_hex

TABLES = (
    "contributions", "forget_receipts", "certificates", "model_versions", "rounds", "rejections", "site_keys",
    "decisions", "automatic_unlearning", "framu_rounds", "framu_pins", "refinements",
)  # fmt: skip


def export(ledger: Ledger, hub_public_pem: str, out: Path) -> dict[str, int]:
    """Write the audit trail to `out`; rows per table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = ledger.audit_rows()
    with open(out / "audit.jsonl", "w") as fh:
        for table in TABLES:
            for row in rows[table]:
                fh.write(json.dumps({"table": table, "row": row}, sort_keys=True) + "\n")
    for table in TABLES:
        with open(out / f"{table}.csv", "w", newline="") as fh:
            cols = sorted({k for r in rows[table] for k in r}) or ["(empty)"]
            w = csv.DictWriter(fh, fieldnames=cols)
            w.writeheader()
            w.writerows(rows[table])
    key = signing.parse_public_pem(hub_public_pem)
    keys = {
        "hub": {"key_id": signing.key_id(key), "public_key": hub_public_pem},
        "sites": {r["site_id"]: {"key_id": r["key_id"], "public_key": r["public_key"]} for r in rows["site_keys"]},
    }
    (out / "keys.json").write_text(json.dumps(keys, indent=1, sort_keys=True) + "\n")
    return {t: len(rows[t]) for t in TABLES}


def _load(folder: Path) -> dict[str, list[dict[str, Any]]]:
    tables: dict[str, list[dict[str, Any]]] = {t: [] for t in TABLES}
    with open(Path(folder) / "audit.jsonl") as fh:
        for line in fh:
            rec = json.loads(line)
            tables.setdefault(rec["table"], []).append(rec["row"])
    return tables


def verify(folder: Path, hub_public_pem: str | None = None) -> dict[str, Any]:
    """Check the exported trail; a report with counts and every problem found (none means it verifies)."""
    folder = Path(folder)
    t = _load(folder)
    keys = json.loads((folder / "keys.json").read_text())
    problems: list[str] = []
    hub_key = signing.parse_public_pem(hub_public_pem or keys["hub"]["public_key"])
    trusted_hub = {signing.key_id(hub_key): hub_key}
    site_keys = {s: signing.parse_public_pem(k["public_key"]) for s, k in keys["sites"].items()}
    versions = {}
    for v in t["model_versions"]:  # JSON columns arrive as text from the export
        versions[int(v["version"])] = {
            **v,
            "trained_on": json.loads(v["trained_on"]) if isinstance(v["trained_on"], str) else v["trained_on"],
            "stats_digests": json.loads(v["stats_digests"])
            if isinstance(v["stats_digests"], str)
            else v["stats_digests"],
            "weights": weights_from_hex(v.get("weights")),
        }
    checked = {"certificates": 0, "receipts": 0, "contributions": 0}
    if t.get("refinements"):
        checked["refinements"] = 0

    for c in t["certificates"]:
        if not c["payload"]:
            continue  # a receipt from a site that had contributed nothing: no certificate was needed
        body = json.loads(c["payload"])
        cid = body.get("certificate_id", "?")
        try:
            signing.verify(body, trusted_hub)
        except signing.SignatureError as err:
            problems.append(f"certificate {cid}: {err}")
        v = versions.get(int(body["model_version_after"]))
        if v is None:
            problems.append(f"certificate {cid}: model version {body['model_version_after']} is not in the trail")
        else:
            carried = set(body["removed_contributions"]) & set(v["trained_on"])
            if carried:
                problems.append(f"certificate {cid}: model v{v['version']} was trained on removed {sorted(carried)}")
            if sorted(v["trained_on"]) != sorted(body["trained_on"]):
                problems.append(f"certificate {cid}: trained_on differs from model v{v['version']}'s record")
            if v["stats_digests"] and training_digest(v["stats_digests"], v["weights"]) != body["training_digest"]:
                problems.append(f"certificate {cid}: training digest does not match model v{v['version']}")
        checked["certificates"] += 1

    for r in t["forget_receipts"]:
        body = json.loads(r["payload"])
        key = site_keys.get(r["site_id"])
        if key is None:
            problems.append(f"receipt {r['receipt_id']}: no key for site {r['site_id']}")
            continue
        try:
            signing.verify(body, {signing.key_id(key): key})
        except signing.SignatureError as err:
            problems.append(f"receipt {r['receipt_id']}: {err}")
        checked["receipts"] += 1

    for c in t["contributions"]:
        if c["payload"]:
            if hashlib.sha256(c["payload"].encode()).hexdigest() != c["payload_sha256"]:
                problems.append(f"contribution {c['contribution_id']}: payload does not match its sha256")
        elif not c.get("purged_at"):
            problems.append(f"contribution {c['contribution_id']}: payload missing but not recorded as purged")
        checked["contributions"] += 1

    for r in t.get("refinements", []):
        if r["payload"]:
            if hashlib.sha256(r["payload"].encode()).hexdigest() != r["payload_sha256"]:
                problems.append(f"refinement statistics {r['statistics_id']}: payload does not match its sha256")
        elif not r.get("purged_at"):
            problems.append(f"refinement statistics {r['statistics_id']}: payload missing but not recorded as purged")
        checked["refinements"] += 1

    # The delivery gate's decisions: each with the manifest, signed by the hub, that told the sites which head to serve.
    gates = [d for d in t["decisions"] if d["kind"] == "delivery_gate"]
    if gates:
        checked["gate_decisions"] = 0
    for d in gates:
        detail = json.loads(d["detail"]) if isinstance(d["detail"], str) else d["detail"]
        try:
            body = json.loads(detail["signed_manifest"])
            signing.verify(body, trusted_hub)
        except (KeyError, ValueError, signing.SignatureError) as err:
            problems.append(f"gate decision on {d['subject']}: signed manifest does not verify: {err}")
            continue
        if f"v{body['version']}" != d["subject"] or body.get("serve") != detail.get("serve"):
            problems.append(f"gate decision on {d['subject']}: its signed manifest says v{body['version']} serves "
                            f"{body.get('serve')}, the record {detail.get('serve')}")  # fmt: skip
        if (body.get("gate") or {}).get("state") != detail.get("state"):
            problems.append(f"gate decision on {d['subject']}: state differs between the record and the manifest")
        checked["gate_decisions"] += 1
    return {"checked": checked, "problems": problems, "ok": not problems}
