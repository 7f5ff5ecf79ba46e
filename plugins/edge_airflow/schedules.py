"""When the product's DAGs run: a release on its spec's cron or on its model's drift or field
quality event,
a canary rollout step every `deploymentStrategy.canary.interval`, the desired-state publisher
on every GitOps commit and hourly."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import AssetOrTimeSchedule
from airflow.sdk.definitions.timetables.trigger import CronTriggerTimetable

from edge_airflow.assets import DESIRED_STATE, drift_asset, quality_asset

CRON_PRESETS = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@weekly": "0 0 * * 0",
                "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *"}
DESIRED_STATE_CRON = "17 * * * *"  # hourly, which also signs the TUF timestamp again before it expires


def release_schedule(spec) -> Any:
    """The spec's cron OR an event for the model (drift, or a field quality breach that asks to
    retrain); a spec without a schedule: the events only."""
    events = drift_asset(spec.name) | quality_asset(spec.name)
    if spec.schedule is None:
        return events
    if spec.schedule == "@once":
        return spec.schedule
    cron = CRON_PRESETS.get(spec.schedule, spec.schedule)
    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(cron, timezone="UTC"), assets=events)


def rollout_schedule(spec) -> timedelta:
    """A canary's step interval (`deploymentStrategy.canary.interval`)."""
    from pipelines.specs import parse_duration

    return timedelta(seconds=parse_duration(spec.deployment_strategy.canary.interval))


def desired_state_schedule() -> AssetOrTimeSchedule:
    """Every commit to the GitOps branch, and hourly."""
    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(DESIRED_STATE_CRON, timezone="UTC"),
                               assets=[DESIRED_STATE])
