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

**Trigger form**: `reason` (recorded); `force_retrain` (retrain and re-run every stage even
when these inputs were released before: a new release key salted with the run id, a new
MLflow version); `approval` (`manual` makes a person approve even when the spec says auto;
nothing relaxes a manual spec); `dry_run` (validate, train, register, evaluate every gate
and decide, then stop: nothing published or committed, the summary says what would have
happened).
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta
from pathlib import Path

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import Asset, AssetOrTimeSchedule, Param, dag, get_current_context, task
from airflow.sdk.definitions.timetables.trigger import CronTriggerTimetable

from pipelines import connections
from pipelines.edge import DESIRED_STATE_ASSET_URI
from pipelines.specs import SpecError, discover_specs, load_spec

SPECS_DIR = Path(os.environ.get("EDGE_SPECS_DIR", Path(__file__).resolve().parent.parent / "model_specs"))
# A commit to the GitOps branch raises it; edge_publish_desired_state runs on it.
DESIRED_STATE_ASSET = Asset(DESIRED_STATE_ASSET_URI)
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


def drift_asset(model: str) -> Asset:
    """Raised by drift monitoring (or any alerting system, through the REST API) to retrain."""
    from pipelines.monitor import drift_asset_uri

    return Asset(drift_asset_uri(model))


def _schedule(spec):
    """The spec's cron OR a drift event for the model; a spec without a schedule: drift only."""
    if spec.schedule is None:
        return [drift_asset(spec.name)]
    presets = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@weekly": "0 0 * * 0",
               "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *"}
    if spec.schedule == "@once":
        return spec.schedule
    cron = presets.get(spec.schedule, spec.schedule)
    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(cron, timezone="UTC"), assets=[drift_asset(spec.name)])


