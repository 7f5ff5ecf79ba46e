"""Every gate's `checks` list each comparison its rule makes, and its `breaches` are exactly the
failed checks: on verdicts the gates build from real figures (a model trained on UCI Adult, its
weights rounded to int8, Fairlearn group reports, an Evidently drift report, the device catalog)."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import TINY_SPEC
from sklearn.linear_model import LinearRegression, LogisticRegression

from pipelines import training
from pipelines.data.builtin import load_sklearn_diabetes, load_uci_adult
from pipelines.finops import cost
from pipelines.finops.catalog import load_catalog, load_fleet
from pipelines.gates import Breach, Check, by_variant, drift, fairness, parity, quality
from pipelines.records import GateVerdict
from pipelines.specs import FairnessSpec, MetricThreshold, parse_spec

FEATURES = ["age", "education_num", "hours_per_week", "capital_gain", "capital_loss"]
SENSITIVE = ["sex", "race"]


def _judged(verdict: GateVerdict, checks, breaches, observed: dict | None = None) -> list[Check]:
    """The verdict's checks, after asserting that its breaches are the failed ones."""
    observed = verdict.observed if observed is None else observed
    found = checks(verdict.thresholds, observed)
    assert [c for c in found if not c.passed] == breaches(verdict.thresholds, observed)
    return found


def _agrees(verdict: GateVerdict, checks, breaches) -> list[Check]:
    """As `_judged`, and the verdict passes exactly when every check passes."""
    found = _judged(verdict, checks, breaches)
    assert verdict.passed == all(c.passed for c in found), (verdict.reason, found)
    return found


def test_a_check_states_whether_it_passed_and_a_breach_is_a_failed_check():
    assert Breach is Check
    with pytest.raises(TypeError):
        Check("accuracy", 0.8, 0.9, "min", "gates.quality.accuracy.minValue")  # `passed` is required
    check = Check("accuracy", 0.8, 0.9, "min", "gates.quality.accuracy.minValue", passed=False)
    assert dataclasses.replace(check, passed=True).passed


# -- real figures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adult() -> dict:
    """A logistic regression on 2,000 UCI Adult rows, judged on the next 2,000, and the same model
    with its weights rounded to int8 (symmetric, one scale): their outputs and Fairlearn reports."""
    rows = load_uci_adult().head(4000)
    train, test = rows.iloc[:2000], rows.iloc[2000:]
    model = LogisticRegression(max_iter=1000).fit(train[FEATURES].to_numpy(), train["income_over_50k"])
    x, y = test[FEATURES].to_numpy(), test["income_over_50k"].to_numpy()
    int8 = LogisticRegression()
    scale = np.abs(model.coef_).max() / 127
    int8.classes_, int8.coef_, int8.intercept_ = model.classes_, np.round(model.coef_ / scale) * scale, model.intercept_
    out = {"y": y}
    for name, fitted in (("fp32", model), ("dynamic", int8)):
        proba = fitted.predict_proba(x)
        out[name] = {"proba": proba, "accuracy": float(np.mean(proba.argmax(axis=1) == y)),
                     "report": fairness.group_report(y, proba.argmax(axis=1), test[SENSITIVE], 30, 2)}
    out["weak"] = LogisticRegression(max_iter=1000).fit(train[["age"]].to_numpy(), train["income_over_50k"]) \
        .predict_proba(test[["age"]].to_numpy())
    return out


