"""FRAMU at the hub: attention weights over contributions, refined by reinforcement from federated evaluation.

One round, as the hub runs it (docs/framu.md):

0. `loo_wanted(contributions, evaluations, now)`: the contributions (attention below `loo_below`, at
   most `loo_max`) whose leave-one-out head the round's model should carry; the sites' confusion
   matrices of those heads give the `loo_gain` feature (hub/framu/features.py).
1. `weights(contributions, evaluations, now, round_key)`: features of every contribution (state),
   noise-free attention a_c = sigmoid(mu_c) with mu_c = bias + theta . z_c + u_c, z_c = phi_c - ref
   (ref: a fixed reference, or the median over the contributions for age, idle time), and the
   action: exploration in logit space, w_c = sigmoid(mu_c + sigma * eps_c), eps_c ~ N(0, 1) clipped
   to +-max_noise and derived from (seed, round_key, contribution id) only. The proposal is kept
   in the state, pending its reward.
2. The hub fits the closed-form model with those weights (each contribution's share of the
   synthetic set) and the sites evaluate it on their local held-out samples.
3. `reward(model_version, evaluations)`: r = median (or mean) of the sites' accuracies of that
   version (or their trimmed mean). Critic: V, the expected reward under the current policy and
   contributions; TD error delta = r - V (one-step episodes, gamma = 0), V += beta * delta; V
   restarts when the set of contributions changes (another state). Actor
   (Gaussian policy gradient with the TD error as advantage, steps clipped):
   theta += alpha * delta * mean_c(eps_c / sigma * z_c) and, per contribution, its attention
   offset u_c += alpha_u * delta * eps_c / sigma.
4. `decide(...)`: a contribution whose noise-free attention stays below `threshold` for
   `patience` consecutive rounds (with `require_evaluation`, only rounds after its site has
   reported an evaluation count) becomes a decision, `outdated` when its site has sent nothing
   for `outdated_after_s`, else `irrelevant`. Pinned contributions are never decided, and
   FRAMU never excludes more than `max_unlearn_share` of the sites (its evidence is consensus).

Pure numpy; nothing here imports torch. The state is plain JSON (floats round-trip exactly through
json), so a hub that restarts with `Framu(config, state)` continues bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Literal

import numpy as np

from contract.payloads import Contribution
from hub.framu.features import DAY_S, FEATURE_NAMES, SiteEvaluation, features

STATE_FORMAT = 1
# Features added after STATE_FORMAT 1 was first saved: a saved state without them is completed from the prior.
ADDED_FEATURES = ("loo_gain", "self_gap")
HEAD_VERSIONS_KEPT = 16  # model versions whose leave-one-out head names the state remembers

# The value of each feature for a contribution with nothing against it: the policy scores the
# difference, so the bias alone is the logit of such a contribution. "median": the median over the
# contributions scored together (only relative age matters: a common shift of every logit changes
# no model, since the closed-form fit depends on relative weights only).
FEATURE_REFERENCE: dict[str, float | str] = {
    "agreement": 1.0,
    "margin": "median",
    "eval_gap": 0.0,
    "eval_missing": 0.0,
    "log_age_days": "median",
    "log_site_idle_days": "median",
    "log_count_ratio": 0.0,
    "encoder_majority": 1.0,
    "loo_gain": 0.0,
    "self_gap": 0.0,
}


def centred(feats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """z_c = phi_c - ref per contribution id (FEATURE_REFERENCE), the policy's input."""
    if not feats:
        return {}
    m = np.stack([feats[c] for c in sorted(feats)])
    ref = np.array(
        [float(np.median(m[:, i])) if r == "median" else float(r) for i, r in enumerate(FEATURE_REFERENCE.values())]
    )
    return {c: feats[c] - ref for c in feats}


# The initial policy (theta_0): the attention the features alone give, before any reward. Chosen on
# validation data (`python -m bench.framu --select`, public split only); age, idle time and size
# start at 0: the policy has to learn from rewards whether they matter.
PRIOR: dict[str, float] = {
    "agreement": 12.0,
    "margin": 0.0,
    "eval_gap": 6.0,
    "eval_missing": 0.0,
    "log_age_days": 0.0,
    "log_site_idle_days": 0.0,
    "log_count_ratio": 0.0,
    "encoder_majority": 4.0,
    "loo_gain": -25.0,  # `--select-stage counterfactual` (bench/results/framu-select-loo.json)
    "self_gap": 0.0,  # `--select-stage stale` (bench/results/framu-select-stale.json)
}


