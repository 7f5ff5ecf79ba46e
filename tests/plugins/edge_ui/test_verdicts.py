"""Gate verdicts in words: a row per check with labels, units and the spec field, the other
figures without empty ones, and the macro that shows them (strict, autoescaped, styled by class)."""

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from conftest import TINY_SPEC
from edge_ui import verdicts
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from pipelines.finops import cost
from pipelines.finops.catalog import load_catalog, load_fleet
from pipelines.gates import drift, fairness, parity, quality, waived
from pipelines.records import GateVerdict
from pipelines.specs import FairnessSpec, MetricThreshold, parse_spec

UI = Path(verdicts.__file__).parent


def _table(verdict: GateVerdict) -> list[tuple]:
    return [(r.label, r.observed, r.comparison, r.limit, r.field, r.passed) for r in verdicts.verdict_rows(verdict)]


def _facts(verdict: GateVerdict) -> dict:
    facts = verdicts.context_rows(verdict)
    assert all(f.value or f.listed for f in facts), facts  # nothing empty
    assert len({f.label for f in facts}) == len(facts), facts  # each label once
    return {f.label: f.listed or f.value for f in facts}


# -- each gate -------------------------------------------------------------------------------------
def test_quality_rows_read_as_shares_and_points_against_the_champion():
    rules = {"accuracy": MetricThreshold(minValue=0.8, maxRegression=0.01),
             "mae": MetricThreshold(direction="lower", maxValue=50, maxRegression=2),
             "f1_macro": MetricThreshold(minValue=0.5)}
    verdict = quality.quality_verdict(rules, {"accuracy": 0.79, "mae": 41.5}, {"accuracy": 0.86, "mae": 40.0}, "3")
    assert _table(verdict) == [
        ("accuracy on the held-out test rows", "79.00%", "≥", "80%", "gates.quality.accuracy.minValue", False),
        ("drop in accuracy vs champion v3", "7.00 points", "≤", "1 point", "gates.quality.accuracy.maxRegression",
         False),
        ("mean absolute error on the held-out test rows", "41.5000", "≤", "50", "gates.quality.mae.maxValue", True),
        ("rise in mean absolute error vs champion v3", "1.5000", "≤", "2", "gates.quality.mae.maxRegression", True),
        ("macro F1 on the held-out test rows", "not measured", "", "", "gates.quality.f1_macro", False)]
    assert verdicts.verdict_rows(verdict)[1].detail == "79.00% against 86.00% for champion v3"
    assert _facts(verdict) == {"champion compared against": "v3"}

    first = quality.quality_verdict({"accuracy": MetricThreshold(minValue=0.8)}, {"accuracy": 0.9, "roc_auc": 0.95},
                                    None, None)
    assert _table(first) == [("accuracy on the held-out test rows", "90.00%", "≥", "80%",
                              "gates.quality.accuracy.minValue", True)]
    assert _facts(first) == {}  # no champion: nothing to compare against, and no empty fact saying so


def _entry(dp, eo, gap, lowest):
    return {"demographic_parity_difference": dp, "equalized_odds_difference": eo, "accuracy_difference": gap,
            "min_group_accuracy": lowest, "by_group": {}, "excluded_small_groups": {}}


