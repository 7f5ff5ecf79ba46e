"""The field quality and fairness monitor: how the deployed model does on the inferences whose
true outcome has arrived, per version, device group and sensitive group, and what is done when
it breaks the spec's thresholds.

For one model, `check_field_quality` joins, over `monitoring.field.window` up to `now`:

- the **sampled inferences** devices reported (inference id, version, device group, output;
  a regression's value);
- the **labels** the business system sent for them (`pipelines.operate.feedback`), the latest
  per inference id; labels received more than `monitoring.field.labelWindow` after their
  inference are late and left out; labels of inferences never sampled are counted as unmatched;
- the **sensitive attributes** from the operator's table (`monitoring.field.attributes`),
  joined by inference id on the server: devices never send them.

Per model version it measures accuracy and macro F1 (a regression: mean absolute error), per
device group the same, and per sensitive feature Fairlearn's group metrics and parity gaps (the
release gate's own `group_report`), each with a bootstrap interval (`pipelines.gates.field`).
The checks are the spec's: the quality floors and ceilings of `gates.quality` that labels can
measure (accuracy, f1_macro, mae), on the version and on each device group, and the fairness
limits of `responsibleAI.fairness` (biasScore, equalizedOdds, minGroupAccuracy; a regression's
maxErrorGap). A version with fewer than `monitoring.field.minLabels` labelled inferences, or a
sensitive group under `responsibleAI.fairness.minGroupSize`, is reported, not judged; a check
breaks only when its whole interval lies past the limit.

Evidence goes to the artifact store under `monitoring/<model>/<time>/`: Evidently's
classification (or regression) report of the deployed version's labelled inferences
(`quality.html`), explanations of a sample of them with the spec's method
(`explanations.json`), and the check itself (`quality.json`, written last).

On a breach of the deployed (or canary) version, the spec's `responsibleAI.onBreach` runs in
order: `notify` (the caller's alert channels), `hold` (a commit that stops the canary where it
is, `python -m pipelines rollout <model> --resume` lifts it), `rollback` (a commit restoring the
previous release, as `edge_rollback` does, unless that version breaks the field checks of the
same window too: going back would not help), `retrain` (the caller raises the Asset event
`edge-quality://<model>`, which starts the model's release). Each action is recorded in the
check with its commit; `notify` and `retrain` happen once per breach of a version, not every
hour it lasts.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from pipelines.errors import one_line
from pipelines.records import Record
from pipelines.settings import Settings, get_settings

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

QUALITY_BY = "edge_quality_monitor"
SEED = 20261205
FIELD_METRICS = {"accuracy", "f1_macro", "mae"}
REPORT_ROWS = 200_000  # Evidently's report of a larger window is made on a seeded sample of this many


class FieldError(RuntimeError):
    """The check cannot be made: the attributes table or the deployed artifact is unusable."""


class VersionQuality(Record):
    """One version's figures in the field and the checks on them."""

    version: str
    role: Literal["deployed", "canary", "control", "previous", "other"] = Field(
        description="deployed; canary (in progress); control (the canary's previous version, still serving); "
                    "previous (the version the last rollout replaced); other.")
    sampled: int = Field(description="Sampled inferences of this version in the window.")
    labelled: int = Field(description="Of those, with a label in time.")
    status: Literal["insufficient_labels", "ok", "breach"]
    figures: dict = Field(default_factory=dict, description="Metric -> value, low, high (the interval).")
    device_groups: dict = Field(default_factory=dict, description="Device group -> rows and figures.")
    fairness: dict = Field(default_factory=dict, description="Sensitive feature -> groups, gaps, intervals.")
    checks: list[dict] = Field(default_factory=list)
    breaches: list[str] = Field(default_factory=list, description="The broken checks, one line each.")


class ActionRecord(Record):
    """One remediation action and what came of it."""

    action: Literal["notify", "hold", "rollback", "retrain"]
    status: Literal["done", "skipped", "failed"]
    detail: str
    commit: str | None = None


