"""The tasks after a release, one function each: a canary rollout step, a rollback, a drift
check, the FinOps forecast and its budget alert, and publishing the desired state to devices.
Each reads what the run gives (its parameters, its own time, who started it), calls
`pipelines.operate` or `pipelines.edge`, and says in the task log what happened; a check with
nothing to report skips its task, which then raises no Asset event. A rollback (by a person,
or by the canary analysis), drift and a forecast budget breach are alerted to people
(`edge_airflow.alerts`)."""

from __future__ import annotations

import logging
import re

from airflow.exceptions import AirflowFailException, AirflowSkipException
from airflow.sdk import get_current_context

from edge_airflow.alerts import send_alert
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
    if result.decision == "rollback" and result.commit:
        send_alert("rollback", result.model, f"{result.model}: canary of version {result.version} rolled back to "
                   f"version {result.previous_version}", "\n".join(result.lines()), "critical",
                   {"version": result.version, "previous_version": result.previous_version, "share": result.share,
                    "step": result.step, "failed_checks": [c.name for c in result.checks if not c.passed],
                    "commit": result.commit}, result.version)
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
    send_alert("rollback", result.model, f"{result.model} rolled back: version {result.from_version} -> "
               f"{result.to_version}", f"By {by}: {params['reason']}", "warning",
               {"from_version": result.from_version, "to_version": result.to_version, "commit": result.commit,
                "by": by}, result.from_version)
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
    send_alert("drift", result.model, f"{result.model}: drift in the field, {result.drifted_columns} of "
               f"{result.columns} columns drifted", f"{result.reason} (window {result.window_start} to "
               f"{result.window_end})", "warning", figures, result.deployed_version)
    return figures


def forecast(model: str) -> dict:
    """The model's FinOps report as of the run's own date (never the clock); skipped before
    the model's first release."""
    from pipelines.operate.finops_report import finops_report
    from pipelines.release import latest_summary

    if latest_summary(model) is None:
        raise AirflowSkipException(f"{model} has not been released yet")
    return finops_report(model, get_current_context()["dag_run"].run_after.date()).to_xcom()


def alert_on_breach(report: dict, model: str) -> list[dict]:
    """On a forecast breach: raise the model's budget-breach Asset event with the forecast's
    figures and run the spec's `finops.onBreach` (alerts, commits left to the desired-state
    publisher); otherwise skip."""
    if not report["breach"]:
        raise AirflowSkipException(f"{model}: {report['reason']}")
    log.warning("FORECAST BUDGET BREACH %s: %s", model, report["reason"])
    figures = {"total_predicted_usd": report["total_predicted_usd"], "total_upper_usd": report["total_upper_usd"],
               "monthly_budget_usd": report["monthly_budget_usd"], "as_of": report["as_of"],
               "report": report["evidence"].get("report.txt")}
    raise_event(finops_breach_asset(model), figures)

    def notify(_) -> list[str]:
        return send_alert("budget_breach", model, f"{model}: 30-day spend forecast ${report['total_predicted_usd']:,.2f} "
                          f"breaches the ${report['monthly_budget_usd']:,.2f} monthly budget", report["reason"],
                          "warning", figures)

    from pipelines.operate.budget import act_on_breach
    from pipelines.operate.finops_report import FinOpsReport
    from pipelines.operate.monitor import spec_path_of

    with signing_settings() as settings:
        actions = act_on_breach(spec_path_of(model, settings), FinOpsReport.model_validate(report), settings,
                                notify=notify, publish=False)
    for action in actions:
        print(f"finops.onBreach {action.action}: {action.status}: {action.detail}"
              + (f" (commit {action.commit})" if action.commit else ""))
    return [a.to_xcom() for a in actions]


def publish_desired_state() -> dict:
    """Publish the GitOps tip to devices as signed desired state; the log says, per model,
    what was published or refused and why."""
    from pipelines.edge.publish import publish_desired_state as publish

    with signing_settings() as settings:
        result = publish(settings)
    print("\n".join(result.lines()))
    return result.to_xcom()
