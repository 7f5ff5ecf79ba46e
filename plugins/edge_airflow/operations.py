"""The tasks after a release, one function each: a canary rollout step, a rollback, a drift
check, the FinOps forecast and its budget alert, and publishing the desired state to devices.
Each reads what the run gives (its parameters, its own time, who started it), calls
`pipelines.operate` or `pipelines.edge`, and says in the task log what happened; a check with
nothing to report skips its task, which then raises no Asset event."""

from __future__ import annotations

import logging
import re

from airflow.exceptions import AirflowFailException, AirflowSkipException
from airflow.sdk import get_current_context

from edge_airflow.assets import drift_asset, finops_breach_asset, raise_event
from edge_airflow.connections import signing_settings
from edge_airflow.run import triggered_by

log = logging.getLogger(__name__)


def task_id(prefix: str, model: str) -> str:
    """`<prefix>__<model>`, with any character a task id cannot hold as `_`."""
    return f"{prefix}__" + re.sub(r"[^A-Za-z0-9_.-]", "_", model)


def rollout_step(spec_path: str) -> dict:
    """Analyse the model's canary and advance, hold or roll back (the `dry_run` parameter:
    analyse only); the desired-state publisher publishes the commit."""
    from pipelines.operate.rollout import step_rollout

    dry_run = bool(get_current_context()["params"]["dry_run"])
    with signing_settings() as settings:
        result = step_rollout(spec_path, dry_run=dry_run, settings=settings, publish=False)
    print("\n".join(result.lines()))
    if result.commit:
        print(f"{result.decision.upper()} committed: {result.commit}")
    return result.to_xcom()


def roll_back() -> dict:
    """Restore the release the parameters name (`model`, `target`, `reason`), as the person who
    started the run; a target that cannot be restored fails the task without retries."""
    from pipelines.gitops.rollback import RollbackError
    from pipelines.operate.rollback import rollback_release

    params = get_current_context()["params"]
    by = triggered_by()
    try:
        with signing_settings() as settings:
            result = rollback_release(params["model"], params["target"] or None, params["reason"], by,
                                      settings=settings, publish=False)
    except RollbackError as error:
        raise AirflowFailException(f"{params['model']}: {error}") from None
    print(f"ROLLED BACK {result.model}: version {result.from_version} -> {result.to_version}, "
          f"commit {result.commit} by {by}")
    return result.to_xcom()


def check_drift(spec_path: str, model: str) -> dict:
    """Check the deployed model's drift at the run's own time (never the clock): raise the
    model's drift Asset event with the figures, or skip with the reason."""
    from pipelines.operate.monitor import check_drift as drift_check

    result = drift_check(spec_path, now=get_current_context()["dag_run"].run_after)
    if result.status != "drift":
        raise AirflowSkipException(f"{result.model}: {result.status}: {result.reason}")
    log.warning("DRIFT %s: %s", result.model, result.reason)
    figures = result.figures()
    raise_event(drift_asset(model), figures)
    return figures


def forecast(model: str) -> dict:
    """The model's FinOps report as of the run's own date (never the clock); skipped before
    the model's first release."""
    from pipelines.operate.finops_report import finops_report
    from pipelines.release import latest_summary

    if latest_summary(model) is None:
        raise AirflowSkipException(f"{model} has not been released yet")
    return finops_report(model, get_current_context()["dag_run"].run_after.date()).to_xcom()


def alert_on_breach(report: dict, model: str) -> None:
    """Raise the model's budget-breach Asset event with the forecast's figures, or skip."""
    if not report["breach"]:
        raise AirflowSkipException(f"{model}: {report['reason']}")
    log.warning("FORECAST BUDGET BREACH %s: %s", model, report["reason"])
    raise_event(finops_breach_asset(model), {
        "total_predicted_usd": report["total_predicted_usd"], "total_upper_usd": report["total_upper_usd"],
        "monthly_budget_usd": report["monthly_budget_usd"], "as_of": report["as_of"],
        "report": report["evidence"].get("report.txt")})


def publish_desired_state() -> dict:
    """Publish the GitOps tip to devices as signed desired state; the log says, per model,
    what was published or refused and why."""
    from pipelines.edge.publish import publish_desired_state as publish

    with signing_settings() as settings:
        result = publish(settings)
    print("\n".join(result.lines()))
    return result.to_xcom()
