"""FRAMU: deterministic attention, a state that survives a restart, decisions, and the weighted exact fit it drives."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from contract.payloads import Contribution
from edge.contribution import make_contribution
from hub.framu import FEATURE_NAMES, RECOMMENDED, Framu, FramuConfig, SiteEvaluation, features
from hub.learning.closed_form import ContributionStats, FeatureExtractor, FeatureMap, solve, sum_stats
from hub.learning.exact import ExactConfig, ExactTrainer, training_digest
from hub.synthesis import SynthesisConfig, Synthesizer, SyntheticSet

NOW = datetime(2026, 6, 1, tzinfo=UTC)
LABELS = ("a", "b", "c")
DIM = 8
CENTRES = np.random.default_rng(0).standard_normal((len(LABELS), DIM))


def site_data(seed: int, n: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings clustered by label (the same clusters at every site) and their labels."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(LABELS)), n)
    x = CENTRES[y] + 0.2 * rng.standard_normal((len(y), DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def contribution(site: int, encoder_id: str = "enc", flip: bool = False, age_days: float = 1.0) -> Contribution:
    x, y = site_data(site)
    if flip:  # a faulty label table: a -> b -> c -> a
        y = (y + 1) % len(LABELS)
    c = make_contribution(f"site-{site}", encoder_id, x, np.array(LABELS)[y], k=2, min_group_size=5, seed=site)
    return c.model_copy(update={"created_at": NOW - timedelta(days=age_days)})


def config(**kw: object) -> FramuConfig:
    return replace(RECOMMENDED, **kw)  # type: ignore[arg-type]


def evals(contributions: list[Contribution], version: int, accuracy: dict[str, float]) -> list[SiteEvaluation]:
    return [SiteEvaluation(c.site_id, version, accuracy.get(c.site_id, 0.9), 20) for c in contributions]


# ---------------------------------------------------------------------------------------------- policy


def test_features_are_named_and_pure() -> None:
    cs = [contribution(i) for i in range(4)]
    f1 = features(cs, [], NOW)
    f2 = features(list(reversed(cs)), [], NOW)
    assert set(f1) == {c.contribution_id for c in cs}
    for cid, v in f1.items():
        assert v.shape == (len(FEATURE_NAMES),)
        assert np.array_equal(v, f2[cid])  # input order does not matter
    assert f1[cs[0].contribution_id][FEATURE_NAMES.index("eval_missing")] == 1.0


def test_weights_are_deterministic_given_seed_state_inputs_and_round_key() -> None:
    # Arrange
    cs = [contribution(i) for i in range(5)]
    ev = evals(cs, 1, {})
    # Act
    a = Framu(config(seed=7)).weights(cs, ev, NOW, "round-1")
    b = Framu(config(seed=7)).weights(list(reversed(cs)), ev, NOW, "round-1")
    other_round = Framu(config(seed=7)).weights(cs, ev, NOW, "round-2")
    other_seed = Framu(config(seed=8)).weights(cs, ev, NOW, "round-1")
    # Assert
    assert a == b
    assert set(a) == {c.contribution_id for c in cs} and all(0.0 <= w <= 1.0 for w in a.values())
    assert a != other_round and a != other_seed  # the exploration noise comes from seed + round_key
    np.random.seed(123)  # a global RNG plays no part
    assert Framu(config(seed=7)).weights(cs, ev, NOW, "round-1") == a
    noise_free = Framu(config(seed=7)).weights(cs, ev, NOW, "round-1", explore=False)
    assert noise_free == Framu(config(seed=8)).weights(cs, ev, NOW, "round-9", explore=False)


def test_a_clearly_corrupted_contribution_gets_the_lowest_weight() -> None:
    cs = [contribution(i) for i in range(5)] + [contribution(5, flip=True)]
    bad = cs[-1].contribution_id
    agent = Framu(config())
    # Before any evaluation (prototypes against the other sites' only) and after the sites reported.
    w0 = agent.weights(cs, [], NOW, "r0", explore=False)
    w1 = agent.weights(cs, evals(cs, 1, {"site-5": 0.05}), NOW, "r1", explore=False)
    for w in (w0, w1):
        assert min(w, key=w.__getitem__) == bad
        assert w[bad] < RECOMMENDED.threshold < min(v for c, v in w.items() if c != bad)
    f = features(cs, [], NOW)
    assert f[bad][FEATURE_NAMES.index("agreement")] < 0.2


def run_rounds(agent: Framu, cs: list[Contribution], start: int, n: int) -> list[tuple]:
    """n rounds of the service loop with reports that favour down-weighting site-5 (a flipped site)."""
    out = []
    for t in range(start, start + n):
        w = agent.weights(cs, evals(cs, t, {"site-5": 0.1}), NOW + timedelta(hours=t), f"round-{t}")
        # The better the bad site is down-weighted, the better the good sites do: a reward with a signal.
        good_acc = 0.8 + 0.1 * (1.0 - w[cs[-1].contribution_id])
        td = agent.reward(t + 1, evals(cs, t + 1, {"site-5": 0.1} | {c.site_id: good_acc for c in cs[:-1]}))
        out.append((w, td, agent.decide(w, cs, NOW + timedelta(hours=t))))
    return out


def test_state_round_trips_through_json_and_the_run_continues_identically() -> None:
    cs = [contribution(i) for i in range(5)] + [contribution(5, flip=True)]
    cfg = config(patience=4)
    a = Framu(cfg)
    run_rounds(a, cs, 0, 3)
    # A pending proposal is part of the state too: the restart happens between weights() and reward().
    a.weights(cs, [], NOW, "round-3")
    saved = json.dumps(a.state())
    b = Framu(cfg, json.loads(saved))
    assert b.state() == a.state()
    assert a.reward(4, evals(cs, 4, {})) == b.reward(4, evals(cs, 4, {}))
    # Continuing after the restore: same weights, TD errors, decisions and states, bit for bit.
    ra, rb = run_rounds(a, cs, 4, 4), run_rounds(b, cs, 4, 4)
    assert ra == rb
    assert json.dumps(a.state()) == json.dumps(b.state())
    assert a.state()["rounds"] == 8 and a.state()["pending"] is None
    assert any(td for _, td, _ in ra)  # the policy did learn (non-zero TD errors)
    assert [d.contribution_id for _, _, ds in ra for d in ds] == [cs[-1].contribution_id]


def test_reward_without_a_pending_proposal_or_reports_changes_nothing() -> None:
    cs = [contribution(i) for i in range(3)]
    agent = Framu(config())
    assert agent.reward(1, evals(cs, 1, {})) is None
    agent.weights(cs, [], NOW, "r1")
    before = agent.state()
    assert agent.reward(1, evals(cs, 2, {})) is None  # reports on another version only
    assert agent.state() == before
    assert agent.reward(1, evals(cs, 1, {})) == 0.0  # the first reward initialises the value baseline


def test_pinned_contributions_are_never_decided() -> None:
    cs = [contribution(i) for i in range(4)] + [contribution(4, flip=True)]
    bad = cs[-1].contribution_id
    pinned = frozenset({bad})
    agent = Framu(config(patience=2))
    for t in range(5):
        w = agent.weights(cs, evals(cs, t, {"site-4": 0.0}), NOW, f"r{t}", pinned=pinned)
        assert w[bad] == 1.0
        agent.reward(t + 1, evals(cs, t + 1, {"site-4": 0.0}))
        assert agent.decide(w, cs, NOW, pinned=pinned) == []
    # Unpinned, the same contribution is decided after `patience` rounds, once.
    decided = []
    for t in range(5, 9):
        w = agent.weights(cs, evals(cs, t, {"site-4": 0.0}), NOW, f"r{t}")
        decided += agent.decide(w, cs, NOW)
    assert [d.contribution_id for d in decided] == [bad]
    assert decided[0].figures["rounds_below"] == 2.0 and decided[0].figures["weight"] < 0.5


def test_reason_is_outdated_when_the_site_has_been_silent_longer_than_outdated_after_s() -> None:
    cfg = config(patience=1, outdated_after_s=30 * 86400.0)
    cs = [contribution(i) for i in range(4)]
    old = contribution(4, flip=True, age_days=90)
    recent = contribution(5, flip=True, age_days=2)
    reasons = {}
    for bad in (old, recent):
        agent = Framu(cfg)
        w = agent.weights([*cs, bad], evals([*cs, bad], 1, {}), NOW, "r0", explore=False)
        (d,) = agent.decide(w, [*cs, bad], NOW)
        reasons[d.site_id] = d.reason
        assert d.contribution_id == bad.contribution_id
        assert d.figures["threshold"] == cfg.threshold and "feature_agreement" in d.figures
        assert all(isinstance(v, float) for v in d.figures.values())
    assert reasons == {"site-4": "outdated", "site-5": "irrelevant"}


def test_never_more_than_a_third_of_the_sites_are_excluded() -> None:
    # Four of six sites flipped: FRAMU's evidence is consensus, so it stops at floor(6 / 3) = 2.
    cs = [contribution(i) for i in range(2)] + [contribution(i, flip=True) for i in range(2, 6)]
    agent = Framu(config(patience=1))
    active, decided = list(cs), []
    for t in range(4):
        w = agent.weights(active, evals(active, t, {}), NOW, f"r{t}", explore=False)
        for d in agent.decide(w, active, NOW):
            decided.append(d)
            active = [c for c in active if c.contribution_id != d.contribution_id]
    assert len(decided) == 2 and len(active) == 4
    # A decided site that sends a newer contribution is no longer counted as excluded.
    assert set(agent.state()["excluded_sites"]) == {d.site_id for d in decided}


def test_exploration_never_causes_a_decision() -> None:
    # Huge exploration noise, but every contribution's noise-free attention is high: nothing is decided.
    cs = [contribution(i) for i in range(5)]
    agent = Framu(config(exploration=8.0, patience=1, learn=True))
    for t in range(6):
        w = agent.weights(cs, [], NOW, f"r{t}")
        assert agent.decide(w, cs, NOW) == []


def test_framu_imports_without_torch() -> None:
    code = "import sys, hub.framu; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


# ------------------------------------------------------------------------------------ weighted exact fit


def synthetic(cid: str, n: int, seed: int) -> SyntheticSet:
    rng = np.random.default_rng(seed)
    y = rng.choice(np.array(LABELS), n)
    images = rng.random((n, 1, 8, 8), dtype=np.float32) * 0.5
    for i, name in enumerate(LABELS):
        images[y == name, 0, i * 2 : i * 2 + 2] += 0.5
    return SyntheticSet(images, y, np.array([cid] * n))


@pytest.fixture(scope="module")
def stats(tiny_bundle: Path) -> list[ContributionStats]:
    ex = FeatureExtractor(tiny_bundle / "encoder.onnx", FeatureMap(dim=8, n_features=64, bandwidth=0.7, seed=3))
    return [ContributionStats.from_synthetic(synthetic(f"{i:032x}", 30 + i, i), f"{i:032x}", ex) for i in range(4)]


def test_weighted_sum_with_all_weights_one_solves_to_the_same_head_but_names_the_weights(
    stats: list[ContributionStats],
) -> None:
    plain = sum_stats(stats)
    ones = sum_stats(stats, {s.contribution_id: 1.0 for s in stats})
    # What holds: Gram, sums and count values are bit-identical (x * 1.0 is exact), so the solved
    # head's weights and bias are too; the counts are float64 instead of int64 and the digest names
    # the weights, so the two totals (and the heads' `trained_on`) are told apart.
    assert np.array_equal(plain.gram, ones.gram) and np.array_equal(plain.sums, ones.sums)
    assert np.array_equal(plain.counts, ones.counts)
    assert plain.counts.dtype == np.int64 and ones.counts.dtype == np.float64
    assert plain.weights is None and ones.weights == (1.0,) * 4
    assert plain.digest() != ones.digest()
    a, b = solve(plain), solve(ones)
    assert np.array_equal(a.weights, b.weights) and np.array_equal(a.bias, b.bias)
    # And other weights give another total and another digest.
    half = sum_stats(stats, {s.contribution_id: 0.5 if i == 0 else 1.0 for i, s in enumerate(stats)})
    assert half.digest() != ones.digest()
    assert not np.array_equal(solve(half).weights, b.weights)


def test_weight_zero_is_absence_bit_for_bit(stats: list[ContributionStats]) -> None:
    w = {s.contribution_id: 0.3 + 0.2 * i for i, s in enumerate(stats)}
    gone = stats[1].contribution_id
    zero = sum_stats(stats, {**w, gone: 0.0})
    absent = sum_stats([s for s in stats if s.contribution_id != gone], {c: v for c, v in w.items() if c != gone})
    assert zero.contribution_ids == absent.contribution_ids and gone not in zero.contribution_ids
    for x, y in ((zero.gram, absent.gram), (zero.sums, absent.sums), (zero.counts, absent.counts)):
        assert np.array_equal(x, y)
    assert zero.digest() == absent.digest()
    ha, hb = solve(zero), solve(absent)
    assert np.array_equal(ha.weights, hb.weights) and np.array_equal(ha.bias, hb.bias) and ha.digest() == hb.digest()
    with pytest.raises(ValueError, match="no weight given"):
        sum_stats(stats, {stats[0].contribution_id: 1.0})
    with pytest.raises(ValueError, match="finite and >= 0"):
        sum_stats(stats, {**w, gone: -1.0})


def test_exact_trainer_weighted_fit_and_digests(tiny_bundle: Path, tmp_path: Path) -> None:
    from hub.foundation.bundle import load

    fm = load(tiny_bundle)
    synth = Synthesizer(fm, SynthesisConfig(samples_per_count=1.0, steps=2), tmp_path / "synthesis", progress=False)
    trainer = ExactTrainer(synth, tiny_bundle / "encoder.onnx", ExactConfig(n_features=64), tmp_path / "stats")
    cs = [contribution(i, encoder_id=fm.encoder_id) for i in range(3)]
    plain = trainer.fit(cs)
    # Unweighted: exactly today's digest (statistics digests in id order) and no weights.
    assert plain.weights is None and plain.training_digest == training_digest(plain.stats_digests)
    w = {c.contribution_id: 1.0 for c in cs}
    w[cs[0].contribution_id] = 0.0
    w[cs[1].contribution_id] = 0.5
    weighted = trainer.fit(cs, weights=w)
    assert weighted.trained_on == sorted(c.contribution_id for c in cs[1:])
    assert weighted.weights == {c: v for c, v in w.items() if v > 0}
    # The weighted digest covers the weights: other weights, another digest.
    other = trainer.fit(cs, weights={**w, cs[1].contribution_id: 0.25})
    assert other.training_digest != weighted.training_digest
    # Weight 0 is absence, and the refit from scratch gives the same bytes.
    absent = trainer.fit(cs[1:], weights={c: v for c, v in w.items() if v > 0})
    scratch = trainer.refit_from_scratch(cs, weights=w)
    assert absent.training_digest == weighted.training_digest == scratch.training_digest
    assert absent.onnx == weighted.onnx == scratch.onnx


def partial_contribution(site: int, keep: tuple[str, ...], relabel: dict[str, str] | None = None) -> Contribution:
    """A site holding only the labels `keep` (after `relabel`, a faulty label table, is applied)."""
    x, y = site_data(site)
    names = np.array(LABELS)[y]
    if relabel:
        names = np.array([relabel.get(n, n) for n in names])
    mask = np.isin(names, keep)
    c = make_contribution(f"site-{site}", "enc", x[mask], names[mask], k=2, min_group_size=5, seed=site)
    return c.model_copy(update={"created_at": NOW - timedelta(days=1)})


def test_min_support_weakens_disagreement_with_a_label_that_few_other_sites_hold() -> None:
    # min_support belongs to the consensus modes ("median", "mean"); site by site, the faulty site shares one
    # label with the clean one, too few for a pair, so it is no evidence at all (the pairwise test below).
    # Arrange: label "c" is held by one other site only, and that site's "c" is really "a" (faulty table).
    clean = partial_contribution(0, ("a", "b", "c"))
    others = [partial_contribution(i, ("a", "b")) for i in range(1, 4)]
    faulty = partial_contribution(4, ("c",), relabel={"a": "c", "c": "x"})
    cs = [clean, *others, faulty]
    agreement = FEATURE_NAMES.index("agreement")
    # Act
    full = features(cs, [], NOW, consensus="median", min_support=1)
    weak = features(cs, [], NOW, consensus="median", min_support=3)
    # Assert: the clean site's "c" prototypes disagree with a one-site class mean, counted at 1/3 with min_support 3.
    assert full[clean.contribution_id][agreement] < 0.8
    assert weak[clean.contribution_id][agreement] > full[clean.contribution_id][agreement] + 0.1
    # Labels that three or more other sites hold count in full either way.
    for c in others:
        assert weak[c.contribution_id][agreement] == full[c.contribution_id][agreement]


def test_with_require_evaluation_prototypes_alone_never_start_a_decision() -> None:
    cs = [contribution(i) for i in range(5)] + [contribution(5, flip=True)]
    bad = cs[-1].contribution_id
    agent = Framu(config(patience=1, require_evaluation=True))
    for t in range(3):  # no site has reported: the flipped prototypes alone decide nothing
        w = agent.weights(cs, [], NOW, f"r{t}", explore=False)
        assert w[bad] < RECOMMENDED.threshold
        assert agent.decide(w, cs, NOW) == []
    w = agent.weights(cs, evals(cs, 1, {"site-5": 0.1}), NOW, "r3", explore=False)
    assert [d.contribution_id for d in agent.decide(w, cs, NOW)] == [bad]


# ------------------------------------------------------------------------------ counterfactual evidence


def confusions(correct: int, wrong: int) -> list[list[int]]:
    """A 3-label confusion matrix with `correct` samples on the diagonal and `wrong` off it, per label."""
    m = np.zeros((len(LABELS), len(LABELS)), np.int64)
    for i in range(len(LABELS)):
        m[i, i] = correct
        m[i, (i + 1) % len(LABELS)] = wrong
    return m.tolist()


def loo_reports(cs: list[Contribution], version: int, bad: str, gain_rows: int) -> list[SiteEvaluation]:
    """Every site reports the full model (8 of 10 right per label) and the model without `bad`
    (8 + gain_rows right); `bad`'s own site claims that leaving it out costs it everything."""
    out = []
    for c in cs:
        own = c.contribution_id == bad
        loo = confusions(0, 10) if own else confusions(8 + gain_rows, 2 - gain_rows)
        out.append(SiteEvaluation(c.site_id, version, 0.8, 30, confusions(8, 2), {bad: loo}))
    return out


