"""The FinOps report of one model: spend history, a 30-day forecast against the budget,
anomalous days. History comes from a telemetry history file; before a fleet reports any,
the report simulates it from the released cost estimate and says so."""

from __future__ import annotations

import json
import tempfile
from datetime import date, timedelta
from pathlib import Path

from pipelines.records import Record
from pipelines.settings import Settings, get_settings
from pipelines.storage import ObjectStore

HISTORY_DAYS = 90


class FinOpsReport(Record):
    model: str
    as_of: str
    history_source: str
    simulated: bool
    breach: bool
    total_predicted_usd: float
    total_upper_usd: float
    monthly_budget_usd: float
    anomalies: list[dict]
    reason: str
    evidence: dict[str, str]
    actual_usd_per_month: float | None = None
    actual_breach: bool = False


def history_path(settings: Settings, model: str) -> Path:
    return settings.state / "telemetry" / "history" / f"{model}.csv"


def _simulated_history(summary, as_of: date):
    """90 days shaped by the released estimate (devices, usage, $/inference, $/GB)."""
    from pipelines.finops.cost import DAYS_PER_MONTH, CostEstimate
    from pipelines.finops.forecast import simulate_history

    estimate = CostEstimate.model_validate(summary.cost)
    groups = {}
    for g in estimate.groups:
        per_day = g.inferences_per_month / DAYS_PER_MONTH
        telemetry_bytes = g.telemetry_gb_per_month * 1e9 / DAYS_PER_MONTH
        groups[g.group] = {
            "devices": max(g.devices, 1),
            "inferences_per_device_per_day": per_day / max(g.devices, 1),
            "bytes_per_device_per_day": telemetry_bytes / max(g.devices, 1),
            "cost_per_inference_usd": g.energy_usd / max(g.inferences_per_month, 1),
            "cost_per_gb_usd": g.telemetry_usd / max(g.telemetry_gb_per_month, 1e-12),
        }
    start = as_of - timedelta(days=HISTORY_DAYS)
    return simulate_history(groups, HISTORY_DAYS, start, seed=HISTORY_DAYS, trend_per_day=0.004,
                            weekly_amplitude=0.15)


def finops_report(model: str, as_of: date, settings: Settings | None = None) -> FinOpsReport:
    """Forecast the next 30 days of a released model's spend; write table, plot and JSON."""
    from pipelines.finops.forecast import forecast_spend, forecast_verdict, load_history, plot_forecast, report_table
    from pipelines.release import latest_summary

    settings = settings or get_settings()
    summary = latest_summary(model, settings)
    if summary is None or summary.cost is None:
        raise ValueError(f"{model}: no released cost estimate yet; release the model first")
    path = history_path(settings, model)
    if path.is_file():
        history, source, simulated = load_history(path), str(path), False
    else:
        history, simulated = _simulated_history(summary, as_of), True
        source = "simulated from the released cost estimate (no telemetry history yet)"
    history = history[history["date"] < str(as_of)]
    budget = summary.cost["monthly_budget_usd"]
    forecast = forecast_spend(history, horizon_days=30, monthly_budget_usd=budget)
    verdict = forecast_verdict(forecast)
    actual = _actual_day(model, as_of, settings)
    actual_month = round(actual.total_usd / actual.days * 30, 6) if actual is not None else None
    actual_breach = actual_month is not None and actual_month > budget
    reason = verdict.reason
    if actual is not None:
        reason += (f"; measured on the devices the day before: ${actual_month:,.4f}/month "
                   f"{'over' if actual_breach else 'within'} the ${budget:,.2f} budget")
    store = ObjectStore(settings.store_url, settings.s3_endpoint_url)
    prefix = f"finops/{model}/{as_of.isoformat()}"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if actual is not None:
            _write_actual(actual, folder)
        (folder / "forecast.json").write_text(json.dumps(
            {"forecast": forecast.model_dump(mode="json"), "verdict": verdict.model_dump(mode="json"),
             "history_source": source, "simulated": simulated}, indent=2))
        (folder / "report.txt").write_text(
            f"{model}: 30-day spend forecast as of {as_of} ({source})\n\n{report_table(forecast)}\n")
        plot_forecast(history, forecast, folder / "forecast.png",
                      f"{model}: daily spend and 30-day forecast" + (" (simulated history)" if simulated else ""))
        evidence = {p.name: store.put_file(p, f"{prefix}/{p.name}") for p in sorted(folder.iterdir())}
    if actual is not None:
        _log_actual(model, actual, actual_month, settings)
    return FinOpsReport(model=model, as_of=as_of.isoformat(), history_source=source, simulated=simulated,
                        breach=forecast.breach or actual_breach, total_predicted_usd=forecast.total_predicted_usd,
                        total_upper_usd=forecast.total_upper_usd, monthly_budget_usd=budget,
                        anomalies=forecast.anomalies, reason=reason, evidence=evidence,
                        actual_usd_per_month=actual_month, actual_breach=actual_breach)


def _actual_day(model: str, as_of: date, settings: Settings):
    """The actual cost of the day before `as_of` (UTC) from device telemetry; None without any."""
    from datetime import datetime, timezone

    from pipelines.operate.actual_cost import actual_cost

    until = datetime(as_of.year, as_of.month, as_of.day, tzinfo=timezone.utc)
    actual = actual_cost(model, until - timedelta(days=1), until, settings)
    return actual if actual.classes else None


def _write_actual(actual, folder: Path) -> None:
    """The measured day as evidence: its record and its FOCUS usage rows."""
    import csv

    from pipelines.finops.cost import FOCUS_COLUMNS

    (folder / "actual.json").write_text(actual.model_dump_json(indent=1))
    with (folder / "actual_focus.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FOCUS_COLUMNS)
        writer.writeheader()
        writer.writerows(actual.rows)


def _log_actual(model: str, actual, per_month: float, settings: Settings) -> None:
    """The measured figures on the deployed version's MLflow run (`cost.actual.*` metrics, each
    estimate's error); a registry that cannot be reached is a warning, not a failed report."""
    import logging

    from pipelines import registry

    metrics = {"cost.actual.usd_per_month": per_month}
    for c in actual.classes:
        where = f"{c.group}.{c.device_class}"
        for name, value in (("energy_j_per_inference", c.energy_j_per_inference), ("p95_ms", c.p95_ms)):
            if value is not None:
                metrics[f"cost.actual.{where}.{name}"] = value
        for name, error in c.errors.items():
            metrics[f"cost.estimate_error.{where}.{name}"] = error
    try:
        version = registry.client(settings.tracking_uri).get_model_version_by_alias(model, registry.CHAMPION_ALIAS)
        registry.log_evidence(settings.tracking_uri, version.run_id, "finops", [], metrics)
    except Exception as error:  # noqa: BLE001 (the report stands without the registry)
        logging.getLogger(__name__).warning("actual cost of %s not logged to MLflow: %s", model, error)
