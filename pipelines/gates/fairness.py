"""Fairness (Fairlearn): group metrics of the shipped ONNX variant over sensitive features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.gates import Breach, Check, failed, number, rounded
from pipelines.records import GateVerdict
from pipelines.specs import FairnessSpec

GAP_METRICS = ("demographic_parity_difference", "equalized_odds_difference", "accuracy_difference",
               "mae_difference")


def _regression_report(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray, keep: np.ndarray) -> dict:
    """A regression's error by group (Fairlearn MetricFrame): MAE, RMSE and mean prediction."""
    from fairlearn.metrics import MetricFrame, count
    from sklearn.metrics import mean_absolute_error, root_mean_squared_error

    frame = MetricFrame(metrics={"count": count, "mae": mean_absolute_error, "rmse": root_mean_squared_error,
                                 "mean_prediction": lambda t, p: float(np.mean(p))},
                        y_true=y_true[keep], y_pred=y_pred[keep], sensitive_features=groups[keep])
    by_group = frame.by_group
    return {"by_group": {str(g): {k: rounded(v) for k, v in row.items()} for g, row in by_group.iterrows()},
            "mae_difference": rounded(by_group["mae"].max() - by_group["mae"].min()),
            "max_group_mae": rounded(by_group["mae"].max())}


def _collapsed(groups: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray):
    """The distinct (group, truth, prediction) triples and how many rows hold each."""
    combos = pd.DataFrame({"g": groups, "t": y_true, "p": y_pred}).value_counts(sort=False).reset_index(name="n")
    return (combos["g"].to_numpy(), combos["t"].to_numpy(), combos["p"].to_numpy(),
            combos["n"].to_numpy(np.float64))


def _weighted_count(y_true, y_pred, sample_weight) -> int:
    """Rows of a group: the sum of the collapsed rows' weights."""
    return int(round(float(np.sum(sample_weight))))


def _worst_per_class(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray, n_classes: int,
                     weights: np.ndarray | None = None) -> dict:
    """Multi-class parity: each class against the rest, the worst class's demographic parity
    and equalized odds differences, and which class that is."""
    from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference

    found = {}
    for metric, name in ((demographic_parity_difference, "demographic_parity_difference"),
                         (equalized_odds_difference, "equalized_odds_difference")):
        values = [(float(metric(y_true == c, y_pred == c, sensitive_features=groups, sample_weight=weights)), c)
                  for c in range(n_classes) if (y_true == c).any()]
        value, worst_class = max(values) if values else (None, None)
        found[name] = rounded(value)
        found[f"{name}_class"] = worst_class
    return found


def group_report(y_true: np.ndarray, y_pred: np.ndarray, sensitive: pd.DataFrame,
                 min_group_size: int, n_classes: int) -> dict:
    """Per sensitive feature: metrics by group and the gaps between groups.

    Two classes: demographic parity and equalized odds (positive = class 1). More classes: the
    same, each class against the rest, and the worst class's figures. A regression
    (`n_classes` 0): the mean absolute error by group and its largest gap. Groups with fewer
    than `min_group_size` rows are listed but left out of the gaps (their rates are noise).
    """
    from fairlearn.metrics import (
        MetricFrame,
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
        if n_classes == 0:
            report[column] = {**_regression_report(y_true, y_pred, groups, keep), "excluded_small_groups": small}
            continue
        # Each distinct (group, truth, prediction) once, weighted by how many rows have it: the
        # same figures as row by row, in a fraction of the time (Fairlearn handles each row in
        # Python: 36 s on 651,220 rows, 0.2 s collapsed).
        g, t, p, w = _collapsed(groups[keep], y_true[keep], y_pred[keep])
        metrics = {"count": _weighted_count, "accuracy": accuracy_score}
        if binary:
            metrics.update({"selection_rate": selection_rate, "true_positive_rate": true_positive_rate,
                            "false_positive_rate": false_positive_rate})
        frame = MetricFrame(metrics=metrics, y_true=t, y_pred=p, sensitive_features=g,
                            sample_params={name: {"sample_weight": w} for name in metrics})
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
                t, p, sensitive_features=g, sample_weight=w))
            entry["equalized_odds_difference"] = rounded(equalized_odds_difference(
                t, p, sensitive_features=g, sample_weight=w))
        else:
            entry.update(_worst_per_class(t, p, g, n_classes, w))
        report[column] = entry
    return report


def worst(report: dict, metric: str) -> tuple[float | None, str | None]:
    """The largest value of a gap metric over the sensitive features, and which feature."""
    values = [(entry[metric], column) for column, entry in report.items() if entry.get(metric) is not None]
    return max(values) if values else (None, None)


_GAP_RULES = (("demographic_parity_difference", "bias_score", "biasScore"),
              ("equalized_odds_difference", "equalized_odds", "equalizedOdds"))
_REGRESSION_RULES = (("mae_difference", "max_error_gap", "maxErrorGap"),)
# When no parity could be measured (no class with rows in every group): the accuracy spread.
_ACCURACY_RULES = (("accuracy_difference", "bias_score", "biasScore"),)


def _worst_feature(observed: dict, metric: str) -> str | None:
    """The sensitive feature with the largest recorded value of a gap metric (as `worst`)."""
    values = [(number(value), key.split(".", 1)[1]) for key, value in observed.items()
              if key.startswith(f"{metric}.") and number(value) is not None]
    return max(values)[1] if values else None


