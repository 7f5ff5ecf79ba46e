"""Each gate passes on fair, stable, faithful data and fails on data built to fail it.
The verdicts' observed values are asserted, not only the boolean."""


import numpy as np
import pandas as pd
import pytest

from pipelines.gates.drift import drift_report, drift_verdict
from pipelines.gates.fairness import fairness_verdict, group_report, plot_groups
from pipelines.gates.parity import parity_verdict
from pipelines.gates.quality import quality_verdict
from pipelines.specs import FairnessSpec, MetricThreshold

RULES = {"accuracy": MetricThreshold(direction="higher", minValue=0.8, maxRegression=0.01)}


def test_quality_passes_without_and_against_a_champion():
    first = quality_verdict(RULES, {"accuracy": 0.86}, None, None)
    assert first.passed and "no champion" in first.reason
    assert first.observed["accuracy.candidate"] == 0.86
    better = quality_verdict(RULES, {"accuracy": 0.855}, {"accuracy": 0.86}, "3")
    assert better.passed and better.observed["accuracy.change"] == pytest.approx(-0.005)


def test_quality_fails_a_weakened_candidate_with_the_figures():
    verdict = quality_verdict(RULES, {"accuracy": 0.83}, {"accuracy": 0.86}, "3")
    assert not verdict.passed
    assert verdict.observed["accuracy.champion"] == 0.86
    assert verdict.observed["accuracy.change"] == pytest.approx(-0.03)
    assert "accuracy regressed by 0.0300 vs champion v3 (0.8300 vs 0.8600; allowed 0.01)" in verdict.reason
    floor = quality_verdict(RULES, {"accuracy": 0.7}, None, None)
    assert not floor.passed and "accuracy 0.7000 < min 0.8" in floor.reason
    lower = {"log_loss": MetricThreshold(direction="lower", maxValue=0.5, maxRegression=0.05)}
    assert not quality_verdict(lower, {"log_loss": 0.45}, {"log_loss": 0.3}, "1").passed


def _predictions(favoured: bool, rows: int = 4000, seed: int = 0):
    rng = np.random.default_rng(seed)
    group = rng.choice(["a", "b"], size=rows)
    y = rng.integers(0, 2, size=rows)
    pred = y.copy()
    flip = rng.random(rows) < 0.1
    pred[flip] = 1 - pred[flip]
    if favoured:  # the model says "yes" to group b far more often, whatever the truth
        boost = (group == "b") & (rng.random(rows) < 0.5)
        pred[boost] = 1
    return y, pred, pd.DataFrame({"group": group})


def test_fairness_passes_an_even_model_and_fails_a_favouring_one(tmp_path):
    spec = FairnessSpec(biasScore=0.1, equalizedOdds=0.1)
    y, pred, sensitive = _predictions(favoured=False)
    even = fairness_verdict(group_report(y, pred, sensitive, 30, 2), spec, {}, "fp32")
    assert even.passed and even.observed["demographic_parity_difference"] < 0.05

    y, pred, sensitive = _predictions(favoured=True)
    report = group_report(y, pred, sensitive, 30, 2)
    from fairlearn.metrics import demographic_parity_difference

    expected = demographic_parity_difference(y, pred, sensitive_features=sensitive["group"])
    verdict = fairness_verdict(report, spec, {}, "fp32")
    assert not verdict.passed
    assert verdict.observed["demographic_parity_difference"] == pytest.approx(expected, abs=1e-6)
    assert verdict.observed["demographic_parity_difference"] > 0.2
    assert "demographic parity difference" in verdict.reason and "by group" in verdict.reason
    assert report["group"]["by_group"]["b"]["selection_rate"] > report["group"]["by_group"]["a"]["selection_rate"]
    png = plot_groups(report, tmp_path / "groups.png", "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_small_groups_are_reported_not_compared():
    y, pred, sensitive = _predictions(favoured=False)
    sensitive.loc[:9, "group"] = "tiny"
    report = group_report(y, pred, sensitive, 30, 2)
    assert report["group"]["excluded_small_groups"] == {"tiny": 10}
    assert "tiny" not in report["group"]["by_group"]


def test_parity_fails_a_variant_that_keeps_accuracy_but_widens_a_group_gap():
    y, pred, sensitive = _predictions(favoured=False, rows=6000)
    group = sensitive["group"].to_numpy()
    minority = np.flatnonzero(group == "b")[:300]
    sensitive.loc[minority, "group"] = "c"  # a small group of 300 rows
    int8 = pred.copy()
    int8[minority[:90]] = 1 - int8[minority[:90]]  # quantization error lands on group c only
    fp32_report = group_report(y, pred, sensitive, 30, 2)
    int8_report = group_report(y, int8, sensitive, 30, 2)
    fp32_acc, int8_acc = float(np.mean(pred == y)), float(np.mean(int8 == y))
    assert fp32_acc - int8_acc < 0.02  # overall accuracy barely moves...
    verdict = parity_verdict("static", fp32_acc, int8_acc, fp32_report, int8_report,
                             accuracy_budget=0.02, fairness_change=0.02)
    assert not verdict.passed  # ...but the gap between groups widens
    assert verdict.observed["accuracy_difference.group.change"] > 0.2
    assert "accuracy difference by group widens" in verdict.reason
    same = parity_verdict("dynamic", fp32_acc, fp32_acc, fp32_report, fp32_report, 0.02, 0.02)
    assert same.passed and same.observed["accuracy_change"] == 0


def test_drift_passes_a_stable_window_and_fails_a_shifted_one(tmp_path):
    rng = np.random.default_rng(1)
    reference = pd.DataFrame({"age": rng.normal(40, 10, 2000), "hours": rng.normal(40, 5, 2000),
                              "job": rng.choice(["a", "b", "c"], 2000)})
    stable = pd.DataFrame({"age": rng.normal(40, 10, 1000), "hours": rng.normal(40, 5, 1000),
                           "job": rng.choice(["a", "b", "c"], 1000)})
    figures = drift_report(reference, stable, 0.5, tmp_path / "stable.html")
    verdict = drift_verdict(figures, 0.5, 2000, 1000, {})
    assert verdict.passed and verdict.observed["drifted_share"] < 0.5

    shifted = stable.assign(age=stable["age"] + 15, hours=stable["hours"] * 1.3)
    figures = drift_report(reference, shifted, 0.5, tmp_path / "shifted.html")
    verdict = drift_verdict(figures, 0.5, 2000, 1000, {})
    assert not verdict.passed
    assert verdict.observed["drifted_columns"] == 2
    assert verdict.observed["drifted_share"] == pytest.approx(2 / 3)
    assert verdict.observed["drifted_column_names"] == "age, hours"
    html = (tmp_path / "shifted.html").read_text()
    assert html.lstrip().startswith("<!DOCTYPE html>") and len(html) > 100_000
