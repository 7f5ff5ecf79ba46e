"""Release gates: quality vs the champion, fairness, quantization parity, drift.

Each gate is a pure function from figures to a `GateVerdict` (passed, thresholds, observed
values, evidence, a one-line reason). A gate that says no is an outcome, not an exception.

Each gate module also has a `breaches(thresholds, observed)` function: the gate's rule applied
to the figures a verdict records. The verdict passes exactly when it finds no breach, and the
Edge Releases view explains a failed verdict from the same breaches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipelines.records import GateVerdict


@dataclass(frozen=True)
class Breach:
    """One rule a verdict's figures break.

    `observed` and `limit` are the two figures the rule compares. `kind` says how: "min" (below
    a floor), "max" (above a ceiling), "regression" (`observed` is how much worse `value` is than
    `baseline`, `limit` how much worse it may be) or "missing" (the figure was not measured).
    `field` is where the limit is set (a spec field such as "gates.quality.accuracy.minValue").
    """

    metric: str
    observed: float | None
    limit: float | None
    kind: Literal["min", "max", "regression", "missing"]
    field: str
    group: str | None = None
    variant: str | None = None
    value: float | None = None
    baseline: float | None = None
    champion: str | None = None
    direction: Literal["higher", "lower"] | None = None
    device_class: str | None = None
    limit_text: str | None = None


def number(value) -> float | None:
    """A recorded figure as a float; None when it is absent."""
    return None if value is None or isinstance(value, bool) else float(value)


def waived(gate: str, justification: str) -> GateVerdict:
    """A gate the spec waives: passes, and says why in the spec's own words."""
    return GateVerdict(gate=gate, passed=True, waived=True, reason=f"waived: {' '.join(justification.split())}")


def rounded(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(float(value), digits)
