"""The charts: SVG images that decode, parse and name every series, the same figures as a table,
the same bytes for the same figures, and the template macro that shows them."""

import base64
import xml.etree.ElementTree as ET
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from edge_ui import charts, trends
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from pipelines.edge import telemetry
from pipelines.gates.fairness import fairness_verdict, group_report, group_table
from pipelines.operate.monitor import DriftCheck
from pipelines.operate.rollout import CanaryCheck, RolloutStep, save_analysis
from pipelines.records import QuantCandidate
from pipelines.settings import Settings
from pipelines.specs import FairnessSpec
from pipelines.storage import ObjectStore

TEMPLATES = Path(charts.__file__).parent / "templates"
PREFIX = "data:image/svg+xml;base64,"


def _svg(chart: charts.Chart) -> tuple[bytes, str]:
    """The SVG's bytes (they must parse as XML) and all its text."""
    assert chart.uri.startswith(PREFIX)
    data = base64.b64decode(chart.uri.removeprefix(PREFIX), validate=True)
    root = ET.fromstring(data)
    assert root.tag == "{http://www.w3.org/2000/svg}svg" and root.get("width") == "460.8pt"
    assert len(data) < 60_000, "small enough to inline in a page"
    return data, " ".join(" ".join(root.itertext()).split())


def _names_every(text: str, labels: list[str]) -> None:
    missing = [label for label in labels if label not in text]
    assert not missing, f"not in the SVG: {missing}"


COST = trends.CostTrend(
    model="fraud", version="3", training_usd_per_month=0.4, total_usd_per_month=5.7, budget_usd_per_month=10,
    groups=[trends.GroupCostPoint(group="phones", variant="dynamic", usd_per_month=4.2),
            trends.GroupCostPoint(group="kiosks", variant="fp32", usd_per_month=1.1)],
    forecast=trends.CostForecast(as_of="2026-01-05", horizon_days=30, predicted_usd=6.1, lower_usd=5.0,
                                 upper_usd=7.3, interval=0.9, monthly_budget_usd=10, breach=False, simulated=True,
                                 uri="file:///store/finops/fraud/2026-01-05/forecast.json"))


def test_cost_against_the_budget_with_the_forecast():
    chart = charts.cost_chart(COST)
    _, text = _svg(chart)
    _names_every(text, ["Cost of fraud v3 per month against the budget", "phones", "kiosks", "training", "total v3",
                        "forecast, next 30 days", "device group (estimate)", "total of the estimate",
                        "forecast as of 2026-01-05 (simulated history)", "90% interval", "monthly budget $10.00",
                        "USD per month (30 days)", "$4.20", "$6.10"])
    assert chart.header == ["item", "USD per month", "note"]
    assert chart.rows[:2] == [["phones", "$4.20", "variant dynamic"], ["kiosks", "$1.10", "variant fp32"]]
    assert chart.rows[-2:] == [["forecast, next 30 days", "$6.10", "as of 2026-01-05: 90% interval $5.00 to $7.30; "
                                "history simulated from the release estimate"],
                               ["budget", "$10.00", "finops.monthlyBudgetUsd"]]
    assert chart.alt.startswith("Horizontal bar chart of the monthly cost of fraud v3: phones $4.20; kiosks $1.10;")
    assert "(90% interval $5.00 to $7.30)" in chart.alt
    assert charts.cost_chart(None) is None and charts.cost_chart(trends.CostTrend(model="fraud")) is None


def test_the_same_figures_give_the_same_bytes_once():
    first = charts.cost_chart(COST)
    assert charts.cost_chart(COST.model_copy(deep=True)) is first, "rendered once per content"
    charts.cost_chart.cache_clear()
    assert charts.cost_chart(COST).uri == first.uri, "deterministic: no date, fixed ids"
    cheaper = COST.model_copy(update={"budget_usd_per_month": 12.0})
    assert charts.cost_chart(cheaper).uri != first.uri