# -- quality ---------------------------------------------------------------------------------------
def test_quality_checks_each_floor_ceiling_and_regression_vs_the_champion(adult):
    candidate = training.task_metrics("binary", adult["fp32"]["proba"], adult["y"])
    champion = training.task_metrics("binary", adult["weak"], adult["y"])  # age alone: a weaker champion
    rules = {"accuracy": MetricThreshold(minValue=0.7, maxRegression=0.01),
             "roc_auc": MetricThreshold(minValue=0.6, maxValue=0.99, maxRegression=0.01)}
    verdict = quality.quality_verdict(rules, candidate, champion, "3")
    found = _agrees(verdict, quality.checks, quality.breaches)
    assert verdict.passed and all(c.passed for c in found)
    assert [(c.metric, c.kind, c.field) for c in found] == [
        ("accuracy", "min", "gates.quality.accuracy.minValue"),
        ("accuracy", "regression", "gates.quality.accuracy.maxRegression"),
        ("roc_auc", "min", "gates.quality.roc_auc.minValue"),
        ("roc_auc", "max", "gates.quality.roc_auc.maxValue"),
        ("roc_auc", "regression", "gates.quality.roc_auc.maxRegression")]
    regression = found[1]
    assert regression.champion == "3" and regression.observed < 0  # better than the champion
    assert regression.value == round(candidate["accuracy"], 6) and regression.baseline == round(champion["accuracy"], 6)

    # The stronger model as the champion of the weaker one: the weaker regresses, and misses a floor.
    weaker = quality.quality_verdict({**rules, "f1_macro": MetricThreshold(minValue=0.5)},
                                     {k: v for k, v in champion.items() if k != "f1_macro"}, candidate, "4")
    found = _agrees(weaker, quality.checks, quality.breaches)
    assert not weaker.passed
    failed = {(c.metric, c.kind, c.field) for c in found if not c.passed}
    assert ("accuracy", "regression", "gates.quality.accuracy.maxRegression") in failed
    assert ("f1_macro", "missing", "gates.quality.f1_macro") in failed
    assert next(c for c in found if c.kind == "regression" and c.metric == "accuracy").observed > 0.01


# -- fairness --------------------------------------------------------------------------------------
def test_fairness_checks_each_gap_and_the_lowest_group_accuracy(adult):
    report = adult["fp32"]["report"]
    loose = fairness.fairness_verdict(report, FairnessSpec(biasScore=1.0, equalizedOdds=1.0, minGroupAccuracy=0.5),
                                      {}, "fp32")
    found = _agrees(loose, fairness.checks, fairness.breaches)
    assert loose.passed and [(c.metric, c.field) for c in found] == [
        ("demographic_parity_difference", "responsibleAI.fairness.biasScore"),
        ("equalized_odds_difference", "responsibleAI.fairness.equalizedOdds"),
        ("min_group_accuracy", "responsibleAI.fairness.minGroupAccuracy")]
    worst_odds = max(report, key=lambda feature: report[feature]["equalized_odds_difference"])
    assert found[1].group == worst_odds and found[1].observed == report[worst_odds]["equalized_odds_difference"]

    lowest = min(entry["min_group_accuracy"] for entry in report.values())
    strict = fairness.fairness_verdict(report, FairnessSpec(biasScore=1.0, equalizedOdds=0.05,
                                                            minGroupAccuracy=lowest + 0.01), {}, "fp32")
    found = _agrees(strict, fairness.checks, fairness.breaches)
    assert not strict.passed
    assert [(c.field, c.variant) for c in found if not c.passed] == [
        ("responsibleAI.fairness.equalizedOdds", "fp32"), ("responsibleAI.fairness.minGroupAccuracy", "fp32")]


def test_fairness_checks_each_variant_of_a_verdict_over_several(adult):
    spec = FairnessSpec(biasScore=1.0, equalizedOdds=0.12)
    verdicts = {v: fairness.fairness_verdict(adult[v]["report"], spec, {}, v) for v in ("fp32", "dynamic")}
    combined = {**verdicts["fp32"].observed, **{f"dynamic.{k}": v for k, v in verdicts["dynamic"].observed.items()}}
    parts = by_variant(combined)
    assert list(parts) == ["fp32", "dynamic"] and parts["dynamic"] == verdicts["dynamic"].observed
    for variant, observed in parts.items():
        found = _judged(verdicts[variant], fairness.checks, fairness.breaches, observed)
        assert {c.variant for c in found} == {variant}
        assert all(c.passed for c in found) == verdicts[variant].passed