def test_fairness_rows_name_the_feature_and_each_variant():
    spec = FairnessSpec(biasScore=0.1, equalizedOdds=0.12, minGroupAccuracy=0.7)
    fp32 = fairness.fairness_verdict({"race": _entry(0.05, 0.04, 0.02, 0.8), "sex": _entry(0.03, 0.06, 0.01, 0.85)},
                                     spec, {}, "fp32")
    dynamic = fairness.fairness_verdict({"race": _entry(0.16, 0.04, 0.02, 0.8), "sex": _entry(0.03, 0.06, 0.01, 0.85)},
                                        spec, {}, "dynamic")
    combined = fp32.model_copy(update={  # as a release records the variants it ships
        "passed": False, "observed": {**fp32.observed, **{f"dynamic.{k}": v for k, v in dynamic.observed.items()}}})
    rows = verdicts.verdict_rows(combined)
    assert [(r.variant, r.label, r.observed, r.comparison, r.limit, r.passed) for r in rows] == [
        ("fp32", "demographic parity difference across race", "5.00 points", "≤", "10 points", True),
        ("fp32", "equalized odds difference across sex", "6.00 points", "≤", "12 points", True),
        ("fp32", "lowest accuracy of any group", "80.00%", "≥", "70%", True),
        ("dynamic", "demographic parity difference across race", "16.00 points", "≤", "10 points", False),
        ("dynamic", "equalized odds difference across sex", "6.00 points", "≤", "12 points", True),
        ("dynamic", "lowest accuracy of any group", "80.00%", "≥", "70%", True)]
    assert [r.field for r in rows[:3]] == ["responsibleAI.fairness.biasScore", "responsibleAI.fairness.equalizedOdds",
                                           "responsibleAI.fairness.minGroupAccuracy"]
    assert rows[3].group == "race"
    facts = _facts(combined)
    assert facts["variants judged"] == ["fp32", "dynamic"]
    assert facts["demographic parity difference across sex (dynamic)"] == "3.00 points"
    assert "demographic parity difference across race (dynamic)" not in facts  # its check row shows it
    assert facts["groups compared"].startswith("those with at least 30 rows")

    errors = {"sex": {"mae_difference": 14.25, "max_group_mae": 48.0, "by_group": {}, "excluded_small_groups": {}}}
    regression = fairness.fairness_verdict(errors, FairnessSpec(maxErrorGap=12), {}, "fp32")
    assert _table(regression) == [("mean absolute error gap across sex", "14.2500", "≤", "12",
                                   "responsibleAI.fairness.maxErrorGap", False)]
    assert _facts(regression)["largest mean absolute error of any group"] == "48.0000"


def _gaps(dp):
    return {"race": {"demographic_parity_difference": dp, "equalized_odds_difference": 0.1,
                     "accuracy_difference": 0.01}}


def test_parity_rows_read_the_drop_and_widenings_in_points():
    verdict = parity.parity_verdict("static", 0.85, 0.82, _gaps(0.10), _gaps(0.16), 0.01, 0.02)
    assert _table(verdict) == [
        ("drop in accuracy from fp32 to the static variant", "3.00 points", "≤", "1 point", "export.accuracyBudget",
         False),
        ("widening of the demographic parity difference across race, static vs fp32", "6.00 points", "≤", "2 points",
         "gates.quantizationFairnessChange", False),
        ("widening of the equalized odds difference across race, static vs fp32", "0.00 points", "≤", "2 points",
         "gates.quantizationFairnessChange", True),
        ("widening of the accuracy gap across race, static vs fp32", "0.00 points", "≤", "2 points",
         "gates.quantizationFairnessChange", True)]
    assert verdicts.verdict_rows(verdict)[0].detail == "82.00% against 85.00% for fp32"
    assert _facts(verdict)["largest demographic parity difference of static (worst feature)"] == "16.00 points"

    errors = {"sex": {"mae_difference": 10.0}}
    r2 = parity.parity_verdict("dynamic", 0.51, 0.50, errors, {"sex": {"mae_difference": 12.0}}, 0.02, 0.1,
                               metric="r2", gap_scale=10.0)
    rows = verdicts.verdict_rows(r2)
    assert [(r.label, r.observed, r.limit) for r in rows] == [
        ("drop in R² from fp32 to the dynamic variant", "1.00 points", "2 points"),
        ("widening of the mean absolute error gap across sex, dynamic vs fp32, as a share of fp32's error",
         "20.0%", "10%")]
    assert rows[0].detail == "0.5000 against 0.5100 for fp32"

    shipped_fp32 = parity.parity_verdict("fp32", 0.85, 0.85, _gaps(0.1), _gaps(0.1), 0.01, 0.02)
    assert verdicts.verdict_rows(shipped_fp32) == [] and _facts(shipped_fp32) == {"accuracy of fp32": "85.00%"}


def test_drift_rows_and_facts():
    figures = {"drifted_share": 0.75, "drifted_columns": 3, "columns": {"a": 0, "b": 0, "c": 0, "d": 0},
               "drifted_column_names": ["age", "hours_per_week", "income"]}
    verdict = drift.drift_verdict(figures, 0.5, 100_000, 2_500, {})
    verdict = verdict.model_copy(update={"observed": {**verdict.observed, "reference_rows_total": 651_220,
                                                      "current_rows_total": 2_500}})
    assert _table(verdict) == [("share of columns that drifted", "75.0%", "<", "50%", "gates.driftShare", False)]
    assert _facts(verdict) == {"columns that drifted": "3", "drifted columns": ["age", "hours_per_week", "income"],
                               "training rows compared": "100,000 (a sample of 651,220)",
                               "production rows compared": "2,500"}
    calm = drift.drift_verdict({**figures, "drifted_share": 0.0, "drifted_columns": 0, "drifted_column_names": []},
                               0.5, 100, 100, {})
    assert "drifted columns" not in _facts(calm)  # an empty list is not a fact
    nothing = drift.no_production_data(0.5, "no rows")
    assert verdicts.verdict_rows(nothing) == [] and _facts(nothing) == {"production rows compared": "0"}