def test_fairness_per_group_with_the_gate_limits(tmp_path, state):
    store = ObjectStore(Settings().store_url)
    rng = np.random.default_rng(1)
    groups = pd.DataFrame({"group": rng.choice(["a", "b"], size=400).tolist() + ["c"] * 4})
    truth = rng.integers(0, 2, size=404)
    guesses = np.where(rng.random(404) < 0.85, truth, 1 - truth)
    report = group_report(truth, guesses, groups, 30, 2)
    uri = store.put_bytes(group_table(report).to_csv(index=False).encode(),
                          "runs/fraud/key/evidence/fairness/fairness_by_group.csv")
    verdict = fairness_verdict(report, FairnessSpec(biasScore=0.2, equalizedOdds=0.3, minGroupAccuracy=0.7),
                               {"fairness_by_group.csv": uri}, "dynamic")
    found = trends.fairness_groups("fraud", Settings(), {"model_version": "3", "verdicts": [verdict.to_xcom()]})
    chart = charts.fairness_chart(found)
    _, text = _svg(chart)
    _names_every(text, ["Fairness of fraud v3 by group: the gate passed", "selection rate per group",
                        "error rate per group", "selection rate limit: lowest group + biasScore",
                        "error rate limit: 1 - minGroupAccuracy", "selection rate (share positive)",
                        "error rate (1 - accuracy)", "sensitive group (group)", "0.3"])
    assert chart.header == ["feature", "group", "rows", "selection rate", "error rate", "gate limit", "note"]
    rates = {g.group: g.selection_rate for g in found.groups}
    assert [row[:2] for row in chart.rows] == [["group", "a"], ["group", "b"], ["group", "c"]]
    assert chart.rows[0][3] == f"{rates['a']:.3f}" and chart.rows[2][-1] == "too small to compare"
    assert f"selection rate <= {min(rates['a'], rates['b']) + 0.2:.3g}" in chart.rows[0][5]
    assert chart.caption == "From the fairness gate's evidence (dynamic variant). Not drawn, too small to compare: c."
    assert chart.alt.endswith("The fairness gate passed.")


def test_drift_share_over_time_with_the_threshold(tmp_path, state):
    settings = Settings()
    store = ObjectStore(settings.store_url)
    for day, status, share in ((1, "ok", 0.1), (2, "drift", 0.5), (3, "insufficient_data", None), (4, "ok", 0.2)):
        check = DriftCheck(model="fraud", status=status, reason="-", checked_at=f"2026-01-0{day}T06:00:00Z",
                           window_start="-", window_end="-", drift_share_threshold=0.3, min_rows=200,
                           deployed_version="3", drifted_share=share)
        store.put_bytes(check.model_dump_json().encode(), f"monitoring/fraud/2026010{day}T060000Z/drift.json")
    chart = charts.drift_chart(trends.drift_trend("fraud", settings))
    _, text = _svg(chart)
    _names_every(text, ["Drift of fraud: share of columns drifted per check", "drifted share", "drift found",
                        "no verdict (too few rows)", "threshold (monitoring.driftShare)",
                        "columns drifted (% of compared)", "time of the check (UTC)"])
    assert chart.rows[0] == ["2026-01-04T06:00:00Z", "ok", "20%", "30%", "3"], "newest first"
    assert chart.rows[1][1:3] == ["insufficient data", "-"]
    assert chart.alt.endswith("1 found drift. Latest: ok, 20% drifted against a threshold of 30%.")


def test_canary_share_and_checks_over_time(tmp_path, state):
    settings = Settings()
    start = datetime(2026, 11, 27, 10, 0, tzinfo=timezone.utc)
    common = {"model": "fraud", "version": "3", "previous_version": "2", "step": 1, "steps": 2, "share": 20}
    passed = CanaryCheck(name="error_rate", observed=0.001, threshold=0.02, passed=True, detail="0.10%")
    failed = CanaryCheck(name="prediction_shift", observed=0.3, threshold=0.1, passed=False, detail="0.300")
    for minutes, step in ((0, RolloutStep(**common, decision="hold", reason="too few requests")),
                          (15, RolloutStep(**common, decision="advance", next_share=100, reason="ok",
                                           checks=[passed])),
                          (30, RolloutStep(**{**common, "share": 100}, decision="complete", reason="done")),
                          (45, RolloutStep(**{**common, "version": "4", "previous_version": "3"},
                                           decision="rollback", reason="shift", checks=[passed, failed]))):
        save_analysis(step, start + timedelta(minutes=minutes), settings)
    chart = charts.canary_chart(trends.canary_trend("fraud", settings))
    _, text = _svg(chart)
    _names_every(text, ["Canary of fraud: share of the devices and checks per analysis", "share after the decision",
                        "hold", "advance", "complete", "rollback", "check passed", "check failed", "error rate",
                        "prediction shift", "v3", "v4", "devices on the canary (%)", "time of the analysis (UTC)"])
    assert chart.rows[0] == ["2026-11-27T10:45:00.000Z", "4", "rollback", "20%", "0%",
                             "error_rate pass, prediction_shift FAIL"]
    assert chart.rows[-1] == ["2026-11-27T10:00:00.000Z", "3", "hold", "20%", "20%", "-"]
    assert "checks that failed at least once: prediction_shift" in chart.alt


