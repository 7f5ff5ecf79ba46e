"""Audit retention: what the artifact store keeps of each release, and what it may remove.

A model's audit trail is kept in two places of the artifact store: each release's folder
`runs/<model>/<release key>/` (its data snapshot, model files, verdicts, evidence, model card
and summaries) and each attempt `releases/<model>/attempts/<stamp>-<run>.json` (who started a
run, a person's approval). Each is an item of the plan, owned by the model versions it names,
and falls under one rule:

- `deployed`: a version the GitOps branch deploys (the base manifest's version, and a canary's
  control version `rollout.previousVersion`) or MLflow's `champion`: kept, whatever its age.
- `pending`: a release waiting for a person or for the review of its branch: kept.
- `within_window`: kept until its clock is `auditRetentionDays` old. The clock starts at the
  item's last write, or, for a version the fleet ran, when the GitOps branch stopped deploying
  it, whichever is later. A version that never shipped (rejected, a dry run, a failed run) is
  retired from its last write.
- `expired`: past its window and not deployed: removed by `apply_retention`.

The window is the largest of the spec's `responsibleAI.auditRetentionDays` and of the spec
snapshots the release stored when it ran (a window is never shortened after the evidence was
written: that is also the date S3 Object Lock holds it to). A model whose spec is gone and whose
releases stored no snapshot keeps `UNKNOWN_WINDOW_DAYS`, the longest window a spec may ask.

Nothing else is touched: the published models and signatures (`models/`), the TUF repository,
the latest summaries, rollout, monitoring and FinOps records, and telemetry. Time is the
caller's (`now`); dates decide, so an object under Object Lock is never asked to go early.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import PurePosixPath
from typing import Literal

from pydantic import Field

from pipelines.records import Record
from pipelines.settings import Settings
from pipelines.specs import SpecError, discover_specs, load_spec
from pipelines.storage import ObjectStore, StoredObject, StoreError

log = logging.getLogger(__name__)

RUNS_PREFIX = "runs/"
RELEASES_PREFIX = "releases/"
AUDIT_PREFIX = "audit/retention"
UNKNOWN_WINDOW_DAYS = 3650  # the largest responsibleAI.auditRetentionDays a spec may ask
DEFAULT_WINDOW_DAYS = 365  # a stored spec from before the field existed kept evidence this long
PENDING = ("awaiting_approval", "in_review")

Rule = Literal["deployed", "pending", "within_window", "expired"]


class RetentionItem(Record):
    """One release folder or one attempt record, and the rule that keeps or removes it."""

    model: str
    kind: Literal["release", "attempt"]
    location: str = Field(description="The release folder (`runs/<model>/<key>/`) or the attempt's key.")
    versions: list[str] = Field(description="The model versions it belongs to; [] for a run that registered none.")
    rule: Rule
    window_days: int
    clock_from: datetime = Field(description="Its last write, or when the fleet stopped running its version.")
    expires_at: datetime | None = Field(None, description="None while its version is deployed or pending.")
    keys: list[str]


class RetentionPlan(Record):
    """Every item of the store's audit trail at `now`, with its rule."""

    now: datetime
    deployed: dict[str, list[str]] = Field(description="Deployed versions by model.")
    items: list[RetentionItem]

    def by_rule(self, rule: Rule) -> list[RetentionItem]:
        return [item for item in self.items if item.rule == rule]

    def lines(self) -> list[str]:
        """The plan as a short table, one line per item."""
        rows = [f"  {'model':<20} {'kind':<8} {'versions':<9} {'rule':<14} {'window':>7}  {'expires':<10}  location"]
        for item in self.items:
            expires = f"{item.expires_at:%Y-%m-%d}" if item.expires_at else "-"
            versions = ",".join(item.versions) or "-"
            rows.append(f"  {item.model:<20} {item.kind:<8} {versions:<9} {item.rule:<14} "
                        f"{item.window_days:>5} d  {expires:<10}  {_short(item.location)}")
        return rows


