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

**Attempts**: every run is recorded in the artifact store (`releases/<model>/attempts/`, shown
in Edge Releases): running, then its outcome, a person's answer (with the comment), or the task
that failed and its error.

**Alerts**: a release the gates reject, one that waits for a person's approval (or that a person
rejects) and a failed run are alerted to people through the connections `edge_alerts_webhook`,
`edge_alerts_slack` and `edge_alerts_pagerduty`, with a link to the version in Edge Releases.

**Unpausing**: a paused DAG runs only when triggered by hand. Airflow's "unpause on trigger"
unpauses it for good: from then on the spec's `schedule` and drift events (`edge-drift://`)
start releases too, until the DAG is paused again.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import dag, task
from edge_airflow import connections
from edge_airflow.approval import ReleaseApproval, answer, decide_release, decided
from edge_airflow.assets import DESIRED_STATE, desired_state_changed
from edge_airflow.attempts import on_failure, started
from edge_airflow.params import release_params
from edge_airflow.run import log_summary, options, run_id, trigger
from edge_airflow.schedules import release_schedule
from edge_airflow.xcom import every_verdict, pulled, run_stage, stage_seconds

from pipelines.specs import ModelSpec, SpecError, load_specs, specs_folder

IO_RETRIES = {"retries": 3, "retry_delay": timedelta(seconds=5), "retry_exponential_backoff": True}


def build_release_dag(spec_path: Path, spec: ModelSpec):
    path = str(spec_path)

    @dag(
        dag_id=f"edge_release__{spec.name}",
        description=f"Release {spec.name} to edge devices ({spec.training.model_type})",
        schedule=release_schedule(spec),
        start_date=datetime(2026, 1, 1),
        catchup=False,
        max_active_runs=1,
        tags=["edge-release", spec.training.framework or ("imported" if spec.model else "own-code"),
              f"cost-center:{spec.finops.cost_center}"],
        owner_links={},
        # A task that fails for good records the run's attempt as failed (edge_airflow.attempts).
        default_args={"owner": spec.owner, "retries": 0, "pre_execute": connections.pre_execute,
                      "on_failure_callback": on_failure(spec.name)},
        doc_md=f"{__doc__}\n\n**Spec**: `{spec_path.name}` — {spec.description}",
        params=release_params(),
    )
    def release():
        @task
        def validate_data():
            started(spec.name)  # the run's attempt, running
            return run_stage("validate_data", path, salt=options().salt)

        @task
        def train(data: dict):
            return run_stage("train", path, data)

        @task
        def export(data: dict, trained: dict):
            return run_stage("export", path, data, trained)

        @task
        def quantize(data: dict, exported: dict):
            return run_stage("quantize", path, data, exported)

        @task(**IO_RETRIES)
        def register(data: dict, trained: dict, exported: dict, plan: dict):
            return run_stage("register", path, data, trained, exported, plan, trigger=trigger(), options=options())

        @task
        def quality_gate(data: dict, plan: dict, registered: dict):
            return run_stage("quality_gate", path, data, plan, registered)

        @task
        def fairness_gate(data: dict, plan: dict, registered: dict, cost: dict):
            return run_stage("fairness_gate", path, data, plan, registered, cost)

        @task
        def parity_gate(data: dict, plan: dict, registered: dict, cost: dict):
            return run_stage("parity_gate", path, data, plan, registered, cost)

        @task
        def drift_gate(data: dict, plan: dict, registered: dict):
            return run_stage("drift_gate", path, data, plan, registered)

        @task
        def edge_cost(data: dict, trained: dict, plan: dict, registered: dict):
            return run_stage("edge_cost", path, data, trained, plan, registered)

        @task
        def explain(data: dict, plan: dict, registered: dict):
            return run_stage("explain", path, data, plan, registered)

        @task
        def model_card(data: dict, trained: dict, plan: dict, registered: dict, verdicts: list, explanation: dict,
                       cost: dict):
            return run_stage("model_card", path, data, trained, plan, registered, every_verdict(verdicts, cost),
                             explanation, cost)

        @task.branch
        def decide(data: dict, verdicts: list, cost: dict, card: dict, plan: dict, registered: dict):
            """Release, ask a person (the spec or the run's `approval` asks for one), or reject;
            a dry run stops here. Then nothing downstream runs but the summary."""
            return decide_release(path, data, every_verdict(verdicts, cost), card, plan, registered,
                                  ask="approve_release", publish="publish")

        # Runs after `decide` chose it, or after a person approved (a rejection skips it).
        @task(trigger_rule="none_failed_min_one_success", **IO_RETRIES)
        def publish(registered: dict, plan: dict, card: dict, cost: dict):
            return run_stage("publish", path, registered, plan, card, cost, signing=True)

        @task(**IO_RETRIES, outlets=[DESIRED_STATE])
        def commit(data: dict, trained: dict, registered: dict, published: dict, plan: dict, verdicts: list,
                   cost: dict):
            return desired_state_changed(run_stage(
                "commit", path, data, trained, registered, published, plan, every_verdict(verdicts, cost),
                answer("approve_release"), cost, signing=True))

        @task(trigger_rule="none_failed_min_one_success")
        def summarize(data: dict, trained: dict, plan: dict, registered: dict, verdicts: list, card: dict,
                      cost: dict):
            """The outcome: released, rejected (which gate, why), waiting, or a dry run's
            decision; tagged in MLflow."""
            return log_summary(run_stage(
                "summarize", path, data, trained, plan, registered, every_verdict(verdicts, cost), decided("decide"),
                pulled("publish"), pulled("commit"), card, answer("approve_release"), stage_seconds(), trigger(),
                cost, options=options(), attempt_id=run_id()))

        data = validate_data()
        trained = train(data)
        exported = export(data, trained)
        plan = quantize(data, exported)
        registered = register(data, trained, exported, plan)
        cost = edge_cost(data, trained, plan, registered)
        verdicts = [quality_gate(data, plan, registered), fairness_gate(data, plan, registered, cost),
                    parity_gate(data, plan, registered, cost), drift_gate(data, plan, registered)]
        explanation = explain(data, plan, registered)
        card = model_card(data, trained, plan, registered, verdicts, explanation, cost)
        decision = decide(data, verdicts, cost, card, plan, registered)
        published = publish(registered, plan, card, cost)
        # Every DAG has the approval task: the spec or the run's `approval` parameter may ask
        # for it; `decide` skips it otherwise.
        approval = ReleaseApproval(task_id="approve_release", subject=f"Release {spec.name}? All gates passed",
                                   model=spec.name, decided_by="decide")
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


for _path, _spec in load_specs(specs_folder()).items():
    if isinstance(_spec, SpecError):
        build_invalid_spec_dag(_path, _spec)
    else:
        build_release_dag(_path, _spec)
