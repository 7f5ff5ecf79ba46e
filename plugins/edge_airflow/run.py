"""What a release run is, as the release stages see it: the options the person starting it
chose, what started it (recorded in MLflow), and its outcome as one line of the task log."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from airflow.sdk import get_current_context

if TYPE_CHECKING:
    from pipelines.records import ReleaseOptions


def options() -> ReleaseOptions:
    """This run's trigger-form parameters as the `ReleaseOptions` the stages take."""
    from pipelines.release import release_options

    context = get_current_context()
    return release_options(dict(context["params"]), context["run_id"])


def trigger(context: dict | None = None) -> str:
    """What started the run: a person (with the reason they gave), the schedule, or drift
    events (with their figures); of the running task's context unless one is given."""
    context = context or get_current_context()
    run = context["dag_run"]
    reason = (context["params"].get("reason") or "").strip()
    run_type = str(getattr(run.run_type, "value", run.run_type))
    if run_type == "asset_triggered":
        events = [e for evs in (context.get("triggering_asset_events") or {}).values() for e in evs]
        extras = [dict(getattr(e, "extra", {}) or {}) for e in events]
        return f"asset_triggered: {json.dumps(extras, sort_keys=True, default=str)[:400]}"
    return f"{run_type}: {reason}" if reason else run_type


def run_id() -> str:
    """This run's id."""
    return get_current_context()["run_id"]


def triggered_by() -> str:
    """Who started this run (the Airflow user), or `airflow` for the scheduler."""
    return getattr(get_current_context()["dag_run"], "triggering_user_name", None) or "airflow"


def headline(summary: dict) -> str:
    """The release's outcome in one line (`ReleaseSummary.headline`)."""
    from pipelines.records import ReleaseSummary

    return ReleaseSummary.model_validate(summary).headline()


def log_summary(summary: dict) -> dict:
    """Print the release summary's headline in the task log; returns the summary."""
    print(headline(summary))
    return summary
