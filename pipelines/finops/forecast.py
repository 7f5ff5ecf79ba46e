"""Spend forecast for an edge fleet: trend plus weekly seasonality, anomalies, budget gate.

History is one row per (day, device group) with the day's inferences, telemetry egress bytes,
active devices and spend. Spend is summed over groups per day, a linear model on
[t, day-of-week one-hot] is fitted, days that the model cannot explain (robust z of the
residual) are flagged and left out of the final fit, and the next `horizon_days` are projected
with a prediction interval and compared with the monthly budget.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.records import GateVerdict, Record

COLUMNS = ("date", "device_group", "inferences", "bytes", "active_devices", "cost_usd")
COUNT_COLUMNS = ("inferences", "bytes", "active_devices")
GROUP_KEYS = ("devices", "inferences_per_device_per_day", "bytes_per_device_per_day",
              "cost_per_inference_usd", "cost_per_gb_usd")
MIN_HISTORY_DAYS = 14
DAYS_PER_MONTH = 30  # the budget is monthly; a horizon of other length gets a prorated budget
BYTES_PER_GB = 1e9


class Forecast(Record):
    """Projected spend over the next `horizon_days` (totals over device groups)."""

    horizon_days: int
    daily: list[dict]
    total_predicted_usd: float
    total_lower_usd: float
    total_upper_usd: float
    interval: float
    monthly_budget_usd: float | None
    breach: bool
    breach_probability_note: str
    anomalies: list[dict]
    trend_usd_per_day: float
    model: str
    history_days: int


# ---------------------------------------------------------------------------------------------
# History: load, validate, simulate


def load_history(path: Path | str) -> pd.DataFrame:
    """Read a CSV or Parquet spend history and validate it (see `validate_history`).

    Raises:
        ValueError: one line naming the file and the offending column or row.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        frame = pd.read_csv(path)
    elif suffix in (".parquet", ".pq"):
        frame = pd.read_parquet(path)
    else:
        raise ValueError(f"{path.name}: unsupported history format {suffix or '(none)'!r}; use .csv or .parquet")
    return validate_history(frame, path.name)


def validate_history(frame: pd.DataFrame, name: str = "history") -> pd.DataFrame:
    """Check columns and types; return a copy with parsed dates, sorted by (date, device_group).

    Counts become int64, `cost_usd` float64, `date` midnight datetime64[ns]. Extra columns are
    kept after the required ones. Rows are numbered from 1 in messages, in the order given.

    Raises:
        ValueError: one line, e.g. "history.csv: column 'cost_usd' is missing".
    """
    for column in COLUMNS:
        if column not in frame.columns:
            raise ValueError(f"{name}: column {column!r} is missing")
    if frame.empty:
        raise ValueError(f"{name}: no rows")
    out = frame.reset_index(drop=True).copy()

    dates = pd.to_datetime(out["date"], errors="coerce")
    if dates.dt.tz is not None:
        dates = dates.dt.tz_localize(None)
    _reject(name, "date", dates.isna(), out["date"], "is not a date")
    _reject(name, "date", dates != dates.dt.normalize(), out["date"], "is not a calendar day (has a time of day)")
    out["date"] = dates.astype("datetime64[ns]")

    groups = out["device_group"]
    _reject(name, "device_group", groups.isna() | (groups.astype(str).str.strip() == ""), groups, "is empty")
    out["device_group"] = groups.astype(str)

    for column in (*COUNT_COLUMNS, "cost_usd"):
        raw = out[column]
        values = pd.to_numeric(raw, errors="coerce") if raw.dtype != bool else raw.astype(float)
        _reject(name, column, values.isna() | ~np.isfinite(values.astype(float)), raw, "is not a number")
        _reject(name, column, values < 0, raw, "is negative")
        if column in COUNT_COLUMNS:
            _reject(name, column, values != np.floor(values), raw, "is not a whole number")
            out[column] = values.astype("int64")
        else:
            out[column] = values.astype("float64")

    duplicated = out.duplicated(["date", "device_group"], keep="first")
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise ValueError(f"{name}: row {row + 1} repeats (date {out['date'][row]:%Y-%m-%d}, "
                         f"device_group {out['device_group'][row]!r}) of an earlier row")

    extra = [c for c in out.columns if c not in COLUMNS]
    return out[[*COLUMNS, *extra]].sort_values(["date", "device_group"], kind="stable").reset_index(drop=True)


