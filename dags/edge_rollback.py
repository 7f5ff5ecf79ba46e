"""
### Edge rollback

Puts a model's previous release back on the fleet: a GitOps commit that restores the target
release's manifests, marked as a rollback and saying who asked and why. Edge clusters and
devices reconcile it like any release. MLflow's `champion` alias moves to the restored
version; the rolled-back version is tagged so a re-run of its release does not commit it again.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from airflow.sdk import Asset, Param, dag, get_current_context, task

from pipelines import connections
from pipelines.edge import DESIRED_STATE_ASSET_URI
from pipelines.specs import discover_specs

SPECS_DIR = Path(os.environ.get("EDGE_SPECS_DIR", Path(__file__).resolve().parent.parent / "model_specs"))
MODELS = sorted(discover_specs(SPECS_DIR)) or ["none"]


@dag(dag_id="edge_rollback", schedule=None, start_date=datetime(2026, 1, 1), catchup=False, max_active_runs=1,
     tags=["edge-release", "rollback"], doc_md=__doc__, default_args={"pre_execute": connections.pre_execute},
     params={
         "model": Param(MODELS[0], type="string", enum=MODELS, description="The model to roll back."),
         "target": Param("", type="string",
                         description="Version (3 or v3) or commit sha; empty: the previous version."),
         "reason": Param("", type="string", minLength=5, description="Why (recorded in the commit and MLflow)."),
     })
def edge_rollback():
    @task(retries=2, outlets=[Asset(DESIRED_STATE_ASSET_URI)])
    def roll_back():
        from airflow.exceptions import AirflowFailException

        from pipelines.gitops.rollback import RollbackError
        from pipelines.release import rollback_release

        context = get_current_context()
        params = context["params"]
        by = getattr(context["dag_run"], "triggering_user_name", None) or "airflow"
        try:
            with connections.signing_settings() as settings:
                result = rollback_release(params["model"], params["target"] or None, params["reason"], by,
                                          settings=settings, publish=False)
        except RollbackError as error:
            raise AirflowFailException(f"{params['model']}: {error}") from None
        print(f"ROLLED BACK {result.model}: version {result.from_version} -> {result.to_version}, "
              f"commit {result.commit} by {by}")
        return result.to_xcom()

    roll_back()


edge_rollback()
