"""The gates by task: multi-class fairness as the worst class against the rest, a regression's
fairness as the error gap between groups, and its quantization parity as a share of fp32's error."""

import numpy as np
import pandas as pd
from fairlearn.metrics import demographic_parity_difference

from pipelines.gates import fairness, parity
from pipelines.specs import FairnessSpec


def test_multiclass_fairness_is_the_worst_class_against_the_rest():
    rng = np.random.default_rng(0)
    groups = pd.DataFrame({"site": rng.choice(["north", "south"], size=600)})
    y_true = rng.integers(0, 3, size=600)
    y_pred = y_true.copy()
    # Class 2 is predicted for every southern row that is not class 2 by a third of the time.
    south = groups["site"].eq("south").to_numpy()
    flip = south & (rng.random(600) < 0.33)
    y_pred[flip] = 2
    report = fairness.group_report(y_true, y_pred, groups, 30, 3)["site"]
    expected = max(demographic_parity_difference(y_true == c, y_pred == c, sensitive_features=groups["site"])
                   for c in range(3))
    assert report["demographic_parity_difference"] == round(expected, 6)
    assert report["demographic_parity_difference_class"] == 2
    verdict = fairness.fairness_verdict({"site": report}, FairnessSpec(biasScore=0.1, equalizedOdds=0.5), {}, "fp32")
    assert not verdict.passed and "demographic parity difference" in verdict.reason
    assert fairness.breaches(verdict.thresholds, verdict.observed)


def test_a_regression_is_fair_when_its_error_gap_between_groups_is_small():
    rng = np.random.default_rng(1)
    sex = pd.DataFrame({"sex": rng.choice(["1", "2"], size=400)})
    y_true = rng.normal(150, 40, size=400)
    noise = np.where(sex["sex"].eq("2"), 30.0, 10.0)  # four times the error for one group
    y_pred = y_true + rng.normal(0, 1, size=400) * noise
    report = fairness.group_report(y_true, y_pred, sex, 30, 0)
    by_group = report["sex"]["by_group"]
    gap = report["sex"]["mae_difference"]
    assert gap == round(abs(by_group["2"]["mae"] - by_group["1"]["mae"]), 6) and gap > 10
    strict = fairness.fairness_verdict(report, FairnessSpec(maxErrorGap=5), {}, "fp32")
    loose = fairness.fairness_verdict(report, FairnessSpec(maxErrorGap=30), {}, "fp32")
    assert not strict.passed and "mean absolute error differs by" in strict.reason
    assert loose.passed and len(fairness.breaches(strict.thresholds, strict.observed)) == 1

    # Quantization parity: the gap widening by 2 units is 2 / fp32's MAE (here 10) = 0.2 of it.
    widened = {"sex": {**report["sex"], "mae_difference": gap + 2.0}}
    verdict = parity.parity_verdict("static", 0.8, 0.8, report, widened, 0.01, 0.1, metric="r2", gap_scale=10.0)
    assert verdict.observed["mae_difference.sex.change"] == 0.2 and not verdict.passed
    assert parity.parity_verdict("static", 0.8, 0.8, report, widened, 0.01, 0.25, metric="r2", gap_scale=10.0).passed