def test_a_regression_checks_the_error_gap_between_groups():
    rows = load_sklearn_diabetes()
    x, y = rows.drop(columns="progression"), rows["progression"].to_numpy()
    predicted = LinearRegression().fit(x.iloc[:300], y[:300]).predict(x.iloc[300:])
    report = fairness.group_report(y[300:], predicted, rows.iloc[300:][["sex"]], 30, 0)
    gap = report["sex"]["mae_difference"]
    assert gap > 0
    [check] = _agrees(fairness.fairness_verdict(report, FairnessSpec(maxErrorGap=gap + 1), {}, "fp32"),
                      fairness.checks, fairness.breaches)
    assert check.passed and (check.metric, check.group, check.observed) == ("mae_difference", "sex", gap)
    [check] = _agrees(fairness.fairness_verdict(report, FairnessSpec(maxErrorGap=gap / 2), {}, "fp32"),
                      fairness.checks, fairness.breaches)
    assert not check.passed and check.field == "responsibleAI.fairness.maxErrorGap"


# -- quantization parity ---------------------------------------------------------------------------
def test_parity_checks_the_accuracy_drop_and_each_gap_widening(adult):
    fp32, int8 = adult["fp32"], adult["dynamic"]
    drop = fp32["accuracy"] - int8["accuracy"]
    assert drop > 0.01  # rounding unscaled features' weights to int8 costs accuracy

    def verdict(budget: float, change: float) -> GateVerdict:
        return parity.parity_verdict("dynamic", fp32["accuracy"], int8["accuracy"], fp32["report"], int8["report"],
                                     budget, change)

    loose = verdict(drop + 0.01, 1.0)
    found = _agrees(loose, parity.checks, parity.breaches)
    assert loose.passed and all(c.passed for c in found)
    widenings = [c for c in found if c.field == "gates.quantizationFairnessChange"]
    assert {(c.metric, c.group) for c in widenings} == {
        (metric, feature) for metric in fairness.GAP_METRICS for feature in SENSITIVE
        if fp32["report"][feature].get(metric) is not None}
    [accuracy] = [c for c in found if c.field == "export.accuracyBudget"]
    assert (accuracy.value, accuracy.baseline) == (round(int8["accuracy"], 6), round(fp32["accuracy"], 6))

    strict = verdict(0.01, 0.0)
    found = _agrees(strict, parity.checks, parity.breaches)
    failed = [c for c in found if not c.passed]
    assert not strict.passed and failed[0].field == "export.accuracyBudget"
    assert {(c.metric, c.group) for c in failed[1:]} == {(c.metric, c.group) for c in found[1:] if c.observed > 0}

    assert parity.checks(loose.thresholds, {**loose.observed, "variant": "fp32"}) == []  # no quantization error


# -- drift -----------------------------------------------------------------------------------------
def test_drift_checks_the_share_of_drifted_columns(tmp_path):
    rows = load_uci_adult()[FEATURES]
    reference = rows.iloc[:1500]

    def verdict(current: pd.DataFrame) -> GateVerdict:
        figures = drift.drift_report(reference, current, 0.5, tmp_path / "report.html")
        return drift.drift_verdict(figures, 0.5, len(reference), len(current), {})

    same = verdict(rows.iloc[1500:3000])  # more rows of the same file
    [check] = _agrees(same, drift.checks, drift.breaches)
    assert check.passed and check.observed < 0.5 and check.strict
    older = verdict(rows.iloc[1500:6000].query("age > 45"))  # only older people: ages and more drift
    [check] = _agrees(older, drift.checks, drift.breaches)
    assert not check.passed and check.observed >= 0.5 and check.field == "gates.driftShare"
    assert "age" in older.observed["drifted_column_names"]
    assert _agrees(drift.no_production_data(0.5, "no rows"), drift.checks, drift.breaches) == []


# -- edge memory, latency and budget ---------------------------------------------------------------
SPEC = {
    **TINY_SPEC,
    "targets": [{"name": "pis", "selector": {"matchLabels": {"kind": "pi"}}, "latencySloMs": 10},
                {"name": "phones", "selector": {"matchLabels": {"kind": "phone"}}}],
}
PRICES = {"egressUsdPerGb": {"value": 0.1, "source": "test price"},
          "electricityUsdPerKwh": {"value": 0.2, "source": "test price"},
          "trainingUsdPerHour": {"value": 3.6, "source": "test price"}}