def test_loo_gain_is_the_other_sites_balanced_accuracy_without_minus_with() -> None:
    cs = [contribution(i) for i in range(5)]
    bad = cs[4].contribution_id
    loo_gain = FEATURE_NAMES.index("loo_gain")
    # Leaving `bad` out: the other sites go from 0.8 to 0.9 balanced accuracy (its own site's report is ignored).
    f = features(cs, loo_reports(cs, 3, bad, 1), NOW)
    assert f[bad][loo_gain] == pytest.approx(0.1)
    assert all(f[c.contribution_id][loo_gain] == 0.0 for c in cs[:4])  # no head, no evidence
    # loo_window pools the newest versions that had a head: 0.1 (v3) and -0.2 (v5) pool to -0.05; v1 is too old.
    history = loo_reports(cs, 1, bad, 2) + loo_reports(cs, 3, bad, 1) + loo_reports(cs, 5, bad, -2)
    assert features(cs, history, NOW)[bad][loo_gain] == pytest.approx(-0.2)
    assert features(cs, history, NOW, loo_window=2)[bad][loo_gain] == pytest.approx(-0.05)
    # Reports without heads: the feature is 0 and every other feature is what it was before.
    plain = [SiteEvaluation(e.site_id, e.model_version, e.accuracy, e.samples) for e in loo_reports(cs, 3, bad, 1)]
    fp = features(cs, plain, NOW)
    self_gap = FEATURE_NAMES.index("self_gap")
    assert fp[bad][loo_gain] == 0.0 and fp[bad][self_gap] == 0.0
    # The other head-derived feature: `bad`'s own site gets nothing right without it, the others 0.8 with it.
    assert f[bad][self_gap] == pytest.approx(-0.8)
    heads = [loo_gain, self_gap]
    assert np.array_equal(np.delete(fp[bad], heads), np.delete(f[bad], heads))