class QualityCheck(Record):
    """One check of a model's quality and fairness in the field."""

    model: str
    status: Literal["no_release", "insufficient_labels", "ok", "breach"]
    reason: str
    checked_at: str
    window_start: str
    window_end: str
    deployed_version: str | None = None
    canary: bool = False
    previous_version: str | None = None
    min_labels: int
    confidence: float
    resamples: int
    sampled: int = 0
    labels_received: int = 0
    labelled: int = 0
    late: int = Field(0, description="Labels received more than labelWindow after their inference: not judged.")
    unmatched: int = Field(0, description="Labels of inference ids no device sampled in the window.")
    corrections: int = Field(0, description="Labels sent again for the same inference (the latest counts).")
    unknown_labels: int = Field(0, description="Labels that are not a class the model knows.")
    without_attributes: int = Field(0, description="Labelled inferences the attributes table does not cover.")
    versions: list[VersionQuality] = Field(default_factory=list)
    breached_version: str | None = None
    new_breach: bool = False
    explanations: list[dict] = Field(default_factory=list)
    explanation_error: str | None = None
    actions: list[ActionRecord] = Field(default_factory=list)
    report_uri: str | None = None
    summary_uri: str | None = None

    def version(self, version: str | None) -> VersionQuality | None:
        return next((v for v in self.versions if v.version == version), None)

    def figures(self) -> dict:
        """What an alert or an Asset event carries (JSON values only)."""
        breached = self.version(self.breached_version)
        return {"model": self.model, "status": self.status, "version": self.breached_version or self.deployed_version,
                "breaches": breached.breaches if breached else [], "labelled": self.labelled,
                "window_start": self.window_start, "window_end": self.window_end, "report_uri": self.report_uri,
                "summary_uri": self.summary_uri}

    def lines(self) -> list[str]:
        """The check for people: the verdict, the counts, each version's figures and breaches."""
        status = {"breach": "BREACH", "ok": "ok", "insufficient_labels": "insufficient labels",
                  "no_release": "no release"}[self.status]
        out = [f"Field quality of {self.model}: {status}", f"  {self.reason}", "",
               f"  window            {self.window_start} .. {self.window_end}"]
        if self.status == "no_release":
            return out
        out.append(f"  labels            {self.labelled:,} joined of {self.labels_received:,} received "
                   f"({self.sampled:,} sampled inferences; {self.unmatched:,} unmatched, {self.late:,} late, "
                   f"{self.corrections:,} corrections, {self.unknown_labels:,} unknown classes)")
        for version in self.versions:
            figures = ", ".join(f"{k} {v['value']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"
                                for k, v in version.figures.items() if v.get("low") is not None)
            out.append(f"  v{version.version} ({version.role})".ljust(20) + f"{version.labelled:,} labelled: "
                       f"{figures or 'no figures'}; {version.status.replace('_', ' ')}")
            out += [f"      {line}" for line in version.breaches]
        if self.explanations:
            out.append(f"  explanations      {len(self.explanations)} sampled inferences explained")
        for action in self.actions:
            commit = f" (commit {action.commit[:10]})" if action.commit else ""
            out.append(f"  {action.action:<17} {action.status}: {action.detail}{commit}")
        if self.report_uri:
            out.append(f"  report            {self.report_uri}")
        return out


# -- joining what devices sampled with what the business system learned ----------------------------
def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def read_attributes(source: str, spec_path: Path, columns: list[str], settings: Settings) -> pd.DataFrame:
    """The operator's table: `inference_id` and the spec's sensitive features (CSV or Parquet; a
    path relative to the spec's folder, or s3://)."""
    import io

    import pandas as pd

    from pipelines.specs import spec_dir
    from pipelines.storage import ObjectStore, StoreError

    where = f"monitoring.field.attributes {source}"
    try:
        if source.startswith("s3://"):
            folder, _, name = source.rpartition("/")
            data = io.BytesIO(ObjectStore(folder, settings.s3_endpoint_url).read_bytes(name))
        else:
            data = spec_dir(spec_path) / source
        parquet = source.lower().endswith((".parquet", ".pq"))
        table = pd.read_parquet(data) if parquet else pd.read_csv(data, dtype=str, keep_default_na=False)
    except (OSError, StoreError, ValueError) as error:
        raise FieldError(f"{where}: cannot be read: {one_line(error, 200)}") from None
    missing = [c for c in ["inference_id", *columns] if c not in table.columns]
    if missing:
        raise FieldError(f"{where}: no column {missing[0]!r} (needs inference_id and {', '.join(columns)})")
    table = table[["inference_id", *columns]].astype(str)
    return table.drop_duplicates("inference_id", keep="last")


def join_labels(samples: pd.DataFrame, labels: pd.DataFrame, label_window: float) -> tuple[pd.DataFrame, dict]:
    """Sampled inferences with their latest label received in time, and the counts of what was
    left out (late, unmatched, corrections)."""
    received = len(labels)
    latest = labels.drop_duplicates("inference_id", keep="last")
    samples = samples.drop_duplicates("inference_id", keep="last")
    joined = samples.merge(latest, on="inference_id", how="inner")
    delay = (joined["received_at"] - joined["ts"]).dt.total_seconds()
    late = delay > label_window
    counts = {"labels_received": received, "corrections": received - len(latest),
              "unmatched": len(latest) - len(joined), "late": int(late.sum())}
    return joined[~late].reset_index(drop=True), counts


