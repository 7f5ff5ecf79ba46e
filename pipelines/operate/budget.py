"""Budget policies that act: what the daily FinOps job does when a model's 30-day spend
forecast, or its spend measured on the devices the day before, breaches its monthly budget,
as the spec's `finops.onBreach` says, in order:

- `notify`: the caller's alert channels (Airflow sends `budget_breach`);
- `lower_sampling`: a commit halving the devices' `telemetry.sampleRate` in the deployed base
  manifest (never below `finops.minSampleRate`): fewer sampled inputs, fewer bytes of telemetry
  egress. Each day the breach lasts halves it again, down to the floor. `python -m pipelines
  finops-restore <model>` commits the spec's own telemetry settings back (a release renders
  them too);
- `pause_rollout`: a commit holding a canary where it is (`pipelines.operate.rollout`), lifted
  by `python -m pipelines rollout <model> --resume`.

Every commit's message carries the forecast; the actions and their commits are recorded beside
the day's report, `finops/<model>/<date>/actions.json`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

from pipelines.errors import one_line
from pipelines.records import Record
from pipelines.settings import Settings, get_settings

log = logging.getLogger(__name__)

BUDGET_BY = "edge_finops_report"


class BudgetActionRecord(Record):
    """One budget action and what came of it."""

    action: Literal["notify", "lower_sampling", "pause_rollout"]
    status: Literal["done", "skipped", "failed"]
    detail: str
    commit: str | None = None


def _telemetry_commit(settings: Settings, model: str, rate_of: Callable[[float], float | None], message: str,
                      publish: bool) -> tuple[str | None, float | None, float | None]:
    """Commit a new `spec.telemetry.sampleRate` (rate_of: the current rate -> the new one, None:
    leave it); the commit, and the rates before and after."""
    from pipelines.operate.commits import change_base_manifest

    seen: dict[str, float | None] = {"before": None, "after": None}

    def change(doc: dict) -> dict | None:
        telemetry = doc["spec"].setdefault("telemetry", {})
        current = float(telemetry.get("sampleRate", 0.0))
        seen["before"] = current
        new = rate_of(current)
        if new is None or new == current:
            return None
        telemetry["sampleRate"] = new
        seen["after"] = new
        return doc

    commit = change_base_manifest(settings, model, change, message, publish)
    return commit, seen["before"], seen["after"]


def lower_sampling(model: str, floor: float, reason: str, settings: Settings | None = None, publish: bool = True,
                   details: str = "") -> BudgetActionRecord:
    """Halve the deployed telemetry sample rate, not below `floor`, by a commit."""
    settings = settings or get_settings()

    def halved(current: float) -> float | None:
        return None if current <= floor else max(floor, round(current / 2, 4))

    message_for = "finops({model}): lower telemetry sampling\n\nBy {by}: {reason}\n\n{details}"
    commit, before, after = _telemetry_commit(
        settings, model, halved, message_for.format(model=model, by=BUDGET_BY, reason=reason, details=details).rstrip()
        + "\n", publish)
    if commit is None:
        return BudgetActionRecord(action="lower_sampling", status="skipped",
                                  detail=f"telemetry.sampleRate {before:g} is at the floor {floor:g} "
                                         "(finops.minSampleRate)")
    return BudgetActionRecord(action="lower_sampling", status="done", commit=commit,
                              detail=f"telemetry.sampleRate {before:g} -> {after:g} (floor {floor:g})")


def restore_sampling(spec_path, by: str, settings: Settings | None = None, publish: bool = True) -> str | None:
    """Commit the spec's own telemetry sample rate back into the deployed manifest; the commit,
    or None when it is already the spec's."""
    from pipelines.specs import load_spec

    settings = settings or get_settings()
    spec = load_spec(spec_path)
    wanted = float(spec.telemetry.sample_rate)
    commit, _, _ = _telemetry_commit(
        settings, spec.name, lambda current: wanted,
        f"finops({spec.name}): restore telemetry sampling to the spec's {wanted:g}\n\nBy {by}.\n", publish)
    return commit


def act_on_breach(spec_path, report, settings: Settings | None = None,
                  notify: Callable[[object], list[str]] | None = None, publish: bool = True) -> list[BudgetActionRecord]:
    """Run the spec's `finops.onBreach` for a breaching FinOps report (`FinOpsReport`); record the
    actions beside the report. A report without a breach does nothing."""
    from pipelines.operate.commits import ManifestChangeError
    from pipelines.operate.rollout import RolloutError, hold_rollout
    from pipelines.specs import load_spec
    from pipelines.storage import ObjectStore

    if not report.breach:
        return []
    settings = settings or get_settings()
    spec = load_spec(spec_path)
    if report.actual_breach:
        reason = (f"spend measured on the devices, ${report.actual_usd_per_month:,.2f}/month, breaches the "
                  f"${report.monthly_budget_usd:,.2f} monthly budget (as of {report.as_of})")
    else:
        reason = (f"30-day spend forecast ${report.total_predicted_usd:,.2f} (upper ${report.total_upper_usd:,.2f}) "
                  f"breaches the ${report.monthly_budget_usd:,.2f} monthly budget (as of {report.as_of})")
    details = f"FinOps report: {report.evidence.get('report.txt', '')}".rstrip(": ")
    done: list[BudgetActionRecord] = []
    for action in spec.finops.on_breach:
        try:
            if action == "notify":
                channels = notify(report) if notify else None
                done.append(BudgetActionRecord(action=action, status="done" if channels else "skipped", detail=(
                    f"alert sent to {', '.join(channels)}" if channels else
                    "no alert channel (alerts are sent by the Airflow DAG edge_finops_report)" if notify is None
                    else "no alert channel configured")))
            elif action == "lower_sampling":
                done.append(lower_sampling(spec.name, spec.finops.min_sample_rate, reason, settings, publish, details))
            elif action == "pause_rollout":
                commit = hold_rollout(spec.name, reason, BUDGET_BY, settings, details=details, publish=publish)
                done.append(BudgetActionRecord(action=action, status="done" if commit else "skipped", commit=commit,
                                               detail="canary held where it is" if commit else "already held"))
        except (RolloutError, ManifestChangeError) as error:
            done.append(BudgetActionRecord(action=action, status="skipped", detail=one_line(error, 300)))
        except Exception as error:  # one failed action must not stop the next
            log.warning("finops.onBreach %s of %s failed: %s", action, spec.name, one_line(error, 300))
            done.append(BudgetActionRecord(action=action, status="failed", detail=one_line(error, 300)))
    store = ObjectStore(settings.store_url, settings.s3_endpoint_url)
    body = "[\n" + ",\n".join(a.model_dump_json() for a in done) + "\n]\n"
    store.put_bytes(body.encode(), f"finops/{spec.name}/{report.as_of}/actions.json")
    return done
