"""Read models of the Edge Releases charts: figures over time and per group, assembled from
what the pipeline stores (no Airflow, no drawing here; `charts` draws them).

- `cost_trend(model, settings, summary=None)`: cost per device group of the latest release
  (`releases/<model>/latest.json`, or the summary given) against the monthly budget, and the
  newest 30-day forecast of the daily FinOps job (`finops/<model>/<date>/forecast.json`).
- `fairness_groups(model, settings, summary=None)`: selection rate and error (MAE for a
  regression) per sensitive group, from the fairness gate's `fairness_by_group.csv` evidence,
  with the limits the gate's thresholds put on them.
- `drift_trend(model, settings)`: the drift monitor's checks (`monitoring/<model>/<stamp>/drift.json`).
- `canary_trend(model, settings)`: the canary analyses `step_rollout` saves
  (`rollouts/<model>/<stamp>.json`).
- `versions_running(model, settings)`: devices per version and device group, per day or hour,
  from the telemetry store (a bounded window and a cap on the records read).
- `quantization_points(summary)`: size, latency and score of each quantization candidate.

Each returns None when nothing is recorded yet. A name that cannot be a model's raises
`views.UnknownModel`; a store that cannot be read StoreError; a file that is not what its writer
writes ValueError or KeyError: for the caller to show as a problem.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Literal

from pydantic import Field

from edge_ui.views import check_model_name
from pipelines.edge import telemetry
from pipelines.operate.monitor import MONITORING_PREFIX
from pipelines.operate.rollout import ROLLOUTS_PREFIX, AnalysisRecord, CanaryCheck
from pipelines.records import GateVerdict, QuantCandidate, Record
from pipelines.settings import Settings, get_settings
from pipelines.storage import ObjectStore

FINOPS_PREFIX = "finops"
FAIRNESS_CSV = "fairness_by_group.csv"
MAX_POINTS = 200  # most drift checks or canary analyses read (the newest)
MAX_RECORDS = 50_000  # most telemetry records `versions_running` parses
MAX_HOURLY_DAYS = 7  # the longest window counted per hour (168 buckets; per day beyond)
RUNNING_STATES = ("active", "unchanged")  # agent states in which a status record's version serves


# -- records -------------------------------------------------------------------------------------
class GroupCostPoint(Record):
    group: str
    variant: str | None = None
    usd_per_month: float


class CostForecast(Record):
    """The newest forecast of the daily FinOps job (totals over device groups)."""

    as_of: str = Field(description="The day the forecast was made for (ISO date).")
    horizon_days: int
    predicted_usd: float
    lower_usd: float
    upper_usd: float
    interval: float = Field(description="Coverage of the interval, e.g. 0.9.")
    monthly_budget_usd: float | None = None
    breach: bool
    simulated: bool = Field(description="The history it rests on was simulated from the release estimate.")
    uri: str


class CostTrend(Record):
    model: str
    version: str | None = Field(None, description="The release whose estimate `groups` come from.")
    groups: list[GroupCostPoint] = Field(default_factory=list)
    training_usd_per_month: float = 0.0
    total_usd_per_month: float | None = None
    budget_usd_per_month: float | None = None
    forecast: CostForecast | None = None


class GroupFigures(Record):
    """One sensitive group's row of the fairness gate's table."""

    feature: str
    group: str
    count: int | None = None
    selection_rate: float | None = None
    error: float | None = Field(None, description="1 - accuracy.")
    mae: float | None = None
    note: str = Field("", description="Why the group has no figures (too small to compare).")


class FairnessLimit(Record):
    """What the gate allows one metric of the groups of one feature."""

    feature: str
    metric: Literal["selection_rate", "error", "mae"]
    value: float = Field(description="The largest value the gate allows a group.")
    rule: str = Field(description="Where it comes from, e.g. `lowest group + biasScore 0.2`.")


class FairnessGroups(Record):
    model: str
    version: str | None = None
    variant: str | None = Field(None, description="The variant the evidence measures (the chosen one).")
    task: Literal["binary", "multiclass", "regression"]
    passed: bool
    groups: list[GroupFigures]
    limits: list[FairnessLimit] = Field(default_factory=list)
    evidence_uri: str


class DriftPoint(Record):
    checked_at: str
    status: str
    drifted_share: float | None = None
    threshold: float | None = None
    deployed_version: str | None = None


class DriftTrend(Record):
    model: str
    points: list[DriftPoint] = Field(description="Oldest first.")


class CanaryPoint(Record):
    at: str
    decision: str
    version: str | None = None
    previous_version: str | None = None
    step: int | None = None
    steps: int | None = None
    share: int | None = Field(None, description="Percent of the devices on the canary when analysed.")
    share_after: int | None = Field(None, description="Percent after the decision (0 after a rollback).")
    checks: list[CanaryCheck] = Field(default_factory=list)
    commit: str | None = None


class CanaryTrend(Record):
    model: str
    points: list[CanaryPoint] = Field(description="Oldest first.")


class VersionCount(Record):
    bucket: str = Field(description="Start of the day (YYYY-MM-DD) or hour (YYYY-MM-DDTHH:00Z), UTC.")
    group: str
    version: str
    devices: int


class VersionsRunning(Record):
    model: str
    per: Literal["day", "hour"]
    since: str
    until: str
    rows: list[VersionCount] = Field(description="By bucket, group and version.")
    records_read: int
    truncated: bool = Field(False, description="The cap on records was reached: older days were not read.")
    oldest_read: str | None = Field(None, description="The oldest day read when truncated (possibly in part).")


class QuantPoint(Record):
    variant: str
    size_bytes: int
    score: float
    score_change: float
    latency_p50_ms: float
    latency_p95_ms: float
    eligible: bool
    chosen: bool
    note: str = ""


class QuantizationPoints(Record):
    model: str
    version: str | None = None
    metric: str = Field(description="What `score` measures (accuracy, or r2).")
    reason: str = ""
    points: list[QuantPoint]


# -- helpers -------------------------------------------------------------------------------------
def _settings(settings: Settings | None) -> Settings:
    return settings or get_settings()


def _store(settings: Settings) -> ObjectStore:
    return ObjectStore(settings.store_url, settings.s3_endpoint_url)


def _number(value) -> float | None:
    return None if value is None or value == "" or isinstance(value, bool) else float(value)


def _json(store: ObjectStore, key: str) -> dict | None:
    return json.loads(store.read_bytes(key)) if store.exists(key) else None


def _latest_summary(model: str, settings: Settings) -> dict | None:
    return _json(_store(settings), f"releases/{model}/latest.json")


def _newest(keys: list[str], limit: int) -> list[str]:
    """The `limit` greatest keys (their stamps sort by time), oldest first."""
    return sorted(keys)[-limit:] if limit > 0 else []


# -- cost ----------------------------------------------------------------------------------------
def _forecast(store: ObjectStore, model: str) -> CostForecast | None:
    keys = [k for k in store.list_keys(f"{FINOPS_PREFIX}/{model}/") if k.endswith("/forecast.json")]
    if not keys:
        return None
    key = max(keys)
    data = json.loads(store.read_bytes(key))
    forecast = data["forecast"]
    return CostForecast(as_of=key.split("/")[-2], horizon_days=forecast["horizon_days"],
                        predicted_usd=forecast["total_predicted_usd"], lower_usd=forecast["total_lower_usd"],
                        upper_usd=forecast["total_upper_usd"], interval=forecast["interval"],
                        monthly_budget_usd=_number(forecast.get("monthly_budget_usd")), breach=forecast["breach"],
                        simulated=bool(data.get("simulated")), uri=store.uri(key))


def cost_trend(model: str, settings: Settings | None = None, summary: dict | None = None) -> CostTrend | None:
    """Cost per device group of `summary` (default: the latest release's) against the budget,
    with the newest FinOps forecast; None when neither exists."""
    check_model_name(model)
    settings = _settings(settings)
    summary = summary if summary is not None else _latest_summary(model, settings)
    estimate = (summary or {}).get("cost") or {}
    forecast = _forecast(_store(settings), model)
    if not estimate and forecast is None:
        return None
    groups = [GroupCostPoint(group=g["group"], variant=g.get("variant"), usd_per_month=g["total_usd"])
              for g in estimate.get("groups") or []]
    budget = _number(estimate.get("monthly_budget_usd"))
    if budget is None and forecast is not None:
        budget = forecast.monthly_budget_usd
    return CostTrend(model=model, version=str(summary["model_version"]) if estimate else None, groups=groups,
                     training_usd_per_month=_number(estimate.get("training_usd_per_month")) or 0.0,
                     total_usd_per_month=_number(estimate.get("total_usd_per_month")),
                     budget_usd_per_month=budget, forecast=forecast)


# -- fairness ------------------------------------------------------------------------------------
def _fairness_verdict(summary: dict) -> GateVerdict | None:
    for verdict in summary.get("verdicts") or []:
        if verdict.get("gate") == "fairness":
            return GateVerdict.model_validate(verdict)
    return None


def _above_lowest(feature: str, measured: list[GroupFigures], metric: str, gap: float | None,
                  spec_key: str) -> list[FairnessLimit]:
    """A gap rule as a limit: the feature's lowest group plus the allowed gap."""
    values = [getattr(g, metric) for g in measured]
    if gap is None or not values or None in values:
        return []
    return [FairnessLimit(feature=feature, metric=metric, value=min(values) + gap,
                          rule=f"lowest group + {spec_key} {gap:g}")]


def _limits(task: str, verdict: GateVerdict, groups: list[GroupFigures]) -> list[FairnessLimit]:
    """The gate's thresholds as the largest value each feature's groups may show: gaps above the
    lowest group (demographic parity on selection rates, the error gap of a regression, or the
    accuracy spread where no parity was measured), and minGroupAccuracy as an error ceiling."""
    thresholds = verdict.thresholds
    bias, floor = _number(thresholds.get("bias_score")), _number(thresholds.get("min_group_accuracy"))
    no_parity = _number(verdict.observed.get("demographic_parity_difference")) is None
    limits = []
    for feature in dict.fromkeys(g.feature for g in groups):
        measured = [g for g in groups if g.feature == feature and not g.note]
        if task == "regression":
            limits += _above_lowest(feature, measured, "mae", _number(thresholds.get("max_error_gap")), "maxErrorGap")
            continue
        if task == "binary":
            limits += _above_lowest(feature, measured, "selection_rate", bias, "biasScore")
        elif no_parity:
            limits += _above_lowest(feature, measured, "error", bias, "biasScore")
        if floor is not None:
            limits.append(FairnessLimit(feature=feature, metric="error", value=1 - floor,
                                        rule=f"1 - minGroupAccuracy {floor:g}"))
    return limits


def fairness_groups(model: str, settings: Settings | None = None,
                    summary: dict | None = None) -> FairnessGroups | None:
    """The fairness gate's figures per group for `summary` (default: the latest release's);
    None without a fairness verdict that has the table as evidence (a waived gate, say)."""
    check_model_name(model)
    settings = _settings(settings)
    summary = summary if summary is not None else _latest_summary(model, settings)
    verdict = _fairness_verdict(summary or {})
    if verdict is None or FAIRNESS_CSV not in verdict.evidence:
        return None
    uri = verdict.evidence[FAIRNESS_CSV]
    store = _store(settings)
    rows = list(csv.DictReader(io.StringIO(store.read_bytes(store.key_of(uri)).decode("utf-8"))))
    columns = set(rows[0]) if rows else set()
    task = "regression" if "mae" in columns else "binary" if "selection_rate" in columns else "multiclass"
    groups = []
    for row in rows:
        accuracy = _number(row.get("accuracy"))
        groups.append(GroupFigures(feature=row["feature"], group=row["group"],
                                   count=int(float(row["count"])) if row.get("count") else None,
                                   selection_rate=_number(row.get("selection_rate")),
                                   error=None if accuracy is None else 1 - accuracy, mae=_number(row.get("mae")),
                                   note=row.get("note") or ""))
    return FairnessGroups(model=model, version=str(summary.get("model_version") or "") or None,
                          variant=str(verdict.observed.get("variant") or "") or None, task=task,
                          passed=verdict.passed, groups=groups, limits=_limits(task, verdict, groups),
                          evidence_uri=uri)


# -- drift ---------------------------------------------------------------------------------------
def drift_trend(model: str, settings: Settings | None = None, limit: int = MAX_POINTS) -> DriftTrend | None:
    """The newest `limit` drift checks of `model`, oldest first; None before the first."""
    check_model_name(model)
    store = _store(_settings(settings))
    prefix = f"{MONITORING_PREFIX}/{model}/"
    local = store.local_path(prefix)
    if local is not None:  # one folder per check; one in progress has no JSON yet (it is written last)
        found = [p.name for p in local.iterdir() if (p / "drift.json").is_file()] if local.is_dir() else []
        keys = [f"{prefix}{stamp}/drift.json" for stamp in found]
    else:
        keys = [k for k in store.list_keys(prefix) if k.endswith("/drift.json")]
    points = []
    for key in _newest(keys, limit):
        data = json.loads(store.read_bytes(key))
        points.append(DriftPoint(checked_at=data["checked_at"], status=data["status"],
                                 drifted_share=_number(data.get("drifted_share")),
                                 threshold=_number(data.get("drift_share_threshold")),
                                 deployed_version=data.get("deployed_version")))
    return DriftTrend(model=model, points=points) if points else None


# -- canary --------------------------------------------------------------------------------------
def _share_after(record: AnalysisRecord) -> int | None:
    if record.decision == "advance":
        return record.next_share
    if record.decision == "rollback":
        return 0
    if record.decision == "complete":
        return 100
    return record.share


def canary_trend(model: str, settings: Settings | None = None, limit: int = MAX_POINTS) -> CanaryTrend | None:
    """The newest `limit` canary analyses of `model`, oldest first; None before the first."""
    check_model_name(model)
    store = _store(_settings(settings))
    keys = [k for k in store.list_keys(f"{ROLLOUTS_PREFIX}/{model}/") if k.endswith(".json")]
    points = []
    for key in _newest(keys, limit):
        record = AnalysisRecord.model_validate_json(store.read_bytes(key))
        points.append(CanaryPoint(at=record.at, decision=record.decision, version=record.version,
                                  previous_version=record.previous_version, step=record.step, steps=record.steps,
                                  share=100 if record.decision == "complete" else record.share,
                                  share_after=_share_after(record), checks=record.checks, commit=record.commit))
    return CanaryTrend(model=model, points=points) if points else None


# -- versions running ----------------------------------------------------------------------------
def _running(record: dict) -> str | None:
    """The version a record shows running: an inference record's, or a status record's in a
    serving state."""
    version = record.get("version")
    if version is None or (record.get("kind", "status") == "status" and record.get("state") not in RUNNING_STATES):
        return None
    return str(version)


def _bucket(moment: datetime, per: str) -> str:
    moment = moment.astimezone(timezone.utc)
    return f"{moment:%Y-%m-%d}" if per == "day" else f"{moment:%Y-%m-%dT%H}:00Z"


def _newest_first(store: ObjectStore, keys: list[str]) -> Iterator[tuple[datetime | None, Callable[[], dict]]]:
    """A device's records of one day, newest first: (the time its object's name gives, or None
    for a line of a local `.jsonl` file; what reads it)."""
    for key in keys:
        if key.endswith(".jsonl"):  # a local store: one line per record, in the order written
            for line in reversed(store.read_bytes(key).decode().splitlines()):
                if line.strip():
                    yield None, partial(json.loads, line)
    stamped = sorted(((int(k.rsplit("-", 1)[1].removesuffix(".json")), k) for k in keys if k.endswith(".json")),
                     reverse=True)
    for millis, key in stamped:  # S3: one object per record, `<device>-<epoch ms>.json`
        yield datetime.fromtimestamp(millis / 1000, tz=timezone.utc), partial(_json, store, key)


def _device_files(store: ObjectStore, model: str, day) -> dict[tuple[str, str], list[str]]:
    """(group, device) -> the keys of its records of `model` on `day`."""
    files: dict[tuple[str, str], list[str]] = {}
    for key in store.list_keys(f"{telemetry.PREFIX}/{model}/{day:%Y-%m-%d}/"):
        parts = key.split("/")
        if len(parts) != 5:
            continue
        name = parts[4]
        if name.endswith(".jsonl"):
            device = name.removesuffix(".jsonl")
        elif name.endswith(".json") and "-" in name:
            device = name.rsplit("-", 1)[0]
        else:
            continue
        files.setdefault((parts[3], device), []).append(key)
    return files


def versions_running(model: str, settings: Settings | None = None, days: int = 30,
                     per: Literal["day", "hour"] = "day", max_records: int = MAX_RECORDS,
                     now: datetime | None = None) -> VersionsRunning | None:
    """Devices per version and device group in each day (or hour) of the `days` before `now`,
    from telemetry: a device counts once per bucket, with the version of its newest record there
    that shows one serving. Days are read newest first, each device's records newest first, and
    at most `max_records` records are parsed (then `truncated`: older days are missing). On S3
    the objects' names give their time: only what can still change a bucket is read. Per hour,
    `days` is at most MAX_HOURLY_DAYS (ValueError)."""
    check_model_name(model)
    if per == "hour" and days > MAX_HOURLY_DAYS:
        raise ValueError(f"per hour, at most {MAX_HOURLY_DAYS} days are counted (asked: {days}); count per day")
    settings = _settings(settings)
    store = ObjectStore(settings.telemetry_url, settings.s3_endpoint_url)
    until = (now or telemetry.utc_now()).astimezone(timezone.utc)
    since = until - timedelta(days=days)
    seen: dict[tuple[str, str, str], str] = {}  # (bucket, group, device) -> version
    read = 0
    day = oldest = until.date()
    while day >= since.date() and read < max_records:
        oldest = day
        for (group, device), keys in sorted(_device_files(store, model, day).items()):
            for moment, load in _newest_first(store, keys):
                if read >= max_records:
                    break
                if moment is not None and (not since <= moment < until
                                           or (_bucket(moment, per), group, device) in seen):
                    continue
                record = load()
                read += 1
                moment = telemetry.parse_timestamp(record["ts"])
                slot, version = (_bucket(moment, per), group, device), _running(record)
                if since <= moment < until and version is not None and slot not in seen:
                    seen[slot] = version
                    if per == "day":
                        break  # the day's partition holds nothing newer for this device
        day -= timedelta(days=1)
    if not seen:
        return None
    counts = Counter((bucket, group, version) for (bucket, group, _), version in seen.items())
    truncated = read >= max_records
    return VersionsRunning(
        model=model, per=per, since=telemetry.timestamp(since), until=telemetry.timestamp(until),
        rows=[VersionCount(bucket=b, group=g, version=v, devices=n) for (b, g, v), n in sorted(counts.items())],
        records_read=read, truncated=truncated, oldest_read=f"{oldest:%Y-%m-%d}" if truncated else None)


# -- quantization --------------------------------------------------------------------------------
def quantization_points(summary: dict) -> QuantizationPoints | None:
    """Each quantization candidate of a stored release summary, the chosen one marked; None
    without candidates."""
    plan = summary.get("quantization") or {}
    candidates = [QuantCandidate.model_validate(c) for c in plan.get("candidates") or []]
    if not candidates:
        return None
    return QuantizationPoints(
        model=str(summary.get("model", "")), version=str(summary.get("model_version") or "") or None,
        metric=plan.get("metric") or "accuracy", reason=plan.get("reason") or "",
        points=[QuantPoint(variant=c.variant, size_bytes=c.size_bytes, score=c.accuracy,
                           score_change=c.accuracy_change, latency_p50_ms=c.latency_p50_ms,
                           latency_p95_ms=c.latency_p95_ms, eligible=c.eligible, chosen=c.variant == plan.get("chosen"),
                           note=c.note) for c in candidates])
