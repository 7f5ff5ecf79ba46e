"""The charts' read models on what the pipeline's own code writes: a release and its FinOps
forecast, fairness evidence, drift checks, saved canary analyses and device telemetry."""

import json
from datetime import date, datetime, timedelta, timezone

import boto3
import numpy as np
import pandas as pd
import pytest
from conftest import tabular_frame, write_spec
from edge_ui import trends, views

from pipelines import release
from pipelines.edge import telemetry
from pipelines.gates.fairness import fairness_verdict, group_report, group_table
from pipelines.operate.finops_report import finops_report
from pipelines.operate.monitor import DriftCheck
from pipelines.operate.rollout import analyze, save_analysis
from pipelines.settings import Settings
from pipelines.specs import FairnessSpec, parse_spec
from pipelines.storage import ObjectStore

PHONES = {"name": "phones", "selector": {"matchLabels": {"apexlogic.dev/device-class": "android-phone"}}}
KIOSKS = {"name": "kiosks", "selector": {"matchLabels": {"apexlogic.dev/device-class": "raspberry-pi-4"}}}


# -- a release: cost, fairness evidence, quantization --------------------------------------------
@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """One release of a small model with two device groups, in a state folder of its own."""
    folder = tmp_path_factory.mktemp("released")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGE_STATE_DIR", str(folder / "state"))
        tabular_frame().to_csv(folder / "data.csv", index=False)
        spec = write_spec(folder, "trend-model", "data.csv", targets=[PHONES, KIOSKS],
                          responsibleAI={"fairness": {"biasScore": 0.3, "equalizedOdds": 0.3,
                                                      "minGroupAccuracy": 0.6}})
        summary = release.run_release(spec)
        assert summary.status == "released", summary.reasons
        yield Settings(specs_dir=folder), summary


def test_cost_per_group_against_the_budget_and_the_newest_forecast(released):
    settings, summary = released
    trend = trends.cost_trend("trend-model", settings)
    expected = {g["group"]: g["total_usd"] for g in summary.cost["groups"]}
    assert {g.group: g.usd_per_month for g in trend.groups} == expected and set(expected) == {"phones", "kiosks"}
    assert trend.version == summary.model_version and trend.budget_usd_per_month == 10
    assert trend.total_usd_per_month == summary.cost["total_usd_per_month"]
    assert trend.training_usd_per_month == summary.cost["training_usd_per_month"]
    assert trend.forecast is None, "no FinOps report yet"

    finops_report("trend-model", date(2026, 1, 10), settings)
    report = finops_report("trend-model", date(2026, 1, 11), settings)
    forecast = trends.cost_trend("trend-model", settings).forecast
    assert (forecast.as_of, forecast.horizon_days, forecast.simulated) == ("2026-01-11", 30, True)
    assert (forecast.predicted_usd, forecast.upper_usd, forecast.monthly_budget_usd) == (
        report.total_predicted_usd, report.total_upper_usd, 10)
    assert forecast.uri == report.evidence["forecast.json"]
    stored = json.loads(ObjectStore(settings.store_url).read_bytes("finops/trend-model/2026-01-11/forecast.json"))
    assert (forecast.lower_usd, forecast.interval) == (stored["forecast"]["total_lower_usd"], 0.9)

    given = summary.model_dump(mode="json")
    given["cost"] = {**given["cost"], "groups": given["cost"]["groups"][:1], "monthly_budget_usd": 3.5}
    other = trends.cost_trend("trend-model", settings, summary=given)
    assert len(other.groups) == 1 and other.budget_usd_per_month == 3.5, "the summary given, not the latest"
    assert trends.cost_trend("no-such-model", settings) is None


def test_fairness_groups_of_a_release_from_its_evidence(released):
    settings, summary = released
    found = trends.fairness_groups("trend-model", settings)
    verdict = next(v for v in summary.verdicts if v.gate == "fairness")
    assert found.evidence_uri == verdict.evidence["fairness_by_group.csv"]
    assert (found.task, found.passed, found.version, found.variant) == (
        "binary", verdict.passed, summary.model_version, summary.quantization.chosen)
    store = ObjectStore(settings.store_url)
    table = pd.read_csv(store.local_path(store.key_of(found.evidence_uri)))
    assert [(g.feature, g.group) for g in found.groups] == list(zip(table["feature"], table["group"].astype(str)))
    for group, row in zip(found.groups, table.itertuples()):
        assert group.selection_rate == pytest.approx(row.selection_rate)
        assert group.error == pytest.approx(1 - row.accuracy) and group.count == row.count
    rates = [g.selection_rate for g in found.groups]
    assert [(lim.metric, round(lim.value, 9)) for lim in found.limits] == [
        ("selection_rate", round(min(rates) + 0.3, 9)), ("error", 0.4)]
    assert found.limits[0].rule == "lowest group + biasScore 0.3"