def checks(thresholds: dict, observed: dict) -> list[Check]:
    """The fairness rules on one variant's figures: demographic parity and equalized odds
    differences (of the worst class, with more than two) at most biasScore and equalizedOdds, or,
    where no parity could be measured, the accuracy difference between groups at most biasScore;
    for a regression, the gap in mean absolute error between groups at most maxErrorGap; and the
    lowest group accuracy at least minGroupAccuracy. Each gap is the worst over the sensitive
    features, and names that feature."""
    found = []
    variant = observed.get("variant")
    variant = None if variant is None else str(variant)
    if number(observed.get("mae_difference")) is not None:
        rules = _REGRESSION_RULES
    elif number(observed.get("demographic_parity_difference")) is not None:
        rules = _GAP_RULES
    else:
        rules = _ACCURACY_RULES
    for metric, key, spec_key in rules:
        value, limit = number(observed.get(metric)), number(thresholds.get(key))
        if value is not None and limit is not None:
            found.append(Check(metric, value, limit, "max", f"responsibleAI.fairness.{spec_key}",
                               group=_worst_feature(observed, metric), variant=variant, passed=not value > limit))
    lowest, floor = number(observed.get("min_group_accuracy")), number(thresholds.get("min_group_accuracy"))
    if lowest is not None and floor is not None:
        found.append(Check("min_group_accuracy", lowest, floor, "min", "responsibleAI.fairness.minGroupAccuracy",
                           variant=variant, passed=not lowest < floor))
    return found


def breaches(thresholds: dict, observed: dict) -> list[Breach]:
    """The fairness checks one variant's figures fail."""
    return failed(checks(thresholds, observed))


def _problem(breach: Breach) -> str:
    if breach.metric == "mae_difference":
        return f"mean absolute error differs by {breach.observed:.4g} between groups of {breach.group} > {breach.limit:g}"
    if breach.kind == "min":
        return f"lowest group accuracy {breach.observed:.3f} < {breach.limit:g}"
    return f"{breach.metric.replace('_', ' ')} {breach.observed:.3f} by {breach.group} > {breach.limit:g}"


def fairness_verdict(report: dict, spec: FairnessSpec, evidence: dict[str, str], variant: str) -> GateVerdict:
    observed: dict = {"variant": variant}
    if any("mae_difference" in entry for entry in report.values()):
        return _regression_verdict(report, spec, evidence, observed)
    dp, dp_feature = worst(report, "demographic_parity_difference")
    eo, eo_feature = worst(report, "equalized_odds_difference")
    acc_gap, _ = worst(report, "accuracy_difference")
    min_acc = min((e["min_group_accuracy"] for e in report.values()), default=None)
    observed.update({"demographic_parity_difference": dp, "equalized_odds_difference": eo,
                     "accuracy_difference": acc_gap, "min_group_accuracy": min_acc})
    for column, entry in report.items():
        for metric in (m for m in GAP_METRICS if m in entry):
            observed[f"{metric}.{column}"] = entry[metric]
    thresholds = {"bias_score": spec.bias_score, "equalized_odds": spec.equalized_odds,
                  "min_group_accuracy": spec.min_group_accuracy, "min_group_size": spec.min_group_size}
    found = breaches(thresholds, observed)
    if found:
        reason = "; ".join(_problem(b) for b in found)
    elif dp is not None:
        worst_class = "" if all(e.get("demographic_parity_difference_class") is None for e in report.values()) \
            else " (worst class against the rest)"
        reason = (f"demographic parity difference {dp:.3f} (by {dp_feature}) and equalized odds difference "
                  f"{eo:.3f} (by {eo_feature}){worst_class} within {spec.bias_score:g} and {spec.equalized_odds:g}")
    else:
        reason = f"accuracy difference between groups {acc_gap:.3f} within {spec.bias_score:g}"
    return GateVerdict(gate="fairness", passed=not found, thresholds=thresholds, observed=observed,
                       evidence=evidence, reason=reason)


def _regression_verdict(report: dict, spec: FairnessSpec, evidence: dict[str, str], observed: dict) -> GateVerdict:
    gap, feature = worst(report, "mae_difference")
    observed.update({"mae_difference": gap, "max_group_mae": max((e["max_group_mae"] for e in report.values()),
                                                                 default=None)})
    for column, entry in report.items():
        observed[f"mae_difference.{column}"] = entry["mae_difference"]
    thresholds = {"max_error_gap": spec.max_error_gap, "min_group_size": spec.min_group_size}
    found = breaches(thresholds, observed)
    reason = "; ".join(_problem(b) for b in found) if found else (
        f"mean absolute error differs by {gap:.4g} between groups of {feature} (within {spec.max_error_gap:g})")
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
        series = [m for m in ("accuracy", "selection_rate", "mae") if all(m in groups[g] for g in names)]
        width = 0.8 / len(series)
        for i, metric in enumerate(series):
            ax.bar(x + i * width, [groups[g][metric] for g in names], width, label=metric.replace("_", " "))
        ax.set_xticks(x + width * (len(series) - 1) / 2, names, rotation=30, ha="right", fontsize=8)
        if "mae" not in series:
            ax.set_ylim(0, 1)
        ax.set_title(column)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
