"""Every release attempt, as one record in the artifact store: what started it and how it ended.

A run (an Airflow DAG run, or the CLI's `run_release`) records itself as `running` when it
starts, and its outcome at its end: from the release summary (`finish_attempt`), or the stage
and the error that stopped it (`fail_attempt`). A person's decision in Required Actions is
added when it is made (`record_approval`). The record lives at
`releases/<model>/attempts/<UTC stamp>-<run id slug>.json`, the stamp being when the run
started: names sort oldest first. The record of a run id is found again by its slug, so a
retried task updates the same record.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal
from uuid import uuid4

from pydantic import Field

from pipelines.errors import one_line
from pipelines.records import Approval, Record, ReleaseSummary
from pipelines.specs import DNS_LABEL
from pipelines.storage import ObjectStore

AttemptStatus = Literal["running", "released", "in_review", "rejected", "awaiting_approval", "dry_run", "failed"]

ERROR_LIMIT = 500  # characters of an error line
_STAMP = "%Y%m%dT%H%M%S%fZ"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


class Attempt(Record):
    """One run of a model's release, whatever its outcome."""

    model: str
    run_id: str = Field(description="The Airflow run id, or the id the CLI made (`cli__<time>__<hex>`).")
    trigger: str = Field(description="What started it, as the release records it: `scheduled`, "
                                     "`asset_triggered: <the drift events' figures>`, `manual: <reason>`, `cli`.")
    started_by: str = Field("", description="Who started it: the Airflow user of a run started by hand.")
    started_at: str
    finished_at: str | None = None
    status: AttemptStatus = "running"
    version: str | None = Field(None, description="The MLflow version, once registered.")
    reasons: list[str] = Field(default_factory=list, description="Why it was not released (the summary's).")
    failed_stage: str | None = Field(None, description="The stage (Airflow task) that failed.")
    error: str | None = Field(None, description="What failed, on one line, credentials redacted.")
    approval: Approval | None = Field(None, description="A person's decision (who, when, comment).")
    gitops_commit: str | None = None


def now() -> str:
    """The current UTC time, ISO 8601 to the millisecond (attempts of one second stay in order)."""
    return _iso(datetime.now(timezone.utc))


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_run_id(prefix: str = "cli") -> str:
    """A run id for a release started outside Airflow: `<prefix>__<UTC time>__<8 hex>`."""
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    return f"{prefix}__{stamp}__{uuid4().hex[:8]}"


def folder(model: str) -> str:
    """The store folder of a model's attempts; ValueError unless `model` is a DNS label."""
    if not isinstance(model, str) or not DNS_LABEL.match(model):
        raise ValueError(f"{model!r} is not a model name (a DNS label)")
    return f"releases/{model}/attempts/"


def run_slug(run_id: str) -> str:
    """`run_id` as a safe file name: letters, digits, `_` and `-` only, cut to 80 characters,
    with a digest of the whole id so two ids never share a name."""
    digest = hashlib.sha256(run_id.encode()).hexdigest()[:10]
    return f"{_UNSAFE.sub('_', run_id)[:80]}-{digest}"


def error_line(error: BaseException | str, folders: tuple[str | Path, ...] = ()) -> str:
    """An error as one line with credentials in URLs redacted: a release or spec error's own
    message, any other exception's type and message. Paths inside `folders` (the specs and
    state folders) are written relative to them: the record names the file, not the host."""
    from pipelines.gitops.git import redact
    from pipelines.release.context import ReleaseError
    from pipelines.specs import SpecError

    text = redact(str(error))
    for folder in folders:
        for form in {str(folder), str(Path(folder).resolve())}:
            text = text.replace(form.rstrip("/") + "/", "")
    if isinstance(error, BaseException) and not isinstance(error, (ReleaseError, SpecError)):
        text = f"{type(error).__name__}: {text}" if text.strip() else type(error).__name__
    return one_line(text, ERROR_LIMIT)


def _key_of(model: str, run_id: str, store: ObjectStore) -> str | None:
    suffix = f"-{run_slug(run_id)}.json"
    return next((k for k in reversed(store.list_keys(folder(model))) if k.endswith(suffix)), None)


def load_attempt(model: str, run_id: str, store: ObjectStore) -> Attempt | None:
    """The attempt of `run_id`, or None when it has none."""
    key = _key_of(model, run_id, store)
    return Attempt.model_validate_json(store.read_bytes(key)) if key else None


def _update(model: str, run_id: str, store: ObjectStore, trigger: str, started_by: str = "",
            started_at: datetime | None = None, **changes) -> Attempt:
    """The attempt of `run_id` with `changes`, saved in place; a new one (started at
    `started_at`, or now) when the run has none yet."""
    key = _key_of(model, run_id, store)
    if key is None:
        moment = (started_at or datetime.now(timezone.utc)).astimezone(timezone.utc)
        attempt = Attempt(model=model, run_id=run_id, trigger=trigger, started_by=started_by, started_at=_iso(moment))
        key = f"{folder(model)}{moment.strftime(_STAMP)}-{run_slug(run_id)}.json"
    else:
        attempt = Attempt.model_validate_json(store.read_bytes(key))
    attempt = Attempt.model_validate({**attempt.model_dump(), **changes})
    store.put_bytes(attempt.model_dump_json(indent=2).encode(), key)
    return attempt


def start_attempt(model: str, run_id: str, trigger: str, store: ObjectStore, started_by: str = "",
                  started_at: datetime | None = None) -> Attempt:
    """Record the run as `running` (started at `started_at`, or now). A run that has a record
    (its first task retried) keeps its start and is running again."""
    return _update(model, run_id, store, trigger, started_by, started_at, status="running", finished_at=None,
                   failed_stage=None, error=None)


def finish_attempt(summary: ReleaseSummary, run_id: str, store: ObjectStore) -> Attempt:
    """Record the run's outcome from its release summary (a person's decision recorded before
    is kept when the summary has none)."""
    return _update(summary.model, run_id, store, summary.trigger, status=summary.status, finished_at=now(),
                   version=summary.model_version, reasons=list(summary.reasons), failed_stage=None, error=None,
                   gitops_commit=summary.gitops_commit, **({"approval": summary.approval} if summary.approval else {}))


def fail_attempt(model: str, run_id: str, stage: str, error: BaseException | str, store: ObjectStore,
                 trigger: str = "", version: str | None = None, folders: tuple[str | Path, ...] = ()) -> Attempt:
    """Record the run as `failed` in `stage`, with the error on one line (`error_line`, paths
    relative to `folders`) and the version it registered, if it got that far."""
    return _update(model, run_id, store, trigger, status="failed", finished_at=now(), failed_stage=stage,
                   error=error_line(error, folders), **({"version": version} if version else {}))


def record_approval(model: str, run_id: str, approval: Approval, store: ObjectStore, trigger: str = "") -> Attempt:
    """Record a person's decision on the run (who, when, comment) as soon as it is made."""
    return _update(model, run_id, store, trigger, approval=approval)


def list_attempts(model: str, store: ObjectStore, limit: int | None = 50) -> list[Attempt]:
    """The model's attempts, newest first, at most `limit` (None: all)."""
    keys = sorted(store.list_keys(folder(model)), reverse=True)
    keys = [k for k in keys if k.endswith(".json")][:limit]
    return [Attempt.model_validate_json(store.read_bytes(k)) for k in keys]
