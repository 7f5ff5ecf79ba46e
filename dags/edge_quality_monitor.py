"""
### Edge field quality monitor

Hourly, for every model spec: the deployed version's quality and fairness on the inferences
whose true outcome has arrived (`python -m pipelines feedback`, or `POST
/edge/api/models/<model>/feedback`), over the spec's `monitoring.field.window`: accuracy and
macro F1 (a regression: mean absolute error) per version and device group, and Fairlearn's group
metrics and parity gaps per sensitive group (attributes joined on the server from the operator's
table, `monitoring.field.attributes`), each with a bootstrap interval; a version or group with
too few labels is reported, not judged. Evidence (Evidently's classification or regression
report, explanations of sampled inferences, the check's JSON) goes to the artifact store under
`monitoring/<model>/<time>/`.

On a breach, the spec's `responsibleAI.onBreach` runs in order: `notify` (the alert channels of
`edge_airflow.alerts`), `hold` (a commit that stops the canary), `rollback` (a commit restoring
the previous release), `retrain` (the task `retrain__<model>` raises the Asset event
`edge-quality://<model>`, which starts the model's release). The task log and the check's JSON
say what each action did. No release or too few labels: `check__<model>` is skipped with the
reason.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import dag, task
from edge_airflow import connections, operations, quality
from edge_airflow.alerts import on_failure
from edge_airflow.assets import DESIRED_STATE, quality_asset

from pipelines.specs import SpecError, load_specs, specs_folder

_LOADED = load_specs(specs_folder())
SPECS = {spec.name: str(path) for path, spec in _LOADED.items() if not isinstance(spec, SpecError)}
INVALID = {path.stem: str(spec).splitlines()[0] for path, spec in _LOADED.items() if isinstance(spec, SpecError)}
_DOC = __doc__ + ("\n\n**Specs left out (invalid)**:\n\n" + "\n".join(f"- `{m}`: {e}" for m, e in INVALID.items())
                  if INVALID else "")


@dag(dag_id="edge_quality_monitor", schedule="@hourly", start_date=datetime(2026, 1, 1), catchup=False,
     max_active_runs=1, tags=["edge-release", "monitoring", "responsible-ai"], doc_md=_DOC,
     default_args={"retries": 2, "retry_delay": timedelta(seconds=30),
                   "pre_execute": connections.pre_execute})
def edge_quality_monitor():
    for model, path in SPECS.items():
        # A hold or a rollback is a commit: the desired-state publisher runs after every check
        # that acted (a no-op when nothing changed).
        @task(task_id=operations.task_id("check", model), on_failure_callback=on_failure(model),
              outlets=[DESIRED_STATE])
        def check(path: str = path, model: str = model):
            """Judge the field quality and fairness; act on a breach as the spec says."""
            return quality.check_quality(path, model)

        @task(task_id=operations.task_id("retrain", model), outlets=[quality_asset(model)])
        def retrain(result: dict, model: str = model):
            """Raise the retraining Asset event, or skip."""
            return quality.raise_retraining(result, model)

        retrain(check())


edge_quality_monitor()