def test_a_contribution_that_hurts_the_others_loses_attention() -> None:
    cs = [contribution(i) for i in range(5)]
    bad = cs[4].contribution_id
    prior = dict(RECOMMENDED.prior) | {"loo_gain": -50.0}
    agent = Framu(config(prior=tuple(prior.items()), patience=1))
    before = agent.weights(cs, evals(cs, 3, {}), NOW, "r3", explore=False)
    after = agent.weights(cs, loo_reports(cs, 3, bad, 1), NOW, "r4", explore=False)
    assert before[bad] > RECOMMENDED.threshold > after[bad]
    assert [d.contribution_id for d in agent.decide(after, cs, NOW)] == [bad]
    # And one whose absence would cost the others attention gains it.
    helped = agent.weights(cs, loo_reports(cs, 3, bad, -1), NOW, "r5", explore=False)
    assert helped[bad] > before[bad]


def test_loo_wanted_asks_for_the_lowest_attention_contributions_only() -> None:
    cs = [contribution(i) for i in range(4)] + [contribution(i, flip=True) for i in (4, 5)]
    flipped = sorted(c.contribution_id for c in cs[4:])
    assert Framu(config(loo_below=0.0)).loo_wanted(cs, [], NOW) == []  # off
    agent = Framu(config(loo_below=0.5, loo_max=2))
    before = agent.state()
    assert agent.loo_wanted(list(reversed(cs)), [], NOW) == flipped  # id order, whatever the input order
    assert agent.state() == before  # asking changes nothing
    one = Framu(config(loo_below=0.5, loo_max=1)).loo_wanted(cs, [], NOW)
    att = Framu(config()).attention(cs, [], NOW)
    assert one == [min(flipped, key=att.__getitem__)]
    assert Framu(config(loo_below=0.5)).loo_wanted(cs, [], NOW, pinned=frozenset(flipped)) == []