@dataclass(frozen=True)
class FramuConfig:
    """FRAMU's settings. The defaults past `seed` were chosen on validation data (docs/framu.md)."""

    threshold: float  # attention weight below which a contribution is a candidate for unlearning
    patience: int  # consecutive rounds below threshold before a decision
    outdated_after_s: float  # a candidate whose site's newest contribution is older than this is 'outdated'
    seed: int = 0
    bias: float = 3.0  # logit of a contribution with nothing against it (sigmoid(3) = 0.95)
    prior: tuple[tuple[str, float], ...] = tuple(PRIOR.items())  # theta_0, by feature name
    learning_rate: float = 2.0  # alpha: actor step on theta
    offset_learning_rate: float = 2.0  # alpha_u: actor step on each contribution's own attention offset
    value_learning_rate: float = 0.3  # beta: critic (value baseline) step
    exploration: float = 1.0  # sigma: exploration noise in logit space
    max_noise: float = 2.0  # |eps| is clipped here: an explored logit is within sigma * max_noise of the noise-free one
    max_td: float = 0.1  # |TD error| used in an update is clipped here (accuracy units)
    max_step: float = 0.5  # norm of one round's change of theta, and of one offset, is clipped here
    max_offset: float = 4.0  # |u_c| bound
    max_theta: float = 20.0  # |theta_i| bound
    max_unlearn_share: float = 1 / 3  # never exclude more than floor(this * sites) sites
    reward_aggregate: Literal["median", "mean", "trimmed"] = "mean"
    # How agreement is measured (hub.framu.features): site by site since stage 6 (docs/framu.md; "median" before).
    consensus: Literal["median", "mean", "pairwise"] = "pairwise"
    min_support: int = 3  # other sites holding a label before a disagreement with its class mean counts in full
    require_evaluation: bool = True  # a round counts towards a streak only once the site's evaluation is in
    learn: bool = True  # False: the fixed attention policy (features alone, no exploration, no updates)
    # Counterfactual evidence (docs/framu.md): which contributions get a leave-one-out head in a round's model.
    loo_below: float = 0.9  # a contribution whose noise-free attention is below this wants one (0: none is asked)
    # At most this many leave-one-out heads per model, lowest attention first. 0 (none) by default: on validation
    # the heads tied FRAMU without them and were worse in the stale scenario (docs/framu.md, stage 3).
    loo_max: int = 0
    loo_window: int = 1  # model versions pooled into loo_gain (the newest with a head for the contribution)
    # The consensus a contribution's agreement is measured against comes only from the other contributions whose
    # noise-free attention in the previous proposal was at least `threshold` (docs/framu.md, stage 5b: with
    # threshold 0.6, chosen on seventeen validation seeds).
    trusted_consensus: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.patience < 1:
            raise ValueError(f"patience must be at least 1, got {self.patience}")
        if self.outdated_after_s < 0:
            raise ValueError(f"outdated_after_s must be >= 0, got {self.outdated_after_s}")
        unknown = sorted({k for k, _ in self.prior} - set(FEATURE_NAMES))
        if unknown:
            raise ValueError(f"prior names unknown features {unknown}; known: {list(FEATURE_NAMES)}")
        if not 0.0 <= self.max_unlearn_share < 1.0:
            raise ValueError(f"max_unlearn_share must be in [0, 1), got {self.max_unlearn_share}")
        if self.consensus not in ("median", "mean", "pairwise"):
            raise ValueError(f"consensus must be 'median', 'mean' or 'pairwise', got {self.consensus!r}")
        if self.min_support < 1:
            raise ValueError(f"min_support must be at least 1, got {self.min_support}")
        if not 0.0 <= self.loo_below <= 1.0:
            raise ValueError(f"loo_below must be in [0, 1], got {self.loo_below}")
        if self.loo_max < 0 or self.loo_window < 1:
            raise ValueError(f"loo_max must be >= 0 and loo_window >= 1, got {self.loo_max}, {self.loo_window}")
        if self.reward_aggregate not in ("median", "mean", "trimmed"):
            raise ValueError(f"reward_aggregate must be 'median', 'mean' or 'trimmed', got {self.reward_aggregate!r}")


