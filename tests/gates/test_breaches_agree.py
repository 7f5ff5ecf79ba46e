"""A verdict passes exactly when its gate's `breaches` finds nothing in the figures the verdict
records, and the Edge Releases view explains every breach, naming the field that sets its limit."""

import pytest
import yaml
from conftest import TINY_SPEC
from edge_ui import views

from pipelines.finops import cost
from pipelines.finops.catalog import load_catalog, load_fleet
from pipelines.gates import drift, fairness, parity, quality
from pipelines.records import GateVerdict
from pipelines.specs import FairnessSpec, MetricThreshold, parse_spec


def _agree(verdict: GateVerdict, breaches, count: int) -> str:
    """Check the verdict against its rule and its explanation; return the explanation."""
    found = breaches(verdict.thresholds, verdict.observed)
    assert verdict.passed == (not found), (verdict.reason, found)
    assert len(found) == count, found
    if verdict.passed:
        return ""
    text = views.explain_verdict(verdict)
    assert text.count(" gate failed") == count, text  # one sentence per breach, none from the fallback
    for breach in found:
        assert breach.field in text, (breach, text)
        if breach.group:
            assert breach.group in text, (breach, text)
    return text


# -- quality ---------------------------------------------------------------------------------------
FLOOR = MetricThreshold(minValue=0.8, maxRegression=0.01)
LOSS = MetricThreshold(direction="lower", maxValue=0.5, maxRegression=0.05)


@pytest.mark.parametrize(("rules", "candidate", "champion", "count"), [
    ({"accuracy": FLOOR}, {"accuracy": 0.86}, None, 0),
    ({"accuracy": FLOOR}, {"accuracy": 0.8}, None, 0),  # at the floor
    ({"accuracy": FLOOR}, {"accuracy": 0.7999999999}, None, 0),  # recorded as 0.8: judged as recorded
    ({"accuracy": FLOOR}, {"accuracy": 0.79}, None, 1),
    ({"accuracy": FLOOR}, {"accuracy": 0.85}, {"accuracy": 0.86}, 0),  # regresses exactly the allowed 0.01
    ({"accuracy": FLOOR}, {"accuracy": 0.79}, {"accuracy": 0.86}, 2),  # below the floor and regressed
    ({"log_loss": LOSS}, {"log_loss": 0.36}, {"log_loss": 0.3}, 1),  # lower is better: a rise regresses
    ({"log_loss": LOSS}, {"log_loss": 0.55}, {"log_loss": 0.3}, 2),
    ({"accuracy": FLOOR, "f1_macro": MetricThreshold(minValue=0.5)}, {"accuracy": 0.9}, None, 1),  # not measured
])
def test_quality_verdicts_agree_with_their_breaches(rules, candidate, champion, count):
    verdict = quality.quality_verdict(rules, candidate, champion, None if champion is None else "3")
    text = _agree(verdict, quality.breaches, count)
    if "log_loss" in candidate and champion:
        assert "higher than the deployed champion v3 (0.3000)" in text


# -- fairness --------------------------------------------------------------------------------------
def _entry(dp, eo, gap, lowest):
    return {"demographic_parity_difference": dp, "equalized_odds_difference": eo, "accuracy_difference": gap,
            "min_group_accuracy": lowest, "by_group": {}, "excluded_small_groups": {}}


@pytest.mark.parametrize(("report", "spec", "count"), [
    ({"race": _entry(0.05, 0.05, 0.02, 0.8)}, FairnessSpec(), 0),
    ({"race": _entry(0.1, 0.1, 0.02, 0.8)}, FairnessSpec(biasScore=0.1, equalizedOdds=0.1), 0),  # at the limits
    ({"race": _entry(0.181, 0.05, 0.02, 0.8), "sex": _entry(0.12, 0.15, 0.01, 0.82)},
     FairnessSpec(biasScore=0.1, equalizedOdds=0.12), 2),  # parity across race, odds across sex
    ({"race": _entry(0.05, 0.05, 0.02, 0.6)}, FairnessSpec(minGroupAccuracy=0.7), 1),
    ({"race": _entry(None, None, 0.05, 0.9)}, FairnessSpec(biasScore=0.1), 0),  # more than two classes
    ({"race": _entry(None, None, 0.15, 0.7)}, FairnessSpec(biasScore=0.1, minGroupAccuracy=0.75), 2),
])
def test_fairness_verdicts_agree_with_their_breaches(report, spec, count):
    _agree(fairness.fairness_verdict(report, spec, {}, "fp32"), fairness.breaches, count)


def test_a_verdict_over_two_variants_is_explained_for_the_one_that_fails():
    spec = FairnessSpec(biasScore=0.1, equalizedOdds=0.12)
    fp32 = fairness.fairness_verdict({"race": _entry(0.05, 0.05, 0.02, 0.8)}, spec, {}, "fp32")
    dynamic = fairness.fairness_verdict({"race": _entry(0.16, 0.05, 0.02, 0.8)}, spec, {}, "dynamic")
    assert fp32.passed and not dynamic.passed
    assert not fairness.breaches(fp32.thresholds, fp32.observed)
    [breach] = fairness.breaches(dynamic.thresholds, dynamic.observed)
    combined = fp32.model_copy(update={  # as a release records the variants it ships
        "passed": False, "observed": {**fp32.observed, **{f"dynamic.{k}": v for k, v in dynamic.observed.items()}}})
    assert views.explain_verdict(combined).startswith(
        "The fairness gate failed for the dynamic variant: the demographic parity difference across race is "
        f"0.160, above the 0.1 allowed by {breach.field}.")


