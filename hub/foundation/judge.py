"""Quality of a foundation model: does a prototype of class c make images an independent judge calls c?

The judge is a classifier trained on the *labelled* public split. It is a measuring instrument only:
nothing it learns flows into the encoder or the generator, which never see a label.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from edge.contribution import make_contribution
from hub.classifier import accuracy, predict, train_classifier
from hub.foundation.bundle import Foundation
from hub.synthesis import SynthesisConfig, Synthesizer


def judge_quality(
    foundation: Foundation,
    images: np.ndarray,
    labels: np.ndarray,
    label_names: tuple[str, ...],
    synthesis: SynthesisConfig,
    k: int = 4,
    seed: int = 0,
    guidances: tuple[float, ...] = (1.0, 1.5, 2.0),
) -> dict[str, object]:
    """Judge accuracy on samples synthesized from per-class prototypes of `images` (the public split).

    The headline figure uses `synthesis`; `guidance_sweep` repeats the measure at other
    classifier-free guidance scales (class fidelity against guidance).
    """
    from hub.foundation.encoder import embed

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    cut = int(0.8 * len(images))
    fit, hold = order[:cut], order[cut:]
    judge = train_classifier(images[fit], labels[fit], len(label_names), epochs=40, seed=seed)
    emb = embed(foundation.load_torch_encoder(), images)
    names = np.array(label_names)[labels]
    contribution = make_contribution("judge", foundation.encoder_id, emb, names, k=k, seed=seed)

    def score(cfg: SynthesisConfig) -> dict[str, object]:
        synth = Synthesizer(foundation, cfg, progress=False).synthesize(contribution)
        pred = np.array(label_names)[predict(judge, synth.images)]
        per_class = {c: float((pred[synth.labels == c] == c).mean()) for c in label_names if (synth.labels == c).any()}
        return {"accuracy": float((pred == synth.labels).mean()), "per_class": per_class, "samples": len(synth.labels)}

    sweep = {g: score(replace(synthesis, guidance=g)) for g in sorted({*guidances, synthesis.guidance})}
    main = sweep[synthesis.guidance]
    return {
        "judge_accuracy": main["accuracy"],
        "per_class": main["per_class"],
        "guidance_sweep": {str(g): r["accuracy"] for g, r in sweep.items()},
        "samples": main["samples"],
        "prototypes_k": k,
        "judge_holdout_accuracy_on_real": accuracy(judge, images[hold], labels[hold]),
    }
