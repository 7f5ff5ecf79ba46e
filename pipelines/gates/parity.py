"""Quantization parity: the shipped int8 variant against fp32, overall AND per group.

A variant that keeps overall accuracy but widens the gap between groups fails: quantization
error is not spread evenly, and a minority group can carry most of it.
"""

from __future__ import annotations

from pipelines.gates import Breach, Check, failed, number, rounded
from pipelines.gates.fairness import GAP_METRICS, worst
from pipelines.records import GateVerdict


def checks(thresholds: dict, observed: dict) -> list[Check]:
    """The parity rules on one int8 variant's figures: its accuracy drop vs fp32 within
    export.accuracyBudget, and each group gap widening by at most
    gates.quantizationFairnessChange. An fp32 variant has no quantization error to judge."""
    variant = observed.get("variant")
    if variant is None or variant == "fp32":
        return []
    variant = str(variant)
    found = []
    before, after = number(observed.get("fp32_accuracy")), number(observed.get("variant_accuracy"))
    budget = number(thresholds.get("accuracy_budget"))
    if before is not None and after is not None and budget is not None:
        found.append(Check("accuracy", before - after, budget, "regression", "export.accuracyBudget",
                           variant=variant, value=after, baseline=before, direction="higher",
                           passed=not before - after > budget + 1e-12))
    allowed = number(thresholds.get("fairness_change"))
    for key, value in observed.items():
        metric, _, column = key.removesuffix(".change").partition(".")
        widening = number(value) if key.endswith(".change") and metric in GAP_METRICS else None
        if widening is not None and allowed is not None:
            found.append(Check(metric, widening, allowed, "regression", "gates.quantizationFairnessChange",
                               group=column, variant=variant, direction="lower",
                               passed=not widening > allowed + 1e-12))
    return found


def breaches(thresholds: dict, observed: dict) -> list[Breach]:
    """The parity checks one int8 variant's figures fail."""
    return failed(checks(thresholds, observed))


def parity_verdict(variant: str, fp32_accuracy: float, variant_accuracy: float, fp32_report: dict,
                   variant_report: dict, accuracy_budget: float, fairness_change: float,
                   evidence: dict[str, str] | None = None, metric: str = "accuracy",
                   gap_scale: float = 1.0) -> GateVerdict:
    """`fp32_accuracy` and `variant_accuracy` are the task's score (`metric`: accuracy, or R2 for
    a regression). A regression's group gaps are errors in the target's units: their change is
    divided by `gap_scale` (fp32's mean absolute error), so the allowed widening is a share of it."""
    thresholds = {"accuracy_budget": accuracy_budget, "fairness_change": fairness_change}
    observed: dict = {"variant": variant, "metric": metric, "fp32_accuracy": rounded(fp32_accuracy),
                      "variant_accuracy": rounded(variant_accuracy),
                      "accuracy_change": rounded(variant_accuracy - fp32_accuracy)}
    if variant != "fp32":
        for gap in GAP_METRICS:
            for column in fp32_report:
                before, after = fp32_report[column].get(gap), variant_report.get(column, {}).get(gap)
                if before is not None and after is not None:
                    scale = gap_scale if gap == "mae_difference" and gap_scale > 0 else 1.0
                    observed[f"{gap}.{column}.change"] = rounded((after - before) / scale)
        for gap in ("demographic_parity_difference", "equalized_odds_difference", "mae_difference"):
            if gap != "mae_difference" or worst(fp32_report, gap)[0] is not None:
                observed[f"{gap}.fp32"] = worst(fp32_report, gap)[0]
                observed[f"{gap}.{variant}"] = worst(variant_report, gap)[0]
    found = breaches(thresholds, observed)
    problems = []
    for b in found:
        if b.metric == "accuracy":
            problems.append(f"{metric} drops {100 * b.observed:.2f} pt (budget {100 * b.limit:.2f} pt)")
        else:
            before, after = fp32_report[b.group][b.metric], variant_report[b.group][b.metric]
            problems.append(f"{b.metric.replace('_', ' ')} by {b.group} widens from {before:.3f} to {after:.3f} "
                            f"(allowed +{b.limit:g})")
    if variant == "fp32":
        reason = "the shipped variant is fp32: no quantization error"
    elif problems:
        reason = "; ".join(problems)
    else:
        reason = (f"{variant} keeps {metric} within {100 * accuracy_budget:.2f} pt and no group gap widens by "
                  f"more than {fairness_change:g}")
    return GateVerdict(gate="quantization_parity", passed=not found, thresholds=thresholds, observed=observed,
                       evidence=evidence or {}, reason=reason)
