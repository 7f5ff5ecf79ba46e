"""Quality and fairness in the field: figures of labelled inferences with bootstrap confidence
intervals, and the checks the field monitor and the canary analysis make on them.

Point estimates come from Fairlearn's MetricFrame (`fairness.group_report`, the same code as
the release gate). Their uncertainty comes from a bootstrap over the rows, done on counts: a
classifier's rows of one group are a multinomial over its confusion matrix cells, so resampling
`n` rows of a group is one multinomial draw of `n` over the group's cell shares, and every
figure (accuracy, selection rate, true and false positive rates, the gaps between groups) is a
function of the cells. That is the plain bootstrap (each group resampled at its own size, a
stratified bootstrap), in time that grows with the resamples and the cells, not the rows. A
regression's absolute errors are resampled the same way over at most `ERROR_BINS` quantile bins
of each group's errors (each bin standing for its mean error).

A check is judged only with enough rows (`min_rows`), and breaks its rule only when the whole
interval lies past the limit: a small or noisy window is never an alarm.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Literal

import numpy as np

ERROR_BINS = 256


def confusion(truth: np.ndarray, predicted: np.ndarray, groups: np.ndarray, n_classes: int
              ) -> tuple[list[str], np.ndarray]:
    """The groups' names and their confusion counts, shape (groups, truth, prediction)."""
    names, index = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    counts = np.zeros((len(names), n_classes, n_classes), dtype=np.int64)
    np.add.at(counts, (index, np.asarray(truth, dtype=np.int64), np.asarray(predicted, dtype=np.int64)), 1)
    return [str(n) for n in names], counts


