"""Quality gates: a bound a step's result must meet to be kept. A result outside its bound
raises :class:`GateFailed` and the step's artifact is discarded."""

from __future__ import annotations

import math

from attrs import frozen

from gptstore.errors import GptstoreError


class GateFailed(GptstoreError):
    """A result outside its gate; nothing of the step is kept."""


@frozen(kw_only=True)
class Gate:
    """``metric`` must be at most ``at_most`` and at least ``at_least`` (either may be None).

    With ``relative``, the bounds apply to the change against the value before the step
    (``after / before - 1``: 0.03 is +3%), not to the value itself.
    """

    metric: str
    at_most: float | None = None
    at_least: float | None = None
    relative: bool = False

    def check(self, after: float, before: float | None = None) -> None:
        """Raise GateFailed when ``after`` (against ``before`` when relative) is out of bounds,
        or is not a finite number (a diverged model's NaN passes no gate)."""
        if not math.isfinite(after) or (before is not None and not math.isfinite(before)):
            raise GateFailed(
                f"{self.metric} is {after} (before: {before}), not a finite number; the result "
                "is discarded"
            )
        if self.relative:
            if before is None or before == 0:
                raise GateFailed(f"gate on {self.metric}: no value before the step to compare")
            value = after / before - 1
            shown = f"{after:.4g} is {value:+.2%} against {before:.4g}"
            bound = "{:+.2%}"
        else:
            value, shown, bound = after, f"{after:.4g}", "{:.4g}"
        if self.at_most is not None and value > self.at_most:
            limit = f"at most {bound.format(self.at_most)}"
        elif self.at_least is not None and value < self.at_least:
            limit = f"at least {bound.format(self.at_least)}"
        else:
            return
        raise GateFailed(
            f"{self.metric} {shown}, outside its gate ({limit}); the result is discarded"
        )