# Recommended settings for a hub (docs/framu.md): below 0.6 for 3 rounds (stage 5b; 0.5 before); outdated after 30 days.
RECOMMENDED = FramuConfig(threshold=0.6, patience=3, outdated_after_s=30 * DAY_S)


@dataclass(frozen=True)
class Decision:
    """A contribution FRAMU would unlearn, why, and the figures behind it (for the certificate and audit)."""

    contribution_id: str
    site_id: str
    reason: Literal["outdated", "irrelevant"]
    figures: dict[str, float] = field(default_factory=dict)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _noise(seed: int, round_key: str, contribution_id: str) -> float:
    """A standard normal draw from (seed, round key, contribution id) alone: no global RNG, no order dependence."""
    digest = hashlib.sha256(f"fedge/framu/{seed}/{round_key}/{contribution_id}".encode()).digest()
    return float(np.random.default_rng(int.from_bytes(digest[:16], "little")).standard_normal())


def aggregate_reward(values: Sequence[float], how: str) -> float:
    """Aggregate per-site figures: median, mean, or trimmed (interquartile) mean, which drops the lowest and
    the highest quarter (floor(n / 4) sites each) and averages the rest: robust to a few bad sites
    like the median, without the median's flatness on discrete accuracies."""
    x = np.sort(np.asarray(values, np.float64))
    if how == "median":
        return float(np.median(x))
    if how == "trimmed":
        k = len(x) // 4
        return float(x[k : len(x) - k].mean())
    return float(x.mean())