SPEC = {
    **TINY_SPEC,
    "resources": {"limits": {"memory": "16Mi"}},
    "targets": [{"name": "budget-phones", "selector": {"matchLabels": {"kind": "phone"}}, "latencySloMs": 10},
                {"name": "pis", "selector": {"matchLabels": {"kind": "pi"}}}],
}


@pytest.fixture
def estimate(tmp_path):
    groups = [{"name": f"{kind}-fleet", "labels": {"kind": kind}, "deviceClass": device, "devices": 1000,
               "inferencesPerDevicePerDay": 1000, "otaUpdatesPerMonth": 2, "telemetryBytesPerDevicePerDay": 1_000_000}
              for kind, device in (("phone", "android-phone"), ("pi", "raspberry-pi-4"))]
    prices = {name: {"value": value, "source": "test price"}
              for name, value in (("egressUsdPerGb", 0.1), ("electricityUsdPerKwh", 0.2), ("trainingUsdPerHour", 3.6))}
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({"prices": prices, "groups": groups}))
    catalog = load_catalog()
    figures = cost.VariantFigures(flops=1_000_000, memory_bytes=8 * 2**20, artifact_bytes=50_000_000)
    host = cost.HostFigures(gflops=23.8, overhead_ms=0.005, fp32_latency_p50_ms=1.0, fp32_latency_p95_ms=2.0,
                            train_seconds=360, variants={"fp32": figures})
    spec = parse_spec(SPEC)
    return spec, cost.estimate(spec, catalog, load_fleet(path, catalog), host, "fp32"), catalog


def test_edge_rows_read_in_ms_mib_and_dollars(estimate):
    spec, estimate_, catalog = estimate
    latency = cost.latency_verdict(spec, estimate_)
    assert _table(latency) == [("p95 latency on the budget-phones group", "1.190 ms", "≤", "10 ms",
                                "targets[budget-phones].latencySloMs", True)]
    assert _facts(latency) == {"p95 latency on the pis group (no SLO set)": "4.000 ms"}

    memory = verdicts.verdict_rows(cost.memory_verdict(spec, estimate_, catalog))
    assert [(r.label, r.observed, r.limit, r.field) for r in memory] == [
        ("memory the model needs on the budget-phones group", "8.0 MiB", "16 MiB (16Mi)", "resources.limits.memory"),
        ("memory the model needs on the budget-phones group, vs android-phone device memory", "8.0 MiB",
         "6,144 MiB", "classes.android-phone.memory_bytes"),
        ("memory the model needs on the pis group", "8.0 MiB", "16 MiB (16Mi)", "resources.limits.memory"),
        ("memory the model needs on the pis group, vs raspberry-pi-4 device memory", "8.0 MiB", "4,096 MiB",
         "classes.raspberry-pi-4.memory_bytes")]
    assert all(r.passed and r.comparison == "≤" for r in memory)

    over = estimate_.model_copy(update={"monthly_budget_usd": 10.0})
    budget = cost.budget_verdict(over)
    total = f"${over.total_usd_per_month:,.2f}/month"
    assert _table(budget) == [("projected cost per month", total, "≤", "$10.00/month", "finops.monthlyBudgetUsd",
                               False)]
    facts = _facts(budget)
    assert facts["training cost"] == "$0.36/month"  # 360 s at $3.60 an hour, one release a month
    assert set(facts) == {"training cost", "cost of the budget-phones group", "cost of the pis group"}


def test_waived_and_unknown_gates():
    verdict = waived("drift", "the   production data lands in a system this pipeline cannot read yet")
    assert verdicts.verdict_rows(verdict) == []
    assert _facts(verdict) == {"waived because": "the production data lands in a system this pipeline cannot read yet"}

    unknown = GateVerdict(gate="license", passed=False, thresholds={"allowed": "apache-2.0", "max_age": None},
                          observed={"license": "gpl-3.0", "notes": "", "files": 12}, reason="a GPL dependency")
    assert verdicts.verdict_rows(unknown) == []
    assert _facts(unknown) == {"license": "gpl-3.0", "files": "12", "allowed (limit)": "apache-2.0"}

    unreadable = GateVerdict(gate="drift", passed=False, thresholds={"drift_share": "half"},
                             observed={"drifted_share": 0.7}, reason="figures of another shape")
    assert verdicts.verdict_rows(unreadable) == []
    assert _facts(unreadable) == {"drifted_share": "0.7", "drift_share (limit)": "half"}