# -- quantization parity ---------------------------------------------------------------------------
def _gaps(dp):
    return {"race": {"demographic_parity_difference": dp, "equalized_odds_difference": 0.1,
                     "accuracy_difference": 0.01}}


@pytest.mark.parametrize(("variant", "fp32_acc", "variant_acc", "after", "count"), [
    ("fp32", 0.85, 0.85, _gaps(0.10), 0),
    ("dynamic", 0.85, 0.84, _gaps(0.10), 0),  # drops exactly the budget
    ("dynamic", 0.85, 0.82, _gaps(0.10), 1),
    ("static", 0.85, 0.85, _gaps(0.12), 0),  # widens exactly the allowed change
    ("static", 0.85, 0.82, _gaps(0.16), 2),
])
def test_parity_verdicts_agree_with_their_breaches(variant, fp32_acc, variant_acc, after, count):
    verdict = parity.parity_verdict(variant, fp32_acc, variant_acc, _gaps(0.10), after, 0.01, 0.02)
    _agree(verdict, parity.breaches, count)


# -- drift -----------------------------------------------------------------------------------------
def _figures(share):
    return {"drifted_share": share, "drifted_columns": None if share is None else 2,
            "columns": {"a": 0, "b": 0, "c": 0, "d": 0}, "drifted_column_names": [] if share is None else ["a", "b"]}


@pytest.mark.parametrize(("share", "count"), [(0.25, 0), (0.4999, 0), (0.5, 1), (0.75, 1), (None, 1)])
def test_drift_verdicts_agree_with_their_breaches(share, count):
    _agree(drift.drift_verdict(_figures(share), 0.5, 100, 100, {}), drift.breaches, count)


def test_no_production_data_is_nothing_to_judge():
    _agree(drift.no_production_data(0.5, "no rows"), drift.breaches, 0)


# -- edge memory, latency and budget ---------------------------------------------------------------
SPEC = {
    **TINY_SPEC,
    "targets": [{"name": "pis", "selector": {"matchLabels": {"kind": "pi"}}, "latencySloMs": 10}],
}
FLEET = {
    "prices": {"egressUsdPerGb": {"value": 0.1, "source": "test price"},
               "electricityUsdPerKwh": {"value": 0.2, "source": "test price"},
               "trainingUsdPerHour": {"value": 3.6, "source": "test price"}},
    "groups": [{"name": "pi-fleet", "labels": {"kind": "pi"}, "deviceClass": "raspberry-pi-4", "devices": 1000,
                "inferencesPerDevicePerDay": 1000, "otaUpdatesPerMonth": 2, "telemetryBytesPerDevicePerDay": 1_000_000}],
}


def _estimate(tmp_path, memory_bytes: int, **spec):
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(FLEET))
    catalog = load_catalog()
    figures = cost.VariantFigures(flops=1_000_000, memory_bytes=memory_bytes, artifact_bytes=50_000_000)
    host = cost.HostFigures(gflops=23.8, overhead_ms=0.005, fp32_latency_p50_ms=1.0, fp32_latency_p95_ms=2.0,
                            train_seconds=360, variants={"fp32": figures})
    model = parse_spec({**SPEC, **spec})
    return model, cost.estimate(model, catalog, load_fleet(path, catalog), host, "fp32"), catalog


@pytest.mark.parametrize(("limit", "memory", "count"), [
    (None, 8 * 2**20, 0), ("16Mi", 8 * 2**20, 0), ("8Mi", 8 * 2**20, 0), ("4Mi", 8 * 2**20, 1),
    (None, 5 * 2**30, 1),  # more than the 4 GB of a Raspberry Pi 4
    ("4Mi", 5 * 2**30, 2),
])
def test_memory_verdicts_agree_with_their_breaches(tmp_path, limit, memory, count):
    spec, estimate, catalog = _estimate(tmp_path, memory, **({"resources": {"limits": {"memory": limit}}}
                                                             if limit else {}))
    text = _agree(cost.memory_verdict(spec, estimate, catalog), cost.memory_breaches, count)
    if memory > 4 * 2**30:
        assert "more than the 4096.0 MiB of a raspberry-pi-4 device" in text


@pytest.mark.parametrize(("slo", "count"), [(None, 0), (10, 0), (4, 0), (3, 1)])  # p95 is 4.0 ms
def test_latency_verdicts_agree_with_their_breaches(tmp_path, slo, count):
    target = {**SPEC["targets"][0], "latencySloMs": slo}
    spec, estimate, _ = _estimate(tmp_path, 8 * 2**20, targets=[target])
    _agree(cost.latency_verdict(spec, estimate), cost.latency_breaches, count)


@pytest.mark.parametrize(("budget", "count"), [(100, 0), (13.38, 0), (13.37, 1), (5, 1)])  # total $13.38
def test_budget_verdicts_agree_with_their_breaches(tmp_path, budget, count):
    _, estimate, _ = _estimate(tmp_path, 8 * 2**20, finops={**SPEC["finops"], "monthlyBudgetUsd": budget})
    _agree(cost.budget_verdict(estimate), cost.budget_breaches, count)