class RetentionResult(Record):
    """What one run of the retention job removed, and what it kept."""

    plan: RetentionPlan
    dry_run: bool
    deleted: list[str] = Field(description="Keys removed (none in a dry run).")
    refused: dict[str, str] = Field(default_factory=dict, description="Keys the store would not remove, and why.")
    record_uri: str | None = Field(None, description="This run's own record in the store (none in a dry run).")

    def lines(self) -> list[str]:
        """The plan's table, then what was removed."""
        plan = self.plan
        head = f"Audit retention at {_iso(plan.now)}" + (" (dry run: nothing deleted)" if self.dry_run else "")
        counts = ", ".join(f"{len(plan.by_rule(r))} {r.replace('_', ' ')}"
                           for r in ("deployed", "pending", "within_window", "expired"))
        expired_keys = sum(len(item.keys) for item in plan.by_rule("expired"))
        done = (f"would delete {expired_keys} objects" if self.dry_run else
                f"deleted {len(self.deleted)} objects" + (f", {len(self.refused)} refused" if self.refused else ""))
        lines = [head, *plan.lines(), f"{len(plan.items)} items: {counts}; {done}"]
        lines += [f"  refused {key}: {why}" for key, why in self.refused.items()]
        if self.record_uri:
            lines.append(f"record: {self.record_uri}")
        return lines


# -- what is deployed ---------------------------------------------------------------------------
def _manifest_versions(text: str | None) -> set[str]:
    """Versions a base manifest deploys: its own, and a canary's control version."""
    from pipelines.gitops import manifest

    if not text:
        return set()
    doc = manifest.read_manifest(text)
    versions = {str(doc["spec"]["modelRef"]["version"])}
    rollout = doc["spec"].get("rollout") or {}
    if rollout.get("previousVersion") is not None:
        versions.add(str(rollout["previousVersion"]))
    return versions


def fleet_history(settings: Settings, model: str) -> tuple[set[str], dict[str, datetime]]:
    """The versions the GitOps branch deploys now, and for each version it deployed before,
    when it stopped (the date of the commit that left it out, the latest such commit when it
    came back in between)."""
    from pipelines.gitops import manifest, repo

    path = manifest.base_manifest_path(model)
    work = settings.work_dir / "gitops"
    if repo.read_file(settings.remote, settings.gitops_branch, path, work) is None:
        return set(), {}
    dates = {c["sha"]: datetime.fromisoformat(c["date"]).astimezone(timezone.utc)
             for c in repo.log(settings.remote, settings.gitops_branch, work, path)}
    history = list(reversed(repo.history(settings.remote, settings.gitops_branch, path, work)))  # oldest first
    retired: dict[str, datetime] = {}
    before: set[str] = set()
    for sha, text in history:
        now_deployed = _manifest_versions(text)
        for version in before - now_deployed:
            retired[version] = max(retired.get(version, dates[sha]), dates[sha])
        before = now_deployed
    return before, retired


def _champion(settings: Settings, model: str) -> str | None:
    """The version MLflow's `champion` alias names; None when the model or alias does not exist.
    An unreachable registry raises: without it nothing is known to be safe to remove."""
    from pipelines import registry

    try:
        return str(registry.client(settings.tracking_uri).get_model_version_by_alias(
            model, registry.CHAMPION_ALIAS).version)
    except Exception as error:  # MLflow raises MlflowException for a missing model or alias
        code = f"{getattr(error, 'error_code', '')} {error}"
        if "RESOURCE_DOES_NOT_EXIST" in code or "INVALID_PARAMETER_VALUE" in code:
            return None
        raise


