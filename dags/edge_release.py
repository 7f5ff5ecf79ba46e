"""
### Edge release: from a model spec to a GitOps commit

One DAG per file in `model_specs/` (`edge_release__<model>`). Each task is one stage of
`pipelines.release`: validate the data (Great Expectations), train, export to ONNX,
build and measure quantized variants, register the chosen one in MLflow (alias
`candidate`), publish it to the artifact store, and commit the `MobileAIModelDeployment`
manifest to the GitOps repository that edge clusters and devices reconcile.

A re-run over the same data, spec and code reuses every stage's output and commits nothing
new. Bad data or an unfaithful export fails the run without retries; store, registry and
Git faults are retried.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import Param, dag, get_current_context, task

from pipelines.specs import SpecError, discover_specs, load_spec

SPECS_DIR = Path(os.environ.get("EDGE_SPECS_DIR", Path(__file__).resolve().parent.parent / "model_specs"))
IO_RETRIES = {"retries": 3, "retry_delay": timedelta(seconds=5), "retry_exponential_backoff": True}


def _stage(name: str, call):
    """Run one stage, record its duration as XCom `seconds`, fail fast on bad input."""
    from airflow.exceptions import AirflowFailException

    from pipelines.release import ReleaseError

    start = time.perf_counter()
    try:
        record = call()
    except (ReleaseError, SpecError) as error:
        raise AirflowFailException(str(error)) from None
    get_current_context()["ti"].xcom_push(key="seconds", value=round(time.perf_counter() - start, 3))
    return record.to_xcom()


def _trigger() -> str:
    context = get_current_context()
    run = context["dag_run"]
    reason = (context["params"].get("reason") or "").strip()
    run_type = getattr(run.run_type, "value", run.run_type)
    return f"{run_type}: {reason}" if reason else str(run_type)


def build_release_dag(spec_path: Path):
    spec = load_spec(spec_path)
    path = str(spec_path)

    @dag(
        dag_id=f"edge_release__{spec.name}",
        description=f"Release {spec.name} to edge devices ({spec.training.framework})",
        schedule=spec.schedule,
        start_date=datetime(2026, 1, 1),
        catchup=False,
        max_active_runs=1,
        tags=["edge-release", spec.training.framework, f"cost-center:{spec.finops.cost_center}"],
        owner_links={},
        default_args={"owner": spec.owner, "retries": 0},
        doc_md=f"{__doc__}\n\n**Spec**: `{spec_path.name}` — {spec.description}",
        params={"reason": Param("", type="string", description="Why this release is started (recorded in MLflow).")},
    )
    def release():
        @task
        def validate_data():
            from pipelines import release as stages

            return _stage("validate_data", lambda: stages.validate_data(path))

        @task
        def train(data: dict):
            from pipelines import release as stages
            from pipelines.records import DataCheck

            return _stage("train", lambda: stages.train(path, DataCheck.model_validate(data)))

        @task
        def export(data: dict, trained: dict):
            from pipelines import release as stages
            from pipelines.records import DataCheck, TrainedModel

            return _stage("export", lambda: stages.export(
                path, DataCheck.model_validate(data), TrainedModel.model_validate(trained)))

        @task
        def quantize(data: dict, exported: dict):
            from pipelines import release as stages
            from pipelines.records import DataCheck, ExportedModel

            return _stage("quantize", lambda: stages.quantize(
                path, DataCheck.model_validate(data), ExportedModel.model_validate(exported)))

        @task(**IO_RETRIES)
        def register(data: dict, trained: dict, exported: dict, plan: dict):
            from pipelines import release as stages
            from pipelines.records import DataCheck, ExportedModel, QuantizationPlan, TrainedModel

            return _stage("register", lambda: stages.register(
                path, DataCheck.model_validate(data), TrainedModel.model_validate(trained),
                ExportedModel.model_validate(exported), QuantizationPlan.model_validate(plan), trigger=_trigger()))

        @task(**IO_RETRIES)
        def publish(registered: dict, plan: dict):
            from pipelines import release as stages
            from pipelines.records import QuantizationPlan, RegisteredVersion

            return _stage("publish", lambda: stages.publish(
                path, RegisteredVersion.model_validate(registered), QuantizationPlan.model_validate(plan)))

        @task(**IO_RETRIES)
        def commit(data: dict, trained: dict, registered: dict, published: dict, plan: dict):
            from pipelines import release as stages
            from pipelines.records import (DataCheck, PublishedArtifact, QuantizationPlan,
                                           RegisteredVersion, TrainedModel)

            return _stage("commit", lambda: stages.commit(
                path, DataCheck.model_validate(data), TrainedModel.model_validate(trained),
                RegisteredVersion.model_validate(registered), PublishedArtifact.model_validate(published),
                QuantizationPlan.model_validate(plan)))

        @task
        def summarize(data: dict, trained: dict, plan: dict, registered: dict, published: dict, committed: dict):
            from pipelines import release as stages
            from pipelines.records import (DataCheck, GitOpsCommit, PublishedArtifact, QuantizationPlan,
                                           RegisteredVersion, TrainedModel)

            ti = get_current_context()["ti"]
            seconds = {name: ti.xcom_pull(task_ids=name, key="seconds") for name in stages.STAGES}
            summary = stages.summarize(
                path, DataCheck.model_validate(data), TrainedModel.model_validate(trained),
                QuantizationPlan.model_validate(plan), RegisteredVersion.model_validate(registered),
                PublishedArtifact.model_validate(published), GitOpsCommit.model_validate(committed),
                {k: v for k, v in seconds.items() if v is not None}, _trigger())
            return summary.to_xcom()

        data = validate_data()
        trained = train(data)
        exported = export(data, trained)
        plan = quantize(data, exported)
        registered = register(data, trained, exported, plan)
        published = publish(registered, plan)
        committed = commit(data, trained, registered, published, plan)
        summarize(data, trained, plan, registered, published, committed)

    return release()


def build_invalid_spec_dag(spec_path: Path, error: SpecError):
    """A spec that does not validate still gets its DAG, whose only task fails with the
    error: the other specs' DAGs stay available, and the problem shows where users look."""

    @dag(dag_id=f"edge_release__{spec_path.stem}", schedule=None, start_date=datetime(2026, 1, 1),
         catchup=False, tags=["edge-release", "invalid-spec"],
         description=f"INVALID SPEC: {str(error).splitlines()[0]}"[:200],
         doc_md=f"### Invalid model spec\n\n```\n{error}\n```")
    def invalid():
        @task(retries=0)
        def spec_is_invalid():
            from airflow.exceptions import AirflowFailException

            raise AirflowFailException(str(error))

        spec_is_invalid()

    return invalid()


for _path in discover_specs(SPECS_DIR).values():
    try:
        build_release_dag(_path)
    except SpecError as _error:
        build_invalid_spec_dag(_path, _error)
