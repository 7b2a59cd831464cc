"""FRAMU at the hub: attention weights over contributions, refined by reinforcement learning from the sites'
federated evaluation, that down-weight and (through the exact unlearning path) unlearn outdated or
irrelevant contributions. docs/framu.md has the formulation, next to the paper's.

Entry point: `Framu` (agent.py); `features` (features.py) is the pure state function. numpy only:
importing this package never imports torch.
"""

from hub.framu.agent import RECOMMENDED, Decision, Framu, FramuConfig, aggregate_reward, config_dict
from hub.framu.features import FEATURE_NAMES, SiteEvaluation, features

__all__ = [
    "FEATURE_NAMES",
    "RECOMMENDED",
    "Decision",
    "Framu",
    "FramuConfig",
    "SiteEvaluation",
    "aggregate_reward",
    "config_dict",
    "features",
]