# -- what the store holds -----------------------------------------------------------------------
def _json(store: ObjectStore, key: str) -> dict:
    """A stored JSON document; {} when it is not one (a record is never trusted to parse)."""
    try:
        value = json.loads(store.read_bytes(key))
    except (StoreError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _release_folders(objects: list[StoredObject]) -> dict[tuple[str, str], list[StoredObject]]:
    """The store's objects under `runs/` grouped by (model, release key)."""
    folders: dict[tuple[str, str], list[StoredObject]] = defaultdict(list)
    for obj in objects:
        parts = PurePosixPath(obj.key).parts
        if len(parts) >= 4 and parts[0] == "runs":
            folders[(parts[1], parts[2])].append(obj)
    return folders


def _spec_window(settings: Settings) -> dict[str, int]:
    """auditRetentionDays of each model whose spec is in the specs folder and valid."""
    windows = {}
    for name, path in discover_specs(settings.specs_dir).items():
        try:
            windows[name] = load_spec(path).responsible_ai.audit_retention_days
        except SpecError as error:
            log.warning("retention: %s; its stored snapshots decide its window", error)
    return windows


def _snapshot_window(store: ObjectStore, objects: list[StoredObject]) -> int | None:
    """The largest auditRetentionDays of the spec snapshots a release stored (`specs/*.json`)."""
    found = []
    for obj in objects:
        if PurePosixPath(obj.key).parts[3:4] == ("specs",) and obj.key.endswith(".json"):
            ai = _json(store, obj.key).get("responsibleAI") or {}
            found.append(int(ai.get("auditRetentionDays", DEFAULT_WINDOW_DAYS)))
    return max(found, default=None)


def _folder_facts(store: ObjectStore, objects: list[StoredObject]) -> tuple[set[str], set[str], str]:
    """A release folder's versions (from its summaries), the shipped sha256s it built (its
    quantization record's chosen variant), and its root summary's status."""
    versions, shas, status = set(), set(), ""
    for obj in objects:
        name = PurePosixPath(obj.key)
        if name.name.startswith("summary") and name.suffix == ".json":
            summary = _json(store, obj.key)
            if summary.get("model_version"):
                versions.add(str(summary["model_version"]))
            if len(name.parts) == 4 and name.name == "summary.json":
                status = summary.get("status", "")
        elif len(name.parts) == 4 and name.name == "quantization.json":
            plan = _json(store, obj.key)
            chosen = next((c for c in plan.get("candidates", []) if c.get("variant") == plan.get("chosen")), {})
            if chosen.get("sha256"):
                shas.add(chosen["sha256"])
    return versions, shas, status


def _versions_by_sha(store: ObjectStore, model: str, summaries: list[tuple[set[str], str]]) -> dict[str, set[str]]:
    """Which versions carry each artifact sha256: the published markers, and the summaries."""
    found: dict[str, set[str]] = defaultdict(set)
    for key in store.list_keys(f"models/{model}/"):
        if key.endswith("/model.json") and key.count("/") == 3:
            marker = _json(store, key)
            if marker.get("sha256") and marker.get("version"):
                found[marker["sha256"]].add(str(marker["version"]))
    for versions, sha in summaries:
        if sha:
            found[sha] |= versions
    return found


# -- the plan -----------------------------------------------------------------------------------
def _rule(versions: set[str], deployed: set[str], pending: bool, expires: datetime, now: datetime) -> Rule:
    if versions & deployed:
        return "deployed"
    if pending:
        return "pending"
    return "expired" if now >= expires else "within_window"


def _item(model: str, kind: str, location: str, objects: list[StoredObject], versions: set[str], window: int,
          deployed: set[str], retired: dict[str, datetime], pending: bool, now: datetime) -> RetentionItem:
    """One item: its clock starts at its last write or its versions' retirement, whichever is later."""
    clock = max([o.modified for o in objects] + [retired[v] for v in versions if v in retired])
    expires = clock + timedelta(days=window)
    rule = _rule(versions, deployed, pending, expires, now)
    return RetentionItem(model=model, kind=kind, location=location, versions=sorted(versions, key=_version_order),
                         rule=rule, window_days=window, clock_from=clock,
                         expires_at=expires if rule in ("within_window", "expired") else None,
                         keys=[o.key for o in objects])


def plan_retention(settings: Settings, now: datetime) -> RetentionPlan:
    """Every release folder and attempt of every model in the artifact store, with the rule
    that keeps or removes it at `now` (a time zone is required; naive times are taken as UTC).
    Reads the store, the GitOps branch and MLflow's champion alias; writes nothing."""
    now = _utc(now)
    store = ObjectStore(settings.store_url, settings.s3_endpoint_url)
    folders = _release_folders(store.objects(RUNS_PREFIX))
    attempts: dict[str, list[StoredObject]] = defaultdict(list)
    for obj in store.objects(RELEASES_PREFIX):
        parts = PurePosixPath(obj.key).parts
        if len(parts) == 4 and parts[2] == "attempts" and obj.key.endswith(".json"):
            attempts[parts[1]].append(obj)
    spec_windows = _spec_window(settings)
    models = sorted({m for m, _ in folders} | set(attempts))
    items: list[RetentionItem] = []
    deployed_by_model: dict[str, list[str]] = {}
    for model in models:
        deployed, retired = fleet_history(settings, model)
        champion = _champion(settings, model)
        deployed |= {champion} if champion else set()
        deployed_by_model[model] = sorted(deployed, key=_version_order)
        own = {rk: objs for (m, rk), objs in folders.items() if m == model}
        facts = {rk: _folder_facts(store, objs) for rk, objs in own.items()}
        by_sha = _versions_by_sha(store, model, [(v, _summary_sha(store, own[rk])) for rk, (v, _, _) in facts.items()])
        snapshots = {rk: _snapshot_window(store, objs) for rk, objs in own.items()}
        model_window = max([spec_windows.get(model, 0), *[w for w in snapshots.values() if w]]) or UNKNOWN_WINDOW_DAYS
        for rk, objs in sorted(own.items()):
            versions, shas, status = facts[rk]
            versions = versions | {v for sha in shas for v in by_sha.get(sha, ())}
            window = max(spec_windows.get(model, 0), snapshots[rk] or 0) or UNKNOWN_WINDOW_DAYS
            items.append(_item(model, "release", f"runs/{model}/{rk}/", objs, versions, window, deployed, retired,
                               status in PENDING, now))
        for obj in attempts.get(model, []):
            record = _json(store, obj.key)
            versions = {str(record["version"])} if record.get("version") else set()
            items.append(_item(model, "attempt", obj.key, [obj], versions, model_window, deployed, retired,
                               record.get("status") in PENDING, now))
    return RetentionPlan(now=now, deployed=deployed_by_model, items=items)


def _summary_sha(store: ObjectStore, objects: list[StoredObject]) -> str:
    """The artifact sha256 of a release folder's root summary ('' without one)."""
    root = next((o.key for o in objects if len(PurePosixPath(o.key).parts) == 4
                 and PurePosixPath(o.key).name == "summary.json"), None)
    return _json(store, root).get("artifact_sha256", "") if root else ""


# -- applying it --------------------------------------------------------------------------------
def apply_retention(settings: Settings, now: datetime, dry_run: bool = False) -> RetentionResult:
    """Remove the expired items of the plan at `now`, records before the files they point to,
    and write this run's record (`audit/retention/<stamp>.json`: what was removed, by rule and
    item), itself audit evidence, locked like evidence when the store has Object Lock. A key the
    store refuses is reported and the others go on. A dry run removes and writes nothing."""
    plan = plan_retention(settings, now)
    expired = plan.by_rule("expired")
    if dry_run:
        return RetentionResult(plan=plan, dry_run=True, deleted=[])
    store = ObjectStore(settings.store_url, settings.s3_endpoint_url, object_lock=settings.object_lock_mode)
    deleted, refused = [], {}
    for item in expired:
        # Records (.json) first: a stage that resumes never finds a record whose files are gone.
        for key in sorted(item.keys, key=lambda k: (not k.endswith(".json"), k)):
            try:
                store.delete(key)
                deleted.append(key)
            except StoreError as error:
                refused[key] = str(error)
                log.warning("retention: %s", error)
    result = RetentionResult(plan=plan, dry_run=False, deleted=deleted, refused=refused)
    return result.model_copy(update={"record_uri": _write_record(store, result)})


def record_key(now: datetime) -> str:
    """Where the retention run at `now` records itself."""
    return f"{AUDIT_PREFIX}/{_utc(now):%Y%m%dT%H%M%SZ}.json"


def _write_record(store: ObjectStore, result: RetentionResult) -> str:
    """This run's record; a retry at the same time adds to the first try's record."""
    plan = result.plan
    key = record_key(plan.now)
    earlier = _json(store, key) if store.exists(key) else {}
    removed = {entry["key"]: entry for entry in earlier.get("deleted", [])}
    for item in plan.by_rule("expired"):
        for k in item.keys:
            if k in result.deleted:
                removed[k] = {"key": k, "rule": item.rule, "model": item.model, "kind": item.kind,
                              "item": item.location, "versions": item.versions,
                              "expired_at": _iso(item.expires_at)}
    record = {
        "schema": "edge-release/audit-retention/v1", "now": _iso(plan.now),
        "deleted": sorted(removed.values(), key=lambda e: e["key"]), "refused": result.refused,
        "kept": {rule: [i.location for i in plan.by_rule(rule)] for rule in ("deployed", "pending", "within_window")},
        "deployed": plan.deployed,
    }
    longest = max([i.window_days for i in plan.items], default=DEFAULT_WINDOW_DAYS)
    return store.put_bytes(json.dumps(record, indent=1).encode(), key,
                           retain_until=plan.now + timedelta(days=longest))


# -- small helpers ------------------------------------------------------------------------------
def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def _iso(moment: datetime) -> str:
    return _utc(moment).isoformat(timespec="seconds").replace("+00:00", "Z")


def _version_order(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (1 << 30, version)


def _short(location: str) -> str:
    """A location with its release key shortened to 12 characters, an attempt to its start time."""
    parts = location.split("/")
    if parts[0] == "runs" and len(parts) > 2 and len(parts[2]) > 12:
        parts[2] = parts[2][:12] + "…"
    elif parts[0] == "releases" and len(parts) == 4 and "-" in parts[3]:
        parts[3] = parts[3].split("-", 1)[0] + "-…"
    return "/".join(parts)
