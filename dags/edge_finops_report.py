"""
### Edge FinOps report

Daily, for every released model: a 30-day spend forecast (trend and weekly seasonality,
with an interval) from the fleet's telemetry history, anomalous days, and the forecast
against the model's monthly budget. The report (table, plot, JSON) goes to the artifact
store under `finops/<model>/<date>/`. A forecast breach logs a warning and raises the Asset
event `edge-finops://<model>` with the figures, for alerting or a follow-up DAG.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from airflow.sdk import Asset, dag, get_current_context, task

from pipelines import connections
from pipelines.specs import discover_specs

SPECS_DIR = Path(os.environ.get("EDGE_SPECS_DIR", Path(__file__).resolve().parent.parent / "model_specs"))
MODELS = sorted(discover_specs(SPECS_DIR))


def _breach_asset(model: str) -> Asset:
    return Asset(f"edge-finops://{model}")


@dag(dag_id="edge_finops_report", schedule="@daily", start_date=datetime(2026, 1, 1), catchup=False,
     max_active_runs=1, tags=["edge-release", "finops"], doc_md=__doc__,
     default_args={"pre_execute": connections.pre_execute})
def edge_finops_report():
    for model in MODELS:
        @task(task_id=f"forecast__{model}")
        def forecast(model: str = model):
            from airflow.exceptions import AirflowSkipException

            from pipelines.finops.report import finops_report
            from pipelines.release import latest_summary

            if latest_summary(model) is None:
                raise AirflowSkipException(f"{model} has not been released yet")
            as_of = get_current_context()["dag_run"].run_after.date()  # the run's own date, never now()
            return finops_report(model, as_of).to_xcom()

        @task(task_id=f"alert__{model}", outlets=[_breach_asset(model)])
        def alert(report: dict, model: str = model):
            """Raise the breach Asset event, or skip (a skipped task raises no event)."""
            import logging

            from airflow.exceptions import AirflowSkipException

            if not report["breach"]:
                raise AirflowSkipException(f"{model}: {report['reason']}")
            logging.getLogger(__name__).warning("FORECAST BUDGET BREACH %s: %s", model, report["reason"])
            get_current_context()["outlet_events"][_breach_asset(model)].extra = {
                "total_predicted_usd": report["total_predicted_usd"], "total_upper_usd": report["total_upper_usd"],
                "monthly_budget_usd": report["monthly_budget_usd"], "as_of": report["as_of"],
                "report": report["evidence"].get("report.txt")}

        alert(forecast())


edge_finops_report()