def test_versions_running_per_group(tmp_path, state):
    settings = Settings()
    store = ObjectStore(settings.telemetry_url)
    now = datetime(2026, 3, 10, 12, 0, tzinfo=timezone.utc)
    for day in range(1, 10):
        for group, devices in (("phones", 6), ("kiosks", 2)):
            for device in range(devices):
                version = "2" if device < day * devices // 9 else "1"
                telemetry.write_record(store, {
                    "kind": "status", "device_id": f"{group}-{device}", "model": "fraud", "version": version,
                    "state": "active", "error": None, "latency_ms": 0.4, "group": group,
                    "ts": telemetry.timestamp(datetime(2026, 3, day, 9, tzinfo=timezone.utc))})
    running = trends.versions_running("fraud", settings, days=10, now=now)
    chart = charts.versions_chart(running)
    _, text = _svg(chart)
    _names_every(text, ["Versions of fraud running per device group, per day", "phones", "kiosks", "version",
                        "v1", "v2", "devices", "day (UTC)"])
    assert chart.header == ["day", "device group", "v1", "v2"]
    assert chart.rows[:2] == [["2026-03-09", "phones", "0", "6"], ["2026-03-09", "kiosks", "0", "2"]]
    assert chart.caption == ("From device telemetry: each device counted once per day, with its newest report; "
                             "72 records read.")
    assert "In 2026-03-09: kiosks: v2 on 2; phones: v2 on 6." in chart.alt


def test_quantization_variants_with_the_chosen_one_marked():
    candidates = [QuantCandidate(variant="fp32", uri="file:///m/fp32.onnx", sha256="a" * 64, size_bytes=480_000,
                                 accuracy=0.91, accuracy_change=0.0, latency_p50_ms=0.8, latency_p95_ms=1.1,
                                 eligible=True),
                  QuantCandidate(variant="dynamic", uri="file:///m/dynamic.onnx", sha256="b" * 64,
                                 size_bytes=130_000, accuracy=0.905, accuracy_change=-0.005, latency_p50_ms=0.5,
                                 latency_p95_ms=0.7, eligible=True),
                  QuantCandidate(variant="static", uri="file:///m/static.onnx", sha256="c" * 64, size_bytes=125_000,
                                 accuracy=0.86, accuracy_change=-0.05, latency_p50_ms=0.4, latency_p95_ms=0.6,
                                 eligible=False, note="over the accuracy budget")]
    summary = {"model": "fraud", "model_version": "3",
               "quantization": {"candidates": [c.model_dump(mode="json") for c in candidates], "chosen": "dynamic",
                                "reason": "the smallest within the accuracy budget", "metric": "accuracy"}}
    chart = charts.quantization_chart(trends.quantization_points(summary))
    _, text = _svg(chart)
    _names_every(text, ["Quantization of fraud v3: size, latency and accuracy", "fp32", "dynamic", "static",
                        "chosen (dynamic)", "not eligible (hollow)", "size (KiB)", "p95 latency (ms)",
                        "accuracy on the test split"])
    assert chart.rows[1] == ["dynamic (chosen)", "127.0", "0.500", "0.700", "0.9050", "-0.0050", "yes", "-"]
    assert chart.rows[2][-2:] == ["no", "over the accuracy budget"]
    assert chart.caption == "the smallest within the accuracy budget"
    assert chart.alt.endswith("static 122.1 KiB, 0.600 ms, accuracy 0.8600 (not eligible). Chosen: dynamic.")


def test_the_macro_shows_the_image_its_caption_and_the_table_without_inline_styles():
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(default=True),
                      undefined=StrictUndefined)
    chart = charts.cost_chart(COST)
    html = env.from_string('{% from "charts.html" import chart %}{{ chart(c) }}').render(c=chart)
    assert f'<img class="chart-image" src="{chart.uri}" alt="{chart.alt}">' in html
    assert "<figcaption" in html and "<details class=\"chart-data\">" in html
    assert html.count("<tr>") == 1 + len(chart.rows) and "<td>$4.20</td>" in html
    assert "style=" not in html, "the pages' Content-Security-Policy forbids inline styles"
    css = (TEMPLATES.parent / "static" / "charts.css").read_text()
    assert ".chart-image" in css and ".chart-table" in css


@pytest.mark.parametrize(("draw", "empty"), [
    (charts.cost_chart, trends.CostTrend(model="m")),
    (charts.fairness_chart, trends.FairnessGroups(model="m", task="binary", passed=True, evidence_uri="file:///e",
                                                  groups=[trends.GroupFigures(feature="f", group="g", count=3,
                                                                              note="too small to compare")])),
    (charts.drift_chart, trends.DriftTrend(model="m", points=[])),
    (charts.canary_chart, trends.CanaryTrend(model="m", points=[])),
    (charts.versions_chart, trends.VersionsRunning(model="m", per="day", since="-", until="-", rows=[],
                                                   records_read=0)),
    (charts.quantization_chart, trends.QuantizationPoints(model="m", metric="accuracy", points=[])),
])
def test_nothing_to_draw(draw, empty):
    assert draw(None) is None and draw(empty) is None