def _class_index(joined: pd.DataFrame, classes: list[str]) -> tuple[pd.DataFrame, int]:
    """Labels as the model's class indices; rows whose label is no class are left out (counted)."""
    index = {str(c): i for i, c in enumerate(classes)}
    truth = joined["label"].astype(str).map(index)
    known = truth.notna()
    out = joined[known].copy()
    out["truth"] = truth[known].astype("int64")
    return out, int((~known).sum())


# -- figures and checks ---------------------------------------------------------------------------------
def _figure(value, samples, confidence: float) -> dict:
    from pipelines.gates.field import interval

    low, high = interval(samples, confidence)
    return {"value": None if value is None or not np.isfinite(value) else round(float(value), 6),
            "low": low, "high": high}


def _classification(rows: pd.DataFrame, by: str | None, n_classes: int, resamples: int, confidence: float,
                    rng: np.random.Generator) -> tuple[dict, dict]:
    """Figures over all rows and per value of column `by` (None: all rows as one group)."""
    from pipelines.gates import field

    groups = rows[by].astype(str).to_numpy() if by else np.zeros(len(rows), dtype=str)
    names, counts = field.confusion(rows["truth"].to_numpy(), rows["prediction"].to_numpy(), groups, n_classes)
    point = field.classification_figures(counts)
    boot = field.classification_figures(field.resample_confusion(counts, resamples, rng))
    overall = {k: _figure(point[k], boot[k], confidence)
               for k in ("accuracy", "f1_macro", "demographic_parity_difference", "equalized_odds_difference",
                         "min_group_accuracy", "accuracy_difference")}
    per_group = {name: {"rows": int(counts[g].sum()),
                        "accuracy": _figure(point["group_accuracy"][g], boot["group_accuracy"][:, g], confidence)}
                 for g, name in enumerate(names)}
    return overall, per_group


def _regression(rows: pd.DataFrame, by: str | None, resamples: int, confidence: float,
                rng: np.random.Generator) -> tuple[dict, dict]:
    from pipelines.gates import field

    errors = (rows["value"] - rows["truth"]).to_numpy(dtype=np.float64)
    groups = rows[by].astype(str).to_numpy() if by else np.zeros(len(rows), dtype=str)
    names, bins = field.error_bins(errors, groups)
    boot = field.resample_mae(bins, resamples, rng)
    maes = [float(np.mean(np.abs(errors[groups == n]))) for n in names]
    overall_boot = field.resample_mae(field.error_bins(errors, np.zeros(len(errors), dtype=str))[1], resamples, rng)[:, 0]
    spread = np.nanmax(boot, axis=1) - np.nanmin(boot, axis=1)
    overall = {"mae": _figure(float(np.mean(np.abs(errors))), overall_boot, confidence),
               "mae_difference": _figure(max(maes) - min(maes) if maes else None, spread, confidence)}
    per_group = {n: {"rows": int((groups == n).sum()), "mae": _figure(maes[g], boot[:, g], confidence)}
                 for g, n in enumerate(names)}
    return overall, per_group