class Framu:
    """Attention over contributions, refined by an actor-critic from federated evaluation (module docstring)."""

    def __init__(self, config: FramuConfig, state: dict | None = None):
        self.config = config
        fresh = {
            "format": STATE_FORMAT,
            "theta": {n: float(dict(config.prior).get(n, 0.0)) for n in FEATURE_NAMES},
            "offsets": {},  # contribution id -> u_c
            "value": None,  # V: the critic's expected reward under the current policy (None: unknown)
            "value_ids": [],  # the contributions V was learnt with
            "streaks": {},  # contribution id -> consecutive rounds below threshold
            "decided": [],  # contribution ids already reported as decisions (still active)
            "excluded_sites": [],  # sites whose decided contribution left and nothing newer came
            "attention": {},  # contribution id -> noise-free attention of the last proposal
            "features": {},  # contribution id -> feature vector of the last proposal
            "pending": None,  # the proposal awaiting its reward
            "last": {},  # last reward, td_error, model_version
            "rounds": 0,  # rewards received
            "head_roles": {},  # model version (str) -> {leave-one-out head name: contribution id}, newest few
        }
        if state is None:
            state = fresh
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown FRAMU state format {state.get('format')!r}; expected {STATE_FORMAT}")
        # A state saved before a feature existed gets that feature's prior coefficient (it had no say then).
        prior = dict(config.prior)
        state = {**state, "theta": {**{n: float(prior.get(n, 0.0)) for n in ADDED_FEATURES}, **state["theta"]}}
        missing = sorted(set(FEATURE_NAMES) - set(state["theta"]))
        if missing:
            raise ValueError(f"FRAMU state lacks policy parameters for features {missing}")
        # A deep copy through JSON: the caller's dict is never mutated, and what we hold is what state() gives.
        self._s: dict = json.loads(json.dumps(state))
        # A state saved before a key existed gets that key's initial value (same format, one more field).
        for key, value in fresh.items():
            self._s.setdefault(key, json.loads(json.dumps(value)))

    def state(self) -> dict:
        """The whole learning state as JSON-serialisable data (a copy): pass it back after a restart."""
        return json.loads(json.dumps(self._s))

    # ------------------------------------------------------------------------------------------ policy

    def _logit(self, cid: str, z: np.ndarray) -> float:
        theta = self._s["theta"]
        score = sum(theta[n] * float(z[i]) for i, n in enumerate(FEATURE_NAMES))
        return self.config.bias + score + float(self._s["offsets"].get(cid, 0.0))

    def _features(
        self, contributions: list[Contribution], evaluations: list[SiteEvaluation], now: datetime
    ) -> dict[str, np.ndarray]:
        cfg = self.config
        trust = self._s["attention"] if cfg.trusted_consensus else None
        return features(
            contributions, evaluations, now, cfg.consensus, cfg.min_support, cfg.loo_window, trust, cfg.threshold
        )

    def loo_wanted(
        self,
        contributions: list[Contribution],
        evaluations: list[SiteEvaluation],
        now: datetime,
        pinned: frozenset[str] = frozenset(),
    ) -> list[str]:
        """Contribution ids that this round's model should carry a leave-one-out head for, in id order.

        Those whose noise-free attention is below `loo_below`, lowest first, at most `loo_max` of them;
        never a pinned one (it is never decided), never the only contribution. Reads the state, changes nothing.
        """
        cfg = self.config
        if cfg.loo_max <= 0 or cfg.loo_below <= 0.0 or len(contributions) < 2:
            return []
        att = self.attention(contributions, evaluations, now)
        low = sorted((a, cid) for cid, a in att.items() if a < cfg.loo_below and cid not in pinned)
        return sorted(cid for _, cid in low[: cfg.loo_max])

    def attention(
        self, contributions: list[Contribution], evaluations: list[SiteEvaluation], now: datetime
    ) -> dict[str, float]:
        """Noise-free attention weight in [0, 1] per contribution id; reads the state, changes nothing."""
        zs = centred(self._features(contributions, evaluations, now))
        return {cid: _sigmoid(self._logit(cid, z)) for cid, z in zs.items()}

    def weights(
        self,
        contributions: list[Contribution],
        evaluations: list[SiteEvaluation],
        now: datetime,
        round_key: str,
        pinned: frozenset[str] = frozenset(),
        explore: bool = True,
    ) -> dict[str, float]:
        """Attention weight in [0, 1] per contribution id (all of them): the weights to fit this round's model with.

        Deterministic given config.seed, the state, the inputs and `round_key` (the exploration noise
        derives from seed + round_key + contribution id, never from a global RNG). Records what it
        proposed (features, noise, noise-free attention) in the state, pending its reward.

        Args:
            contributions: the active contributions.
            evaluations: the sites' latest reports (features use each site's newest model version).
            now: the time of the round.
            round_key: a key unique to the round (for example the model version it will produce).
            pinned: contribution ids an operator pinned: weight 1, never explored, never decided.
            explore: False gives the noise-free attention (the production weights) and records no
                proposal: nothing is pending and reward() will return None for it.
        """
        cfg = self.config
        feats = self._features(contributions, evaluations, now)
        zs = centred(feats)
        ids = sorted(feats)
        # Offsets of contributions no longer active are dropped: ids are never reused.
        self._s["offsets"] = {c: u for c, u in self._s["offsets"].items() if c in feats}
        out, eps, mus, attention = {}, {}, {}, {}
        sigma = cfg.exploration if (explore and cfg.learn) else 0.0
        for cid in ids:
            if cid in pinned:
                out[cid] = attention[cid] = 1.0
                continue
            mu = self._logit(cid, zs[cid])
            e = float(np.clip(_noise(cfg.seed, round_key, cid), -cfg.max_noise, cfg.max_noise)) if sigma else 0.0
            mus[cid], eps[cid] = mu, e
            attention[cid] = _sigmoid(mu)
            out[cid] = _sigmoid(mu + sigma * e)
        self._s["attention"] = attention
        self._s["features"] = {cid: [float(x) for x in feats[cid]] for cid in ids}
        self._s["centred"] = {cid: [float(x) for x in zs[cid]] for cid in ids}
        if explore:
            self._s["pending"] = {
                "round_key": round_key,
                "ids": ids,
                "centred": {cid: [float(x) for x in zs[cid]] for cid in mus},
                "eps": eps,
                "logits": mus,
                "sigma": sigma,
                "weights": out,
            }
        return out

    def record_heads(self, model_version: int, heads: dict[str, str] | None) -> None:
        """Remember which leave-one-out head of `model_version` leaves out which contribution.

        `heads` is the manifest's head name -> role map; roles `without:<contribution id>` are kept, others
        ignored. Only the newest HEAD_VERSIONS_KEPT versions are kept (loo_window reads fewer).
        """
        loo = {h: r.removeprefix("without:") for h, r in sorted((heads or {}).items()) if r.startswith("without:")}
        roles = dict(self._s["head_roles"])
        if loo:
            roles[str(int(model_version))] = loo
        keep = sorted(roles, key=int)[-HEAD_VERSIONS_KEPT:]
        self._s["head_roles"] = {v: roles[v] for v in keep}

    def head_roles(self, model_version: int) -> dict[str, str]:
        """{leave-one-out head name: contribution id} of a model version ({} when none was recorded)."""
        return dict(self._s["head_roles"].get(str(int(model_version)), {}))

    # ---------------------------------------------------------------------------------------- learning

    def reward(self, model_version: int, evaluations: list[SiteEvaluation]) -> float | None:
        """The federated evaluation of the model built with the last proposed weights: TD update; returns the TD error.

        Only reports on `model_version` count (accuracy given, samples > 0). Returns None, changing
        nothing, when no proposal is pending or no site has reported on that version yet (call again
        when reports arrive).
        """
        pending = self._s["pending"]
        if pending is None:
            return None
        latest: dict[str, float] = {}
        for e in evaluations:
            ok = e.accuracy is not None and e.samples > 0 and math.isfinite(e.accuracy)
            if e.model_version == model_version and ok:
                latest[e.site_id] = float(e.accuracy)  # type: ignore[arg-type]
        if not latest:
            return None
        cfg = self.config
        sites = sorted(latest)
        r = aggregate_reward([latest[x] for x in sites], cfg.reward_aggregate)
        ids = list(pending.get("ids", sorted(pending.get("weights", {}))))
        if self._s["value_ids"] != ids:
            # Other contributions, another state: the old expectation does not apply.
            self._s["value"], self._s["value_ids"] = None, ids
        v = self._s["value"]
        td = 0.0 if v is None else r - float(v)
        self._s["value"] = r if v is None else float(v) + cfg.value_learning_rate * td
        step = float(np.clip(td, -cfg.max_td, cfg.max_td))
        sigma = float(pending.get("sigma", 0.0))
        # (A proposal saved by an older version, without centred features or with fewer of them, is rewarded
        # without an actor step.)
        lengths = {len(z) for z in pending.get("centred", {}).values()}
        if cfg.learn and sigma > 0 and step != 0.0 and pending["eps"] and lengths == {len(FEATURE_NAMES)}:
            theta, offsets = self._s["theta"], self._s["offsets"]
            grad = np.zeros(len(FEATURE_NAMES))
            for cid in sorted(pending["eps"]):
                score = pending["eps"][cid] / sigma  # d log pi / d mu_c for a Gaussian policy in logit space
                grad += score * np.array(pending["centred"][cid])
                du = float(np.clip(cfg.offset_learning_rate * step * score, -cfg.max_step, cfg.max_step))
                offsets[cid] = float(np.clip(float(offsets.get(cid, 0.0)) + du, -cfg.max_offset, cfg.max_offset))
            d_theta = cfg.learning_rate * step * grad / len(pending["eps"])
            norm = float(np.linalg.norm(d_theta))
            if norm > cfg.max_step:
                d_theta *= cfg.max_step / norm
            for i, name in enumerate(FEATURE_NAMES):
                theta[name] = float(np.clip(theta[name] + d_theta[i], -cfg.max_theta, cfg.max_theta))
        self._s["pending"] = None
        self._s["rounds"] += 1
        self._s["last"] = {"reward": r, "td_error": td, "model_version": int(model_version), "sites": len(sites)}
        return td

    # --------------------------------------------------------------------------------------- decisions

    def decide(
        self,
        weights: dict[str, float],
        contributions: list[Contribution],
        now: datetime,
        pinned: frozenset[str] = frozenset(),
    ) -> list[Decision]:
        """Once per round: update below-threshold streaks; those below threshold for `patience` rounds become decisions.

        Streaks follow the noise-free attention recorded by the last weights() call (exploration
        never causes a decision); `weights` is used for contributions that call did not cover.
        Pinned contributions are never decided (their streak is reset). A contribution is reported
        once; the hub unlearns it (mode auto) or only reports it (mode recommend).
        """
        cfg = self.config
        active = {c.contribution_id: c for c in contributions}
        newest: dict[str, datetime] = {}
        for c in contributions:
            if c.site_id not in newest or c.created_at > newest[c.site_id]:
                newest[c.site_id] = c.created_at
        streaks = {cid: n for cid, n in self._s["streaks"].items() if cid in active}
        decided = [cid for cid in self._s["decided"] if cid in active]
        active_sites = {c.site_id for c in contributions}
        excluded = {x for x in self._s["excluded_sites"] if x not in active_sites}
        flagged = excluded | {active[cid].site_id for cid in decided}
        # Its evidence is agreement with the other sites: FRAMU never excludes a majority (or more than
        # max_unlearn_share) of the sites, whatever the attention says.
        budget = math.floor(cfg.max_unlearn_share * len(active_sites | excluded)) - len(flagged)
        candidates = []
        for cid in sorted(active):
            if cid in pinned:
                streaks[cid] = 0
                continue
            w = float(self._s["attention"].get(cid, weights.get(cid, 1.0)))
            phi = self._s["features"].get(cid)
            if cfg.require_evaluation and (phi is None or phi[FEATURE_NAMES.index("eval_missing")] > 0):
                # No federated evaluation from its site yet: the prototypes alone never start a decision.
                streaks[cid] = 0 if w >= cfg.threshold else streaks.get(cid, 0)
            else:
                streaks[cid] = streaks.get(cid, 0) + 1 if w < cfg.threshold else 0
            if streaks[cid] >= cfg.patience and cid not in decided:
                candidates.append((w, cid))
        out = []
        for w, cid in sorted(candidates):
            c = active[cid]
            if budget <= 0 or c.site_id in flagged:
                continue
            idle_s = max(0.0, (now - newest[c.site_id]).total_seconds())
            age_s = max(0.0, (now - c.created_at).total_seconds())
            figures = {
                "weight": w,
                "threshold": cfg.threshold,
                "rounds_below": float(streaks[cid]),
                "patience": float(cfg.patience),
                "age_s": age_s,
                "site_idle_s": idle_s,
                "outdated_after_s": cfg.outdated_after_s,
                "attention_offset": float(self._s["offsets"].get(cid, 0.0)),
                "rounds_learned": float(self._s["rounds"]),
            }
            phi, z = self._s["features"].get(cid), self._s.get("centred", {}).get(cid)
            if phi is not None:
                figures.update({f"feature_{n}": float(x) for n, x in zip(FEATURE_NAMES, phi, strict=False)})
            if z is not None and len(z) == len(FEATURE_NAMES):
                figures["logit"] = self._logit(cid, np.array(z))
            figures.update({f"theta_{n}": float(t) for n, t in self._s["theta"].items()})
            for key in ("reward", "td_error"):
                if key in self._s["last"]:
                    figures[f"last_{key}"] = float(self._s["last"][key])
            if self._s["value"] is not None:
                figures["value"] = float(self._s["value"])
            reason: Literal["outdated", "irrelevant"] = "outdated" if idle_s > cfg.outdated_after_s else "irrelevant"
            out.append(Decision(cid, c.site_id, reason, figures))
            decided.append(cid)
            flagged.add(c.site_id)
            budget -= 1
        # A decided site stays counted as excluded until it sends a newer contribution.
        self._s["excluded_sites"] = sorted(excluded | {active[cid].site_id for cid in decided})
        self._s["streaks"], self._s["decided"] = streaks, decided
        return out


def config_dict(config: FramuConfig) -> dict:
    """The config as plain JSON data (for results files and the audit trail)."""
    d = asdict(config)
    d["prior"] = dict(config.prior)
    return d
