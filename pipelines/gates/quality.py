"""Quality gate: the candidate against absolute thresholds and against the champion (the
version the GitOps repository deploys now), on the same evaluation rows."""

from __future__ import annotations

from pipelines.gates import Breach, Check, failed, number, rounded
from pipelines.records import GateVerdict
from pipelines.specs import MetricThreshold


def checks(thresholds: dict, observed: dict) -> list[Check]:
    """Per metric, in the spec's order: measured at all, at least minValue, at most maxValue, and
    no worse than the champion by more than maxRegression."""
    found = []
    champion = observed.get("champion_version")
    for name in dict.fromkeys(key.rsplit(".", 1)[0] for key in thresholds):
        field = f"gates.quality.{name}"
        value = number(observed.get(f"{name}.candidate"))
        if value is None:
            found.append(Check(name, None, None, "missing", field, passed=False))
            continue
        low, high = number(thresholds.get(f"{name}.min_value")), number(thresholds.get(f"{name}.max_value"))
        if low is not None:
            found.append(Check(name, value, low, "min", f"{field}.minValue", passed=not value < low))
        if high is not None:
            found.append(Check(name, value, high, "max", f"{field}.maxValue", passed=not value > high))
        allowed, change = number(thresholds.get(f"{name}.max_regression")), number(observed.get(f"{name}.change"))
        if allowed is None or change is None:
            continue
        direction = "lower" if thresholds.get(f"{name}.direction") == "lower" else "higher"
        regression = -change if direction == "higher" else change
        found.append(Check(name, regression, allowed, "regression", f"{field}.maxRegression", value=value,
                           baseline=number(observed.get(f"{name}.champion")),
                           champion=None if champion is None else str(champion), direction=direction,
                           passed=not regression > allowed + 1e-12))
    return found


def breaches(thresholds: dict, observed: dict) -> list[Breach]:
    """The checks the candidate fails: not measured, below minValue, above maxValue, or worse
    than the champion by more than maxRegression."""
    return failed(checks(thresholds, observed))


def _problem(breach: Breach) -> str:
    name = breach.metric
    if breach.kind == "missing":
        return f"{name} was not measured"
    if breach.kind == "min":
        return f"{name} {breach.observed:.4f} < min {breach.limit:g}"
    if breach.kind == "max":
        return f"{name} {breach.observed:.4f} > max {breach.limit:g}"
    return (f"{name} regressed by {breach.observed:.4f} vs champion v{breach.champion} "
            f"({breach.value:.4f} vs {breach.baseline:.4f}; allowed {breach.limit:g})")


def quality_verdict(thresholds: dict[str, MetricThreshold], candidate: dict[str, float],
                    champion: dict[str, float] | None, champion_version: str | None,
                    note: str = "") -> GateVerdict:
    """Check each metric's floor/ceiling and its allowed regression vs the champion."""
    observed: dict = {"champion_version": champion_version}
    limits: dict = {}
    for name, rule in thresholds.items():
        limits.update({f"{name}.min_value": rule.min_value, f"{name}.max_value": rule.max_value,
                       f"{name}.max_regression": rule.max_regression, f"{name}.direction": rule.direction})
        value = candidate.get(name)
        if value is None:
            continue
        observed[f"{name}.candidate"] = rounded(value)
        if champion is not None and name in champion:
            observed[f"{name}.champion"] = rounded(champion[name])
            observed[f"{name}.change"] = rounded(value - champion[name])
    found = breaches(limits, observed)
    if found:
        reason = "; ".join(_problem(b) for b in found)
    elif champion is None:
        reason = "meets every threshold; " + (note or "no champion deployed yet, nothing to compare against")
    else:
        reason = f"meets every threshold and does not regress vs champion v{champion_version}"
    return GateVerdict(gate="quality", passed=not found, thresholds=limits, observed=observed, reason=reason)