def test_a_state_saved_before_the_counterfactual_feature_loads_and_continues() -> None:
    cs = [contribution(i) for i in range(4)]
    agent = Framu(config())
    agent.weights(cs, evals(cs, 1, {}), NOW, "r1")
    old = agent.state()
    # What a hub saved before loo_gain existed: no theta for it, eight centred features per contribution.
    del old["theta"]["loo_gain"], old["head_roles"]
    n = len(FEATURE_NAMES) - 1
    old["features"] = {c: v[:n] for c, v in old["features"].items()}
    old["centred"] = {c: v[:n] for c, v in old["centred"].items()}
    old["pending"]["centred"] = {c: v[:n] for c, v in old["pending"]["centred"].items()}
    restored = Framu(config(), json.loads(json.dumps(old)))
    assert restored.state()["theta"]["loo_gain"] == dict(RECOMMENDED.prior)["loo_gain"]
    assert restored.reward(1, evals(cs, 1, {})) == 0.0  # rewarded; no actor step on the old proposal
    assert restored.decide({}, cs, NOW) == []
    assert restored.weights(cs, evals(cs, 2, {}), NOW, "r2", explore=False)


class FakeLedger:
    """Just what FramuLoop reads and writes, with evaluation rows in the ledger's format (`heads` per row)."""

    def __init__(self, contributions: list[Contribution], rows: list[dict]):
        self.contributions, self.rows, self.saved = contributions, rows, None

    def framu_state(self) -> dict | None:
        return self.saved

    def framu_rounds(self) -> list[dict]:
        return []

    def evaluations(self, model_version: int | None = None) -> list[dict]:
        return [r for r in self.rows if model_version is None or r["model_version"] == model_version]

    def pins(self) -> set[str]:
        return set()

    def model_versions(self) -> list[dict]:
        return []

    def active(self) -> list[Contribution]:
        return self.contributions

    def save_framu(self, state: dict, *args: object, **kwargs: object) -> None:
        self.saved = state

    def unlearn_automatically(self, decisions: list) -> None:
        pass

    def record_recommendations(self, decisions: list) -> None:
        pass