def test_summary_checks_by_gate_from_stored_json():
    failing = quality.quality_verdict({"accuracy": MetricThreshold(minValue=0.8)}, {"accuracy": 0.7}, None, None)
    stored = [failing.to_xcom(), waived("drift", "no production data source exists yet").to_xcom()]
    checks = verdicts.summary_checks(stored)
    assert list(checks) == ["quality", "drift"] and checks["drift"] == []
    assert [(r.observed, r.limit, r.passed) for r in checks["quality"]] == [("70.00%", "80%", False)]


# -- the macro -------------------------------------------------------------------------------------
class _Cells(HTMLParser):
    """The text of each cell, and whether the page holds inline styles."""

    def __init__(self):
        super().__init__()
        self.cells: list[str] = []
        self.inline_style = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.inline_style |= tag == "style" or any(name == "style" for name, _ in attrs)
        if tag in ("td", "th", "dt", "dd", "p"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th", "dt", "dd", "p") and self._cell is not None:
            self.cells.append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _render(verdict) -> tuple[str, _Cells]:
    env = Environment(loader=FileSystemLoader(UI / "templates"), autoescape=select_autoescape(default=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    page = env.from_string('{% from "verdicts.html" import verdict_detail %}{{ verdict_detail(v, rows, facts) }}')
    text = page.render(v=verdict, rows=verdicts.verdict_rows(verdict), facts=verdicts.context_rows(verdict))
    parsed = _Cells()
    parsed.feed(text)
    return text, parsed


def test_the_macro_renders_rows_marks_and_facts_escaped():
    report = {"<b>race</b>": _entry(0.16, 0.04, 0.02, 0.8)}
    verdict = fairness.fairness_verdict(report, FairnessSpec(biasScore=0.1, equalizedOdds=0.12), {}, "fp32")
    text, page = _render(verdict)
    assert "&lt;b&gt;race&lt;/b&gt;" in text and "<b>" not in text
    assert page.cells[:6] == ["what", "observed", "rule", "limit", "set by", "result"]
    assert page.cells[6:12] == ["demographic parity difference across <b>race</b> fp32", "16.00 points", "≤",
                                "10 points", "responsibleAI.fairness.biasScore", "✗fail"]
    assert page.cells[12:18] == ["equalized odds difference across <b>race</b> fp32", "4.00 points", "≤",
                                 "12 points", "responsibleAI.fairness.equalizedOdds", "✓pass"]
    assert "variants judged" in page.cells and not page.inline_style

    text, stored = _render(drift.no_production_data(0.5, "the spec names no data.currentSource").to_xcom())
    assert "<table" not in text
    assert stored.cells == ["no production data yet (the spec names no data.currentSource)",
                            "production rows compared", "0"]

    figures = {"drifted_share": 0.0, "drifted_columns": 0, "columns": {"age": 0.01}, "drifted_column_names": []}
    calm = drift.drift_verdict(figures, 0.5, 100, 100, {})
    text, page = _render(calm)
    assert "verdict-reason" not in text and page.cells[6:12] == [
        "share of columns that drifted", "0.0%", "<", "50%", "gates.driftShare", "✓pass"]
    lacking = calm.model_copy(update={"passed": False, "reason": f"current data lacks feature columns ['bmi']; "
                                                                 f"{calm.reason}"})  # as the drift gate records it
    _, page = _render(lacking)
    assert page.cells[0].startswith("current data lacks feature columns ['bmi']")

    _, waiver = _render(waived("quality", "a baseline model, compared by hand this quarter"))
    assert waiver.cells == ["waived because", "a baseline model, compared by hand this quarter"]


def test_every_class_the_macro_uses_is_styled_in_its_own_stylesheet():
    template = (UI / "templates" / "verdicts.html").read_text()
    css = (UI / "static" / "verdicts.css").read_text()
    used = {c for attr in re.findall(r'class="([^"{]*)"', template) for c in attr.split()}
    used |= set(re.findall(r"'(check-[a-z]+)'", template))
    assert {"checks", "check-pass", "check-fail", "sr-only", "verdict-facts"} <= used
    assert [c for c in sorted(used) if not re.search(rf"\.{c}\b", css)] == []
    assert "style=" not in template and "<style" not in template