def test_quantization_points_of_a_release(released):
    _, summary = released
    points = trends.quantization_points(summary.model_dump(mode="json"))
    assert (points.model, points.version, points.metric) == ("trend-model", summary.model_version, "accuracy")
    assert [p.variant for p in points.points] == [c.variant for c in summary.quantization.candidates]
    assert [p.variant for p in points.points if p.chosen] == [summary.quantization.chosen]
    for point, candidate in zip(points.points, summary.quantization.candidates):
        assert (point.size_bytes, point.score, point.latency_p95_ms, point.eligible) == (
            candidate.size_bytes, candidate.accuracy, candidate.latency_p95_ms, candidate.eligible)
    assert trends.quantization_points({"model": "m"}) is None


# -- fairness of other tasks, from the gate's own functions ---------------------------------------
def _evidence(store: ObjectStore, report: dict, spec: FairnessSpec, variant: str = "fp32") -> dict:
    """A summary whose fairness verdict has the gate's table as evidence, as the gate writes it."""
    uri = store.put_bytes(group_table(report).to_csv(index=False).encode(),
                          "runs/m/key/evidence/fairness/fairness_by_group.csv")
    verdict = fairness_verdict(report, spec, {"fairness_by_group.csv": uri}, variant)
    return {"model": "m", "model_version": "4", "verdicts": [verdict.model_dump(mode="json")]}


def test_fairness_groups_of_a_regression_and_of_three_classes(tmp_path, state):
    settings = Settings()
    store = ObjectStore(settings.store_url)
    rng = np.random.default_rng(0)
    sex = pd.DataFrame({"sex": rng.choice(["f", "m"], size=300).tolist() + ["x"] * 5})
    truth = rng.normal(100, 10, size=305)
    errors = np.where(sex["sex"] == "f", 5.0, 9.0)
    report = group_report(truth, truth + errors, sex, 30, 0)
    found = trends.fairness_groups("m", settings, _evidence(store, report, FairnessSpec(maxErrorGap=12)))
    assert found.task == "regression" and found.passed
    by_group = {g.group: g for g in found.groups}
    assert by_group["f"].mae == pytest.approx(5.0) and by_group["m"].mae == pytest.approx(9.0)
    assert (by_group["x"].note, by_group["x"].count, by_group["x"].mae) == ("too small to compare", 5, None)
    [limit] = found.limits
    assert (limit.metric, limit.value, limit.rule) == ("mae", pytest.approx(17.0), "lowest group + maxErrorGap 12")

    labels = rng.integers(0, 3, size=305)
    guesses = np.where(rng.random(305) < 0.8, labels, (labels + 1) % 3)
    report = group_report(labels, guesses, sex, 30, 3)
    found = trends.fairness_groups("m", settings, _evidence(store, report, FairnessSpec(minGroupAccuracy=0.7)))
    assert found.task == "multiclass" and {g.selection_rate for g in found.groups} == {None}
    assert by_group.keys() == {g.group for g in found.groups}
    assert [(lim.feature, lim.metric, lim.value) for lim in found.limits] == [("sex", "error", pytest.approx(0.3))]
    assert trends.fairness_groups("m", settings, {"verdicts": []}) is None


# -- drift -----------------------------------------------------------------------------------------
def _check(store: ObjectStore, stamp: str, status: str, share: float | None) -> None:
    """A drift check as the monitor writes it: the report first, the JSON last."""
    folder = f"monitoring/drift-model/{stamp}"
    store.put_bytes(b"<html></html>", f"{folder}/drift.html")
    check = DriftCheck(model="drift-model", status=status, reason="-", window_start="-", window_end="-",
                       checked_at=f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]}T{stamp[9:11]}:00:00Z",
                       drift_share_threshold=0.3, min_rows=200, deployed_version="2", drifted=status == "drift",
                       drifted_share=share, report_uri=store.uri(f"{folder}/drift.html"))
    store.put_bytes(check.model_dump_json(indent=2).encode(), f"{folder}/drift.json")


