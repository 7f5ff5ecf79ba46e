"""A person's approval of a release, in Airflow's Required Actions.

The `decide` task is a branch (`decide_release`): it follows `pipelines.release.next_step`
to publish, to ask a person (with a Markdown body of the verdicts, the variant and the
evidence), or to stop, and alerts people when it asks or rejects (`edge_airflow.alerts`).
`ReleaseApproval` asks (with a comment field), records the answer on the run's attempt and
alerts a rejection; `answer` reads what the person chose as a `pipelines.records.Approval`,
which the commit and the summary record.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import Param, get_current_context

from edge_airflow.run import options
from edge_airflow.xcom import call, pulled, run_stage

if TYPE_CHECKING:
    from pipelines.records import Approval

DECISION, BODY, ANSWER = "decision", "approval_body", "answer"  # XCom keys
COMMENT = "comment"  # the approval form's field


def decide_release(spec_path: str, data: dict, verdicts: list[dict], card: dict, plan: dict, registered: dict, *,
                   ask: str, publish: str) -> str | None:
    """Decide on the verdicts and return the task to follow: `publish`, `ask` (a person must
    approve first), or None (rejected, or a dry run: nothing downstream runs but the summary).
    The decision is kept as XCom `decision`, the body of the question as `approval_body`."""
    from pipelines import release

    run_options = options()
    decision = run_stage("decide", spec_path, data=data, verdicts=verdicts, options=run_options)
    ti = get_current_context()["ti"]
    ti.xcom_push(key=DECISION, value=decision)
    step = call(release.next_step, decision, run_options)
    if step == "ask":
        ti.xcom_push(key=BODY, value=call(release.approval_body, registered["name"], registered["version"], verdicts,
                                          card, plan, why="; ".join(decision["reasons"])))
        alert_decision("approval_waiting", registered, decision)
        return ask
    if step == "stop" and decision["outcome"] == "reject" and not run_options.dry_run:
        alert_decision("release_rejected", registered, decision)
    return publish if step == "publish" else None


def alert_decision(event: str, registered: dict, decision: dict) -> list[str]:
    """Alert that the gates rejected `registered` (`release_rejected`, a warning) or that it
    waits for a person in Required Actions (`approval_waiting`, info), with the reasons."""
    from edge_airflow.alerts import send_alert

    model, version = registered["name"], str(registered["version"])
    if event == "approval_waiting":
        title = f"{model} version {version} waits for approval"
        text = "Approve or reject it in Airflow's Required Actions. " + "; ".join(decision["reasons"])
    else:
        title = f"{model} version {version} rejected: " + (", ".join(decision["failed_gates"]) or "by the gates")
        text = "; ".join(decision["reasons"])
    return send_alert(event, model, title, text, "info" if event == "approval_waiting" else "warning",
                      {"outcome": decision["outcome"], "failed_gates": decision["failed_gates"]}, version)


class ReleaseApproval(ApprovalOperator):
    """Airflow's ApprovalOperator asking `model`'s release with the body the `decided_by` task
    prepared, with an optional comment field; it keeps the answer (who, when, what, the
    comment) as XCom `answer` and records it on the run's attempt
    (`edge_airflow.attempts.approved`): on Reject the operator skips its downstream and its
    return value is not kept."""

    def __init__(self, *, model: str, decided_by: str, **kwargs: Any) -> None:
        kwargs.setdefault("body", "{{ ti.xcom_pull(task_ids='%s', key='%s') }}" % (decided_by, BODY))
        # The form's only field (the operator keeps task params alone, never the DAG's).
        # Optional for the UI's form only with "null" among its types: a plain string is required.
        kwargs["params"] = {COMMENT: Param(None, type=["null", "string"], title="Comment", source="task",
                                           description="Optional: why (recorded with the release).")}
        super().__init__(**kwargs)
        self.model = model

    def execute_complete(self, context, event):
        from edge_airflow.attempts import approved

        kept = {"chosen_options": event.get("chosen_options"), "params_input": event.get("params_input") or {},
                "responded_by_user": event.get("responded_by_user"), "responded_at": str(event.get("responded_at"))}
        context["ti"].xcom_push(key=ANSWER, value=kept)
        result = super().execute_complete(context, event)  # validates the answer; a Reject skips downstream
        approval = approval_of(kept)
        approved(self.model, context, approval)
        if not approval.approved:
            alert_refusal(self.model, context, approval)
        return result


def alert_refusal(model: str, context: dict, approval: Approval) -> list[str]:
    """Alert that a person rejected this run's release in Required Actions (info: the person
    knows; the team learns it), with their comment."""
    from edge_airflow.alerts import send_alert

    version = (context["ti"].xcom_pull(task_ids="register") or {}).get("version")
    title = f"{model}" + (f" version {version}" if version else "") + f" rejected by {approval.by}"
    return send_alert("release_rejected", model, title, approval.comment, "info", {"by": approval.by},
                      version and str(version), context=context)


def approval_of(kept: dict | None) -> Approval | None:
    """A kept answer as the `Approval` the release records (None: nobody answered)."""
    from pipelines.records import Approval

    if not kept:
        return None
    user = kept.get("responded_by_user") or {}
    return Approval(approved=kept["chosen_options"] == [ApprovalOperator.APPROVE],
                    by=user.get("name") or user.get("id") or "unknown",
                    at=str(kept.get("responded_at")),
                    comment=(kept.get("params_input") or {}).get(COMMENT) or "")


def decided(task_id: str) -> dict:
    """The decision the `decide_release` task `task_id` kept, as XCom."""
    return pulled(task_id, DECISION)


def answer(task_id: str) -> Approval | None:
    """The person's decision on this run, asked by the `ReleaseApproval` task `task_id`; None
    when nobody was asked."""
    return approval_of(pulled(task_id, ANSWER))
