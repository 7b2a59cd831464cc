"""The hub's unlearning path: receipts in, a round that drops what was forgotten, a signed certificate out.

1. A site that honoured a forget request publishes the superseding contribution, then a signed
   receipt naming the contribution it replaced. `ingest_receipt` verifies and records it.
2. `wants_round` asks for a round at once (not waiting for the site minimum) when an open
   receipt's contribution is in the last model but no longer active.
3. The round trains on the active contributions only. With the closed-form model that is a
   re-sum of cached per-contribution statistics and one solve: exactly what retraining without the
   forgotten contribution yields, in a fraction of the time (docs/unlearning.md).
4. `certify` then checks the new model against a refit from scratch, signs a certificate for every
   receipt it covers, records it, purges the removed contributions' prototypes, synthetic samples
   and statistics, and returns the bytes to publish on `hub/certificate`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from datetime import datetime
from pathlib import Path

from contract import signing
from contract.payloads import Contribution, UnlearningCertificate
from hub.learning.exact import ExactModel, ExactTrainer, max_abs_diff
from hub.ledger import Ledger
from hub.refinement import RefinedModel
from hub.unlearning.certificates import make_certificate
from hub.unlearning.receipts import configured_site_key, parse_receipt
from runtime.outcomes import Outcome

log = logging.getLogger("fedge.hub.unlearning")


class Unlearning:
    """Forget receipts, unlearning rounds and certificates for one hub worker."""

    def __init__(
        self,
        ledger: Ledger,
        signing_key: signing.Ed25519PrivateKey,
        hub_id: str,
        trainer: ExactTrainer | None = None,
        site_keys_dir: Path | None = None,
        verify_refit: bool = True,
        synthesizer=None,
        refinement=None,
    ):
        self.ledger, self.key, self.hub_id, self.trainer = ledger, signing_key, hub_id, trainer
        self.refinement = refinement  # hub/refinement: its statistics leave with the contribution they went with
        self.synthesizer = synthesizer  # its cache holds the removed contributions' synthetic samples
        self.site_keys_dir, self.verify_refit = site_keys_dir, verify_refit

    def ingest_receipt(self, site_id: str, payload: bytes) -> tuple[Outcome, float | None]:
        """Verify and record a receipt; (outcome, request-to-receipt seconds for a new one). Raises Rejected."""
        trusted = configured_site_key(self.site_keys_dir, site_id) or self.ledger.site_key(site_id)
        receipt, kid = parse_receipt(payload, site_id, trusted)
        if not self.ledger.record_receipt(receipt, payload, kid):
            return "duplicate", None
        log.info("forget receipt from %s for request %s: %d samples deleted, %s superseded by %s", site_id,
                 receipt.request_id[:8], receipt.samples_deleted, (receipt.superseded or "nothing")[:8],
                 (receipt.contribution_id or "nothing")[:8])  # fmt: skip
        return "accepted", max(0.0, (receipt.completed_at - receipt.request_issued_at).total_seconds())

    def _statistics_of(self, contribution_ids: list[str]) -> list[str]:
        """Refinement statistics that went with these contributions (none without a refining hub)."""
        return self.refinement.removed_with(contribution_ids) if self.refinement is not None else []

    def wants_round(self, active: set[str], last_trained: set[str]) -> bool:
        """Whether an open receipt's contribution is still in the current model although no longer active."""
        return any(
            r["superseded"] in last_trained and r["superseded"] not in active for r in self.ledger.open_receipts()
        )

    def _exactness(
        self, trained_on: list[str], active: list[Contribution], model: ExactModel | None, removed: list[str]
    ) -> tuple[str, str, dict[str, float]]:
        """(method, training digest, verification figures) of a model that no longer carries `removed`."""
        verification: dict[str, float] = {"removed_in_training_set": float(len(set(trained_on) & set(removed)))}
        if isinstance(model, RefinedModel) and self.refinement is not None:
            # Solved from the sites' refinement statistics: the refit re-reads and re-sums every stored payload.
            timings = model.timings
            verification["unlearning_seconds"] = round(sum(timings.get(k, 0.0) for k in ("sum_s", "solve_s", "export_s")), 4)  # fmt: skip
            if self.verify_refit:
                t0 = time.perf_counter()
                heads = self.refinement.refit_heads_from_scratch(model)  # `logits` and every head_refined_<i>
                verification["refit_seconds"] = round(time.perf_counter() - t0, 4)
                mine = [model.head, *model.heads]
                verification["refit_max_abs_diff"] = max(max_abs_diff(a, b) for a, b in zip(mine, heads, strict=True))
                verification["refit_bit_identical"] = float([h.digest() for h in mine] == [h.digest() for h in heads])
            verification["refinement_statistics"] = float(len(trained_on))
            return "closed_form_exact", model.training_digest, verification
        if model is not None and self.trainer is not None:
            timings = model.timings
            verification["unlearning_seconds"] = round(sum(timings.get(k, 0.0) for k in ("sum_s", "solve_s", "export_s")), 4)  # fmt: skip
            if self.verify_refit:
                t0 = time.perf_counter()
                refit = self.trainer.refit_from_scratch(active, weights=model.weights)
                verification["refit_seconds"] = round(time.perf_counter() - t0, 4)
                verification["refit_max_abs_diff"] = max_abs_diff(model.head, refit.head)
                verification["refit_bit_identical"] = float(model.head.digest() == refit.head.digest())
            return "closed_form_exact", model.training_digest, verification
        # A retrained model has no statistics: its digest covers the contribution ids it was trained on.
        return "retrain_exact", hashlib.sha256(json.dumps(sorted(trained_on)).encode()).hexdigest(), verification

    def certify_automatic(
        self,
        version: int,
        model_sha256: str,
        version_before: int | None,
        trained_on: list[str],
        active: list[Contribution],
        model: ExactModel | None,
    ) -> list[tuple[UnlearningCertificate, bytes, dict]]:
        """Certificates for FRAMU's decisions that model `version` honours: one per contribution, with the figures.

        Reason `outdated` or `irrelevant`, no request ids; `verification` holds the exactness figures and
        the decision's own (`framu_*`: attention, threshold, rounds below it, every feature). Nothing is
        purged: no one asked for the data to be deleted, and the contribution's prototypes are the
        evidence behind the decision. Returns (certificate, bytes, the decision's ledger row).
        """
        trained = set(trained_on)
        out = []
        for row in self.ledger.uncertified_unlearning():
            cid = row["contribution_id"]
            if cid in trained:
                continue
            removed = sorted([cid, *self._statistics_of([cid])])
            method, digest, verification = self._exactness(trained_on, active, model, removed)
            verification.update({f"framu_{k}": float(v) for k, v in sorted(row["figures"].items())})
            cert, body = make_certificate(
                self.key, self.hub_id, row["reason"], [], removed, version_before, version, model_sha256, trained_on,
                digest, method, verification, None,
            )  # fmt: skip
            self.ledger.certify_unlearning(cert.certificate_id, version, body, [cid])
            log.info("certificate %s: model v%d no longer carries %s (FRAMU: %s)", cert.certificate_id[:8], version,
                     cid[:8], row["reason"])  # fmt: skip
            out.append((cert, body, row))
        return out

    def certify(
        self,
        version: int,
        model_sha256: str,
        version_before: int | None,
        trained_on: list[str],
        active: list[Contribution],
        model: ExactModel | None,
    ) -> list[tuple[UnlearningCertificate, bytes]]:
        """Certificates for the open receipts that model `version` honours (recorded, purged); [] when none."""
        receipts = self.ledger.open_receipts()
        trained = set(trained_on)
        covered = [r for r in receipts if r["superseded"] is not None and r["superseded"] not in trained]
        nothing = [r for r in receipts if r["superseded"] is None]
        for r in nothing:  # the site had contributed nothing: no model ever carried its data
            self.ledger.record_certificate("not-needed", version, b"", [r["receipt_id"]], [])
        if not covered:
            return []
        superseded = sorted({r["superseded"] for r in covered})
        removed = sorted({*superseded, *self._statistics_of(superseded)})
        method, digest, verification = self._exactness(trained_on, active, model, removed)
        requested = min(datetime.fromisoformat(r["request_issued_at"]) for r in covered)
        cert, body = make_certificate(
            self.key, self.hub_id, "forget_request", sorted({r["request_id"] for r in covered}), removed,
            version_before, version, model_sha256, trained_on, digest, method, verification, requested,
        )  # fmt: skip
        self.ledger.record_certificate(cert.certificate_id, version, body, [r["receipt_id"] for r in covered], removed)
        if self.trainer is not None:
            self.trainer.forget(set(superseded))
        if self.synthesizer is not None:
            for cid in superseded:
                self.synthesizer.forget(cid)
        log.info("certificate %s: model v%d no longer carries %s (%s)", cert.certificate_id[:8], version,
                 ", ".join(c[:8] for c in removed), ", ".join(f"{k} {v:g}" for k, v in verification.items()))  # fmt: skip
        return [(cert, body)]