def judge_version(spec, task: str, version: str, role: str, rows: pd.DataFrame, sampled: int,
                  n_classes: int, sensitive: list[str], rng: np.random.Generator) -> VersionQuality:
    """One version's figures and checks (rows: its labelled inferences with `truth`)."""
    from pipelines.gates.field import judge

    cfg, fairness = spec.monitoring.field, spec.responsible_ai.fairness
    enough = len(rows) >= cfg.min_labels
    base = {"version": version, "role": role, "sampled": sampled, "labelled": len(rows)}
    if not len(rows):
        return VersionQuality(**base, status="insufficient_labels")
    measure = (lambda by: _regression(rows, by, cfg.resamples, cfg.confidence, rng)) if task == "regression" else \
        (lambda by: _classification(rows, by, n_classes, cfg.resamples, cfg.confidence, rng))
    overall, _ = measure(None)
    figures = {k: v for k, v in overall.items() if k in FIELD_METRICS}
    checks = []
    rules = {m: r for m, r in spec.gates.quality_for(task).items() if m in FIELD_METRICS}
    _, by_group = measure("device_group")
    device_groups = {}
    for metric, rule in rules.items():
        limit, kind = (rule.min_value, "min") if rule.direction == "higher" else (rule.max_value, "max")
        if limit is None:
            continue
        where = f"gates.quality.{metric}.{'minValue' if kind == 'min' else 'maxValue'}"
        f = figures[metric]
        checks.append(judge(metric, "version", None, len(rows), f["value"], (f["low"], f["high"]), limit, kind,
                            where, enough))
        if metric in ("accuracy", "mae"):
            for group, entry in by_group.items():
                g = entry[metric]
                checks.append(judge(metric, "device group", group, entry["rows"], g["value"], (g["low"], g["high"]),
                                    limit, kind, where, entry["rows"] >= cfg.min_labels))
    for group, entry in by_group.items():
        device_groups[group] = entry
    fairness_figures = {}
    if "fairness" not in spec.gates.waive:
        for feature in sensitive:
            column = attribute(feature)
            known = rows[rows[column].notna()]
            if not len(known):
                continue
            small = {g: int(n) for g, n in known[column].value_counts().items() if n < fairness.min_group_size}
            judged_rows = known[~known[column].isin(list(small))]
            entry = {"rows": len(known), "excluded_small_groups": small}
            if len(judged_rows) and judged_rows[column].nunique() >= 2:
                gaps, groups = (_regression(judged_rows, column, cfg.resamples, cfg.confidence, rng)
                                if task == "regression" else
                                _classification(judged_rows, column, n_classes, cfg.resamples, cfg.confidence, rng))
                entry |= {"by_group": groups, **{k: v for k, v in gaps.items() if k not in FIELD_METRICS}}
                checks += _fairness_checks(spec, task, feature, entry, len(judged_rows), enough)
            fairness_figures[feature] = entry
    breached = [c for c in checks if c.breached]
    return VersionQuality(**base, status="breach" if breached else ("ok" if enough else "insufficient_labels"),
                          figures=figures, device_groups=device_groups, fairness=fairness_figures,
                          checks=[_check_dict(c) for c in checks], breaches=[c.line() for c in breached])


def _fairness_checks(spec, task: str, feature: str, entry: dict, rows: int, enough: bool) -> list:
    from pipelines.gates.field import judge

    fairness = spec.responsible_ai.fairness
    rules = ([("mae_difference", fairness.max_error_gap, "max", "responsibleAI.fairness.maxErrorGap")]
             if task == "regression" else
             [("demographic_parity_difference", fairness.bias_score, "max", "responsibleAI.fairness.biasScore"),
              ("equalized_odds_difference", fairness.equalized_odds, "max", "responsibleAI.fairness.equalizedOdds"),
              ("min_group_accuracy", fairness.min_group_accuracy, "min", "responsibleAI.fairness.minGroupAccuracy")])
    out = []
    for metric, limit, kind, where in rules:
        if limit is None or metric not in entry:
            continue
        f = entry[metric]
        out.append(judge(metric, "sensitive group", feature, rows, f["value"], (f["low"], f["high"]), limit, kind,
                         where, enough))
    return out


def _check_dict(check) -> dict:
    import dataclasses

    return {**dataclasses.asdict(check), "name": check.name, "breached": check.breached, "line": check.line()}


# -- the monitor ------------------------------------------------------------------------------------------
def _roles(deployed: dict) -> tuple[str, str | None, bool]:
    spec = deployed["spec"]
    version = str(spec["modelRef"]["version"])
    rollout = spec.get("rollout") or {}
    canary = bool(rollout) and int(rollout.get("share", 100)) < 100
    previous = str(rollout["previousVersion"]) if rollout.get("previousVersion") else None
    return version, previous, canary


def _previous_check(store, model: str, before: str) -> QualityCheck | None:
    from pipelines.operate.monitor import MONITORING_PREFIX

    keys = sorted(k for k in store.list_keys(f"{MONITORING_PREFIX}/{model}/") if k.endswith("/quality.json")
                  and k.split("/")[-2] < before)
    for key in reversed(keys):
        try:
            return QualityCheck.model_validate_json(store.read_bytes(key))
        except ValueError:
            continue
    return None


