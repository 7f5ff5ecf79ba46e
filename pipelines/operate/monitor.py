"""The drift monitor: what devices see now against what the deployed model was trained on.

For one model spec, `check_drift` compares

- the **reference**: the training rows of the spec's data (the same split and seed as the
  release), at most `REFERENCE_ROWS` of them, with the deployed ONNX model's predictions;
- the **current** window: the input samples and outputs devices reported in inference
  telemetry over the spec's `monitoring.window` up to `now`;

with Evidently's DataDriftPreset on every feature and on `prediction` (compared as a
category). A glob group of features (`pixel_*`, hundreds of columns) is compared as its
row-wise mean and standard deviation rather than column by column. The verdict is drift
when the share of drifted columns reaches `monitoring.driftShare`.

The Evidently report and the check's JSON go to the artifact store under
`monitoring/<model>/<YYYYmmddTHHMMSSZ>/`. The check is decided on the `now` it is given (an
Airflow run passes its own time, never the clock), so a re-run writes the same files.

The Airflow DAG `edge_drift_monitor` raises the Asset event `edge-drift://<model>` with the
figures when drift is found; the model's release DAG is scheduled on that Asset.
"""

from __future__ import annotations

import fnmatch
import json
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from pipelines.records import Record
from pipelines.settings import Settings, get_settings

if TYPE_CHECKING:
    import pandas as pd

REFERENCE_ROWS = 5_000
PREDICTION = "prediction"
MONITORING_PREFIX = "monitoring"


class MonitorError(RuntimeError):
    """The check cannot be made: the deployed artifact is unreadable or does not match."""


class DriftCheck(Record):
    """One drift check of one model: the verdict and the figures it rests on."""

    model: str
    status: Literal["no_release", "insufficient_data", "ok", "drift"]
    reason: str
    checked_at: str = Field(description="The `now` the check was made for (UTC, ISO 8601).")
    window_start: str
    window_end: str
    drift_share_threshold: float
    min_rows: int
    deployed_version: str | None = None
    deployed_sha256: str | None = None
    drifted: bool = False
    drifted_share: float | None = None
    drifted_columns: int | None = None
    columns: int | None = Field(None, description="Columns compared (features, group aggregates, prediction).")
    drifted_column_names: list[str] = Field(default_factory=list)
    prediction_drift_score: float | None = Field(
        None, description="Evidently's drift score of `prediction` (a p-value or a distance, by its stat test).")
    prediction_drifted: bool | None = None
    reference_rows: int = 0
    current_rows: int = 0
    telemetry_records: int = 0
    versions_seen: dict[str, int] = Field(default_factory=dict, description="Sampled rows per model version.")
    missing_columns: list[str] = Field(default_factory=list, description="Features no sample carried.")
    report_uri: str | None = None
    summary_uri: str | None = None

    def figures(self) -> dict:
        """The figures an Asset event carries (JSON values only)."""
        keys = ("model", "status", "deployed_version", "drifted_share", "drift_share_threshold", "drifted_columns",
                "columns", "drifted_column_names", "prediction_drift_score", "prediction_drifted",
                "reference_rows", "current_rows", "window_start", "window_end", "versions_seen", "report_uri")
        data = self.to_xcom()
        return {key: data[key] for key in keys}


def _is_pattern(name: str) -> bool:
    return any(ch in name for ch in "*?[")


def group_aggregates(frame: pd.DataFrame, groups: dict[str, list[str]]) -> pd.DataFrame:
    """Each glob group of numeric columns as two columns, `mean(<pattern>)` and `std(<pattern>)`,
    computed row-wise over the group's columns present in `frame`."""
    import pandas as pd

    out = {}
    for pattern, members in groups.items():
        present = [c for c in members if c in frame.columns]
        if not present:
            continue
        values = frame[present].apply(pd.to_numeric, errors="coerce").astype("float64")
        out[f"mean({pattern})"] = values.mean(axis=1)
        out[f"std({pattern})"] = values.std(axis=1, ddof=0)
    return pd.DataFrame(out, index=frame.index)


