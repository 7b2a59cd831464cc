"""FRAMU inside the hub service: weights for each round, rewards from the sites' evaluations, decisions.

The hub calls, from its main loop (never from the MQTT thread):

- `loo_wanted(contributions)` before a round: the contributions whose leave-one-out head the round's
  model should carry (outputs `head_loo_<n>`, role `without:<contribution id>` in the manifest's `heads`).
- `round_weights(round_id, contributions)` before a round: the attention of every contribution
  (noise-free) and, in mode `auto`, the explored weights the closed-form model is fitted with.
- `after_round(version, ..., heads=manifest["heads"])` once the model is published (the head roles are
  kept in FRAMU's state, so the sites' per-head reports on that version can be read after a restart): the below-threshold streaks move, the
  decisions come out (mode `auto`: recorded as unlearned in the ledger, in the same transaction as
  FRAMU's state; mode `recommend`: recorded and reported only), and the state is persisted.
- `poll()` every loop: when the sites have reported on the newest model (or `eval_wait_s` passed)
  the pending proposal gets its reward (TD update, persisted); in mode `auto` it asks for another
  round while a contribution is below the threshold but not yet decided, at most `max_rounds` in a row.

Everything FRAMU learns and decides is in the ledger (framu_state, framu_rounds, automatic_unlearning,
decisions), so a restarted hub continues where it stopped and the audit export shows every figure.
"""

from __future__ import annotations

import logging
import time

from contract.payloads import Contribution, now
from hub.config import FramuSettings
from hub.framu.agent import Decision, Framu, FramuConfig, aggregate_reward
from hub.framu.features import SiteEvaluation
from hub.ledger import Ledger
from hub.metrics import HubMetrics

log = logging.getLogger("fedge.hub.framu")