def test_framu_loop_reads_the_leave_one_out_heads_the_manifest_named() -> None:
    from hub.config import FramuSettings
    from hub.framu.loop import FramuLoop
    from hub.metrics import HubMetrics

    cs = [contribution(i) for i in range(5)]
    bad = cs[4].contribution_id
    # Rows as hub.ledger.Ledger.evaluations gives them: `heads` is head name -> confusion matrix, or None.
    rows = [
        {"site_id": e.site_id, "model_version": 3, "samples": e.samples, "accuracy": e.accuracy,
         "balanced_accuracy": None, "heads": {"logits": e.confusion, "head_loo_1": e.without[bad]}}
        for e in loo_reports(cs, 3, bad, 1)
    ]  # fmt: skip
    ledger = FakeLedger(cs, rows)
    loop = FramuLoop(FramuSettings(mode="auto"), ledger, 0, HubMetrics())  # type: ignore[arg-type]
    # Before the manifest's roles are known, the heads are not read: reports as before.
    assert all(e.without is None for e in loop.evaluations())
    assert loop.loo_wanted(cs) == loop.framu.loo_wanted(cs, loop.evaluations(), NOW)
    weights, attention = loop.round_weights(3, cs)
    loop.after_round(3, weights, attention, cs, "new", heads={"logits": "candidate", "head_loo_1": f"without:{bad}"})
    (e,) = [e for e in loop.evaluations() if e.site_id == "site-0"]
    assert e.without == {bad: rows[0]["heads"]["head_loo_1"]} and e.confusion == rows[0]["heads"]["logits"]
    assert loop.framu.state()["head_roles"] == {"3": {"head_loo_1": bad}}
    # The roles are in the state the ledger saved: a restarted loop reads the same reports.
    again = FramuLoop(FramuSettings(mode="auto"), ledger, 0, HubMetrics())  # type: ignore[arg-type]
    assert again.evaluations() == loop.evaluations()
    f = features(cs, loop.evaluations(), NOW)
    assert f[bad][FEATURE_NAMES.index("loo_gain")] == pytest.approx(0.1)
    # A row without heads (a site that predates them) is read as before.
    ledger.rows = [{**rows[0], "heads": None}]
    assert loop.evaluations() == [SiteEvaluation("site-0", 3, 0.8, 30)]