def test_drift_share_over_time(tmp_path, state):
    settings = Settings()
    store = ObjectStore(settings.store_url)
    assert trends.drift_trend("drift-model", settings) is None
    _check(store, "20260102T000000Z", "drift", 0.5)
    _check(store, "20260101T000000Z", "ok", 0.1)
    _check(store, "20260103T000000Z", "insufficient_data", None)
    store.put_bytes(b"<html></html>", "monitoring/drift-model/20260104T000000Z/drift.html")  # in progress
    trend = trends.drift_trend("drift-model", settings)
    assert [(p.checked_at, p.status, p.drifted_share, p.threshold) for p in trend.points] == [
        ("2026-01-01T00:00:00Z", "ok", 0.1, 0.3), ("2026-01-02T00:00:00Z", "drift", 0.5, 0.3),
        ("2026-01-03T00:00:00Z", "insufficient_data", None, 0.3)]
    assert [p.status for p in trends.drift_trend("drift-model", settings, limit=2).points] == [
        "drift", "insufficient_data"]
    for read in (trends.drift_trend, trends.canary_trend, trends.cost_trend, trends.versions_running):
        with pytest.raises(views.UnknownModel):
            read("../drift-model", settings)


# -- canary ----------------------------------------------------------------------------------------
T0 = datetime(2026, 11, 27, 10, 0, tzinfo=timezone.utc)
CANARY = {"type": "Canary", "canary": {"steps": [{"share": 20, "pause": "10m"}, {"share": 50}, {"share": 100}],
                                       "analysis": {"minRequests": 200}}}


def _canary_spec():
    return parse_spec({"name": "canary-model", "owner": "t@example.com",
                       "data": {"source": "data.csv", "target": "label", "features": ["x1"],
                                "sensitiveFeatures": ["group"]},
                       "training": {"framework": "sklearn", "estimator": "logistic_regression"},
                       "finops": {"costCenter": "cc-1", "project": "tests", "monthlyBudgetUsd": 10},
                       "targets": [PHONES], "deploymentStrategy": CANARY}, "canary-model.yaml")


def _cohort(version: str, devices: int, errors: int = 0) -> list[dict]:
    out = []
    for device in range(devices):
        window = telemetry.InferenceWindow("canary-model", version, "phones", 2, started=T0)
        for i in range(100):
            window.add(0.5, None if i < errors else i % 2)
        out.append(window.record(f"v{version}-dev-{device}", {}, now=T0 + timedelta(minutes=5)))
    return out


def test_canary_share_and_checks_from_the_saved_analyses(tmp_path, state):
    settings = Settings()
    spec = _canary_spec()
    base = {"spec": {"modelRef": {"version": "3"}, "rollout": {"share": 20, "step": 1, "steps": 3,
                                                               "previousVersion": "2"}}}
    assert trends.canary_trend("canary-model", settings) is None
    steps = [(T0 + timedelta(minutes=2), []),  # too few requests: hold
             (T0 + timedelta(minutes=20), _cohort("3", 3) + _cohort("2", 10)),  # healthy: advance to 50%
             (T0 + timedelta(minutes=40), _cohort("3", 3, errors=20) + _cohort("2", 10))]  # sick: rollback
    for now, records in steps:
        save_analysis(analyze(spec, base, records, T0, now), now, settings)
    save_analysis(analyze(spec, {"spec": {"modelRef": {"version": "2"}}}, [], T0, T0 + timedelta(hours=1)),
                  T0 + timedelta(hours=1), settings)
    trend = trends.canary_trend("canary-model", settings)
    assert [(p.decision, p.version, p.share, p.share_after) for p in trend.points] == [
        ("hold", "3", 20, 20), ("advance", "3", 20, 50), ("rollback", "3", 20, 0), ("complete", "2", 100, 100)]
    assert [p.at for p in trend.points] == [telemetry.timestamp(now) for now, _ in steps] + [
        telemetry.timestamp(T0 + timedelta(hours=1))]
    assert trend.points[0].checks == [] and all(c.passed for c in trend.points[1].checks)
    failed = [c.name for c in trend.points[2].checks if not c.passed]
    assert "error_rate" in failed
    assert [p.decision for p in trends.canary_trend("canary-model", settings, limit=2).points] == [
        "rollback", "complete"]


# -- versions running ------------------------------------------------------------------------------
NOW = datetime(2026, 3, 10, 12, 0, tzinfo=timezone.utc)