class FramuLoop:
    """One hub worker's FRAMU: `Framu` (hub/framu/agent.py) fed from and persisted to the ledger."""

    def __init__(self, settings: FramuSettings, ledger: Ledger, seed: int, metrics: HubMetrics):
        self.settings, self.ledger, self.metrics = settings, ledger, metrics
        self.mode = settings.mode
        cfg = FramuConfig(
            threshold=settings.threshold, patience=settings.patience, outdated_after_s=settings.outdated_after_s,
            seed=seed, learn=self.mode == "auto", loo_max=settings.loo_heads,
        )  # fmt: skip
        self.framu = Framu(cfg, ledger.framu_state())
        self._waiting: tuple[int, set[str], float] | None = None  # (version, sites expected, since) for a reward
        self._in_a_row = 0  # rounds FRAMU started on its own since the last new input
        pending = self.framu.state()["pending"]
        recorded = ledger.framu_rounds() if pending is not None else []
        if recorded:
            # Restarted while a reward was pending: wait for the reports on the newest recorded version.
            last = recorded[-1]["model_version"]
            self._waiting = (last, self._sites_of(last), time.monotonic())

    @property
    def on(self) -> bool:
        return self.mode != "off"

    def _sites_of(self, version: int) -> set[str]:
        trained = next((v["trained_on"] for v in self.ledger.model_versions() if v["version"] == version), [])
        return {c.site_id for c in self.ledger.active() if c.contribution_id in set(trained)}

    def pinned(self, contributions: list[Contribution]) -> frozenset[str]:
        """Contributions pinned by id or through their site (`fedge-hub framu pin`)."""
        pins = self.ledger.pins()
        return frozenset(c.contribution_id for c in contributions if c.contribution_id in pins or c.site_id in pins)

    def evaluations(self) -> list[SiteEvaluation]:
        """Every site's reports (latest per site and model version), with their per-head confusion matrices.

        A row's `heads` (head name -> confusion matrix, rows true label, columns predicted, the manifest's
        label order; absent or None on a report without heads) gives the full model's matrix (`logits`)
        and, for the leave-one-out heads the version's manifest named (`after_round(heads=...)`), the
        matrix of the model without each contribution.
        """
        out = []
        for r in self.ledger.evaluations():
            heads = r.get("heads") or {}
            roles = self.framu.head_roles(r["model_version"]) if heads else {}
            without = {cid: heads[h] for h, cid in sorted(roles.items()) if heads.get(h) is not None}
            full = heads.get("logits")
            if full is None or not without:
                out.append(SiteEvaluation(r["site_id"], r["model_version"], r["accuracy"], r["samples"]))
            else:
                out.append(SiteEvaluation(r["site_id"], r["model_version"], r["accuracy"], r["samples"], full, without))
        return out

    def loo_wanted(self, contributions: list[Contribution]) -> list[str]:
        """Contribution ids (sorted) whose leave-one-out head the next round's model should carry; [] when off.

        Asked before a round is trained: those whose noise-free attention is below the configured level,
        lowest first, at most `loo_max` (FramuConfig); never a pinned one. Each head is the closed-form
        model refitted with that contribution's weight 0 (`ExactTrainer.fit(..., weights=)`), delivered as
        the ONNX output `head_loo_<n>` with role `without:<contribution id>` in the manifest's `heads`.
        """
        if not self.on or not contributions:
            return []
        return self.framu.loo_wanted(contributions, self.evaluations(), now(), self.pinned(contributions))

    def round_weights(
        self, round_id: int, contributions: list[Contribution]
    ) -> tuple[dict[str, float] | None, dict[str, float]]:
        """(weights to fit with, or None for uniform; noise-free attention per contribution id)."""
        if not self.on or not contributions:
            return None, {}
        explore = self.mode == "auto"
        weights = self.framu.weights(
            contributions, self.evaluations(), now(), f"round-{round_id}", self.pinned(contributions), explore=explore
        )
        attention = dict(self.framu.state()["attention"])
        return (weights if explore else None), attention

    def after_round(
        self,
        version: int,
        applied: dict[str, float] | None,
        attention: dict[str, float],
        contributions: list[Contribution],
        trigger: str,
        heads: dict[str, str] | None = None,
    ) -> list[Decision]:
        """Streaks and decisions after model `version`; persisted (with the unlearning, in mode auto) at once.

        `heads`: the version's manifest `heads` (head name -> role); the `without:<contribution id>` roles
        are remembered so that the sites' reports on the version's leave-one-out heads can be read.
        """
        if not self.on or not attention:
            return []
        self.framu.record_heads(version, heads)
        at = now()
        decisions = self.framu.decide(applied or attention, contributions, at, self.pinned(contributions))
        state = self.framu.state()
        self.ledger.save_framu(state, version, self.mode, applied, attention)
        if decisions and self.mode == "auto":
            self.ledger.unlearn_automatically(
                [(d.contribution_id, d.site_id, d.reason, dict(d.figures)) for d in decisions]
            )
        for d in decisions:
            action = "unlearned" if self.mode == "auto" else "recommended"
            self.metrics.framu_decisions.labels(d.reason, action).inc()
            log.warning("FRAMU %s contribution %s of %s as %s: %s", "unlearns" if action == "unlearned" else
                        "recommends unlearning", d.contribution_id[:8], d.site_id, d.reason,
                        ", ".join(f"{k} {v:.3g}" for k, v in sorted(d.figures.items())))  # fmt: skip
        if decisions and self.mode == "recommend":
            self.ledger.record_recommendations(
                [(d.contribution_id, d.site_id, d.reason, dict(d.figures)) for d in decisions]
            )
        self._show(attention, contributions)
        self._in_a_row = self._in_a_row + 1 if trigger == "framu" else 0
        if state["pending"] is not None:
            self._waiting = (version, {c.site_id for c in contributions}, time.monotonic())
        return decisions

    def _show(self, attention: dict[str, float], contributions: list[Contribution]) -> None:
        site_of = {c.contribution_id: c.site_id for c in contributions}
        self.metrics.framu_attention.clear()
        for cid, a in sorted(attention.items()):
            self.metrics.framu_attention.labels(site_of.get(cid, "?")).set(a)

    def poll(self, latest_version: int | None) -> bool:
        """Reward the pending proposal once its model's reports are in; whether FRAMU wants another round."""
        if not self.on or latest_version is None:
            return False
        reports = [
            SiteEvaluation(r["site_id"], r["model_version"], r["accuracy"], r["samples"])
            for r in self.ledger.evaluations(latest_version)
            if r["accuracy"] is not None
        ]
        if reports:  # what the policy is rewarded with, shown in every mode
            self.metrics.framu_reward.set(
                aggregate_reward([e.accuracy for e in reports], self.framu.config.reward_aggregate)
            )  # type: ignore[misc]
        if self._waiting is None:
            return False
        version, expected, since = self._waiting
        if version != latest_version:
            self._waiting = None
            return False
        reported = {e.site_id for e in reports}
        if not reported or (not expected <= reported and time.monotonic() - since < self.settings.eval_wait_s):
            return False
        td = self.framu.reward(version, self.evaluations())
        self._waiting = None
        if td is None:
            return False
        state = self.framu.state()
        last = state["last"]
        self.ledger.save_framu(state, version, reward=(last["reward"], td))
        self.metrics.framu_td_error.set(td)
        log.info("FRAMU reward for model v%d: %.4f from %d sites (TD error %+.4f)", version, last["reward"],
                 last["sites"], td)  # fmt: skip
        # Below the threshold now (its streak may still wait for its site's first evaluation), or on a streak.
        threshold = self.framu.config.threshold
        low = {cid for cid, a in state["attention"].items() if a < threshold}
        below = [cid for cid in sorted(low | {c for c, n in state["streaks"].items() if n > 0})
                 if cid not in state["decided"]]  # fmt: skip
        if self.mode == "auto" and below and self._in_a_row < self.settings.max_rounds:
            log.info("FRAMU: %d contribution(s) below the attention threshold; another round (%d of at most %d)",
                     len(below), self._in_a_row + 1, self.settings.max_rounds)  # fmt: skip
            return True
        return False

    def wants_unlearning_round(self, last_trained: set[str]) -> bool:
        """Whether a contribution FRAMU unlearned is still in the current model."""
        return any(r["contribution_id"] in last_trained for r in self.ledger.uncertified_unlearning())