def _reject(name: str, column: str, bad: pd.Series, raw: pd.Series, problem: str) -> None:
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise ValueError(f"{name}: column {column!r} row {row + 1}: value {raw.iloc[row]!r} {problem}")


def simulate_history(groups: dict[str, dict], days: int, start: date, seed: int, trend_per_day: float = 0.0,
                     weekly_amplitude: float = 0.0, anomalies: dict[str, float] | None = None, *,
                     noise: float = 0.02) -> pd.DataFrame:
    """SIMULATED spend history for demos and tests: not telemetry from any fleet.

    Per group and day, usage = base × (1 + trend_per_day·i + weekly_amplitude·sin(2π·weekday/7))
    × anomaly multiplier × (1 + ε), with base = devices × per-device rate, i the day index and
    ε ~ N(0, noise) drawn per column from `seed`. Trend and seasonality are additive fractions of
    day-0 usage, so the noiseless daily spend is exactly linear plus weekly (what
    `forecast_spend` fits); its trend in USD/day is trend_per_day × the groups' base daily cost.
    Active devices follow the trend but not the weekday pattern or anomalies.
    cost_usd = inferences × cost_per_inference_usd + bytes / 1e9 × cost_per_gb_usd.

    Args:
        groups: device group -> {devices, inferences_per_device_per_day, bytes_per_device_per_day,
            cost_per_inference_usd, cost_per_gb_usd}.
        days: number of days from `start`.
        seed: seed of the noise; the same arguments give the same frame.
        anomalies: ISO date -> multiplier of that day's usage (all groups).
        noise: relative standard deviation of the multiplicative noise (0 for a noiseless series).

    Returns:
        Frame with the `COLUMNS`, sorted by (date, device_group), as `load_history` returns it.
    """
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    if not groups:
        raise ValueError("groups is empty")
    for group, params in groups.items():
        for key in GROUP_KEYS:
            if key not in params:
                raise ValueError(f"group {group!r}: {key!r} is missing")
    rng = np.random.default_rng(seed)
    dates = pd.date_range(pd.Timestamp(start), periods=days, freq="D")
    index = np.arange(days, dtype=float)
    growth = 1.0 + trend_per_day * index
    level = growth + weekly_amplitude * np.sin(2 * np.pi * dates.dayofweek.to_numpy() / 7)
    if (level <= 0).any() or (growth <= 0).any():
        raise ValueError("trend_per_day and weekly_amplitude drive usage to zero or below within the period")
    spike = np.ones(days)
    for iso, multiplier in (anomalies or {}).items():
        position = (pd.Timestamp(date.fromisoformat(iso)) - dates[0]).days
        if not 0 <= position < days:
            raise ValueError(f"anomaly date {iso} is outside the simulated period "
                             f"{dates[0]:%Y-%m-%d}..{dates[-1]:%Y-%m-%d}")
        spike[position] *= multiplier

    frames = []
    for group in sorted(groups):  # sorted, so the draws do not depend on dict order
        p = groups[group]
        eps = np.clip(rng.normal(0.0, noise, size=(3, days)), -0.5, 0.5) if noise > 0 else np.zeros((3, days))
        devices = float(p["devices"])
        inferences = np.rint(devices * p["inferences_per_device_per_day"] * level * spike * (1 + eps[0]))
        egress = np.rint(devices * p["bytes_per_device_per_day"] * level * spike * (1 + eps[1]))
        active = np.rint(devices * growth * (1 + eps[2] / 4))
        cost = inferences * p["cost_per_inference_usd"] + egress / BYTES_PER_GB * p["cost_per_gb_usd"]
        frames.append(pd.DataFrame({
            "date": dates.astype("datetime64[ns]"), "device_group": group, "inferences": inferences.astype("int64"),
            "bytes": egress.astype("int64"), "active_devices": active.astype("int64"),
            "cost_usd": cost.astype("float64")}))
    history = pd.concat(frames, ignore_index=True)
    return history.sort_values(["date", "device_group"], kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# Forecast


def daily_spend(history: pd.DataFrame) -> pd.Series:
    """Spend per day summed over device groups (validated), indexed by date."""
    frame = validate_history(history)
    return frame.groupby("date")["cost_usd"].sum().sort_index()


def _features(dates: pd.DatetimeIndex, origin: pd.Timestamp) -> np.ndarray:
    """[t (days since origin), Tue..Sun indicators]; Monday is the baseline, absorbed by the intercept."""
    t = ((dates - origin) / pd.Timedelta(days=1)).to_numpy(dtype=float)
    weekday = dates.dayofweek.to_numpy()
    return np.column_stack([t, (weekday[:, None] == np.arange(1, 7)[None, :]).astype(float)])


def _robust_z(residuals: np.ndarray, reference: np.ndarray, floor: float) -> np.ndarray:
    """(r - median) / (1.4826·MAD) with the centre and scale taken from `reference`."""
    centre = float(np.median(reference))
    scale = 1.4826 * float(np.median(np.abs(reference - centre)))
    if scale <= floor:  # more than half the residuals equal: fall back to the mean absolute deviation
        scale = 1.2533 * float(np.mean(np.abs(reference - centre)))
    if scale <= floor:
        return np.zeros_like(residuals)
    return (residuals - centre) / scale


def forecast_spend(history: pd.DataFrame, horizon_days: int = 30, monthly_budget_usd: float | None = None,
                   interval: float = 0.9, anomaly_z: float = 3.5) -> Forecast:
    """Fit trend + weekly seasonality to daily spend and project the next `horizon_days`.

    Anomalies are days whose residual, relative to the fitted value, has a robust z-score
    (median/MAD) above `anomaly_z`. They are removed one at a time (largest |z| first, refitting
    after each), so that a spike neither bends the trend nor, through its weekday coefficient,
    makes the other days of its weekday look anomalous. Removal stops when no remaining day exceeds `anomaly_z`, when a
    quarter of the days are out, or when a removal would leave fewer than 14 days or a weekday
    without data. The interval is a Student-t prediction interval from the residual variance of
    the final fit, including the uncertainty of the fitted coefficients; the total's interval
    treats daily residuals as independent. `breach` compares the predicted total with the
    monthly budget prorated to the horizon (horizon_days / 30 of it; equal for 30 days).

    Args:
        history: frame with the `COLUMNS` (one row per date and device group).
        horizon_days: days to project after the last day of history.
        monthly_budget_usd: budget for 30 days; None for no budget (never a breach).
        interval: coverage of the prediction interval, in (0, 1).
        anomaly_z: robust z-score (median/MAD of the residuals relative to the fit) above which a day
            is an anomaly.

    Raises:
        ValueError: fewer than 14 days of history, or invalid arguments or history.
    """
    from scipy import stats
    from sklearn.linear_model import LinearRegression

    if horizon_days < 1:
        raise ValueError(f"horizon_days must be at least 1, got {horizon_days}")
    if not 0 < interval < 1:
        raise ValueError(f"interval must be in (0, 1), got {interval}")
    if anomaly_z <= 0:
        raise ValueError(f"anomaly_z must be positive, got {anomaly_z}")
    if monthly_budget_usd is not None and monthly_budget_usd < 0:
        raise ValueError(f"monthly_budget_usd must not be negative, got {monthly_budget_usd}")

    spend = daily_spend(history)
    n = len(spend)
    if n < MIN_HISTORY_DAYS:
        raise ValueError(f"history has {n} days of spend; forecasting needs at least {MIN_HISTORY_DAYS}")
    dates = pd.DatetimeIndex(spend.index)
    origin = dates[0]
    x = _features(dates, origin)
    y = spend.to_numpy(dtype=float)
    weekday = dates.dayofweek.to_numpy()
    floor = 1e-9 * max(1.0, float(np.mean(np.abs(y))))

    kept = np.ones(n, dtype=bool)
    while True:
        fit = LinearRegression().fit(x[kept], y[kept])
        expected = fit.predict(x)
        residuals = y - expected
        # Spend noise scales with volume, so z is taken on relative residuals: on absolute ones a
        # growing fleet's late days look anomalous. The floor keeps near-zero fits from exploding.
        relative = residuals / np.maximum(expected, 0.1 * float(np.median(np.abs(y[kept]))) + floor)
        z = _robust_z(relative, relative[kept], 1e-9)
        if (~kept).sum() >= n // 4 or kept.sum() <= MIN_HISTORY_DAYS:
            break
        candidates = [i for i in np.argsort(-np.abs(z)) if kept[i] and abs(z[i]) > anomaly_z
                      and (kept & (weekday == weekday[i])).sum() > 1]
        if not candidates:
            break
        kept[candidates[0]] = False

    # Interval: OLS with an explicit intercept column, as LinearRegression fitted it.
    design = np.column_stack([np.ones(n), x])[kept]
    rank = int(np.linalg.matrix_rank(design))
    dof = max(int(kept.sum()) - rank, 1)
    sigma2 = float(np.sum(residuals[kept] ** 2)) / dof
    inverse = np.linalg.pinv(design.T @ design)
    quantile = float(stats.t.ppf((1 + interval) / 2, dof))

    future_dates = pd.date_range(dates[-1] + pd.Timedelta(days=1), periods=horizon_days, freq="D")
    future_x = _features(future_dates, origin)
    future = np.column_stack([np.ones(horizon_days), future_x])
    raw = fit.predict(future_x)
    half = quantile * np.sqrt(sigma2 * (1 + np.einsum("ij,jk,ik->i", future, inverse, future)))
    predicted = np.clip(raw, 0, None)  # spend is never negative
    daily = [{"date": f"{d:%Y-%m-%d}", "predicted": round(float(p), 4),
              "lower": round(float(max(r - h, 0.0)), 4), "upper": round(float(max(r + h, 0.0)), 4)}
             for d, p, r, h in zip(future_dates, predicted, raw, half)]

    total = float(predicted.sum())
    column_sum = future.sum(axis=0)
    total_se = float(np.sqrt(sigma2 * (horizon_days + column_sum @ inverse @ column_sum)))
    total_raw = float(raw.sum())
    lower, upper = max(total_raw - quantile * total_se, 0.0), max(total_raw + quantile * total_se, 0.0)

    breach = False
    if monthly_budget_usd is None:
        note = "no monthly budget set"
    else:
        budget = monthly_budget_usd * horizon_days / DAYS_PER_MONTH
        breach = total > budget
        probability = float(stats.t.sf((budget - total_raw) / total_se, dof)) if total_se > 0 else float(breach)
        note = (f"P({horizon_days}-day spend > budget {budget:.2f} USD) ≈ {probability:.0%} (Student t, independent "
                f"daily residuals); the {interval:.0%} upper bound {upper:.2f} USD "
                f"{'exceeds' if upper > budget else 'is within'} the budget")

    found = [{"date": f"{dates[i]:%Y-%m-%d}", "observed": round(float(y[i]), 4),
              "expected": round(float(expected[i]), 4), "residual": round(float(residuals[i]), 4),
              "z": round(float(z[i]), 2)}
             for i in range(n) if abs(z[i]) > anomaly_z]

    return Forecast(
        horizon_days=horizon_days, daily=daily, total_predicted_usd=round(total, 4),
        total_lower_usd=round(lower, 4), total_upper_usd=round(upper, 4), interval=interval,
        monthly_budget_usd=monthly_budget_usd, breach=breach, breach_probability_note=note, anomalies=found,
        trend_usd_per_day=round(float(fit.coef_[0]), 6),
        model=(f"LinearRegression on [t (days since {origin:%Y-%m-%d}), day-of-week one-hot (Mon baseline)], "
               f"{int(kept.sum())} of {n} days (anomalies excluded); {interval:.0%} Student-t prediction interval"),
        history_days=n)


# ---------------------------------------------------------------------------------------------
# Gate, plot, table


def _horizon_budget(forecast: Forecast) -> float | None:
    if forecast.monthly_budget_usd is None:
        return None
    return forecast.monthly_budget_usd * forecast.horizon_days / DAYS_PER_MONTH


def forecast_verdict(forecast: Forecast) -> GateVerdict:
    """Gate "forecast_budget": passes unless the predicted total exceeds the (prorated) monthly budget."""
    budget = _horizon_budget(forecast)
    spend = (f"projected {forecast.horizon_days}-day spend {forecast.total_predicted_usd:.2f} USD "
             f"({forecast.interval:.0%} upper {forecast.total_upper_usd:.2f})")
    tail = f"; trend {forecast.trend_usd_per_day:+.2f} USD/day; {len(forecast.anomalies)} anomalous day(s)"
    if budget is None:
        reason = f"no monthly budget set; {spend}{tail}"
    else:
        prorated = "" if forecast.horizon_days == DAYS_PER_MONTH else f" (prorated to {budget:.2f} USD)"
        relation = "exceeds" if forecast.breach else "is within"
        reason = f"{spend} {relation} the monthly budget {forecast.monthly_budget_usd:.2f} USD{prorated}{tail}"
    return GateVerdict(
        gate="forecast_budget", passed=not forecast.breach,
        thresholds={"monthly_budget_usd": forecast.monthly_budget_usd},
        observed={"total_predicted_usd": forecast.total_predicted_usd, "total_upper_usd": forecast.total_upper_usd,
                  "trend_usd_per_day": forecast.trend_usd_per_day, "anomalies": len(forecast.anomalies)},
        reason=reason)


def plot_forecast(history: pd.DataFrame, forecast: Forecast, path: Path, title: str) -> Path:
    """PNG of daily spend: history, forecast, interval band, anomalies and the budget per day."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    spend = daily_spend(history)
    days = pd.to_datetime([d["date"] for d in forecast.daily])
    figure = Figure(figsize=(10, 4.5), layout="constrained")
    FigureCanvasAgg(figure)  # Agg without pyplot: no global state, safe in worker threads
    ax = figure.add_subplot()
    ax.plot(spend.index, spend.to_numpy(), color="tab:blue", lw=1.2, label="history (sum over groups)")
    ax.plot(days, [d["predicted"] for d in forecast.daily], color="tab:orange", lw=1.5, ls="--", label="forecast")
    ax.fill_between(days, [d["lower"] for d in forecast.daily], [d["upper"] for d in forecast.daily],
                    color="tab:orange", alpha=0.25, label=f"{forecast.interval:.0%} interval")
    if forecast.anomalies:
        ax.scatter(pd.to_datetime([a["date"] for a in forecast.anomalies]),
                   [a["observed"] for a in forecast.anomalies], color="tab:red", marker="x", s=60, zorder=3,
                   label="anomaly")
    if forecast.monthly_budget_usd is not None:
        ax.hlines(forecast.monthly_budget_usd / DAYS_PER_MONTH, days[0], days[-1], colors="tab:red", linestyles=":",
                  label="budget per day")
    ax.set_title(title)
    ax.set_ylabel("USD per day")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    figure.autofmt_xdate()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, format="png")
    return path


def report_table(forecast: Forecast) -> str:
    """Plain-text summary: weekly totals of the forecast, total, budget, breach, anomalies."""
    lines = [f"{'week':<6}{'from':<12}{'to':<12}{'days':>5}{'predicted USD':>16}", "-" * 51]
    for week, first in enumerate(range(0, len(forecast.daily), 7), start=1):
        chunk = forecast.daily[first:first + 7]
        lines.append(f"{week:<6}{chunk[0]['date']:<12}{chunk[-1]['date']:<12}{len(chunk):>5}"
                     f"{sum(d['predicted'] for d in chunk):>16,.2f}")
    lines.append("-" * 51)
    lines.append(f"{'total':<35}{forecast.horizon_days:>5}{forecast.total_predicted_usd:>16,.2f}")
    lines.append(f"{forecast.interval:.0%} interval: {forecast.total_lower_usd:,.2f} .. "
                 f"{forecast.total_upper_usd:,.2f} USD")
    budget = _horizon_budget(forecast)
    if budget is None:
        lines.append("budget: none set")
    else:
        prorated = "" if forecast.horizon_days == DAYS_PER_MONTH else f" ({budget:,.2f} for {forecast.horizon_days} days)"
        lines.append(f"budget: {forecast.monthly_budget_usd:,.2f} USD per month{prorated}")
        lines.append(f"breach: {'yes' if forecast.breach else 'no'}; {forecast.breach_probability_note}")
    lines.append(f"trend: {forecast.trend_usd_per_day:+,.2f} USD/day over {forecast.history_days} days of history")
    if forecast.anomalies:
        lines.append("anomalies:")
        for a in forecast.anomalies:
            lines.append(f"  {a['date']}  observed {a['observed']:,.2f}  expected {a['expected']:,.2f}  z {a['z']:+.1f}")
    else:
        lines.append("anomalies: none")
    return "\n".join(lines)
