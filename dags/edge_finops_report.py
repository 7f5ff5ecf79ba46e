"""
### Edge FinOps report

Daily, for every released model: a 30-day spend forecast (trend and weekly seasonality,
with an interval) from the fleet's telemetry history, anomalous days, and the forecast
against the model's monthly budget. The report (table, plot, JSON) goes to the artifact
store under `finops/<model>/<date>/`. A forecast breach logs a warning, raises the Asset
event `edge-finops://<model>` with the figures, for a follow-up DAG, and runs the spec's
`finops.onBreach` in order: `notify` (alerts), `lower_sampling` (a commit halving the devices'
telemetry sample rate, down to `finops.minSampleRate`), `cheaper_variant` (a commit switching
device groups to the release's cheapest eligible variant), `pause_rollout` (a commit holding a
canary); with `finops.review` the commits go to the review branch `finops/<model>/<date>`. The
task log, `finops/<model>/<date>/actions.json` and the model's page of Edge Releases say what
each did.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import dag, task
from edge_airflow import alerts, connections, operations
from edge_airflow.assets import DESIRED_STATE, finops_breach_asset

from pipelines.specs import discover_specs, specs_folder


@dag(dag_id="edge_finops_report", schedule="@daily", start_date=datetime(2026, 1, 1), catchup=False,
     max_active_runs=1, tags=["edge-release", "finops"], doc_md=__doc__,
     default_args={"pre_execute": connections.pre_execute})
def edge_finops_report():
    for model in sorted(discover_specs(specs_folder())):
        @task(task_id=operations.task_id("forecast", model), on_failure_callback=alerts.on_failure(model))
        def forecast(model: str = model):
            return operations.forecast(model)

        @task(task_id=operations.task_id("alert", model), outlets=[finops_breach_asset(model), DESIRED_STATE],
               on_failure_callback=alerts.on_failure(model))
        def alert(report: dict, model: str = model):
            """Raise the breach Asset event and act as the spec says, or skip (a skipped task
            raises no event)."""
            return operations.alert_on_breach(report, model)

        alert(forecast())


edge_finops_report()
