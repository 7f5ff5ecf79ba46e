"""
### Edge drift monitor

Hourly, for every model spec: the deployed model's training reference against the inputs
and outputs devices sampled in their inference telemetry over the spec's
`monitoring.window` (Evidently's DataDriftPreset; a glob group of features such as
`pixel_*` is compared as its row-wise mean and standard deviation; the prediction as a
category). The report and the check's JSON go to the artifact store under
`monitoring/<model>/<time>/`.

When the share of drifted columns reaches the spec's `monitoring.driftShare`, the task
`check__<model>` raises the Asset event `edge-drift://<model>` with the figures (drifted
share, drifted columns, the prediction's drift score, row counts, window, deployed version,
versions seen, report URI) as its extra; the model's release DAG is scheduled on that Asset,
so a drift starts a retraining release that records the figures as its trigger; people are
alerted with the same figures. No drift,
too few sampled rows, or no release yet: the task is skipped with the reason in its log, and
no event is raised.

A spec that does not validate gets no check here (its release DAG shows the error); the
other models are checked as usual.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import dag, task
from edge_airflow import alerts, connections, operations
from edge_airflow.assets import drift_asset

from pipelines.specs import SpecError, load_specs, specs_folder

_LOADED = load_specs(specs_folder())
SPECS = {spec.name: str(path) for path, spec in _LOADED.items() if not isinstance(spec, SpecError)}
INVALID = {path.stem: str(spec).splitlines()[0] for path, spec in _LOADED.items() if isinstance(spec, SpecError)}
_DOC = __doc__ + ("\n\n**Specs left out (invalid)**:\n\n" + "\n".join(f"- `{m}`: {e}" for m, e in INVALID.items())
                  if INVALID else "")


@dag(dag_id="edge_drift_monitor", schedule="@hourly", start_date=datetime(2026, 1, 1), catchup=False,
     max_active_runs=1, tags=["edge-release", "monitoring"], doc_md=_DOC,
     default_args={"retries": 2, "retry_delay": timedelta(seconds=30),
                   "pre_execute": connections.pre_execute})
def edge_drift_monitor():
    for model, path in SPECS.items():
        @task(task_id=operations.task_id("check", model), outlets=[drift_asset(model)],
              on_failure_callback=alerts.on_failure(model))
        def check(path: str = path, model: str = model):
            """Raise the drift Asset event with the figures, or skip (a skipped task raises none)."""
            return operations.check_drift(path, model)

        check()


edge_drift_monitor()
