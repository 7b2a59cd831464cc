"""A training loop's step plan under an optional time budget.

With a budget the plan shrinks once the step rate is known, so that a learning-rate schedule written
over `planned` still decays to its end instead of being cut off at a high rate; the loop also stops
when one more step at the mean rate so far would end past the budget, whatever the plan said (a step
much slower than the mean, on a machine that suddenly gets busy, still overshoots by that step).
"""

from __future__ import annotations

import time
from collections.abc import Callable


class StepBudget:
    """At most `steps` steps, and no more than `seconds` of wall time (None: no limit)."""

    def __init__(
        self, steps: int, seconds: float | None = None, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if seconds is not None and seconds <= 0:
            raise ValueError(f"a time budget must be positive, got {seconds}")
        self.steps = steps
        self.seconds = seconds
        self.planned = steps
        self.done = 0
        self.stopped_by_budget = False
        self._clock = clock
        self._start = clock()

    def elapsed(self) -> float:
        """Seconds since the budget was created."""
        return self._clock() - self._start

    def advance(self) -> bool:
        """Count one finished step; True while the loop should go on."""
        self.done += 1
        if self.seconds is not None:
            elapsed = self.elapsed()
            per_step = elapsed / self.done
            if elapsed + per_step > self.seconds:  # another step at this rate would end past the budget
                self.planned = self.done
            else:  # the steps the rest of the budget affords at the rate so far (at least one more)
                afford = self.done + int((self.seconds - elapsed) / max(per_step, 1e-12))
                self.planned = min(self.steps, max(self.done + 1, afford))
        if self.done < self.planned:
            return True
        self.stopped_by_budget = self.done < self.steps
        return False

    def progress(self, step: int) -> float:
        """Where `step` lies in the plan, in [0, 1] (for cosine schedules)."""
        return min(step, self.planned) / self.planned
