"""Spend forecast on simulated histories with a known trend, weekly pattern and spikes."""

from __future__ import annotations

from datetime import date

import pandas as pd
import pytest

from pipelines.finops.forecast import (
    Forecast,
    forecast_spend,
    forecast_verdict,
    load_history,
    plot_forecast,
    report_table,
    simulate_history,
)

GROUPS = {
    # 2000 × 500 × 0.0002 + 2000 × 0.02 GB × 0.5 = 220 USD/day
    "phones": {"devices": 2000, "inferences_per_device_per_day": 500, "bytes_per_device_per_day": 20e6,
               "cost_per_inference_usd": 0.0002, "cost_per_gb_usd": 0.5},
    # 500 × 2000 × 0.0001 + 500 × 0.1 GB × 0.6 = 130 USD/day
    "cameras": {"devices": 500, "inferences_per_device_per_day": 2000, "bytes_per_device_per_day": 100e6,
                "cost_per_inference_usd": 0.0001, "cost_per_gb_usd": 0.6},
}
BASE_USD_PER_DAY = 350.0
TREND_USD_PER_DAY = 2.0
START = date(2025, 1, 6)
DAYS = 90
SPIKE = "2025-02-19"


def simulate(days: int = DAYS, noise: float = 0.01, anomalies: dict[str, float] | None = None) -> pd.DataFrame:
    return simulate_history(GROUPS, days=days, start=START, seed=7, trend_per_day=TREND_USD_PER_DAY / BASE_USD_PER_DAY,
                            weekly_amplitude=0.15, anomalies=anomalies, noise=noise)


@pytest.fixture(scope="module")
def clean() -> pd.DataFrame:
    return simulate()


@pytest.fixture(scope="module")
def clean_forecast(clean) -> Forecast:
    return forecast_spend(clean, horizon_days=30)


def test_recovers_trend_and_total(clean_forecast):
    assert clean_forecast.trend_usd_per_day == pytest.approx(TREND_USD_PER_DAY, rel=0.10)
    truth = simulate(days=DAYS + 30, noise=0.0)
    true_total = truth[truth["date"] >= pd.Timestamp(START) + pd.Timedelta(days=DAYS)]["cost_usd"].sum()
    assert clean_forecast.total_predicted_usd == pytest.approx(true_total, rel=0.05)
    assert clean_forecast.total_lower_usd < clean_forecast.total_predicted_usd < clean_forecast.total_upper_usd
    assert len(clean_forecast.daily) == 30 and clean_forecast.history_days == DAYS
    assert clean_forecast.daily[0]["date"] == "2025-04-06"
    assert all(d["lower"] <= d["predicted"] <= d["upper"] for d in clean_forecast.daily)


def test_clean_series_has_no_anomalies(clean_forecast):
    assert clean_forecast.anomalies == []


def test_spike_is_flagged_alone_and_does_not_bend_the_trend(clean_forecast):
    spiked = forecast_spend(simulate(anomalies={SPIKE: 4.0}), horizon_days=30)
    assert [a["date"] for a in spiked.anomalies] == [SPIKE]
    spike = spiked.anomalies[0]
    assert spike["observed"] > 3 * spike["expected"] and spike["z"] > 3.5
    assert spiked.trend_usd_per_day == pytest.approx(clean_forecast.trend_usd_per_day, rel=0.02)
    assert spiked.total_predicted_usd == pytest.approx(clean_forecast.total_predicted_usd, rel=0.01)
    assert SPIKE in report_table(spiked)


def test_budget_below_projection_breaches(clean):
    projected = forecast_spend(clean).total_predicted_usd
    forecast = forecast_spend(clean, monthly_budget_usd=round(0.8 * projected, 2))
    assert forecast.breach
    assert "exceeds the budget" in forecast.breach_probability_note  # upper bound is above it too
    verdict = forecast_verdict(forecast)
    assert verdict.gate == "forecast_budget" and not verdict.passed
    assert f"{forecast.total_predicted_usd:.2f}" in verdict.reason
    assert f"{forecast.monthly_budget_usd:.2f}" in verdict.reason
    assert verdict.thresholds == {"monthly_budget_usd": forecast.monthly_budget_usd}
    assert verdict.observed["anomalies"] == 0
    assert "breach: yes" in report_table(forecast)


def test_generous_budget_passes(clean):
    forecast = forecast_spend(clean, monthly_budget_usd=100_000.0)
    verdict = forecast_verdict(forecast)
    assert not forecast.breach and verdict.passed
    assert "is within the monthly budget 100000.00 USD" in verdict.reason
    assert "breach: no" in report_table(forecast)
    assert forecast_verdict(forecast_spend(clean)).passed  # no budget: nothing to breach


def test_too_short_history_is_rejected():
    with pytest.raises(ValueError, match=r"^history has 13 days of spend; forecasting needs at least 14$"):
        forecast_spend(simulate(days=13))


def test_missing_column_is_named(tmp_path, clean):
    path = tmp_path / "history.csv"
    clean.drop(columns="cost_usd").to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"^history\.csv: column 'cost_usd' is missing$"):
        load_history(path)
    with pytest.raises(ValueError, match=r"^history: column 'cost_usd' is missing$"):
        forecast_spend(clean.drop(columns="cost_usd"))


def test_bad_values_and_duplicates_are_named(tmp_path, clean):
    bad = clean.astype({"date": str})
    bad.loc[3, "date"] = "not a day"
    bad.to_csv(tmp_path / "dates.csv", index=False)
    with pytest.raises(ValueError, match=r"^dates\.csv: column 'date' row 4: value 'not a day' is not a date$"):
        load_history(tmp_path / "dates.csv")
    pd.concat([clean, clean.iloc[[5]]]).to_csv(tmp_path / "dup.csv", index=False)
    group = clean["device_group"][5]
    with pytest.raises(ValueError, match=rf"^dup\.csv: row {len(clean) + 1} repeats \(date 2025-01-08, "
                                         rf"device_group '{group}'\) of an earlier row$"):
        load_history(tmp_path / "dup.csv")


def test_plot_writes_png(tmp_path, clean):
    history = simulate(anomalies={SPIKE: 4.0})
    forecast = forecast_spend(history, monthly_budget_usd=12_000.0)
    path = plot_forecast(history, forecast, tmp_path / "plots" / "forecast.png", "edge fleet spend")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_load_history_round_trips(tmp_path, clean, suffix):
    path = tmp_path / f"history.{suffix}"
    if suffix == "csv":
        clean.to_csv(path, index=False)
    else:
        clean.to_parquet(path, index=False)
    pd.testing.assert_frame_equal(load_history(path), clean)


def test_simulation_is_deterministic(clean):
    pd.testing.assert_frame_equal(simulate(), clean)
    assert list(clean.columns) == ["date", "device_group", "inferences", "bytes", "active_devices", "cost_usd"]