def resample_confusion(counts: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap resamples of confusion counts (groups, C, C): each group's rows drawn again at
    its own size; shape (resamples, groups, C, C)."""
    groups, classes = counts.shape[0], counts.shape[1]
    out = np.zeros((resamples, groups, classes, classes), dtype=np.int64)
    for g in range(groups):
        n = int(counts[g].sum())
        if n == 0:
            continue
        shares = counts[g].reshape(-1) / n
        out[:, g] = rng.multinomial(n, shares, size=resamples).reshape(resamples, classes, classes)
    return out


def _ratio(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(bottom > 0, top / np.where(bottom > 0, bottom, 1), np.nan)


def _nan(reduce, values: np.ndarray, axis: int = -1) -> np.ndarray:
    """`reduce` (np.nanmax, np.nanmin) ignoring groups without the figure (NaN when none has it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return reduce(values, axis=axis)


def _spread(values: np.ndarray) -> np.ndarray:
    """Largest minus smallest over the last axis, ignoring groups without the figure."""
    return _nan(np.nanmax, values) - _nan(np.nanmin, values)


def classification_figures(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Figures of confusion counts (..., groups, C, C): `accuracy` and `f1_macro` over all groups,
    `group_accuracy` per group, `min_group_accuracy`, `accuracy_difference`, and the parity gaps
    as the release's fairness gate defines them: with two classes, positive = class 1; with more,
    each class against the rest and the worst class."""
    n_classes = counts.shape[-1]
    per_group = counts.sum(axis=(-2, -1))
    correct = np.trace(counts, axis1=-2, axis2=-1)
    total = counts.sum(axis=-3)
    n = total.sum(axis=(-2, -1))
    figures = {"accuracy": _ratio(np.trace(total, axis1=-2, axis2=-1), n),
               "group_accuracy": _ratio(correct, per_group)}
    predicted, actual, hits = total.sum(axis=-2), total.sum(axis=-1), np.diagonal(total, axis1=-2, axis2=-1)
    f1 = _ratio(2 * hits, predicted + actual)
    present = actual > 0
    with np.errstate(invalid="ignore"):
        figures["f1_macro"] = np.where(present, np.nan_to_num(f1), 0).sum(axis=-1) / np.maximum(present.sum(axis=-1), 1)
    figures["min_group_accuracy"] = _nan(np.nanmin, figures["group_accuracy"])
    figures["accuracy_difference"] = _spread(figures["group_accuracy"])
    classes = [1] if n_classes == 2 else range(n_classes)
    dp, eo = [], []
    for c in classes:
        chosen = counts[..., :, c].sum(axis=-1)            # predicted c, per group
        positives = counts[..., c, :].sum(axis=-1)         # truly c, per group
        true_pos = counts[..., c, c]
        if n_classes > 2 and not np.any(total[..., c, :].sum(axis=-1) > 0):
            continue  # a class no row truly has (the gate leaves it out too)
        selection = _ratio(chosen, per_group)
        tpr = _ratio(true_pos, positives)
        fpr = _ratio(chosen - true_pos, per_group - positives)
        dp.append(_spread(selection))
        eo.append(np.fmax(_spread(tpr), _spread(fpr)))
    figures["demographic_parity_difference"] = _nan(np.nanmax, np.stack(dp), 0) if dp else np.full(n.shape, np.nan)
    figures["equalized_odds_difference"] = _nan(np.nanmax, np.stack(eo), 0) if eo else np.full(n.shape, np.nan)
    return figures


def error_bins(errors: np.ndarray, groups: np.ndarray) -> tuple[list[str], list[tuple[np.ndarray, np.ndarray]]]:
    """Each group's absolute errors as (bin means, counts) over at most ERROR_BINS quantile bins."""
    errors, groups = np.abs(np.asarray(errors, dtype=np.float64)), np.asarray(groups).astype(str)
    names = sorted(set(groups.tolist()))
    out = []
    for name in names:
        values = np.sort(errors[groups == name])
        chunks = np.array_split(values, min(ERROR_BINS, len(values)))
        out.append((np.array([c.mean() for c in chunks]), np.array([len(c) for c in chunks], dtype=np.int64)))
    return names, out


def resample_mae(bins: list[tuple[np.ndarray, np.ndarray]], resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap resamples of each group's mean absolute error; shape (resamples, groups)."""
    out = np.full((resamples, len(bins)), np.nan)
    for g, (means, counts) in enumerate(bins):
        n = int(counts.sum())
        if n:
            out[:, g] = rng.multinomial(n, counts / n, size=resamples) @ means / n
    return out


def interval(samples: np.ndarray, confidence: float) -> tuple[float | None, float | None]:
    """The bootstrap percentile interval of a figure's resamples (None where undefined)."""
    values = np.asarray(samples, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return None, None
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return round(float(low), 6), round(float(high), 6)


@dataclasses.dataclass(frozen=True)
class FieldCheck:
    """One rule on a field figure: `observed` with its interval [`low`, `high`], against
    `limit` as a floor ("min") or a ceiling ("max"). `judged` False: too few rows, reported
    only. `passed` False only when judged and the whole interval lies past the limit."""

    metric: str
    scope: Literal["version", "device group", "sensitive group"]
    group: str | None
    rows: int
    observed: float | None
    low: float | None
    high: float | None
    limit: float
    kind: Literal["min", "max"]
    field: str
    judged: bool
    passed: bool

    @property
    def breached(self) -> bool:
        return self.judged and not self.passed

    @property
    def name(self) -> str:
        """What is checked where: `accuracy`, `accuracy on branch-kiosks`, `min_group_accuracy by sex`."""
        where = {"version": "", "device group": f" on {self.group}", "sensitive group": f" by {self.group}"}[self.scope]
        return f"{self.metric}{where}"

    def line(self) -> str:
        """The check in one line, for logs, alerts and commit messages."""
        if self.observed is None:
            return f"{self.name}: not measured ({self.rows} rows)"
        sign = ">=" if self.kind == "min" else "<="
        state = "BREACH" if self.breached else ("ok" if self.judged else "not judged")
        ci = f" [{self.low:.3f}, {self.high:.3f}]" if self.low is not None and self.high is not None else ""
        return (f"{self.name}: {self.observed:.3f}{ci} {sign} {self.limit:g} "
                f"({self.field}; {self.rows:,} rows): {state}")


def judge(metric: str, scope, group: str | None, rows: int, observed: float | None,
          bounds: tuple[float | None, float | None], limit: float, kind: Literal["min", "max"], field: str,
          enough: bool) -> FieldCheck:
    """A check: judged with enough rows and a figure; broken only when the interval is past the limit."""
    low, high = bounds
    judged = enough and observed is not None and low is not None
    if not judged:
        passed = True
    elif kind == "min":
        passed = high >= limit
    else:
        passed = low <= limit
    return FieldCheck(metric=metric, scope=scope, group=group, rows=rows,
                      observed=None if observed is None else round(float(observed), 6), low=low, high=high,
                      limit=float(limit), kind=kind, field=field, judged=judged, passed=passed)
