"""Quantization parity: the shipped int8 variant against fp32, overall AND per group.

A variant that keeps overall accuracy but widens the gap between groups fails: quantization
error is not spread evenly, and a minority group can carry most of it.
"""

from __future__ import annotations

from pipelines.gates import rounded
from pipelines.gates.fairness import GAP_METRICS, worst
from pipelines.records import GateVerdict


def parity_verdict(variant: str, fp32_accuracy: float, variant_accuracy: float, fp32_report: dict,
                   variant_report: dict, accuracy_budget: float, fairness_change: float,
                   evidence: dict[str, str] | None = None) -> GateVerdict:
    thresholds = {"accuracy_budget": accuracy_budget, "fairness_change": fairness_change}
    observed: dict = {"variant": variant, "fp32_accuracy": rounded(fp32_accuracy),
                      "variant_accuracy": rounded(variant_accuracy),
                      "accuracy_change": rounded(variant_accuracy - fp32_accuracy)}
    if variant == "fp32":
        return GateVerdict(gate="quantization_parity", passed=True, thresholds=thresholds, observed=observed,
                           evidence=evidence or {}, reason="the shipped variant is fp32: no quantization error")
    problems = []
    if fp32_accuracy - variant_accuracy > accuracy_budget + 1e-12:
        problems.append(f"accuracy drops {100 * (fp32_accuracy - variant_accuracy):.2f} pt "
                        f"(budget {100 * accuracy_budget:.2f} pt)")
    for metric in GAP_METRICS:
        for column in fp32_report:
            before, after = fp32_report[column][metric], variant_report.get(column, {}).get(metric)
            if before is None or after is None:
                continue
            widening = after - before
            observed[f"{metric}.{column}.change"] = rounded(widening)
            if widening > fairness_change + 1e-12:
                problems.append(f"{metric.replace('_', ' ')} by {column} widens from {before:.3f} to {after:.3f} "
                                f"(allowed +{fairness_change:g})")
    for metric in ("demographic_parity_difference", "equalized_odds_difference"):
        observed[f"{metric}.fp32"] = worst(fp32_report, metric)[0]
        observed[f"{metric}.{variant}"] = worst(variant_report, metric)[0]
    reason = "; ".join(problems) if problems else (
        f"{variant} keeps accuracy within {100 * accuracy_budget:.2f} pt and no group gap widens by more "
        f"than {fairness_change:g}")
    return GateVerdict(gate="quantization_parity", passed=not problems, thresholds=thresholds, observed=observed,
                       evidence=evidence or {}, reason=reason)
