"""Fairness (Fairlearn): group metrics of the shipped ONNX variant over sensitive features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.gates import Breach, number, rounded
from pipelines.records import GateVerdict
from pipelines.specs import FairnessSpec

GAP_METRICS = ("demographic_parity_difference", "equalized_odds_difference", "accuracy_difference")


def group_report(y_true: np.ndarray, y_pred: np.ndarray, sensitive: pd.DataFrame,
                 min_group_size: int, n_classes: int) -> dict:
    """Per sensitive feature: metrics by group and the gaps between groups.

    Demographic parity and equalized odds are defined for two classes (positive = class 1);
    for more classes only accuracy per group and its spread are reported. Groups with fewer
    than `min_group_size` rows are listed but left out of the gaps (their rates are noise).
    """
    from fairlearn.metrics import (
        MetricFrame,
        count,
        demographic_parity_difference,
        equalized_odds_difference,
        false_positive_rate,
        selection_rate,
        true_positive_rate,
    )
    from sklearn.metrics import accuracy_score

    report: dict = {}
    binary = n_classes == 2
    for column in sensitive.columns:
        groups = sensitive[column].astype(str).to_numpy()
        sizes = pd.Series(groups).value_counts()
        small = {str(g): int(n) for g, n in sizes.items() if n < min_group_size}
        keep = ~np.isin(groups, list(small))
        metrics = {"count": count, "accuracy": accuracy_score}
        if binary:
            metrics.update({"selection_rate": selection_rate, "true_positive_rate": true_positive_rate,
                            "false_positive_rate": false_positive_rate})
        frame = MetricFrame(metrics=metrics, y_true=y_true[keep], y_pred=y_pred[keep],
                            sensitive_features=groups[keep])
        by_group = frame.by_group
        entry = {
            "by_group": {str(g): {k: rounded(v) for k, v in row.items()} for g, row in by_group.iterrows()},
            "excluded_small_groups": small,
            "accuracy_difference": rounded(by_group["accuracy"].max() - by_group["accuracy"].min()),
            "min_group_accuracy": rounded(by_group["accuracy"].min()),
            "demographic_parity_difference": None,
            "equalized_odds_difference": None,
        }
        if binary:
            entry["demographic_parity_difference"] = rounded(demographic_parity_difference(
                y_true[keep], y_pred[keep], sensitive_features=groups[keep]))
            entry["equalized_odds_difference"] = rounded(equalized_odds_difference(
                y_true[keep], y_pred[keep], sensitive_features=groups[keep]))
        report[column] = entry
    return report


def worst(report: dict, metric: str) -> tuple[float | None, str | None]:
    """The largest value of a gap metric over the sensitive features, and which feature."""
    values = [(entry[metric], column) for column, entry in report.items() if entry.get(metric) is not None]
    return max(values) if values else (None, None)


_GAP_RULES = (("demographic_parity_difference", "bias_score", "biasScore"),
              ("equalized_odds_difference", "equalized_odds", "equalizedOdds"))
_MULTICLASS_RULES = (("accuracy_difference", "bias_score", "biasScore"),)


def _worst_feature(observed: dict, metric: str) -> str | None:
    """The sensitive feature with the largest recorded value of a gap metric (as `worst`)."""
    values = [(number(value), key.split(".", 1)[1]) for key, value in observed.items()
              if key.startswith(f"{metric}.") and number(value) is not None]
    return max(values)[1] if values else None


def breaches(thresholds: dict, observed: dict) -> list[Breach]:
    """The fairness rules one variant's figures break: with two classes, demographic parity and
    equalized odds differences above biasScore and equalizedOdds; otherwise the accuracy
    difference between groups above biasScore; and the lowest group accuracy below
    minGroupAccuracy."""
    found = []
    variant = observed.get("variant")
    variant = None if variant is None else str(variant)
    binary = number(observed.get("demographic_parity_difference")) is not None
    for metric, key, spec_key in _GAP_RULES if binary else _MULTICLASS_RULES:
        value, limit = number(observed.get(metric)), number(thresholds.get(key))
        if value is not None and limit is not None and value > limit:
            found.append(Breach(metric, value, limit, "max", f"responsibleAI.fairness.{spec_key}",
                                group=_worst_feature(observed, metric), variant=variant))
    lowest, floor = number(observed.get("min_group_accuracy")), number(thresholds.get("min_group_accuracy"))
    if lowest is not None and floor is not None and lowest < floor:
        found.append(Breach("min_group_accuracy", lowest, floor, "min", "responsibleAI.fairness.minGroupAccuracy",
                            variant=variant))
    return found


def _problem(breach: Breach) -> str:
    if breach.kind == "min":
        return f"lowest group accuracy {breach.observed:.3f} < {breach.limit:g}"
    return f"{breach.metric.replace('_', ' ')} {breach.observed:.3f} by {breach.group} > {breach.limit:g}"


def fairness_verdict(report: dict, spec: FairnessSpec, evidence: dict[str, str], variant: str) -> GateVerdict:
    observed: dict = {"variant": variant}
    dp, dp_feature = worst(report, "demographic_parity_difference")
    eo, eo_feature = worst(report, "equalized_odds_difference")
    acc_gap, _ = worst(report, "accuracy_difference")
    min_acc = min((e["min_group_accuracy"] for e in report.values()), default=None)
    observed.update({"demographic_parity_difference": dp, "equalized_odds_difference": eo,
                     "accuracy_difference": acc_gap, "min_group_accuracy": min_acc})
    for column, entry in report.items():
        for metric in GAP_METRICS:
            observed[f"{metric}.{column}"] = entry[metric]
    thresholds = {"bias_score": spec.bias_score, "equalized_odds": spec.equalized_odds,
                  "min_group_accuracy": spec.min_group_accuracy, "min_group_size": spec.min_group_size}
    found = breaches(thresholds, observed)
    if found:
        reason = "; ".join(_problem(b) for b in found)
    elif dp is not None:
        reason = (f"demographic parity difference {dp:.3f} (by {dp_feature}) and equalized odds difference "
                  f"{eo:.3f} (by {eo_feature}) within {spec.bias_score:g} and {spec.equalized_odds:g}")
    else:
        reason = f"accuracy difference between groups {acc_gap:.3f} within {spec.bias_score:g}"
    return GateVerdict(gate="fairness", passed=not found, thresholds=thresholds, observed=observed,
                       evidence=evidence, reason=reason)


def group_table(report: dict) -> pd.DataFrame:
    rows = []
    for column, entry in report.items():
        for group, values in entry["by_group"].items():
            rows.append({"feature": column, "group": group, **values})
        for group, size in entry["excluded_small_groups"].items():
            rows.append({"feature": column, "group": group, "count": size, "note": "too small to compare"})
    return pd.DataFrame(rows)


def plot_groups(report: dict, path: Path, title: str) -> Path:
    """Bar chart of accuracy (and selection rate, for two classes) per group, one panel per feature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    features = list(report)
    fig, axes = plt.subplots(1, len(features), figsize=(5.5 * len(features), 3.8), squeeze=False)
    for ax, column in zip(axes[0], features):
        groups = report[column]["by_group"]
        names = list(groups)
        x = np.arange(len(names))
        series = [m for m in ("accuracy", "selection_rate") if all(m in groups[g] for g in names)]
        width = 0.8 / len(series)
        for i, metric in enumerate(series):
            ax.bar(x + i * width, [groups[g][metric] for g in names], width, label=metric.replace("_", " "))
        ax.set_xticks(x + width * (len(series) - 1) / 2, names, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(column)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
