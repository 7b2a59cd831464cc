"""The refinement round (Fed3R): sites send additive statistics of the delivered model's features; the hub solves.

1. A refining hub delivers every closed-form model with a second output, the projected random
   features (features.py), and publishes a signed, retained `RefinementRequest` on `hub/refine`
   naming that model.
2. Each site runs the model on its labelled training samples and sends, per label with at least
   `min_group_size` samples, the count and the sum of its features, plus a square root of the counted
   samples' scatter (`RefinementStatistics`, float16, 10-26 KB; edge/refine.py). `ingest` validates
   them, refuses statistics larger than the requested features can produce (`plausible`), and records
   them (ledger table `refinements`), tied to the site's active contribution.
3. `wants_round` asks for a round once every site with an active contribution has statistics (or
   `refine_wait_s` after the first that is not yet in a model); `fit` sums the active statistics in
   id order and solves the class-balanced ridge head exactly (partition-invariant up to the wire's
   float16 rounding: the sums do not care how the samples were split across sites), once for `lam` (the model's `logits`) and once per
   extra lambda in `lams` (outputs `head_refined_<i>`, features.py), all from the same sum, and
   writes the refined ONNX. The delivery gate picks among the heads on the sites' held-out
   evaluations (hub/delivery/gate.py).
4. The refit (`rounds.refine_refit`): the heads above are solved from the sites' training samples
   only, because the gate scores them on the held-out ones. Once the gate serves a refined head, its
   decision records that head's lambda and the training statistics it was chosen on (`refit`), the
   hub asks again with `part: held_out`, and the sites send statistics of their held-out samples.
   `plan` then sums both parts and solves that one lambda: the model is trained on every labelled
   sample, with the regularisation the held-out samples chose (the gate serves it without scoring
   it again, since those samples are now in its training set). When the training statistics change
   (a site joins, updates or is forgotten), the plan falls back to the training part and the gate
   chooses again.
5. Forgetting: a forget request supersedes the site's contribution, which takes its statistics (both
   parts) out of `active`; the next round re-solves without them, and the certificate names them
   among the removed records (`removed_with`) and covers the digest of exactly what was solved from.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg

from contract import signing
from contract.payloads import RefinementRequest, RefinementStatistics, new_id, now
from hub.learning.closed_form import ClosedFormHead, solve, sum_stats
from hub.learning.exact import ExactModel, training_digest
from hub.ledger import Ledger
from hub.refinement.features import OUTPUT, Projection, head_name, refined_onnx, with_feature_output
from hub.refinement.statistics import parse_statistics, to_stats
from runtime.outcomes import Outcome, Rejected

log = logging.getLogger("fedge.hub.refinement")


@dataclass
class RefinedModel(ExactModel):
    """A model solved from the sites' refinement statistics (its `trained_on` are statistics ids)."""

    sites: tuple[str, ...] = ()
    # One head per extra lambda (rounds.refine_lams), output `head_refined_<i>`, solved from the same summed
    # statistics as `head`: `head.digest()` names that sum (its `trained_on`), so a refit whose main head is
    # bit-identical has summed bit-identical statistics, and every extra head is the same function of them.
    heads: tuple[ClosedFormHead, ...] = ()
    # "select": solved from the training statistics, one head per lambda for the gate to choose from;
    # "refit": the gate's choice (`refit`: lambda, head, version) solved again from training and held-out statistics.
    stage: str = "select"
    refit: dict | None = None

    def head_outputs(self) -> dict[str, dict]:
        """The extra heads' ONNX outputs with their lambda and digest (for the manifest)."""
        return {head_name(i): {"lam": h.lam, "digest": h.digest()} for i, h in enumerate(self.heads)}


@dataclass(frozen=True)
class Plan:
    """What a refined model would be solved from now, and how."""

    rows: tuple[tuple[str, str, bytes], ...]  # (statistics id, site, payload), in id order
    lam: float
    lams: tuple[float, ...]
    stage: str  # "select" | "refit"
    refit: dict | None = None  # the gate's recorded choice (stage "refit")
    missing: frozenset[str] = frozenset()  # refit: sites in the chosen model that have sent no held-out part yet

    @property
    def ids(self) -> set[str]:
        return {sid for sid, _, _ in self.rows}


