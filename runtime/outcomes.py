"""One rule for every message handler on both services: each message ends accepted, duplicate or rejected.

A handler's work is a function `apply(message) -> "accepted" | "duplicate"` that raises `Rejected`
for a message it refuses. `guarded` turns it into a Bus handler that never raises: an unexpected
exception becomes a rejection with code `internal`, and `report` hears every outcome exactly once
(to count it, record it and answer the sender). The Bus then acknowledges the message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

from runtime.mqtt import Message

log = logging.getLogger(__name__)

Outcome = Literal["accepted", "duplicate", "rejected"]
OUTCOMES: tuple[Outcome, ...] = ("accepted", "duplicate", "rejected")


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class Rejected(Exception):
    """A message refused, with a machine-readable code and a sentence for people."""

    def __init__(self, code: str, reason: str, ref_id: str | None = None):
        # Reasons and ids often come from the offending input; a lone surrogate from a hostile payload ("\ud800")
        # cannot be stored in SQLite or sent as UTF-8, so both are escaped here, once, for every place they go.
        reason = _printable(reason)
        super().__init__(f"{code}: {reason}")
        self.code, self.reason, self.ref_id = code, reason, None if ref_id is None else _printable(ref_id)


Report = Callable[[str, Message, Outcome, Rejected | None], None]


def guarded(kind: str, apply: Callable[[Message], Outcome], report: Report) -> Callable[[Message], None]:
    """A Bus handler for messages of `kind` that gives each one exactly one outcome and never raises."""

    def handle(msg: Message) -> None:
        rejection: Rejected | None = None
        try:
            outcome = apply(msg)
        except Rejected as err:
            outcome, rejection = "rejected", err
        except Exception as err:  # a bug or a failing disk is still an outcome, never an unacknowledged message
            log.exception("%s on %s failed unexpectedly", kind, msg.topic[:200])
            outcome = "rejected"
            rejection = Rejected("internal", f"failed on this message: {type(err).__name__}: {err}"[:500])
        try:
            report(kind, msg, outcome, rejection)
        except Exception:
            log.exception("could not report the outcome (%s) of %s on %s", outcome, kind, msg.topic[:200])

    return handle
