"""Exact unlearning at the hub: forget receipts in, a round without the forgotten contributions, certificates out.

Entry point: `Unlearning` (engine.py). The audit trail a data-protection officer exports and
verifies is `audit.py` (`fedge-hub audit export|verify`).
"""

from hub.unlearning.engine import Unlearning

__all__ = ["Unlearning"]
