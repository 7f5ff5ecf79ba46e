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
    store = ObjectStore(settings.store_url, settings.s3_endpoint_url)
    prefix = f"finops/{model}/{as_of.isoformat()}"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "forecast.json").write_text(json.dumps(
            {"forecast": forecast.model_dump(mode="json"), "verdict": verdict.model_dump(mode="json"),
             "history_source": source, "simulated": simulated}, indent=2))
        (folder / "report.txt").write_text(
            f"{model}: 30-day spend forecast as of {as_of} ({source})\n\n{report_table(forecast)}\n")
        plot_forecast(history, forecast, folder / "forecast.png",
                      f"{model}: daily spend and 30-day forecast" + (" (simulated history)" if simulated else ""))
        evidence = {p.name: store.put_file(p, f"{prefix}/{p.name}") for p in sorted(folder.iterdir())}
    return FinOpsReport(model=model, as_of=as_of.isoformat(), history_source=source, simulated=simulated,
                        breach=forecast.breach, total_predicted_usd=forecast.total_predicted_usd,
                        total_upper_usd=forecast.total_upper_usd, monthly_budget_usd=budget,
                        anomalies=forecast.anomalies, reason=verdict.reason, evidence=evidence)
