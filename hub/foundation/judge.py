"""Quality of a foundation model: does a prototype of class c make images an independent judge calls c?

The judge is a classifier trained on *labelled* public images. It is a measuring instrument only:
nothing it learns flows into the encoder or the generator, which never see a label. With fewer
than two labels there is nothing to tell apart, so there is no quality score (`unavailable`).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from edge.contribution import make_contribution
from hub.classifier import predict, train_classifier
from hub.foundation.bundle import Foundation
from hub.synthesis import SynthesisConfig, Synthesizer

# A judge score this close to 1 / n_labels (balanced) is read as chance: the generator did not learn the domain.
CHANCE_MARGIN = 0.05

Labelled = tuple[np.ndarray, np.ndarray]  # images [N, 1, S, S], label indices [N]


def balanced_accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Mean per-label recall over the labels present in `labels`."""
    return float(np.mean([(pred[labels == c] == c).mean() for c in np.unique(labels)]))


def unavailable(reason: str) -> dict[str, object]:
    """The quality section when no score can be measured, with the reason."""
    return {"available": False, "reason": reason, "judge_accuracy": None, "judge_balanced_accuracy": None}


def judge_quality(
    foundation: Foundation,
    fit: Labelled,
    check: Labelled,
    prototypes_from: Labelled,
    label_names: tuple[str, ...],
    synthesis: SynthesisConfig,
    k: int = 4,
    seed: int = 0,
    guidances: tuple[float, ...] = (1.0, 1.5, 2.0),
) -> dict[str, object]:
    """Judge accuracy on samples synthesized from per-label prototypes of `prototypes_from`.

    The judge is trained on `fit` and checked on the real images of `check`. The headline figure
    uses `synthesis`; `guidance_sweep` repeats the measure at other classifier-free guidance scales
    (class fidelity against guidance). `judge_balanced_accuracy` (mean per-label share) is the
    figure compared with chance, so a generator that makes only the majority label cannot pass.
    """
    from hub.foundation.encoder import embed

    present = np.unique(prototypes_from[1])
    if len(label_names) < 2 or len(present) < 2:
        return unavailable(f"{len(present)} label(s): a quality score needs at least two labels to tell apart")
    judge = train_classifier(fit[0], fit[1], len(label_names), epochs=40, seed=seed)
    images, labels = prototypes_from
    emb = embed(foundation.load_torch_encoder(), images)
    names = np.array(label_names)[labels]
    contribution = make_contribution("judge", foundation.encoder_id, emb, names, k=k, seed=seed)

    def score(cfg: SynthesisConfig) -> dict[str, object]:
        synth = Synthesizer(foundation, cfg, progress=False).synthesize(contribution)
        pred = np.array(label_names)[predict(judge, synth.images)]
        per_class = {c: float((pred[synth.labels == c] == c).mean()) for c in label_names if (synth.labels == c).any()}
        return {
            "accuracy": float((pred == synth.labels).mean()),
            "balanced": float(np.mean(list(per_class.values()))),
            "per_class": per_class,
            "samples": len(synth.labels),
        }

    sweep = {g: score(replace(synthesis, guidance=g)) for g in sorted({*guidances, synthesis.guidance})}
    main = sweep[synthesis.guidance]
    real = predict(judge, check[0])
    return {
        "available": True,
        "judge_accuracy": main["accuracy"],
        "judge_balanced_accuracy": main["balanced"],
        "per_class": main["per_class"],
        "guidance_sweep": {str(g): r["accuracy"] for g, r in sweep.items()},
        "samples": main["samples"],
        "prototypes_k": k,
        "judge_holdout_accuracy_on_real": float((real == check[1]).mean()),
        "judge_holdout_balanced_accuracy_on_real": balanced_accuracy(real, check[1]),
    }


def chance_verdict(quality: dict[str, object], n_labels: int, margin: float = CHANCE_MARGIN) -> dict[str, object]:
    """`quality` with `chance_level` and `at_chance` (and a `warning` when at chance) for `n_labels` labels."""
    if not quality.get("available", True) or n_labels < 2:
        return quality
    chance = 1.0 / n_labels
    score = float(quality["judge_balanced_accuracy"])  # type: ignore[arg-type]
    real = quality.get("judge_holdout_balanced_accuracy_on_real")
    out = {**quality, "chance_level": chance, "chance_margin": margin, "at_chance": score <= chance + margin}
    if out["at_chance"]:
        out["warning"] = (
            f"quality at chance: the judge's balanced accuracy on synthesized images is {score:.3f}, "
            f"chance is {chance:.3f} for {n_labels} labels; the generator has not learnt this domain "
            "(train longer: --time-budget or --diffusion-steps)"
        )
        if isinstance(real, float) and real <= chance + margin:
            out["warning"] += (
                f"; the judge itself is at chance on real held-back images ({real:.3f}), so it cannot tell"
            )
    return out