# ------------------------------------------------------------------ stale scenario (docs/framu.md, stage 5)


def test_trusted_consensus_leaves_out_the_sites_weighted_low() -> None:
    cs = [contribution(i) for i in range(3)] + [contribution(i, flip=True) for i in (3, 4)]
    clean, agreement = cs[0].contribution_id, FEATURE_NAMES.index("agreement")
    low = {c.contribution_id: 0.1 for c in cs[3:]}
    plain = features(cs, [], NOW)
    trusted = features(cs, [], NOW, trust=low, trust_min=0.5)
    # Judged only against the two other clean sites, the clean site agrees in full.
    assert trusted[clean][agreement] == 1.0
    assert trusted[clean][agreement] >= plain[clean][agreement]
    # Fewer than two trusted other sites: the consensus of all the others, as without trust.
    few = {c.contribution_id: 0.1 for c in cs[1:]}
    assert np.array_equal(features(cs, [], NOW, trust=few, trust_min=0.5)[clean], plain[clean])
    # An agent with trusted_consensus uses its previous proposal's attention (none yet: everyone is trusted).
    a, b = Framu(config()), Framu(config(trusted_consensus=True))
    assert a.weights(cs, [], NOW, "r0", explore=False) == b.weights(cs, [], NOW, "r0", explore=False)


