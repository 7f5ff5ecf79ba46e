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
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import Asset, Param, dag, get_current_context, task

from pipelines import connections
from pipelines.edge import DESIRED_STATE_ASSET_URI
from pipelines.specs import SpecError, discover_specs, load_spec, parse_duration

SPECS_DIR = Path(os.environ.get("EDGE_SPECS_DIR", Path(__file__).resolve().parent.parent / "model_specs"))


def build_rollout_dag(spec_path: Path, spec):
    @dag(dag_id=f"edge_rollout__{spec.name}",
         schedule=timedelta(seconds=parse_duration(spec.deployment_strategy.canary.interval)),
         start_date=datetime(2026, 1, 1), catchup=False, max_active_runs=1,
         tags=["edge-release", "rollout", spec.name], doc_md=__doc__,
         default_args={"pre_execute": connections.pre_execute},
         params={"dry_run": Param(False, type="boolean", description="Analyse only; commit nothing.")})
    def rollout():
        @task(retries=2, retry_delay=timedelta(seconds=10), outlets=[Asset(DESIRED_STATE_ASSET_URI)])
        def analyze_and_act():
            from pipelines.rollout import step_rollout

            with connections.signing_settings() as settings:
                result = step_rollout(spec_path, dry_run=bool(get_current_context()["params"]["dry_run"]),
                                      settings=settings, publish=False)
            print("\n".join(result.lines()))
            if result.commit:
                print(f"{result.decision.upper()} committed: {result.commit}")
            return result.to_xcom()

        analyze_and_act()

    return rollout()


for _path in discover_specs(SPECS_DIR).values():
    try:
        _spec = load_spec(_path)
    except SpecError:
        continue  # edge_release__<model> shows the error
    if _spec.deployment_strategy.type == "Canary":
        build_rollout_dag(_path, _spec)
