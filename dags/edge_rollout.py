"""
### Edge rollout: a health-gated canary

One DAG per model spec whose `deploymentStrategy.type` is `Canary` (`edge_rollout__<model>`),
run every `deploymentStrategy.canary.interval`. Each run reads the inference telemetry of
the devices on the new version (the canary cohort) and of those still on the previous one
(the control cohort) since the current step began, applies the spec's analysis (error rate
and its increase over the control, p95 latency ratio, prediction shift), and then:

- **advance**: a GitOps commit raising `spec.rollout.share` to the next step;
- **hold**: too few canary requests yet, or the step's pause is not over;
- **rollback**: a GitOps commit restoring the previous release (as `edge_rollback` does).

Every commit message carries the analysis. The `dry_run` param analyses without committing.
A rollback (critical) and a failed run are alerted to people.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import dag, task
from edge_airflow import alerts, connections, operations
from edge_airflow.assets import DESIRED_STATE
from edge_airflow.params import rollout_params
from edge_airflow.schedules import rollout_schedule

from pipelines.specs import ModelSpec, load_specs, specs_folder


def build_rollout_dag(spec_path: Path, spec: ModelSpec):
    @dag(dag_id=f"edge_rollout__{spec.name}", schedule=rollout_schedule(spec),
         start_date=datetime(2026, 1, 1), catchup=False, max_active_runs=1,
         tags=["edge-release", "rollout", spec.name], doc_md=__doc__,
         default_args={"pre_execute": connections.pre_execute, "on_failure_callback": alerts.on_failure(spec.name)},
         params=rollout_params())
    def rollout():
        @task(retries=2, retry_delay=timedelta(seconds=10), outlets=[DESIRED_STATE])
        def analyze_and_act():
            return operations.rollout_step(str(spec_path))

        analyze_and_act()

    return rollout()


for _path, _spec in load_specs(specs_folder()).items():
    # An invalid spec has no rollout DAG: edge_release__<model> shows its error.
    if isinstance(_spec, ModelSpec) and _spec.deployment_strategy.type == "Canary":
        build_rollout_dag(_path, _spec)