def field_frame(ctx, spec_path: Path, settings: Settings, records: list[dict], since: datetime, now: datetime,
                classes: list[str], task: str) -> tuple[pd.DataFrame, dict]:
    """The labelled inferences of the telemetry `records` (with `truth`, device `group` and the
    sensitive attributes) from labels received in [since, now), and the counts of what was left out."""
    from pipelines.edge.telemetry import sampled_outputs
    from pipelines.operate.feedback import read_labels
    from pipelines.specs import parse_duration
    from pipelines.storage import ObjectStore

    cfg = ctx.spec.monitoring.field
    telemetry = ObjectStore(settings.telemetry_url, settings.s3_endpoint_url)
    samples = sampled_outputs(records)
    labels = read_labels(telemetry, ctx.spec.name, since, now)
    joined, counts = join_labels(samples, labels, parse_duration(cfg.label_window))
    counts["sampled"] = len(samples)
    if task == "regression":
        joined = joined.assign(truth=joined["label"].astype("float64"))
        known = joined["value"].notna()
        counts["unknown_labels"] = int((~known).sum())
        joined = joined[known]
    else:
        joined, counts["unknown_labels"] = _class_index(joined, classes)
    sensitive = list(ctx.spec.data.sensitive_features)
    counts["without_attributes"] = 0
    if cfg.attributes and sensitive and len(joined):
        table = read_attributes(cfg.attributes, spec_path, sensitive, settings)
        joined = joined.merge(table.rename(columns=dict(zip(sensitive, map(attribute, sensitive)))),
                              on="inference_id", how="left")
        counts["without_attributes"] = int(joined[attribute(sensitive[0])].isna().sum())
    else:
        for column in sensitive:
            joined[attribute(column)] = None
    return joined.reset_index(drop=True), counts


def attribute(feature: str) -> str:
    """The column of a sensitive attribute in the joined frame (apart from the frame's own)."""
    return f"sensitive:{feature}"


def check_field_quality(spec_path: str | Path, settings: Settings | None = None, now: datetime | None = None,
                        act: bool = True, notify: Callable[[QualityCheck], list[str]] | None = None,
                        retrain: Callable[[QualityCheck], str] | None = None, publish: bool = True) -> QualityCheck:
    """Judge the model's field quality and fairness over the window ending at `now` (default:
    the clock), write the evidence, and, unless `act` is False, run the spec's onBreach actions
    on a breach (`notify` and `retrain` are the caller's: Airflow sends alerts and raises the
    Asset event; without them those two actions are skipped and say so)."""
    from pipelines.edge.telemetry import read_records
    from pipelines.operate.monitor import MONITORING_PREFIX, _stamp, fetch_deployed
    from pipelines.release.context import context
    from pipelines.release.gates import deployed_manifest
    from pipelines.specs import parse_duration
    from pipelines.storage import ObjectStore

    settings = settings or get_settings()
    ctx = context(spec_path, settings)
    spec, model, cfg = ctx.spec, ctx.spec.name, ctx.spec.monitoring.field
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    since = now - timedelta(seconds=parse_duration(cfg.window))
    base = {"model": model, "checked_at": _iso(now), "window_start": _iso(since), "window_end": _iso(now),
            "min_labels": cfg.min_labels, "confidence": cfg.confidence, "resamples": cfg.resamples}
    deployed = deployed_manifest(ctx)
    if deployed is None:
        return QualityCheck(status="no_release", reason=f"{model} has no release in the GitOps repository yet", **base)
    version, previous, canary = _roles(deployed)
    base |= {"deployed_version": version, "previous_version": previous, "canary": canary}
    model_path, contract = fetch_deployed(ctx, deployed)
    task = contract.get("edge.task", "binary")
    classes = json.loads(contract.get("edge.classes") or "[]")
    records = read_records(ObjectStore(settings.telemetry_url, settings.s3_endpoint_url), model, since, now,
                           kind="inference")
    joined, counts = field_frame(ctx, Path(spec_path), settings, records, since, now, classes, task)
    base |= counts | {"labelled": len(joined)}

    rng = np.random.default_rng(SEED)
    role_of = {version: "canary" if canary else "deployed",
               **({previous: "control" if canary else "previous"} if previous else {})}
    sampled = {}
    for record in records:
        sampled[str(record.get("version"))] = sampled.get(str(record.get("version")), 0) + sum(
            1 for s in record.get("samples") or () if "id" in s)
    versions = []
    for name in sorted(set(joined["version"]) | {version}, key=lambda v: (v != version, v)):
        rows = joined[joined["version"] == name]
        versions.append(judge_version(spec, task, name, role_of.get(name, "other"), rows, sampled.get(name, 0),
                                      len(classes), list(spec.data.sensitive_features), rng))
    ours = versions[0]
    if ours.status == "breach":
        broken = [c["name"] for c in ours.checks if c["breached"]]
        status, reason = "breach", f"v{version} breaks {len(broken)} field check(s): " + ", ".join(broken)
    elif ours.status == "ok":
        status, reason = "ok", f"v{version}: every field check passed on {ours.labelled:,} labelled inferences"
    else:
        status, reason = "insufficient_labels", (
            f"v{version}: {ours.labelled:,} labelled inferences in {cfg.window} < monitoring.field.minLabels "
            f"{cfg.min_labels}: no verdict")
    stamp = _stamp(now)
    previous_check = _previous_check(ctx.store, model, stamp)
    new_breach = status == "breach" and not (previous_check and previous_check.status == "breach"
                                             and previous_check.breached_version == version)
    check = QualityCheck(status=status, reason=reason, versions=versions, new_breach=new_breach,
                         breached_version=version if status == "breach" else None, **base)

    folder = f"{MONITORING_PREFIX}/{model}/{stamp}"
    ours_rows = joined[joined["version"] == version]
    if len(ours_rows):
        check = check.model_copy(update={"report_uri": _evidently_report(ctx.store, folder, ours_rows, task, classes)})
        check = _explain(check, ctx, Path(spec_path), settings, model_path, ours_rows, records, task, folder)
    if status == "breach" and act:
        check = check.model_copy(update={"actions": remediate(check, spec, settings, notify, retrain, publish)})
    check = check.model_copy(update={"summary_uri": ctx.store.uri(f"{folder}/quality.json")})
    ctx.store.put_bytes(check.model_dump_json(indent=1).encode(), f"{folder}/quality.json")
    return check


