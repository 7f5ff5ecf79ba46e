"""A release DAG run as an attempt (`pipelines.release.attempts`), under the Airflow run id:
the first task records it `running` (`started`), any task that fails records the task and
its error and alerts it (`on_failure`, the tasks' `on_failure_callback`), a person's answer in Required
Actions is recorded when given (`edge_airflow.approval`), and the summary task finishes it
(`summarize(..., attempt_id=<run id>)`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from airflow.exceptions import AirflowFailException
from airflow.sdk import get_current_context

from edge_airflow.run import trigger

if TYPE_CHECKING:
    from pipelines.records import Approval
    from pipelines.storage import ObjectStore

log = logging.getLogger(__name__)


def _store() -> ObjectStore:
    from pipelines.settings import get_settings
    from pipelines.storage import ObjectStore

    settings = get_settings()
    return ObjectStore(settings.store_url, settings.s3_endpoint_url)


def started(model: str) -> None:
    """Record this run of `model`'s release as running: what started it, who, and when."""
    from pipelines.release.attempts import start_attempt

    context = get_current_context()
    run = context["dag_run"]
    start_attempt(model, context["run_id"], trigger(context), _store(),
                  started_by=getattr(run, "triggering_user_name", None) or "",
                  started_at=getattr(run, "start_date", None))


def failed(model: str, context: dict[str, Any]) -> None:
    """Record this run of `model`'s release as failed in the context's task, with its error
    (an `AirflowFailException` carries the release's own one-line message) and the version
    it registered, if any, and alert it (`run_failed`)."""
    from edge_airflow.alerts import failed_run
    from pipelines.release.attempts import fail_attempt
    from pipelines.settings import get_settings

    ti = context["ti"]
    error = context.get("exception") or "the task failed"
    if isinstance(error, AirflowFailException):
        error = str(error)
    registered = ti.xcom_pull(task_ids="register") if ti.task_id != "register" else None
    settings = get_settings()
    version = (registered or {}).get("version")
    try:
        fail_attempt(model, context["run_id"], ti.task_id, error, _store(), trigger(context), version,
                     (settings.specs_dir, settings.state))
    finally:  # people learn of the failure even when the store cannot record it
        failed_run(model, context, version and str(version))


def approved(model: str, context: dict[str, Any], approval: Approval) -> None:
    """Record a person's answer on this run of `model`'s release when it is given; a store that
    cannot be written is logged (the summary records the answer too), never the task's end."""
    from pipelines.release.attempts import record_approval
    from pipelines.storage import StoreError

    try:
        record_approval(model, context["run_id"], approval, _store(), trigger(context))
    except StoreError as error:
        log.warning("%s: the approval was not recorded on attempt %s: %s", model, context["run_id"], error)


def on_failure(model: str) -> Callable[[dict[str, Any]], None]:
    """The `on_failure_callback` of `model`'s release tasks (called after the last retry)."""
    return lambda context: failed(model, context)