class Refinement:
    """The refinement round of one hub worker: request, intake, policy, solve."""

    def __init__(
        self,
        ledger: Ledger,
        projection: Projection,
        encoder_onnx: Path,
        encoder_id: str,
        signing_key: signing.Ed25519PrivateKey,
        min_group_size: int,
        max_payload_bytes: int,
        wait_s: float,
        variant: str = "ridge-balanced",
        lam: float = 1e-6,
        lams: tuple[float, ...] = (),
        refit: bool = True,
    ):
        self.ledger, self.projection, self.encoder_onnx = ledger, projection, Path(encoder_onnx)
        self.feature_key = projection.key(encoder_id)
        self.key, self.min_group_size, self.max_payload_bytes = signing_key, min_group_size, max_payload_bytes
        self.wait_s, self.variant, self.lam, self.lams, self.refit = wait_s, variant, lam, tuple(lams), refit
        self._pending_since: float | None = None
        # The largest feature norm the delivered model can output, four times over: |phi| <= sqrt(2) (random
        # features), |e| = 1 (the encoder's unit embedding), so |z| <= |P|_2 sqrt(3) whatever the kind.
        self.feature_bound = 4.0 * float(np.linalg.norm(projection.matrix.astype(np.float64), 2)) * np.sqrt(3.0)

    # --- the request ---
    def prepare(self, model_onnx: bytes) -> bytes:
        """A closed-form model with the projected features as a second output, so sites can compute statistics."""
        return with_feature_output(model_onnx, self.projection)

    def request(self, version: int, model_sha256: str, part: str = "train") -> bytes:
        """The signed request naming model `version` and the samples to sum (published retained on hub/refine)."""
        body = {
            "schema_version": 1, "request_id": new_id(), "created_at": now().isoformat(),
            "feature_key": self.feature_key, "model_version": version, "model_sha256": model_sha256,
            "output_name": OUTPUT, "dim": self.projection.dim, "min_group_size": self.min_group_size, "part": part,
        }  # fmt: skip
        signed = signing.sign(body, self.key)
        RefinementRequest.model_validate(signed)
        return json.dumps(signed, separators=(",", ":")).encode()

    # --- intake (paho network thread) ---
    def ingest(self, site_id: str, payload: bytes) -> Outcome:
        """Validate and record one site's statistics; raises Rejected (nothing recorded) when refused."""
        st = parse_statistics(
            payload, site_id, self.feature_key, self.projection.dim, self.min_group_size, self.max_payload_bytes
        )
        self.plausible(st)
        if not self.ledger.ingest_refinement(st, payload):
            return "duplicate"
        log.info("refinement statistics %s from %s: %d labels, %d samples, %d bytes", st.statistics_id[:8], site_id,
                 len(st.labels), st.n_samples, len(payload))  # fmt: skip
        return "accepted"

    def plausible(self, st: RefinementStatistics) -> None:
        """Rejected unless the statistics could come from the requested features: every label's mean no longer, and
        the scatter's trace per sample no larger, than `feature_bound` (and its square) allow. Statistics far beyond
        them (a broken model, a forged upload) could make the summed ridge system numerically singular."""
        got = to_stats(st)
        mean_norm = float((np.linalg.norm(got.sums, axis=1) / got.counts).max())
        spread = float(np.trace(got.gram) / got.counts.sum())  # mean squared norm of the counted features
        if not (mean_norm <= self.feature_bound and spread <= self.feature_bound**2):
            raise Rejected(
                "invalid",
                f"statistics beyond what the requested features can produce: largest label mean norm {mean_norm:.3g}, "
                f"mean squared norm {spread:.3g}; the delivered model's features stay within norm "
                f"{self.feature_bound / 4:.3g}",
                st.statistics_id,
            )

    # --- policy (main thread) ---
    def plan(self) -> Plan:
        """The statistics and lambdas a refined model would be solved from now.

        `select`: every site's training statistics, one head per lambda (the gate chooses among them).
        `refit`: when the gate's newest refit choice was made on exactly the active training statistics and some
        site has sent held-out statistics: both parts, at the chosen lambda only."""
        train = self.ledger.active_refinements(self.feature_key, "train")
        select = Plan(tuple(train), self.lam, self.lams, "select")
        choice = self.ledger.refit_choice() if self.refit and train else None
        if choice is None or sorted(sid for sid, _, _ in train) != sorted(choice.get("statistics", [])):
            return select
        sites = {s for _, s, _ in train}
        held = [r for r in self.ledger.active_refinements(self.feature_key, "held_out") if r[1] in sites]
        if not held:
            return select
        rows = tuple(sorted([*train, *held]))
        return Plan(rows, float(choice["lam"]), (), "refit", choice, frozenset(sites - {s for _, s, _ in held}))

    def active_ids(self) -> set[str]:
        """Statistics a refined model would be solved from now."""
        return self.plan().ids

    def wants_round(self, now_s: float, active_sites: set[str]) -> bool:
        """New statistics not yet in a model, from every site expected or for `wait_s` already: for the training
        part, every site with an active contribution; for the refit, every site in the chosen model."""
        plan = self.plan()
        if not plan.ids or plan.ids == self.ledger.last_refined_set():
            self._pending_since = None
            return False
        if self._pending_since is None:
            self._pending_since = now_s
        # select: every site with an active contribution has sent its training part; refit: every chosen site its held-out
        complete = active_sites <= {site for _, site, _ in plan.rows} if plan.stage == "select" else not plan.missing
        return complete or now_s - self._pending_since >= self.wait_s

    # --- solving ---
    def _solve(self, payloads: dict[str, bytes], sites: dict[str, str], lam: float, lams: tuple[float, ...]) -> RefinedModel:  # fmt: skip
        t0 = time.perf_counter()
        stats = [to_stats(RefinementStatistics.model_validate_json(payloads[sid])) for sid in sorted(payloads)]
        total = sum_stats(stats)
        t1 = time.perf_counter()
        head = solve(total, variant=self.variant, lam=lam)  # type: ignore[arg-type]
        extra = tuple(solve(total, head.label_names, variant=self.variant, lam=x) for x in lams)  # type: ignore[arg-type]
        t2 = time.perf_counter()
        digests = {s.contribution_id: s.digest() for s in stats}
        model = RefinedModel(
            onnx=b"", head=head, label_names=head.label_names, trained_on=sorted(digests), stats_digests=digests,
            training_digest=training_digest(digests), synthetic_samples=total.n_samples,
            sites=tuple(sorted({sites[sid] for sid in digests})), heads=extra,
        )  # fmt: skip
        model.timings.update(sum_s=t1 - t0, solve_s=t2 - t1)
        return model

    def fit(self, labels_needed: set[str]) -> RefinedModel | None:
        """The refined model from the active statistics (`plan`), or None when there are none or they miss a label."""
        plan = self.plan()
        if not plan.rows:
            return None
        rows = plan.rows
        try:
            with warnings.catch_warnings():  # an ill-conditioned solve is as unusable as a singular one
                warnings.simplefilter("error", scipy.linalg.LinAlgWarning)
                model = self._solve({sid: p for sid, _, p in rows}, {sid: site for sid, site, _ in rows}, plan.lam, plan.lams)  # fmt: skip
        except (np.linalg.LinAlgError, scipy.linalg.LinAlgWarning) as err:  # statistics recorded before `plausible`
            log.error("the refinement statistics %s give no solvable system (%s); the synthesis model is delivered",
                      ", ".join(sorted(sid[:8] for sid, _, _ in rows)), err)  # fmt: skip
            return None
        model.stage, model.refit = plan.stage, plan.refit
        missing = sorted(labels_needed - set(model.label_names))
        if missing:
            log.warning("refinement statistics cover no sample of label(s) %s; the synthesis model is delivered",
                        ", ".join(missing))  # fmt: skip
            return None
        t = time.perf_counter()
        model.onnx = refined_onnx(self.encoder_onnx, self.projection, model.head, model.heads)
        model.timings["export_s"] = time.perf_counter() - t
        return model

    def refit_from_scratch(self, model: RefinedModel) -> ClosedFormHead:
        """The head solved again from the stored payloads (parsed anew, nothing cached): what a retrain gives.

        Its digest covers the summed statistics (`trained_on`), hence every extra head too; `refit_heads_from_scratch`
        returns all of them for a check head by head."""
        return self.refit_heads_from_scratch(model)[0]

    def refit_heads_from_scratch(self, model: RefinedModel) -> list[ClosedFormHead]:
        """Every head (`logits` first, then `head_refined_<i>`) solved again from the stored payloads."""
        payloads = self.ledger.refinement_payloads(model.trained_on)
        refit = self._solve(payloads, dict.fromkeys(payloads, ""), model.head.lam, tuple(h.lam for h in model.heads))
        return [refit.head, *refit.heads]

    def removed_with(self, contribution_ids: list[str]) -> list[str]:
        """The statistics that went with removed contributions: they leave the model with them."""
        return self.ledger.refinements_based_on(contribution_ids)