def _evidently_report(store, folder: str, rows: pd.DataFrame, task: str, classes: list[str]) -> str:
    """Evidently's classification (or regression) report of labelled inferences (a seeded sample of
    REPORT_ROWS of them in a larger window: the monitor's own figures use every row), in the store."""
    import pandas as pd
    from evidently import BinaryClassification, DataDefinition, Dataset, MulticlassClassification, Regression, Report
    from evidently.presets import ClassificationPreset, RegressionPreset

    if task == "regression":
        frame = pd.DataFrame({"target": rows["truth"].astype(float), "prediction": rows["value"].astype(float)})
        definition = DataDefinition(regression=[Regression(target="target", prediction="prediction")],
                                    numerical_columns=["target", "prediction"])
        preset = RegressionPreset()
    else:
        # Class indices (a multi-class report names them): Evidently sorts the columns' values,
        # which for a million strings takes tens of seconds and for integers a fraction of one.
        names = {i: str(c) for i, c in enumerate(classes)}
        frame = pd.DataFrame({"target": rows["truth"].astype("int64"), "prediction": rows["prediction"].astype("int64")})
        kind = BinaryClassification(target="target", prediction_labels="prediction", pos_label=1) \
            if len(names) == 2 else MulticlassClassification(target="target", prediction_labels="prediction",
                                                             labels=names)
        definition = DataDefinition(classification=[kind], categorical_columns=["target", "prediction"])
        preset = ClassificationPreset()
    if len(frame) > REPORT_ROWS:
        frame = frame.sample(n=REPORT_ROWS, random_state=SEED)
    snapshot = Report([preset]).run(current_data=Dataset.from_pandas(frame, data_definition=definition),
                                    reference_data=None)
    with tempfile.TemporaryDirectory() as tmp:
        html = Path(tmp) / "quality.html"
        snapshot.save_html(str(html))
        return store.put_file(html, f"{folder}/quality.html")


def _explain(check: QualityCheck, ctx, spec_path: Path, settings: Settings, model_path: Path, rows: pd.DataFrame,
             records: list[dict], task: str, folder: str) -> QualityCheck:
    """Explanations of a sample of the version's labelled inferences (wrong answers in a breached
    group first), in the check and as `explanations.json`. An explainer that fails leaves the
    verdict standing: the error is recorded and logged."""
    import pandas as pd

    spec = ctx.spec
    how = spec.responsible_ai.explainability
    if how.method == "none" or how.samples == 0:
        return check
    method = "lime" if how.method == "permutation_importance" else how.method
    wrong = rows[rows["truth"] != rows["prediction"]] if task != "regression" else rows.iloc[0:0]
    chosen = wrong.sample(n=min(how.samples, len(wrong)), random_state=SEED) if len(wrong) else wrong
    if len(chosen) < how.samples:
        rest = rows.drop(index=chosen.index)
        chosen = pd.concat([chosen, rest.sample(n=min(how.samples - len(chosen), len(rest)), random_state=SEED)])
    wanted = set(chosen["inference_id"])
    inputs = {}
    for record in records:
        for sample in record.get("samples") or ():
            if sample.get("id") in wanted:
                inputs[sample["id"]] = sample["inputs"]
    try:
        from pipelines.gates.explain import local_explanations
        from pipelines.operate.monitor import reference_frame

        reference, features = reference_frame(spec, spec_path, settings, model_path)
        background = reference[features].sample(n=min(how.background_rows, len(reference)), random_state=SEED)
        ids = [i for i in chosen["inference_id"] if i in inputs]
        frame = pd.DataFrame([inputs[i] for i in ids])
        frame = frame.reindex(columns=features)
        explained = local_explanations(model_path, frame, background, method, task, SEED)
    except Exception as error:  # the explainer is evidence, not the verdict
        log.warning("field explanations of %s not made: %s", spec.name, one_line(error, 300))
        return check.model_copy(update={"explanation_error": one_line(error, 300)})
    truth = dict(zip(chosen["inference_id"], chosen["label"]))
    explanations = [{"inference_id": i, "label": _json_value(truth.get(i)), **e.model_dump(mode="json")}
                    for i, e in zip(ids, explained)]
    ctx.store.put_bytes(json.dumps(explanations, indent=1).encode(), f"{folder}/explanations.json")
    return check.model_copy(update={"explanations": explanations})