def test_self_gap_is_the_own_sites_accuracy_without_minus_the_others_with() -> None:
    cs = [contribution(i) for i in range(5)]
    bad, self_gap = cs[4].contribution_id, FEATURE_NAMES.index("self_gap")
    # Every site reports the full model at 0.8 and the head without `bad`; its own site gets 6 of 30 right without it.
    reports = [
        SiteEvaluation(
            c.site_id, 2, 0.8, 30, confusions(8, 2), {bad: confusions(2, 8) if c == cs[4] else confusions(8, 2)}
        )
        for c in cs
    ]
    f = features(cs, reports, NOW)
    assert f[bad][self_gap] == pytest.approx(0.2 - 0.8)
    assert all(f[c.contribution_id][self_gap] == 0.0 for c in cs[:4])  # no head of theirs, no evidence
    # The own site's report alone (no other site reported on that version): no evidence either.
    assert features(cs, reports[4:], NOW)[bad][self_gap] == 0.0


# ------------------------------------------------------------ agreement site by site (docs/framu.md, stage 6)


def shifted_contribution(site: int, keep: tuple[str, ...], centres: np.ndarray) -> Contribution:
    """A site holding the labels `keep`, its embeddings clustered round `centres` (another distribution if not CENTRES)."""
    rng = np.random.default_rng(site)
    y = np.repeat(np.arange(len(centres)), 30)
    x = centres[y] + 0.2 * rng.standard_normal((len(y), centres.shape[1]))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    names = np.array(["a", "b", "c", "d"])[y]
    mask = np.isin(names, keep)
    c = make_contribution(f"site-{site}", "enc", x[mask], names[mask], k=2, min_group_size=5, seed=site)
    return c.model_copy(update={"created_at": NOW - timedelta(days=1)})