def _at(day: int, hour: int) -> datetime:
    return datetime(2026, 3, day, hour, 0, tzinfo=timezone.utc)


def _status(device: str, group: str, version: str, when: datetime, state: str = "active") -> dict:
    """A status record as the agent reports one."""
    return {"kind": "status", "device_id": device, "model": "fleet-model", "version": version, "state": state,
            "error": None if state == "active" else "smoke test failed", "latency_ms": 0.4, "group": group,
            "ts": telemetry.timestamp(when)}


def _fleet(store: ObjectStore) -> None:
    """Three phones and a kiosk over four days, written by the telemetry writer."""
    window = telemetry.InferenceWindow("fleet-model", "1", "kiosks", 2, started=_at(8, 9))
    window.add(0.3, 1)
    records = [
        _status("p1", "phones", "1", _at(7, 10)),  # before the window
        _status("p2", "phones", "1", _at(7, 13)),
        _status("p1", "phones", "1", _at(8, 8)), _status("p1", "phones", "2", _at(8, 20)),
        _status("p2", "phones", "1", _at(8, 9)),
        _status("p3", "phones", "2", _at(8, 9), state="failed"),  # not running anything it names
        window.record("k1", {}, now=_at(8, 10)),
        _status("p1", "phones", "2", _at(9, 8)), _status("p2", "phones", "2", _at(9, 9)),
        _status("p3", "phones", "2", _at(9, 10)), _status("p3", "phones", "3", _at(9, 11), state="failed"),
        _status("k1", "kiosks", "1", _at(9, 12), state="unchanged"),
        _status("p1", "phones", "3", _at(10, 13)),  # after `now`
    ]
    for record in records:
        telemetry.write_record(store, record)


EXPECTED_DAYS = [("2026-03-07", "phones", "1", 1), ("2026-03-08", "kiosks", "1", 1),
                 ("2026-03-08", "phones", "1", 1), ("2026-03-08", "phones", "2", 1),
                 ("2026-03-09", "kiosks", "1", 1), ("2026-03-09", "phones", "2", 3)]


def _rows(running: trends.VersionsRunning) -> list[tuple]:
    return [(r.bucket, r.group, r.version, r.devices) for r in running.rows]


def test_versions_running_per_group_and_day_from_telemetry(tmp_path, state):
    settings = Settings()
    assert trends.versions_running("fleet-model", settings, days=3, now=NOW) is None
    _fleet(ObjectStore(settings.telemetry_url))
    running = trends.versions_running("fleet-model", settings, days=3, now=NOW)
    assert _rows(running) == EXPECTED_DAYS
    assert (running.per, running.since, running.until, running.truncated) == (
        "day", "2026-03-07T12:00:00.000Z", "2026-03-10T12:00:00.000Z", False)
    assert running.records_read == 12, "records are parsed until each device's day is decided"

    hourly = trends.versions_running("fleet-model", settings, days=3, per="hour", now=NOW)
    assert [r for r in _rows(hourly) if r[0].startswith("2026-03-08")] == [
        ("2026-03-08T08:00Z", "phones", "1", 1), ("2026-03-08T09:00Z", "phones", "1", 1),
        ("2026-03-08T10:00Z", "kiosks", "1", 1), ("2026-03-08T20:00Z", "phones", "2", 1)]

    with pytest.raises(ValueError, match="per hour, at most 7 days"):
        trends.versions_running("fleet-model", settings, days=30, per="hour", now=NOW)

    capped = trends.versions_running("fleet-model", settings, days=3, max_records=3, now=NOW)
    assert (capped.truncated, capped.records_read, capped.oldest_read) == (True, 3, "2026-03-09")
    assert {r[0] for r in _rows(capped)} == {"2026-03-09"}


def test_versions_running_from_telemetry_on_s3_reads_by_the_objects_names(tmp_path, state, monkeypatch,
                                                                          s3_endpoint):
    for name, value in {"AWS_ACCESS_KEY_ID": "AKIAEDGETEST", "AWS_SECRET_ACCESS_KEY": "edge-test-secret",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="trend-telemetry")
    settings = Settings(telemetry_store="s3://trend-telemetry/fleet", s3_endpoint_url=s3_endpoint)
    _fleet(ObjectStore(settings.telemetry_url, s3_endpoint))
    running = trends.versions_running("fleet-model", settings, days=3, now=NOW)
    assert _rows(running) == EXPECTED_DAYS
    assert running.records_read == 10, "the two records outside the window are not read"