def _json_value(value):
    return value.item() if hasattr(value, "item") else value


# -- the canary's field checks ---------------------------------------------------------------------------
def canary_field_checks(spec_path: str | Path, settings: Settings, records: list[dict], since: datetime,
                        now: datetime, canary: str, control: str) -> list:
    """Checks of a canary on labelled inferences since its step began, once the canary and the
    control each have `monitoring.field.minLabels` of them: the canary's field accuracy (a
    regression: mean absolute error) no worse than the control's by more than the spec's
    `gates.quality.<metric>.maxRegression` (0.01 when unset), and the canary's parity gap per
    sensitive feature within `responsibleAI.fairness.biasScore` (`maxErrorGap`). Each is failed
    only when its bootstrap interval lies wholly past the limit. Fewer labels: no check."""
    from pipelines.gates import field
    from pipelines.operate.monitor import MonitorError, fetch_deployed
    from pipelines.operate.rollout import CanaryCheck
    from pipelines.release.context import context
    from pipelines.release.gates import deployed_manifest

    ctx = context(spec_path, settings)
    spec, cfg = ctx.spec, ctx.spec.monitoring.field
    deployed = deployed_manifest(ctx)
    if deployed is None:
        return []
    try:
        _, contract = fetch_deployed(ctx, deployed)
        task = contract.get("edge.task", "binary")
        classes = json.loads(contract.get("edge.classes") or "[]")
        joined, _ = field_frame(ctx, Path(spec_path), settings, records, since, now, classes, task)
    except (FieldError, MonitorError) as error:
        # The telemetry checks still judge the canary; the field monitor's own run fails on this.
        log.warning("field checks of the %s canary left out: %s", spec.name, one_line(error, 300))
        return []
    ours, theirs = joined[joined["version"] == canary], joined[joined["version"] == control]
    if len(ours) < cfg.min_labels or len(theirs) < cfg.min_labels:
        return []
    rng = np.random.default_rng(SEED)
    metric = "mae" if task == "regression" else "accuracy"
    rule = spec.gates.quality_for(task).get(metric)
    allowed = rule.max_regression if rule and rule.max_regression is not None else 0.01
    if task == "regression":
        draws = [field.resample_mae(field.error_bins((r["value"] - r["truth"]).to_numpy(), np.zeros(len(r), str))[1],
                                    cfg.resamples, rng)[:, 0] for r in (ours, theirs)]
        points = [float(np.mean(np.abs(r["value"] - r["truth"]))) for r in (ours, theirs)]
        worse, worse_draws = points[0] - points[1], draws[0] - draws[1]
    else:
        draws, points = [], []
        for rows in (ours, theirs):
            _, counts = field.confusion(rows["truth"].to_numpy(), rows["prediction"].to_numpy(),
                                        np.zeros(len(rows), str), len(classes))
            points.append(float(field.classification_figures(counts)["accuracy"]))
            draws.append(field.classification_figures(field.resample_confusion(counts, cfg.resamples, rng))["accuracy"])
        worse, worse_draws = points[1] - points[0], draws[1] - draws[0]
    low, high = field.interval(worse_draws, cfg.confidence)
    checks = [CanaryCheck(
        name=f"field_{metric}_regression", observed=round(worse, 6), threshold=allowed,
        passed=low is None or low <= allowed,
        detail=f"{metric} {points[0]:.3f} vs the control's {points[1]:.3f} on {len(ours):,}/{len(theirs):,} labelled "
               f"inferences: {worse:+.3f} worse [{low:+.3f}, {high:+.3f}] (max {allowed:g})")]
    fairness = spec.responsible_ai.fairness
    limit = fairness.max_error_gap if task == "regression" else fairness.bias_score
    gap = "mae_difference" if task == "regression" else "demographic_parity_difference"
    if "fairness" in spec.gates.waive or limit is None:
        return checks
    for feature in spec.data.sensitive_features:
        column = attribute(feature)
        known = ours[ours[column].notna()]
        sizes = known[column].value_counts()
        known = known[known[column].isin(sizes[sizes >= fairness.min_group_size].index)]
        if known[column].nunique() < 2:
            continue
        figures, _ = (_regression(known, column, cfg.resamples, cfg.confidence, rng) if task == "regression" else
                      _classification(known, column, len(classes), cfg.resamples, cfg.confidence, rng))
        f = figures[gap]
        checks.append(CanaryCheck(
            name=f"field_fairness_gap[{feature}]", observed=f["value"], threshold=limit,
            passed=f["low"] is None or f["low"] <= limit,
            detail=f"{gap} by {feature} {f['value']:.3f} [{f['low']:.3f}, {f['high']:.3f}] on {len(known):,} "
                   f"labelled canary inferences (max {limit:g})"))
    return checks