def feature_groups(patterns: list[str], features: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Split resolved features into plain columns and glob groups (pattern -> its columns)."""
    groups = {p: [f for f in features if fnmatch.fnmatchcase(f, p)] for p in patterns if _is_pattern(p)}
    grouped = {c for members in groups.values() for c in members}
    return [f for f in features if f not in grouped], {p: m for p, m in groups.items() if m}


def comparison_view(frame: pd.DataFrame, plain: list[str], groups: dict[str, list[str]],
                    categorical: set[str]) -> pd.DataFrame:
    """The columns the monitor compares: plain features (numbers as float, categories as a
    pandas category with missing values marked, as the model sees them), glob groups as
    row-wise aggregates, and `prediction` as a category."""
    import pandas as pd

    from pipelines.data import MISSING_CATEGORY

    out = {}
    for column in plain:
        if column not in frame.columns:
            continue
        series = frame[column]
        if column in categorical:
            out[column] = series.astype(object).where(series.notna(), MISSING_CATEGORY).astype(str).astype("category")
        else:
            out[column] = pd.to_numeric(series, errors="coerce").astype("float64")
    view = pd.DataFrame(out, index=frame.index)
    view = pd.concat([view, group_aggregates(frame, groups)], axis=1)
    if PREDICTION in frame.columns:
        view[PREDICTION] = frame[PREDICTION].astype(int).astype(str).astype("category")
    return view


def _stamp(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def reference_frame(spec, spec_path: str | Path, settings: Settings, model_path: Path):
    """Training rows of the spec's data (at most REFERENCE_ROWS, seeded) with the deployed
    model's answers in `prediction` (class index, or a regression's bin); and the resolved features."""
    from pipelines.data import prepare_features, read_source, resolve_features, split
    from pipelines.onnx import export as onnx_export
    from pipelines.specs import spec_dir

    session = onnx_export.session(model_path)
    contract = session.get_modelmeta().custom_metadata_map
    frame = read_source(spec.data, spec_dir(spec_path), settings.s3_endpoint_url)
    train = split(frame, spec.data.target, spec.data.test_size, spec.training.seed,
                  stratified=contract.get("edge.task") != "regression")[0]
    if len(train) > REFERENCE_ROWS:
        train = train.sample(n=REFERENCE_ROWS, random_state=spec.training.seed)
    features = resolve_features(spec.data.features, list(frame.columns))
    model_features = json.loads(contract.get("edge.features") or "null") or features
    outputs = onnx_export.predict(model_path, prepare_features(train, model_features), sess=session)
    reference = train[features].copy()
    # As devices report it: the class, or the bin of a regression's value.
    reference[PREDICTION] = onnx_export.answer_labels(outputs, onnx_export.answer_contract(session)[1])
    return reference, features


def _deployed(ctx) -> dict | None:
    from pipelines.release.gates import deployed_manifest

    return deployed_manifest(ctx)


def fetch_deployed(ctx, deployed: dict) -> tuple[Path, dict[str, str]]:
    """The deployed manifest's model file, checked against its checksum, and its contract (the
    ONNX metadata: task, classes, features)."""
    from pipelines.onnx import export as onnx_export
    from pipelines.storage import sha256_file

    ref = deployed["spec"]["modelRef"]
    version, checksum = str(ref["version"]), str(ref["checksum"]).removeprefix("sha256:")
    try:
        model_path = ctx.fetch(ref["sourceUri"])
    except Exception as error:
        raise MonitorError(f"{ctx.spec.name} v{version}: deployed artifact not readable here: {error}") from error
    if sha256_file(model_path) != checksum:
        raise MonitorError(f"{ctx.spec.name} v{version}: {ref['sourceUri']} does not match its checksum "
                           f"sha256:{checksum}")
    return model_path, dict(onnx_export.session(model_path).get_modelmeta().custom_metadata_map)


def check_drift(spec_path: str | Path, settings: Settings | None = None, now: datetime | None = None) -> DriftCheck:
    """Compare the deployed model's training reference with the telemetry window ending at
    `now` (default: the current time); write the report and the check to the artifact store.

    Returns a DriftCheck whose status is `no_release`, `insufficient_data`, `ok` or `drift`.
    """
    from pipelines.edge.telemetry import read_records, samples_frame
    from pipelines.release.context import context
    from pipelines.specs import parse_duration
    from pipelines.storage import ObjectStore

    settings = settings or get_settings()
    ctx = context(spec_path, settings)
    spec, model = ctx.spec, ctx.spec.name
    monitoring = spec.monitoring
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    since = now - timedelta(seconds=parse_duration(monitoring.window))
    base = {"model": model, "checked_at": _iso(now), "window_start": _iso(since), "window_end": _iso(now),
            "drift_share_threshold": monitoring.drift_share, "min_rows": monitoring.min_rows}

    deployed = _deployed(ctx)
    if deployed is None:
        return DriftCheck(status="no_release", reason=f"{model} has no release in the GitOps repository yet", **base)
    ref = deployed["spec"]["modelRef"]
    version, checksum = str(ref["version"]), str(ref["checksum"]).removeprefix("sha256:")
    base.update(deployed_version=version, deployed_sha256=checksum)

    telemetry = ObjectStore(settings.telemetry_url, settings.s3_endpoint_url)
    records = read_records(telemetry, model, since, now, kind="inference")
    current = samples_frame(records)
    seen = current["version"].fillna("unknown").astype(str).value_counts() if len(current) else {}
    base.update(current_rows=len(current), telemetry_records=len(records),
                versions_seen={str(k): int(v) for k, v in dict(seen).items()})
    if len(current) < monitoring.min_rows:
        return DriftCheck(status="insufficient_data", reason=(
            f"{len(current)} sampled rows in {monitoring.window} ({len(records)} telemetry records) "
            f"< monitoring.minRows {monitoring.min_rows}: no verdict"), **base)

    model_path, _ = fetch_deployed(ctx, deployed)

    from pipelines.data import is_categorical
    from pipelines.gates.drift import drift_report

    reference, features = reference_frame(spec, spec_path, settings, model_path)
    plain, groups = feature_groups(spec.data.features, features)
    categorical = {c for c in plain if is_categorical(reference[c])}
    missing = sorted(c for c in plain if c not in current.columns)
    missing += sorted(f"{p} (all columns)" for p, members in groups.items()
                      if not any(c in current.columns for c in members))
    ref_view = comparison_view(reference, plain, groups, categorical)
    cur_view = comparison_view(current, plain, groups, categorical)
    compared = [c for c in ref_view.columns if c in cur_view.columns]
    share = monitoring.drift_share

    store = ctx.store
    folder = f"{MONITORING_PREFIX}/{model}/{_stamp(now)}"
    with tempfile.TemporaryDirectory() as tmp:
        html = Path(tmp) / "drift.html"
        figures = drift_report(ref_view[compared], cur_view[compared], share, html)
        report_uri = store.put_file(html, f"{folder}/drift.html")
    drifted_share = figures["drifted_share"]
    names = figures["drifted_column_names"]
    drifted = drifted_share is not None and drifted_share >= share
    listed = f": {', '.join(names[:5])}{' …' if len(names) > 5 else ''}" if names else ""
    comparison = ">=" if drifted else "<"
    reason = (f"{figures['drifted_columns']} of {len(compared)} columns drifted "
              f"({(drifted_share or 0):.0%} {comparison} {share:.0%}){listed}; "
              f"v{version}, {len(reference)} reference vs {len(current)} current rows")
    if missing:
        reason += f"; samples lack {', '.join(missing)}"
    check = DriftCheck(
        status="drift" if drifted else "ok", reason=reason, drifted=drifted, drifted_share=drifted_share,
        drifted_columns=figures["drifted_columns"], columns=len(compared), drifted_column_names=names,
        prediction_drift_score=figures["columns"].get(PREDICTION),
        prediction_drifted=PREDICTION in names if PREDICTION in compared else None,
        reference_rows=len(reference), missing_columns=missing, report_uri=report_uri,
        summary_uri=store.uri(f"{folder}/drift.json"), **base)
    # The JSON last: its presence says the check is complete.
    store.put_bytes(check.model_dump_json(indent=2).encode(), f"{folder}/drift.json")
    return check


def spec_path_of(model: str, settings: Settings | None = None) -> Path:
    """The spec file of a model in the settings' specs folder (KeyError naming the model and
    the folder; the message is `error.args[0]`)."""
    from pipelines.specs import discover_specs

    settings = settings or get_settings()
    found = discover_specs(settings.specs_dir)
    if model not in found:
        raise KeyError(f"no spec for {model!r} in {settings.specs_dir} (known: {', '.join(sorted(found)) or 'none'})")
    return found[model]


def format_check(check: DriftCheck) -> str:
    """The check as a short table for people."""
    status = {"drift": "DRIFT", "ok": "ok", "insufficient_data": "insufficient data",
              "no_release": "no release"}[check.status]
    lines = [f"Drift check of {check.model}: {status}", f"  {check.reason}", "",
             f"  window            {check.window_start} .. {check.window_end}"]
    if check.deployed_version:
        lines.append(f"  deployed version  {check.deployed_version}")
    if check.status in ("drift", "ok", "insufficient_data"):
        seen = ", ".join(f"v{v} {n}" for v, n in sorted(check.versions_seen.items())) or "none"
        lines += [f"  rows              {check.reference_rows:,} reference, {check.current_rows:,} current "
                  f"(min {check.min_rows:,}; {check.telemetry_records:,} telemetry records)",
                  f"  versions seen     {seen}"]
    if check.drifted_share is not None:
        lines += [f"  drifted share     {check.drifted_share:.2f} (threshold {check.drift_share_threshold:.2f}): "
                  f"{check.drifted_columns} of {check.columns} columns",
                  f"  drifted columns   {', '.join(check.drifted_column_names) or 'none'}"]
        if check.prediction_drift_score is not None:
            verdict = "drifted" if check.prediction_drifted else "stable"
            lines.append(f"  prediction        {verdict} (score {check.prediction_drift_score:.4g})")
    if check.report_uri:
        lines.append(f"  report            {check.report_uri}")
    return "\n".join(lines)
