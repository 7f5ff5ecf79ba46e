"""Release gates: quality vs the champion, fairness, quantization parity, drift.

Each gate is a pure function from figures to a `GateVerdict` (passed, thresholds, observed
values, evidence, a one-line reason). A gate that says no is an outcome, not an exception.
"""

from __future__ import annotations

from pipelines.records import GateVerdict


def waived(gate: str, justification: str) -> GateVerdict:
    """A gate the spec waives: passes, and says why in the spec's own words."""
    return GateVerdict(gate=gate, passed=True, waived=True, reason=f"waived: {' '.join(justification.split())}")


def rounded(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(float(value), digits)
