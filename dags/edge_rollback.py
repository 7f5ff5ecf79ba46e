"""
### Edge rollback

Puts a model's previous release back on the fleet: a GitOps commit that restores the target
release's manifests, marked as a rollback and saying who asked and why. Edge clusters and
devices reconcile it like any release. MLflow's `champion` alias moves to the restored
version; the rolled-back version is tagged so a re-run of its release does not commit it again.
The rollback, or its failure, is alerted to people (the Airflow connections `edge_alerts_*`).
"""


from __future__ import annotations

from datetime import datetime

from airflow.sdk import dag, task
from edge_airflow import alerts, connections, operations
from edge_airflow.assets import DESIRED_STATE
from edge_airflow.params import rollback_params

from pipelines.specs import discover_specs, specs_folder


@dag(dag_id="edge_rollback", schedule=None, start_date=datetime(2026, 1, 1), catchup=False, max_active_runs=1,
     tags=["edge-release", "rollback"], doc_md=__doc__,
     default_args={"pre_execute": connections.pre_execute, "on_failure_callback": alerts.on_failure()},
     params=rollback_params(sorted(discover_specs(specs_folder()))))
def edge_rollback():
    @task(retries=2, outlets=[DESIRED_STATE])
    def roll_back():
        return operations.roll_back()

    roll_back()


edge_rollback()
