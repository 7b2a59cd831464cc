"""The closed-form refinement round (Fed3R, `rounds.refine`): sites' additive feature statistics in, an exact head out.

Entry point: `Refinement` (engine.py). The feature part a site runs is features.py; the wire
statistics' validation and conversion is statistics.py; the site's half is edge/refine.py.
"""

from hub.refinement.engine import RefinedModel, Refinement
from hub.refinement.features import Projection

__all__ = ["Projection", "RefinedModel", "Refinement"]
