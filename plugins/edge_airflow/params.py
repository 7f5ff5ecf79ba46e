"""The trigger forms of the product's DAGs. A release's parameters may only make it do more or
ask more (`pipelines.records.ReleaseOptions`)."""

from __future__ import annotations

from airflow.sdk import Param


def release_params() -> dict[str, Param]:
    """A release's trigger form: `reason`, `force_retrain`, `approval`, `dry_run`."""
    return {
        # Optional in Airflow's form only with "null" among the types: a plain string field is required.
        "reason": Param(None, type=["null", "string"], title="Reason",
                        description="Optional: why this release is started (recorded in MLflow and the summary)."),
        "force_retrain": Param(False, type="boolean", title="Force retrain",
                               description="Retrain and re-run every stage even when the same data, spec and code "
                                           "were released before (otherwise their stored outputs are reused). "
                                           "Makes a new MLflow version and, if every gate passes, a new commit."),
        "approval": Param("spec", type="string", enum=["spec", "manual"], title="Approval",
                          values_display={"spec": "as the spec says", "manual": "a person approves (stricter)"},
                          description="'manual': a person approves this release in Required Actions even when the "
                                      "spec says auto. A run can never relax a manual spec to auto."),
        "dry_run": Param(False, type="boolean", title="Dry run",
                         description="Validate, train, export, register, evaluate every gate and decide, then stop: "
                                     "nothing is published or committed; the summary says what would have happened."),
    }


def rollout_params() -> dict[str, Param]:
    """A rollout step's trigger form: `dry_run`."""
    return {"dry_run": Param(False, type="boolean", description="Analyse only; commit nothing.")}


def rollback_params(models: list[str]) -> dict[str, Param]:
    """A rollback's trigger form: `model` (one of `models`), `target`, `reason`."""
    models = models or ["none"]  # a form needs a choice even before the first spec
    return {
        "model": Param(models[0], type="string", enum=models, description="The model to roll back."),
        "target": Param(None, type=["null", "string"],
                        description="Optional: a version (3 or v3) or a commit sha; empty: the previous version."),
        "reason": Param("", type="string", minLength=5,
                        description="Required, at least 5 characters: why (recorded in the commit and MLflow)."),
    }