# -- remediation ----------------------------------------------------------------------------------------
def _rollback_target(model: str, settings: Settings) -> str:
    """The version a rollback would restore (RollbackError when there is none)."""
    from pipelines.gitops.rollback import choose_target, release_history

    history = release_history(settings.remote, settings.gitops_branch, model, settings.work_dir / "gitops")
    return str(choose_target(history, None)["version"])


def remediate(check: QualityCheck, spec, settings: Settings, notify, retrain, publish: bool) -> list[ActionRecord]:
    """Run the spec's onBreach actions, in order, for the breached version; each is recorded."""
    from pipelines.gitops.rollback import RollbackError
    from pipelines.operate.rollback import rollback_release
    from pipelines.operate.rollout import RolloutError, hold_rollout

    version = check.breached_version
    reason = f"field quality breach of v{version}: " + check.reason.split(": ", 1)[-1]
    details = "Field quality check:\n" + "\n".join(check.lines())
    done: list[ActionRecord] = []
    rolled_back = False
    for action in spec.responsible_ai.on_breach:
        try:
            if action in ("notify", "retrain") and not check.new_breach:
                done.append(ActionRecord(action=action, status="skipped",
                                         detail=f"v{version}'s breach was already reported by an earlier check"))
            elif action == "notify":
                channels = notify(check) if notify else None
                done.append(ActionRecord(action=action, status="done" if channels else "skipped",
                                         detail=f"alert sent to {', '.join(channels)}" if channels else
                                         "no alert channel (alerts are sent by the Airflow DAG edge_quality_monitor "
                                         "through its connections)" if notify is None else "no alert channel configured"))
            elif action == "retrain":
                event = retrain(check) if retrain else None
                done.append(ActionRecord(action=action, status="done" if event else "skipped",
                                         detail=f"Asset event {event} raised: the model's release retrains" if event else
                                         "the retraining event is raised by the Airflow DAG edge_quality_monitor"))
            elif action == "hold":
                if rolled_back or not check.canary:
                    done.append(ActionRecord(action=action, status="skipped", detail=(
                        "rolled back already" if rolled_back else f"no canary in progress: v{version} runs on every device")))
                    continue
                commit = hold_rollout(spec.name, reason, QUALITY_BY, settings, details=details, publish=publish)
                done.append(ActionRecord(action=action, status="done" if commit else "skipped", commit=commit,
                                         detail=f"canary of v{version} held where it is" if commit else "already held"))
            elif action == "rollback":
                target = _rollback_target(spec.name, settings)
                earlier = check.version(target)
                if earlier is not None and earlier.status == "breach":
                    done.append(ActionRecord(action=action, status="skipped", detail=(
                        f"v{target} breaks {len(earlier.breaches)} field check(s) of the same window too: rolling "
                        "back would not help")))
                    continue
                result = rollback_release(spec.name, target, reason, QUALITY_BY, settings, details=details,
                                          publish=publish)
                rolled_back = True
                done.append(ActionRecord(action=action, status="done", commit=result.commit,
                                         detail=f"v{result.from_version} -> v{result.to_version}"))
        except (RollbackError, RolloutError) as error:
            done.append(ActionRecord(action=action, status="skipped", detail=one_line(error, 300)))
        except Exception as error:  # one failed action must not stop the next (a rollback after a failed alert)
            log.warning("onBreach %s of %s failed: %s", action, spec.name, one_line(error, 300))
            done.append(ActionRecord(action=action, status="failed", detail=one_line(error, 300)))
    return done