def _params() -> dict:
    """The trigger form: each parameter may only make a release do more or ask more."""
    return {
        "reason": Param("", type="string", title="Reason",
                        description="Why this release is started (recorded in MLflow and the summary)."),
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


def _options():
    """This run's trigger-form parameters as the typed options the stages take."""
    from pipelines.release import release_options

    context = get_current_context()
    return release_options(dict(context["params"]), context["run_id"])


def _trigger() -> str:
    """What started the run, as recorded in MLflow: a person (with the reason), the schedule,
    or drift events (with their figures)."""
    import json

    context = get_current_context()
    run = context["dag_run"]
    reason = (context["params"].get("reason") or "").strip()
    run_type = str(getattr(run.run_type, "value", run.run_type))
    if run_type == "asset_triggered":
        events = [e for evs in (context.get("triggering_asset_events") or {}).values() for e in evs]
        extras = [dict(getattr(e, "extra", {}) or {}) for e in events]
        return f"asset_triggered: {json.dumps(extras, sort_keys=True, default=str)[:400]}"
    return f"{run_type}: {reason}" if reason else run_type


class ReleaseApproval(ApprovalOperator):
    """Airflow's ApprovalOperator that also keeps the answer (who, when, what) as XCom
    `answer`: on Reject the operator skips its downstream and its return value is not kept."""

    def execute_complete(self, context, event):
        context["ti"].xcom_push(key="answer", value={
            "chosen_options": event.get("chosen_options"), "params_input": event.get("params_input") or {},
            "responded_by_user": event.get("responded_by_user"), "responded_at": str(event.get("responded_at"))})
        return super().execute_complete(context, event)


def _verdicts(verdicts: list, cost: dict) -> list:
    """Every gate's verdict: the responsible-AI gates and the edge cost gates."""
    from pipelines.records import GateVerdict

    return [GateVerdict.model_validate(v) for v in [*verdicts, *cost["verdicts"]]]


def _approval():
    """The person's decision on a manual release, from the approval task's XCom (or None)."""
    from pipelines.records import Approval

    answer = get_current_context()["ti"].xcom_pull(task_ids="approve_release", key="answer")
    if not answer:
        return None
    user = answer.get("responded_by_user") or {}
    return Approval(approved=answer["chosen_options"] == ["Approve"],
                    by=user.get("name") or user.get("id") or "unknown",
                    at=str(answer.get("responded_at")),
                    comment=(answer.get("params_input") or {}).get("comment", ""))


def build_release_dag(spec_path: Path):
    spec = load_spec(spec_path)
    path = str(spec_path)

    @dag(
        dag_id=f"edge_release__{spec.name}",
        description=f"Release {spec.name} to edge devices ({spec.training.framework})",
        schedule=_schedule(spec),
        start_date=datetime(2026, 1, 1),
        catchup=False,
        max_active_runs=1,
        tags=["edge-release", spec.training.framework, f"cost-center:{spec.finops.cost_center}"],
        owner_links={},
        default_args={"owner": spec.owner, "retries": 0, "pre_execute": connections.pre_execute},
        doc_md=f"{__doc__}\n\n**Spec**: `{spec_path.name}` — {spec.description}",
        params=_params(),
    )
    def release():
        @task
        def validate_data():
            from pipelines import release as stages

            return _stage("validate_data", lambda: stages.validate_data(path, salt=_options().salt))

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
                ExportedModel.model_validate(exported), QuantizationPlan.model_validate(plan), trigger=_trigger(),
                options=_options()))

        @task
        def quality_gate(data: dict, plan: dict, registered: dict):
            from pipelines.gates import stages
            from pipelines.records import DataCheck, QuantizationPlan, RegisteredVersion

            return _stage("quality_gate", lambda: stages.quality_gate(
                path, DataCheck.model_validate(data), QuantizationPlan.model_validate(plan),
                RegisteredVersion.model_validate(registered)))

        @task
        def fairness_gate(data: dict, plan: dict, registered: dict, cost: dict):
            from pipelines.gates import stages
            from pipelines.records import DataCheck, QuantizationPlan, RegisteredVersion

            return _stage("fairness_gate", lambda: stages.fairness_gate(
                path, DataCheck.model_validate(data), QuantizationPlan.model_validate(plan),
                RegisteredVersion.model_validate(registered), stages.CostReport.model_validate(cost)))

        @task
        def parity_gate(data: dict, plan: dict, registered: dict, cost: dict):
            from pipelines.gates import stages
            from pipelines.records import DataCheck, QuantizationPlan, RegisteredVersion

            return _stage("parity_gate", lambda: stages.parity_gate(
                path, DataCheck.model_validate(data), QuantizationPlan.model_validate(plan),
                RegisteredVersion.model_validate(registered), stages.CostReport.model_validate(cost)))

        @task
        def drift_gate(data: dict, registered: dict):
            from pipelines.gates import stages
            from pipelines.records import DataCheck, RegisteredVersion

            return _stage("drift_gate", lambda: stages.drift_gate(
                path, DataCheck.model_validate(data), RegisteredVersion.model_validate(registered)))

        @task
        def edge_cost(data: dict, trained: dict, plan: dict, registered: dict):
            from pipelines.gates import stages
            from pipelines.records import DataCheck, QuantizationPlan, RegisteredVersion, TrainedModel

            return _stage("edge_cost", lambda: stages.edge_cost(
                path, DataCheck.model_validate(data), TrainedModel.model_validate(trained),
                QuantizationPlan.model_validate(plan), RegisteredVersion.model_validate(registered)))

        @task
        def explain(data: dict, plan: dict, registered: dict):
            from pipelines.gates import stages
            from pipelines.records import DataCheck, QuantizationPlan, RegisteredVersion

            return _stage("explain", lambda: stages.explain(
                path, DataCheck.model_validate(data), QuantizationPlan.model_validate(plan),
                RegisteredVersion.model_validate(registered)))

        @task
        def model_card(data: dict, trained: dict, plan: dict, registered: dict, verdicts: list, explanation: dict,
                       cost: dict):
            from pipelines.gates import stages
            from pipelines.records import DataCheck, Explanation, QuantizationPlan, RegisteredVersion, TrainedModel

            return _stage("model_card", lambda: stages.model_card(
                path, DataCheck.model_validate(data), TrainedModel.model_validate(trained),
                QuantizationPlan.model_validate(plan), RegisteredVersion.model_validate(registered),
                _verdicts(verdicts, cost), Explanation.model_validate(explanation),
                stages.CostReport.model_validate(cost)))

        @task.branch
        def decide(verdicts: list, cost: dict, card: dict, plan: dict, registered: dict):
            """Release, ask a person (the spec or the run's `approval` asks for one), or reject;
            a dry run stops here. Then nothing downstream runs but the summary."""
            from pipelines import release as stages
            from pipelines.gates.stages import approval_body
            from pipelines.records import ModelCard, QuantizationPlan, RegisteredVersion

            options = _options()
            records = _verdicts(verdicts, cost)
            decision = stages.decide(path, records, options)
            ti = get_current_context()["ti"]
            ti.xcom_push(key="decision", value=decision.to_xcom())
            if options.dry_run:
                return None
            if decision.outcome == "await_approval":
                ti.xcom_push(key="approval_body", value=approval_body(
                    spec.name, RegisteredVersion.model_validate(registered).version, records,
                    ModelCard.model_validate(card), QuantizationPlan.model_validate(plan),
                    why="; ".join(decision.reasons)))
                return "approve_release"
            return "publish" if decision.outcome == "release" else None

        # Runs after `decide` chose it, or after a person approved (a rejection skips it).
        @task(trigger_rule="none_failed_min_one_success", **IO_RETRIES)
        def publish(registered: dict, plan: dict, card: dict, cost: dict):
            from pipelines import release as stages
            from pipelines.records import ModelCard, QuantizationPlan, RegisteredVersion

            with connections.signing_settings() as settings:
                return _stage("publish", lambda: stages.publish(
                    path, RegisteredVersion.model_validate(registered), QuantizationPlan.model_validate(plan),
                    ModelCard.model_validate(card), cost, settings=settings))

        @task(**IO_RETRIES, outlets=[DESIRED_STATE_ASSET])
        def commit(data: dict, trained: dict, registered: dict, published: dict, plan: dict, verdicts: list,
                   cost: dict):
            from pipelines import release as stages
            from pipelines.records import (
                DataCheck,
                PublishedArtifact,
                QuantizationPlan,
                RegisteredVersion,
                TrainedModel,
            )

            with connections.signing_settings() as settings:
                result = _stage("commit", lambda: stages.commit(
                    path, DataCheck.model_validate(data), TrainedModel.model_validate(trained),
                    RegisteredVersion.model_validate(registered), PublishedArtifact.model_validate(published),
                    QuantizationPlan.model_validate(plan), _verdicts(verdicts, cost), _approval(), cost,
                    settings=settings))
            if result.get("created"):
                get_current_context()["outlet_events"][DESIRED_STATE_ASSET].extra = {"commit": result.get("commit")}
            return result

        @task(trigger_rule="none_failed_min_one_success")
        def summarize(data: dict, trained: dict, plan: dict, registered: dict, verdicts: list, card: dict,
                      cost: dict):
            """The outcome: released, rejected (which gate, why), waiting, or a dry run's
            decision; tagged in MLflow."""
            from pipelines import release as stages
            from pipelines.records import (
                DataCheck,
                Decision,
                GitOpsCommit,
                ModelCard,
                PublishedArtifact,
                QuantizationPlan,
                RegisteredVersion,
                TrainedModel,
            )

            ti = get_current_context()["ti"]
            published, committed = ti.xcom_pull(task_ids="publish"), ti.xcom_pull(task_ids="commit")
            names = [*stages.STAGES]
            seconds = {name: ti.xcom_pull(task_ids=name, key="seconds") for name in names}
            summary = stages.summarize(
                path, DataCheck.model_validate(data), TrainedModel.model_validate(trained),
                QuantizationPlan.model_validate(plan), RegisteredVersion.model_validate(registered),
                _verdicts(verdicts, cost),
                Decision.model_validate(ti.xcom_pull(task_ids="decide", key="decision")),
                PublishedArtifact.model_validate(published) if published else None,
                GitOpsCommit.model_validate(committed) if committed else None,
                ModelCard.model_validate(card), _approval(),
                {k: v for k, v in seconds.items() if v is not None}, _trigger(), cost, options=_options())
            if summary.status == "released":
                print(f"RELEASED {summary.model} v{summary.model_version}: commit {summary.gitops_commit}")
            else:
                print(f"{summary.status.upper()} {summary.model} v{summary.model_version}: "
                      + "; ".join(summary.reasons))
            return summary.to_xcom()

        data = validate_data()
        trained = train(data)
        exported = export(data, trained)
        plan = quantize(data, exported)
        registered = register(data, trained, exported, plan)
        cost = edge_cost(data, trained, plan, registered)
        verdicts = [quality_gate(data, plan, registered), fairness_gate(data, plan, registered, cost),
                    parity_gate(data, plan, registered, cost), drift_gate(data, registered)]
        explanation = explain(data, plan, registered)
        card = model_card(data, trained, plan, registered, verdicts, explanation, cost)
        decision = decide(verdicts, cost, card, plan, registered)
        published = publish(registered, plan, card, cost)
        # Every DAG has the approval task: the spec or the run's `approval` parameter may ask
        # for it; `decide` skips it otherwise.
        approval = ReleaseApproval(
            task_id="approve_release",
            subject=f"Release {spec.name}? All gates passed",
            body="{{ ti.xcom_pull(task_ids='decide', key='approval_body') }}",
        )
        decision >> approval >> published
        decision >> published
        committed = commit(data, trained, registered, published, plan, verdicts, cost)
        summary = summarize(data, trained, plan, registered, verdicts, card, cost)
        committed >> summary

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
