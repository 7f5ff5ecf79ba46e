"""Quality gate: the candidate against absolute thresholds and against the champion (the
version the GitOps repository deploys now), on the same evaluation rows."""

from __future__ import annotations

from pipelines.gates import rounded
from pipelines.records import GateVerdict
from pipelines.specs import MetricThreshold


def quality_verdict(thresholds: dict[str, MetricThreshold], candidate: dict[str, float],
                    champion: dict[str, float] | None, champion_version: str | None,
                    note: str = "") -> GateVerdict:
    """Check each metric's floor/ceiling and its allowed regression vs the champion."""
    problems: list[str] = []
    observed: dict = {"champion_version": champion_version}
    limits: dict = {}
    for name, rule in thresholds.items():
        value = candidate.get(name)
        if value is None:
            problems.append(f"{name} was not measured")
            continue
        observed[f"{name}.candidate"] = rounded(value)
        limits.update({f"{name}.min_value": rule.min_value, f"{name}.max_value": rule.max_value,
                       f"{name}.max_regression": rule.max_regression, f"{name}.direction": rule.direction})
        if rule.min_value is not None and value < rule.min_value:
            problems.append(f"{name} {value:.4f} < min {rule.min_value:g}")
        if rule.max_value is not None and value > rule.max_value:
            problems.append(f"{name} {value:.4f} > max {rule.max_value:g}")
        if champion is not None and name in champion:
            base = champion[name]
            change = value - base
            observed[f"{name}.champion"] = rounded(base)
            observed[f"{name}.change"] = rounded(change)
            regression = -change if rule.direction == "higher" else change
            if rule.max_regression is not None and regression > rule.max_regression + 1e-12:
                problems.append(
                    f"{name} regressed by {regression:.4f} vs champion v{champion_version} "
                    f"({value:.4f} vs {base:.4f}; allowed {rule.max_regression:g})"
                )
    if problems:
        reason = "; ".join(problems)
    elif champion is None:
        reason = "meets every threshold; " + (note or "no champion deployed yet, nothing to compare against")
    else:
        reason = f"meets every threshold and does not regress vs champion v{champion_version}"
    return GateVerdict(gate="quality", passed=not problems, thresholds=limits, observed=observed, reason=reason)