def test_pairwise_agreement_keeps_two_like_minded_stale_sites_a_minority() -> None:
    # Arrange: four labels; clean sites 1-3 hold a, b, c; clean site 0 also holds d, which among the other sites
    # only the two stale sites hold. The stale sites' data come from another distribution (other centres),
    # alike at both of them.
    rng = np.random.default_rng(7)
    clean_centres, stale_centres = rng.standard_normal((4, DIM)), rng.standard_normal((4, DIM))
    clean = [shifted_contribution(0, ("a", "b", "c", "d"), clean_centres)]
    clean += [shifted_contribution(i, ("a", "b", "c"), clean_centres) for i in (1, 2, 3)]
    stale = [shifted_contribution(i, ("a", "b", "c", "d"), stale_centres) for i in (4, 5)]
    cs = clean + stale
    agreement = FEATURE_NAMES.index("agreement")
    # Act
    median = features(cs, [], NOW, consensus="median", min_support=1)
    pairwise = features(cs, [], NOW, consensus="pairwise")
    # Assert: site 0's d is judged by the stale sites' d under the median consensus; site by site, the three
    # clean sites that share its other labels outvote the two stale ones.
    site0 = clean[0].contribution_id
    assert median[site0][agreement] < 1.0
    assert pairwise[site0][agreement] == 1.0
    for c in clean:
        assert pairwise[c.contribution_id][agreement] == 1.0
    for c in stale:  # they agree with each other, but that is one vote of five
        assert pairwise[c.contribution_id][agreement] < 0.6
    # A pair needs two labels in common: a site whose labels no other site shares has no evidence against it.
    alone = shifted_contribution(6, ("d",), clean_centres)
    assert features([*clean[1:], alone], [], NOW, consensus="pairwise")[alone.contribution_id][agreement] == 1.0
    # The agent takes the setting, and an unknown one is refused.
    assert Framu(config(consensus="pairwise")).weights(cs, [], NOW, "r0", explore=False)
    with pytest.raises(ValueError, match="consensus"):
        config(consensus="vote")
