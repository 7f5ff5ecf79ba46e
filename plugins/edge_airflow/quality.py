"""The field quality monitor's tasks: judge a model's labelled inferences at the run's own time,
act on a breach as the spec's `responsibleAI.onBreach` says (alerts through `edge_airflow.alerts`,
hold and rollback commits left to the desired-state publisher), and raise the retraining Asset
event `edge-quality://<model>` in a task of its own, which skips unless the check asked for it
(a task that succeeds raises its outlets' events)."""

from __future__ import annotations

import logging

from airflow.exceptions import AirflowSkipException
from airflow.sdk import get_current_context

from edge_airflow.alerts import send_alert
from edge_airflow.assets import quality_asset, raise_event
from edge_airflow.connections import signing_settings

log = logging.getLogger(__name__)


def check_quality(spec_path: str, model: str) -> dict:
    """The check's record (XCom); skipped with the reason when there is no verdict."""
    from pipelines.operate.quality import check_field_quality

    def notify(check) -> list[str]:
        version = check.breached_version
        broken = check.reason.split(": ", 1)[-1]
        return send_alert("field_breach", model, f"{model} v{version} in the field: {broken}"[:200],
                          "\n".join(check.version(version).breaches[:5]), severity="critical",
                          figures=check.figures(), version=version)

    def retrain(check) -> str:
        return f"edge-quality://{model}"

    with signing_settings() as settings:
        check = check_field_quality(spec_path, settings, now=get_current_context()["dag_run"].run_after,
                                    notify=notify, retrain=retrain, publish=False)
    print("\n".join(check.lines()))
    if check.status in ("no_release", "insufficient_labels"):
        raise AirflowSkipException(f"{model}: {check.status}: {check.reason}")
    if check.status == "breach":
        log.warning("FIELD BREACH %s: %s", model, check.reason)
    return check.to_xcom()


def raise_retraining(check: dict, model: str) -> dict:
    """Raise `edge-quality://<model>` with the breach's figures when the check's retrain action
    was done; otherwise skip (no event)."""
    from pipelines.operate.quality import QualityCheck

    result = QualityCheck.model_validate(check)
    if not any(a.action == "retrain" and a.status == "done" for a in result.actions):
        raise AirflowSkipException(f"{model}: no retraining asked ({result.status})")
    figures = result.figures()
    raise_event(quality_asset(model), figures)
    return figures