def _estimate(tmp_path, memory_bytes: int, **spec):
    groups = [{"name": f"{kind}-fleet", "labels": {"kind": kind}, "deviceClass": device, "devices": 1000,
               "inferencesPerDevicePerDay": 1000, "otaUpdatesPerMonth": 2, "telemetryBytesPerDevicePerDay": 1_000_000}
              for kind, device in (("pi", "raspberry-pi-4"), ("phone", "android-phone"))]
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({"prices": PRICES, "groups": groups}))
    catalog = load_catalog()
    figures = cost.VariantFigures(flops=1_000_000, memory_bytes=memory_bytes, artifact_bytes=50_000_000)
    host = cost.HostFigures(gflops=23.8, overhead_ms=0.005, fp32_latency_p50_ms=1.0, fp32_latency_p95_ms=2.0,
                            train_seconds=360, variants={"fp32": figures})
    model = parse_spec({**SPEC, **spec})
    return model, cost.estimate(model, catalog, load_fleet(path, catalog), host, "fp32"), catalog


def test_memory_checks_each_group_against_the_spec_limit_and_its_device_class(tmp_path):
    spec, estimate, catalog = _estimate(tmp_path, 8 * 2**20, resources={"limits": {"memory": "16Mi"}})
    found = _agrees(cost.memory_verdict(spec, estimate, catalog), cost.memory_checks, cost.memory_breaches)
    assert all(c.passed for c in found)
    assert [(c.group, c.field) for c in found] == [
        ("pis", "resources.limits.memory"), ("pis", "classes.raspberry-pi-4.memory_bytes"),
        ("phones", "resources.limits.memory"), ("phones", "classes.android-phone.memory_bytes")]
    assert found[0].limit == 16 * 2**20 and found[0].limit_text == "16Mi"

    spec, estimate, catalog = _estimate(tmp_path, 5 * 2**30, resources={"limits": {"memory": "8Gi"}})
    found = _agrees(cost.memory_verdict(spec, estimate, catalog), cost.memory_checks, cost.memory_breaches)
    [failed] = [c for c in found if not c.passed]  # more than a Raspberry Pi 4's 4 GiB, less than a phone's 6
    assert (failed.group, failed.device_class, failed.field) == ("pis", "raspberry-pi-4",
                                                                 "classes.raspberry-pi-4.memory_bytes")


def test_latency_checks_each_group_with_an_slo(tmp_path):
    spec, estimate, _ = _estimate(tmp_path, 8 * 2**20)  # p95 4.0 ms on the Raspberry Pi 4 group
    [check] = _agrees(cost.latency_verdict(spec, estimate), cost.latency_checks, cost.latency_breaches)
    assert check.passed and (check.group, check.limit, check.observed) == ("pis", 10, 4.0)
    tight = [{**SPEC["targets"][0], "latencySloMs": 3}, {**SPEC["targets"][1], "latencySloMs": 3}]
    spec, estimate, _ = _estimate(tmp_path, 8 * 2**20, targets=tight)
    found = _agrees(cost.latency_verdict(spec, estimate), cost.latency_checks, cost.latency_breaches)
    assert [(c.group, c.passed, c.field) for c in found] == [("pis", False, "targets[pis].latencySloMs"),
                                                             ("phones", True, "targets[phones].latencySloMs")]


@pytest.mark.parametrize(("budget", "passed"), [(100, True), (1, False)])
def test_budget_checks_the_monthly_total(tmp_path, budget, passed):
    _, estimate, _ = _estimate(tmp_path, 8 * 2**20, finops={**SPEC["finops"], "monthlyBudgetUsd": budget})
    [check] = _agrees(cost.budget_verdict(estimate), cost.budget_checks, cost.budget_breaches)
    assert check.passed is passed and check.field == "finops.monthlyBudgetUsd"
    assert (check.observed, check.limit) == (round(estimate.total_usd_per_month, 2), budget)
