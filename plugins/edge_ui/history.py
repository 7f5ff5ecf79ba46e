"""A model's history for the Edge Releases pages: every release attempt and what people and the
canary analysis did, newest first.

- `model_history`: the release attempts (`pipelines.release.attempts`: released, in review,
  rejected, dry run, failed, waiting for approval, running) with their reasons; the approvals
  on them (who, when, comment); and from the GitOps log of `apps/<model>/`, the rollbacks
  (who, why, from and to version), the canary rollout steps (share before and after), and the
  release commits no attempt record names (releases from before attempts were recorded).
- `last_attempt`: the newest attempt, for the index (a run that failed after a release shows
  as failed).

Each event carries its badge class (`ok`, `bad`, `wait`, `warn`, `neutral`, `info` of edge.css);
templates/history.html renders a list of them (`history_table`).
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Literal

from pydantic import Field

from edge_ui import views
from pipelines.records import Record
from pipelines.release.attempts import Attempt, list_attempts
from pipelines.settings import Settings

Badge = Literal["ok", "bad", "wait", "warn", "neutral", "info"]

_ATTEMPT = {"released": ("released", "ok"), "in_review": ("in review", "info"), "rejected": ("rejected", "bad"),
            "awaiting_approval": ("waiting for approval", "wait"), "dry_run": ("dry run", "neutral"),
            "failed": ("failed", "bad"), "running": ("running", "info")}
_ROLLBACK = re.compile(r"version (?P<source>\S+) -> (?P<target>\S+)")
_ROLLOUT = re.compile(r"version (?P<version>\S+) (?P<before>[\d.]+)% -> (?P<after>[\d.]+)%")
_RELEASE = re.compile(r"^(release|deploy)\([^)]*\): version (?P<version>\S+)")
_EPOCH = datetime.min.replace(tzinfo=timezone.utc)
_COMMITS = ("rollback", "rollout", "release")  # the kinds read from the GitOps log


class HistoryEvent(Record):
    """One thing that happened to a model: an attempt, a person's decision, a rollback, a
    rollout step, or a release commit."""

    at: str = Field(description="When (UTC, ISO 8601, to the millisecond): an attempt's end (its start while it "
                                "runs), a person's answer, a commit.")
    kind: Literal["attempt", "approval", "rollback", "rollout", "release"]
    status: str = Field(description="An attempt's status; `approved` or `rejected` for a person's decision; "
                                    "the kind otherwise.")
    what: str = Field(description="The badge's words.")
    badge: Badge
    version: str | None = Field(None, description="The version it concerns (a rollback's target).")
    from_version: str | None = Field(None, description="A rollback's version rolled back from.")
    share_before: float | None = Field(None, description="A rollout step's canary share before, in percent.")
    share_after: float | None = None
    who: str = Field("", description="Who started, decided or rolled back (or what: the schedule, a drift event).")
    trigger: str = Field("", description="What started an attempt, as recorded.")
    reason: str = Field("", description="Why: an attempt's reasons or error, a comment, a rollback's reason.")
    stage: str | None = Field(None, description="The stage a failed attempt stopped in.")
    run_id: str | None = None
    commit: str | None = None


def _utc(value: str | None) -> datetime:
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return _EPOCH
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)


def _iso(value: str | None) -> str:
    moment = _utc(value)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z") if moment != _EPOCH else str(value or "")


def _started_by(attempt: Attempt) -> str:
    """The person who started it, else what did: the schedule, a drift event, the command line."""
    if attempt.started_by:
        return attempt.started_by
    kind = attempt.trigger.split(":", 1)[0].strip()
    return {"scheduled": "schedule", "asset_triggered": "drift event", "manual": ""}.get(kind, kind)


def attempt_event(attempt: Attempt) -> HistoryEvent:
    """An attempt as the history shows it."""
    what, badge = _ATTEMPT[attempt.status]
    reason = f"{attempt.failed_stage}: {attempt.error}" if attempt.status == "failed" else "; ".join(attempt.reasons)
    return HistoryEvent(at=_iso(attempt.finished_at or attempt.started_at), kind="attempt", status=attempt.status,
                        what=what, badge=badge, version=attempt.version, who=_started_by(attempt),
                        trigger=attempt.trigger, reason=reason, stage=attempt.failed_stage, run_id=attempt.run_id,
                        commit=attempt.gitops_commit)


def _approval_event(attempt: Attempt) -> HistoryEvent:
    approval = attempt.approval
    status = "approved" if approval.approved else "rejected"
    return HistoryEvent(at=_iso(approval.at), kind="approval", status=status, what=status,
                        badge="ok" if approval.approved else "bad", version=attempt.version, who=approval.by,
                        reason=approval.comment, run_id=attempt.run_id)


def _line(body: str, label: str) -> str:
    """The value of a `Label: value` line of a commit message ('' when none)."""
    found = re.search(rf"^{re.escape(label)}:\s*(.*)$", body, re.MULTILINE)
    return found.group(1).strip() if found else ""


def _commit_event(commit: views.GitCommit) -> HistoryEvent | None:
    """A rollback, a rollout step or a release commit; None for any other commit."""
    at = _iso(commit.date)
    if commit.kind == "rollback" and (found := _ROLLBACK.search(commit.subject)):
        return HistoryEvent(at=at, kind="rollback", status="rollback", what="rollback", badge="warn",
                            version=found["target"], from_version=found["source"],
                            who=_line(commit.body, "Rolled back by"), reason=_line(commit.body, "Reason"),
                            commit=commit.sha)
    if commit.kind == "rollout" and (found := _ROLLOUT.search(commit.subject)):
        return HistoryEvent(at=at, kind="rollout", status="rollout", what="rollout step", badge="wait",
                            version=found["version"], share_before=float(found["before"]),
                            share_after=float(found["after"]), who="canary analysis",
                            reason=_line(commit.body, "Decision") or f"{found['before']}% -> {found['after']}%",
                            commit=commit.sha)
    if found := _RELEASE.search(commit.subject):
        approved = _line(commit.body, "Approved by")
        return HistoryEvent(at=at, kind="release", status="released", badge="ok",
                            what="deployed" if commit.subject.startswith("deploy(") else "released",
                            version=found["version"], who=approved.split(" at ", 1)[0], reason=commit.subject,
                            commit=commit.sha)
    return None


def model_history(model: str, settings: Settings | None = None, limit: int | None = 200) -> list[HistoryEvent]:
    """Every event of `model`, newest first, at most `limit` (None: all). UnknownModel for a
    name that cannot be a model's; errors of the store or the GitOps repository are raised."""
    settings = views._settings(settings)
    views.check_model_name(model)
    attempts = list_attempts(model, views._store(settings), limit)
    events = [attempt_event(a) for a in attempts]
    events += [_approval_event(a) for a in attempts if a.approval is not None]
    recorded = {a.gitops_commit for a in attempts if a.gitops_commit}
    for commit in views._history(model, settings):
        event = _commit_event(commit)
        if event is not None and not (event.kind == "release" and commit.sha in recorded):
            events.append(event)
    events.sort(key=_order, reverse=True)
    return events[:limit]


def _order(event: HistoryEvent) -> tuple[datetime, bool]:
    """When an event happened, for sorting: a commit's time is known to the second only, so it
    counts as after the attempts that ended within that second; at one moment, a run's end
    follows what happened in it (a person's answer)."""
    moment = _utc(event.at)
    if event.kind in _COMMITS:
        moment += timedelta(milliseconds=999)
    return moment, event.kind == "attempt"


def last_attempt(model: str, settings: Settings | None = None) -> HistoryEvent | None:
    """The newest release attempt of `model` (None before the first recorded one)."""
    settings = views._settings(settings)
    views.check_model_name(model)
    newest = list_attempts(model, views._store(settings), 1)
    return attempt_event(newest[0]) if newest else None
