"""Read models of the "Edge Releases" view: what a data scientist wants to know about each
model, assembled from the stores the release writes (no Airflow here).

- `list_models`: one row per model (specs folder, GitOps repository, release summaries):
  what each device group runs (the overlays resolved at the tip of the GitOps branch, with
  the canary share), the last release's outcome, the monthly cost against the budget, and the
  latest drift check.
- `model_page`: the spec's facts, every MLflow version joined with its stored summary
  (verdicts, evidence, model card, cost and its diff, quantization), the GitOps history of
  `apps/<model>/`, the deployment per group and the latest drift check.
- `version_page`: one version, with `explain_rejection`'s plain sentences when it did not ship.
- `open_evidence`: the bytes of an evidence file, only for URIs inside the artifact store.

Every record is a pydantic `Record`, so the plugin's JSON API returns them as they are.
"""

from __future__ import annotations

import json
import mimetypes
import posixpath
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

from pydantic import Field

from pipelines.gates import by_variant
from pipelines.records import GateVerdict, QuantCandidate, Record, ShippedVariant, usd
from pipelines.release.attempts import Attempt, list_attempts
from pipelines.settings import Settings, get_settings
from pipelines.specs import DNS_LABEL
from pipelines.storage import ObjectStore, StoreError

_VERSION = re.compile(r"^[0-9]{1,9}$")
_COMMIT_KINDS = ("release", "rollout", "rollback")
_SUMMARY_FILE = "summary.json"
_DRIFT_FILE = "drift.json"
_QUALITY_FILE = "quality.json"


class UnknownModel(KeyError):
    """No spec, deployment, summary or registered version has this name."""


class EvidenceError(ValueError):
    """The URI is not an evidence file of the artifact store."""


# -- records -------------------------------------------------------------------------------------
class GroupDeployment(Record):
    """What one device group of a model runs now, per the tip of the GitOps branch."""

    group: str
    version: str
    variant: str | None = None
    size_bytes: int | None = None
    selector: dict[str, str] = Field(default_factory=dict)
    share: float = Field(100.0, description="Percent of the group's devices on `version`.")
    previous_version: str | None = Field(None, description="What the other devices run during a canary.")
    canary: bool = False
    canary_step: int | None = None
    canary_steps: int | None = None
    latency_slo_ms: float | None = None
    latency_p95_ms: float | None = Field(None, description="Projected p95 on the group's devices (cost brief).")
    usd_per_month: float | None = None
    rollback_from: str | None = Field(None, description="Set when this deployment is a rollback.")


class ReleaseOutcome(Record):
    """The last release of a model (its latest summary)."""

    version: str
    status: str
    reasons: list[str] = Field(default_factory=list)
    when: str | None = Field(None, description="When the summary was written (UTC, ISO 8601).")
    trigger: str | None = None
    gitops_commit: str | None = None


class CostStatus(Record):
    deployed_usd_per_month: float | None = Field(None, description="From the deployed manifest's cost brief.")
    deployed_version: str | None = None
    latest_usd_per_month: float | None = Field(None, description="From the latest release summary.")
    latest_version: str | None = None
    budget_usd_per_month: float | None = None
    over_budget: bool = False


class DriftStatus(Record):
    status: str
    reason: str = ""
    checked_at: str | None = None
    deployed_version: str | None = None
    drifted_share: float | None = None
    drift_share_threshold: float | None = None
    drifted_column_names: list[str] = Field(default_factory=list)
    report_uri: str | None = None
    summary_uri: str | None = None


class FieldQuality(Record):
    """The latest field quality and fairness check of a model (`pipelines.operate.quality`)."""

    status: str
    reason: str = ""
    checked_at: str | None = None
    window_start: str | None = None
    labelled: int = 0
    labels_received: int = 0
    unmatched: int = 0
    late: int = 0
    versions: list[dict] = Field(default_factory=list, description="Per version: role, labelled, figures, breaches.")
    actions: list[dict] = Field(default_factory=list, description="The onBreach actions and what came of them.")
    report_uri: str | None = None
    summary_uri: str | None = None
    explanations: int = 0


class MeasuredCost(Record):
    """The newest day of cost measured on the devices (the daily FinOps report's `actual.json`)."""

    as_of: str
    since: str
    until: str
    total_usd: float
    estimated_total_usd: float | None = None
    classes: list[dict] = Field(default_factory=list)
    summary_uri: str | None = None
    focus_uri: str | None = None


class ModelRow(Record):
    model: str
    owner: str | None = None
    description: str = ""
    has_spec: bool = False
    spec_error: str | None = None
    deployed_version: str | None = None
    deployments: list[GroupDeployment] = Field(default_factory=list)
    last_release: ReleaseOutcome | None = None
    last_attempt: Attempt | None = Field(None, description="The newest release run, whatever its outcome "
                                         "(a run that failed or is still going after the last release).")
    cost: CostStatus = CostStatus()
    drift: DriftStatus | None = None
    problems: list[str] = Field(default_factory=list, description="What could not be read, and why.")


class TargetFacts(Record):
    name: str
    selector: dict[str, str]
    latency_slo_ms: float | None = None
    requires_review: bool = False


class SpecFacts(Record):
    """The spec as a data scientist reads it: who, what, and which thresholds apply."""

    owner: str
    description: str = ""
    intended_use: str = ""
    limitations: list[str] = Field(default_factory=list)
    data_source: str
    target: str
    features: list[str]
    sensitive_features: list[str] = Field(default_factory=list)
    framework: str
    model_type: str | None = None
    quantization: list[str] = Field(default_factory=list)
    accuracy_budget: float
    quality: dict[str, dict] = Field(default_factory=dict)
    fairness: dict = Field(default_factory=dict)
    drift_share: float
    waived: dict[str, str] = Field(default_factory=dict)
    targets: list[TargetFacts] = Field(default_factory=list)
    cost_center: str
    project: str
    monthly_budget_usd: float
    deployment_strategy: str
    canary_steps: list[int] = Field(default_factory=list)
    memory_limit: str | None = None
    approval: str
    schedule: str | None = None


class CostGroup(Record):
    group: str
    variant: str | None = None
    devices: int | None = None
    device_classes: list[str] = Field(default_factory=list)
    latency_p95_ms: float | None = None
    usd_per_month: float | None = None
    energy_usd: float | None = None
    ota_usd: float | None = None
    telemetry_usd: float | None = None
    change: str | None = Field(None, description="new, changed or removed vs the deployed version.")
    delta_usd_per_month: float | None = None
    previous_variant: str | None = None


class CostView(Record):
    total_usd_per_month: float | None = None
    budget_usd_per_month: float | None = None
    training_usd_per_month: float | None = None
    baseline: str | None = Field(None, description="What the diff compares against: `new` or `v<version>`.")
    delta_usd_per_month: float | None = None
    groups: list[CostGroup] = Field(default_factory=list)
    diff_lines: list[str] = Field(default_factory=list)


class VersionSummary(Record):
    """The parts of a stored release summary the view shows."""

    status: str
    reasons: list[str] = Field(default_factory=list)
    trigger: str | None = None
    release_key: str
    run_id: str | None = None
    artifact_uri: str | None = None
    artifact_sha256: str | None = None
    gitops_commit: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict, description="The native (fp32) model's.")
    shipped: list[ShippedVariant] = Field(default_factory=list, description="What the devices run, measured on "
                                          "the same held-out rows: the headline figures.")
    verdicts: list[GateVerdict] = Field(default_factory=list)
    model_card_uri: str | None = None
    quantization_choice: str | None = None
    quantization_reason: str | None = None
    quantization_candidates: list[QuantCandidate] = Field(default_factory=list)
    cost: CostView | None = None
    approved_by: str | None = None
    approved_at: str | None = None
    approval_comment: str | None = None


class VersionRow(Record):
    version: str
    created: str | None = None
    status: str | None = Field(None, description="MLflow tag release_status (released, rejected, rolled_back ...).")
    reasons: list[str] = Field(default_factory=list)
    trigger: str | None = None
    gitops_commit: str | None = None
    review_branch: str | None = None
    release_key: str | None = None
    run_id: str | None = None
    aliases: list[str] = Field(default_factory=list)
    rolled_back_by: str | None = None
    rollback_reason: str | None = None
    summary: VersionSummary | None = None
    explanation: list[str] = Field(default_factory=list, description="Why it did not ship, in plain words.")


class GitCommit(Record):
    sha: str
    date: str
    subject: str
    kind: str = Field(description="release, rollout, rollback or other.")
    body: str = ""


class BudgetActionView(Record):
    """One action of `finops.onBreach` the daily FinOps job took (`finops/<model>/<date>/actions.json`)."""

    date: str
    action: str
    status: str
    detail: str
    commit: str | None = None
    branch: str | None = Field(None, description="The review branch it was committed to; None: the GitOps branch.")


class ModelPage(Record):
    model: str
    spec: SpecFacts | None = None
    row: ModelRow
    versions: list[VersionRow] = Field(default_factory=list)
    history: list[GitCommit] = Field(default_factory=list)
    drift: DriftStatus | None = None
    field_quality: FieldQuality | None = None
    measured_cost: MeasuredCost | None = None
    budget_actions: list[BudgetActionView] = Field(default_factory=list, description="Newest first, 14 days at most.")
    problems: list[str] = Field(default_factory=list)


class VersionPage(Record):
    model: str
    spec: SpecFacts | None = None
    version: VersionRow
    deployed_to: list[GroupDeployment] = Field(default_factory=list,
                                               description="Device groups running this version now.")
    commits: list[GitCommit] = Field(default_factory=list, description="GitOps commits naming this version.")
    problems: list[str] = Field(default_factory=list)


# -- small helpers -------------------------------------------------------------------------------
def _settings(settings: Settings | None) -> Settings:
    return settings or get_settings()


def _store(settings: Settings) -> ObjectStore:
    return ObjectStore(settings.store_url, settings.s3_endpoint_url)


def check_model_name(model: str) -> str:
    """`model` if it can name a model (a DNS label); UnknownModel otherwise."""
    if not isinstance(model, str) or not DNS_LABEL.match(model):
        raise UnknownModel(model)
    return model


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _iso_ms(millis: int | None) -> str | None:
    return None if not millis else _iso(datetime.fromtimestamp(millis / 1000, tz=timezone.utc))


def _modified(store: ObjectStore, key: str) -> str | None:
    """When a stored object was last written (None when unknown)."""
    local = store.local_path(key)
    try:
        if local is not None:
            return _iso(datetime.fromtimestamp(local.stat().st_mtime, tz=timezone.utc))
        head = store.s3.head_object(Bucket=store._bucket, Key=store._s3_key(key))
        return _iso(head["LastModified"])
    except Exception:  # noqa: BLE001 (a missing date is not worth failing the page)
        return None


def _read_json(store: ObjectStore, key: str) -> dict | None:
    if not store.exists(key):
        return None
    return json.loads(store.read_bytes(key))


def _number(value) -> float | None:
    return None if value is None or isinstance(value, bool) else float(value)


# -- the spec ------------------------------------------------------------------------------------
def _specs(settings: Settings) -> dict[str, Path]:
    from pipelines.specs import discover_specs

    folder = Path(settings.specs_dir)
    return discover_specs(folder) if folder.is_dir() else {}


def _load_spec(path: Path):
    """(spec, None) or (None, the error message)."""
    from pipelines.specs import SpecError, load_spec

    try:
        return load_spec(path), None
    except SpecError as error:
        return None, str(error).replace(str(path.parent) + "/", "")


def spec_facts(spec) -> SpecFacts:
    """What the page shows of a ModelSpec."""
    dumped = spec.model_dump(mode="json", by_alias=True)
    strategy = spec.deployment_strategy
    return SpecFacts(
        owner=spec.owner, description=" ".join(spec.description.split()),
        intended_use=" ".join(spec.intended_use.split()), limitations=list(spec.limitations),
        data_source=spec.data.source, target=spec.data.target, features=list(spec.data.features),
        sensitive_features=list(spec.data.sensitive_features),
        framework=spec.training.framework or ("imported" if spec.model else "own training code"),
        model_type=spec.training.model_type,
        quantization=list(spec.export.quantization), accuracy_budget=spec.export.accuracy_budget,
        quality={name: {k: v for k, v in rule.items() if v is not None}
                 for name, rule in (dumped["gates"]["quality"] or {}).items()},
        fairness={k: v for k, v in dumped["responsibleAI"]["fairness"].items() if v is not None},
        drift_share=spec.gates.drift_share, waived=dict(spec.gates.waive),
        targets=[TargetFacts(name=t.name, selector=dict(t.selector.match_labels), latency_slo_ms=t.latency_slo_ms,
                             requires_review=t.requires_review) for t in spec.targets],
        cost_center=spec.finops.cost_center, project=spec.finops.project,
        monthly_budget_usd=spec.finops.monthly_budget_usd, deployment_strategy=strategy.type,
        canary_steps=[s.share for s in strategy.canary.steps] if strategy.canary else [],
        memory_limit=spec.resources.limits.memory, approval=spec.approval.mode, schedule=spec.schedule,
    )


# -- GitOps --------------------------------------------------------------------------------------
@dataclass
class _GitOps:
    """The tip of the GitOps branch: base manifests and resolved per-group objects by model."""

    commit: str | None = None
    bases: dict[str, dict] = field(default_factory=dict)
    objects: dict[str, list[dict]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _gitops(settings: Settings) -> _GitOps:
    from pipelines.edge import desired
    from pipelines.gitops import repo
    from pipelines.gitops.manifest import base_manifest_path, read_manifest

    state = _GitOps()
    try:
        if not repo.has_branch(settings.remote, settings.gitops_branch):
            return state  # nothing released yet: the default remote is created by the first release
        with repo.tip(settings.remote, settings.gitops_branch, settings.work_dir / "gitops") as clone:
            state.commit = repo.head(clone)
            for path in sorted(clone.glob(base_manifest_path("*"))):
                try:
                    state.bases[path.parent.parent.name] = read_manifest(path.read_text(encoding="utf-8"))
                except (ValueError, OSError) as error:
                    state.problems.append(f"apps/{path.parent.parent.name}: {error}")
            for obj in desired.resolve(clone, state.problems):
                state.objects.setdefault(desired.model_of(obj), []).append(obj)
    except repo.GitError as error:
        state.problems.append(f"GitOps repository not readable: {error}")
    return state


def _deployment(obj: dict) -> GroupDeployment:
    from pipelines.edge import desired
    from pipelines.gitops.rollback import ROLLBACK_FROM_ANNOTATION

    spec = obj.get("spec") or {}
    ref = spec.get("modelRef") or {}
    group = desired.group_of(obj)
    rollout = spec.get("rollout") or {}
    share = desired.rollout_share(obj)
    canary = share < 100
    brief = ((spec.get("cost") or {}).get("groups") or {}).get(group) or {}
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    return GroupDeployment(
        group=group, version=str(ref.get("version", "")), variant=ref.get("variant"), size_bytes=ref.get("sizeBytes"),
        selector=desired.match_labels(obj) or {}, share=share,
        previous_version=str(rollout["previousVersion"]) if canary and rollout.get("previousVersion") else None,
        canary=canary, canary_step=rollout.get("step") if canary else None,
        canary_steps=rollout.get("steps") if canary else None,
        latency_slo_ms=_number((spec.get("slo") or {}).get("latencyP95Ms")),
        latency_p95_ms=_number(brief.get("latencyP95Ms")), usd_per_month=_number(brief.get("usdPerMonth")),
        rollback_from=str(annotations[ROLLBACK_FROM_ANNOTATION]) if ROLLBACK_FROM_ANNOTATION in annotations else None,
    )


def _history(model: str, settings: Settings) -> list[GitCommit]:
    from pipelines.gitops import repo

    if not repo.has_branch(settings.remote, settings.gitops_branch):
        return []
    commits = repo.log(settings.remote, settings.gitops_branch, settings.work_dir / "gitops", f"apps/{model}")
    out = []
    for commit in commits:
        kind = commit["subject"].split("(", 1)[0]
        out.append(GitCommit(sha=commit["sha"], date=commit["date"], subject=commit["subject"],
                             kind=kind if kind in _COMMIT_KINDS else "other", body=commit["body"]))
    return out


# -- summaries, drift ----------------------------------------------------------------------------
def _outcome(data: dict, when: str | None) -> ReleaseOutcome:
    return ReleaseOutcome(version=str(data.get("model_version", "")), status=str(data.get("status", "unknown")),
                          reasons=list(data.get("reasons") or []), when=when, trigger=data.get("trigger"),
                          gitops_commit=data.get("gitops_commit"))


def _latest_check(model: str, store: ObjectStore, name: str) -> tuple[str, dict] | None:
    """The newest monitor record `name` (drift.json, quality.json) of a model: its key and data."""
    from pipelines.operate.monitor import MONITORING_PREFIX

    prefix = f"{MONITORING_PREFIX}/{model}/"
    local = store.local_path(prefix)
    if local is not None:
        stamps = sorted((p.name for p in local.iterdir() if p.is_dir()), reverse=True) if local.is_dir() else []
        keys = [f"{prefix}{stamp}/{name}" for stamp in stamps]
    else:
        keys = sorted((k for k in store.list_keys(prefix) if k.endswith(f"/{name}")), reverse=True)
    for key in keys:
        if store.exists(key):  # a check in progress writes its JSON last
            return key, json.loads(store.read_bytes(key))
    return None


def _latest_quality(model: str, store: ObjectStore) -> FieldQuality | None:
    found = _latest_check(model, store, _QUALITY_FILE)
    if found is None:
        return None
    key, data = found
    versions = [{"version": v.get("version"), "role": v.get("role"), "labelled": v.get("labelled", 0),
                 "status": v.get("status"), "figures": v.get("figures") or {}, "breaches": v.get("breaches") or []}
                for v in data.get("versions") or []]
    return FieldQuality(
        status=str(data.get("status", "unknown")), reason=str(data.get("reason", "")),
        checked_at=data.get("checked_at"), window_start=data.get("window_start"),
        labelled=int(data.get("labelled") or 0), labels_received=int(data.get("labels_received") or 0),
        unmatched=int(data.get("unmatched") or 0), late=int(data.get("late") or 0), versions=versions,
        actions=list(data.get("actions") or []), report_uri=data.get("report_uri"),
        summary_uri=data.get("summary_uri") or store.uri(key), explanations=len(data.get("explanations") or []))


def _latest_measured_cost(model: str, store: ObjectStore) -> MeasuredCost | None:
    keys = sorted(k for k in store.list_keys(f"finops/{model}/") if k.endswith("/actual.json"))
    if not keys:
        return None
    key = keys[-1]
    data = json.loads(store.read_bytes(key))
    focus = key.removesuffix("actual.json") + "actual_focus.csv"
    return MeasuredCost(as_of=key.split("/")[-2], since=str(data["since"]), until=str(data["until"]),
                        total_usd=float(data["total_usd"]), estimated_total_usd=_number(data.get("estimated_total_usd")),
                        classes=list(data.get("classes") or []), summary_uri=store.uri(key),
                        focus_uri=store.uri(focus) if store.exists(focus) else None)


def _budget_actions(model: str, store: ObjectStore, days: int = 14) -> list[BudgetActionView]:
    keys = sorted((k for k in store.list_keys(f"finops/{model}/") if k.endswith("/actions.json")), reverse=True)
    found = []
    for key in keys[:days]:
        day = key.split("/")[-2]
        found += [BudgetActionView(date=day, **{k: a.get(k) for k in ("action", "status", "detail", "commit", "branch")})
                  for a in json.loads(store.read_bytes(key))]
    return found


def _latest_drift(model: str, store: ObjectStore) -> DriftStatus | None:
    found = _latest_check(model, store, _DRIFT_FILE)
    if found is not None:
        key, data = found
        return DriftStatus(
            status=str(data.get("status", "unknown")), reason=str(data.get("reason", "")),
            checked_at=data.get("checked_at"), deployed_version=data.get("deployed_version"),
            drifted_share=_number(data.get("drifted_share")),
            drift_share_threshold=_number(data.get("drift_share_threshold")),
            drifted_column_names=list(data.get("drifted_column_names") or []),
            report_uri=data.get("report_uri"), summary_uri=data.get("summary_uri") or store.uri(key))
    return None


def _summary_cost(data: dict) -> CostView | None:
    estimate, diff = data.get("cost"), data.get("cost_diff")
    if not estimate and not diff:
        return None
    diff = diff or {}
    changes = diff.get("groups") or {}
    groups = []
    for group in (estimate or {}).get("groups") or []:
        change = changes.get(group.get("group")) or {}
        groups.append(CostGroup(
            group=group.get("group", ""), variant=group.get("variant"), devices=group.get("devices"),
            device_classes=list(group.get("device_classes") or []),
            latency_p95_ms=_number(group.get("latency_p95_ms")), usd_per_month=_number(group.get("total_usd")),
            energy_usd=_number(group.get("energy_usd")), ota_usd=_number(group.get("ota_usd")),
            telemetry_usd=_number(group.get("telemetry_usd")), change=change.get("status"),
            delta_usd_per_month=_number(change.get("deltaUsdPerMonth", change.get("usdPerMonth"))),
            previous_variant=change.get("previousVariant")))
    for name, change in changes.items():
        if change.get("status") == "removed":
            groups.append(CostGroup(group=name, change="removed"))
    lines: list[str] = []
    if diff:
        from pipelines.finops.cost import diff_lines

        try:
            lines = diff_lines(diff)
        except (KeyError, TypeError, ValueError):
            lines = []
    estimate = estimate or {}
    return CostView(total_usd_per_month=_number(estimate.get("total_usd_per_month")),
                    budget_usd_per_month=_number(estimate.get("monthly_budget_usd")),
                    training_usd_per_month=_number(estimate.get("training_usd_per_month")),
                    baseline=diff.get("baseline"), delta_usd_per_month=_number(diff.get("deltaUsdPerMonth")),
                    groups=groups, diff_lines=lines)


def version_summary(data: dict) -> VersionSummary:
    """A stored summary (the JSON of a ReleaseSummary) as the view shows it."""
    plan = data.get("quantization") or {}
    approval = data.get("approval") or {}
    return VersionSummary(
        status=str(data.get("status", "unknown")), reasons=list(data.get("reasons") or []),
        trigger=data.get("trigger"), release_key=str(data.get("release_key", "")), run_id=data.get("run_id"),
        artifact_uri=data.get("artifact_uri"), artifact_sha256=data.get("artifact_sha256"),
        gitops_commit=data.get("gitops_commit"),
        metrics={k: float(v) for k, v in (data.get("metrics") or {}).items() if _number(v) is not None},
        shipped=[ShippedVariant.model_validate(v) for v in data.get("shipped") or []],
        verdicts=[GateVerdict.model_validate(v) for v in data.get("verdicts") or []],
        model_card_uri=data.get("model_card_uri"), quantization_choice=plan.get("chosen"),
        quantization_reason=plan.get("reason"),
        quantization_candidates=[QuantCandidate.model_validate(c) for c in plan.get("candidates") or []],
        cost=_summary_cost(data), approved_by=approval.get("by") if approval.get("approved") else None,
        approved_at=approval.get("at"), approval_comment=approval.get("comment") or None,
    )


def stored_summary(model: str, release_key: str | None, settings: Settings | None = None) -> dict | None:
    """The summary JSON stored beside the release `release_key` built (None without one)."""
    if not release_key or not re.fullmatch(r"[0-9a-f]{16,128}", release_key):
        return None
    return _read_json(_store(_settings(settings)), f"runs/{check_model_name(model)}/{release_key}/{_SUMMARY_FILE}")


# -- MLflow --------------------------------------------------------------------------------------
def _tracking_exists(settings: Settings) -> bool:
    uri = settings.tracking_uri
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).is_file()  # never create an empty registry
    return True


def _registered_versions(model: str, settings: Settings) -> tuple[list, dict[str, list[str]]]:
    """The model's MLflow versions, newest first, and the aliases of each version."""
    if not _tracking_exists(settings):
        return [], {}
    from pipelines import registry

    mlflow_client = registry.client(settings.tracking_uri)
    try:
        versions = mlflow_client.search_model_versions(f"name = '{model}'")
        aliases: dict[str, list[str]] = {}
        if versions:
            for alias, number in (mlflow_client.get_registered_model(model).aliases or {}).items():
                aliases.setdefault(str(number), []).append(alias)
    except Exception as error:  # the registry raises its own RestException on a missing model
        if "RESOURCE_DOES_NOT_EXIST" in str(error):
            return [], {}
        raise
    return sorted(versions, key=lambda v: int(v.version), reverse=True), aliases


def _version_row(model: str, version, aliases: list[str], store: ObjectStore, problems: list[str]) -> VersionRow:
    tags = dict(version.tags or {})
    key = tags.get("release_key")
    summary = None
    if key:
        try:
            data = _read_json(store, f"runs/{model}/{key}/{_SUMMARY_FILE}")
            summary = version_summary(data) if data else None
        except (StoreError, ValueError) as error:
            problems.append(f"v{version.version}: summary not readable: {error}")
    reasons = [r for r in (tags.get("release_reasons") or "").split(" | ") if r]
    row = VersionRow(
        version=str(version.version), created=_iso_ms(version.creation_timestamp),
        status=tags.get("release_status") or (summary.status if summary else None),
        reasons=reasons or (summary.reasons if summary else []),
        trigger=tags.get("trigger") or (summary.trigger if summary else None),
        gitops_commit=tags.get("gitops_commit") or (summary.gitops_commit if summary else None),
        review_branch=tags.get("gitops_review_branch"), release_key=key, run_id=version.run_id,
        aliases=sorted(aliases), rolled_back_by=tags.get("rolled_back_by"),
        rollback_reason=tags.get("rollback_reason"), summary=summary,
    )
    if summary is not None and row.status not in ("released", "in_review"):
        row = row.model_copy(update={"explanation": explain_rejection(summary)})
    return row


# -- plain words -----------------------------------------------------------------------------------
_TRY = {
    "quality": "Try more or cleaner training data, other features, or other training.params; compare with "
               "the champion's run in MLflow.",
    "fairness": "Look at the per-group chart and table in the evidence (fairness_by_group.png, "
                "fairness_by_group.csv): check whether the groups are represented well enough in the training "
                "data, remove features that act as a proxy for the sensitive attribute, or try a fairness-aware "
                "method (Fairlearn's ThresholdOptimizer or ExponentiatedGradient).",
    "quantization_parity": "Compare the variants in the evidence (quantization_parity.json): try static "
                           "quantization with more calibration rows (export.calibrationRows), or ship fp32 by "
                           "removing the int8 mode from export.quantization.",
    "drift": "Open the Evidently report in the evidence to see which columns moved: retrain on recent data "
             "(data.source), or check the pipeline that produces data.currentSource.",
    "edge_latency": "Try an int8 variant (export.quantization), a smaller model, or a device group whose "
                    "devices are faster; cost.json in the evidence shows the projection's inputs.",
    "edge_memory": "Try an int8 variant (int8 weights take a quarter of the bytes of fp32 ones) or a smaller "
                   "model; cost.json in the evidence shows the memory estimate.",
    "budget": "The per-group figures in cost.json show what dominates (energy, OTA delivery, telemetry): ship a "
              "smaller variant, update devices less often, or ask the cost center to raise "
              "finops.monthlyBudgetUsd in a reviewed change of the spec.",
}


def _per_variant(verdict: GateVerdict, sentences_of) -> list[str]:
    """Sentences for each shipped variant of a combined verdict; variants that fail the same way
    share one sentence, naming them when more than one variant ships."""
    parts = by_variant(verdict.observed)
    found: dict[str, list[str]] = {}
    for variant, observed in parts.items():
        for sentence in sentences_of(observed):
            found.setdefault(sentence, []).append(variant)
    out = []
    for sentence, variants in found.items():
        label = f" for the {' and '.join(variants)} variant{'s' if len(variants) > 1 else ''}" if len(parts) > 1 else ""
        out.append(sentence.replace("{variants}", label))
    return out


def _quality(verdict: GateVerdict) -> list[str]:
    from pipelines.gates.quality import breaches

    out = []
    for b in breaches(verdict.thresholds, verdict.observed):
        label = b.metric.replace("_", " ")
        if b.kind == "missing":
            out.append(f"The quality gate failed: {label} was not measured on the held-out test rows, so {b.field} "
                       f"could not be checked.")
        elif b.kind == "min":
            out.append(f"The quality gate failed: {label} on the held-out test rows is {b.observed:.4f}, below the "
                       f"{b.limit:g} required by {b.field}.")
        elif b.kind == "max":
            out.append(f"The quality gate failed: {label} on the held-out test rows is {b.observed:.4f}, above the "
                       f"{b.limit:g} allowed by {b.field}.")
        else:
            out.append(f"The quality gate failed: {label} is {b.value:.4f}, {b.observed:.4f} "
                       f"{'lower' if b.direction == 'higher' else 'higher'} than the deployed champion "
                       f"v{b.champion} ({b.baseline:.4f}) on the same rows; {b.field} allows {b.limit:g}.")
    return out


_FAIRNESS_LABELS = {"accuracy_difference": "accuracy difference between groups",
                    "mae_difference": "difference in mean absolute error between groups"}


def _fairness(verdict: GateVerdict) -> list[str]:
    from pipelines.gates.fairness import breaches

    def sentences(observed: dict) -> list[str]:
        out = []
        for b in breaches(verdict.thresholds, observed):
            if b.kind == "min":
                out.append(f"The fairness gate failed{{variants}}: the lowest accuracy of any group is "
                           f"{b.observed:.3f}, below the {b.limit:g} required by {b.field}.")
                continue
            label = _FAIRNESS_LABELS.get(b.metric, b.metric.replace("_", " "))
            across = f" across {b.group}" if b.group else ""
            out.append(f"The fairness gate failed{{variants}}: the {label}{across} is {b.observed:.3f}, "
                       f"above the {b.limit:g} allowed by {b.field}.")
        return out

    return _per_variant(verdict, sentences)


def _parity(verdict: GateVerdict) -> list[str]:
    from pipelines.gates.parity import breaches

    out = []
    for observed in by_variant(verdict.observed).values():
        for b in breaches(verdict.thresholds, observed):
            if b.metric == "accuracy":
                score = observed.get("metric") or "accuracy"
                out.append(f"The quantization parity gate failed: the {b.variant} int8 variant's {score} is "
                           f"{b.value:.4f} against fp32's {b.baseline:.4f}, a drop of {100 * b.observed:.2f} points "
                           f"where {b.field} allows {100 * b.limit:.2f}.")
            else:
                out.append(f"The quantization parity gate failed: the {b.variant} variant widens the "
                           f"{b.metric.replace('_', ' ')} across {b.group} by {b.observed:.3f} compared with fp32, "
                           f"more than the {b.limit:g} allowed by {b.field}.")
    return out


def _drift(verdict: GateVerdict) -> list[str]:
    from pipelines.gates.drift import breaches

    out = []
    for b in breaches(verdict.thresholds, verdict.observed):
        if b.kind == "missing":
            out.append(f"The drift gate failed: the drift check returned no share of drifted columns, so {b.field} "
                       f"could not be checked.")
            continue
        count, names = verdict.observed.get("drifted_columns"), verdict.observed.get("drifted_column_names") or ""
        listed = f" ({names})" if names else ""
        out.append(f"The drift gate failed: {count} columns{listed} of the recent production data differ from the "
                   f"training data, a share of {b.observed:.0%}, at or above the {b.limit:.0%} allowed by {b.field}.")
    return out


def _latency(verdict: GateVerdict) -> list[str]:
    from pipelines.finops.cost import latency_breaches

    return [f"The edge latency gate failed: on the {b.group} devices the projected p95 latency is "
            f"{b.observed:.3f} ms, above the {b.limit:g} ms objective set by {b.field}."
            for b in latency_breaches(verdict.thresholds, verdict.observed)]


def _memory(verdict: GateVerdict) -> list[str]:
    from pipelines.finops.cost import memory_breaches

    out = []
    for b in memory_breaches(verdict.thresholds, verdict.observed):
        needs = f"The edge memory gate failed: on the {b.group} devices the model needs about {b.observed / 2**20:.1f} MiB"
        if b.device_class:
            out.append(f"{needs}, more than the {b.limit / 2**20:.1f} MiB of a {b.device_class} device "
                       f"({b.field} in the device catalog).")
        else:
            out.append(f"{needs}, above the {b.limit_text} allowed by {b.field}.")
    return out


def _budget(verdict: GateVerdict) -> list[str]:
    from pipelines.finops.cost import budget_breaches

    groups = {k.removesuffix(".usd_per_month"): _number(v) for k, v in verdict.observed.items()
              if k.endswith(".usd_per_month") and k != "training_usd_per_month" and _number(v) is not None}
    largest = max(groups, key=groups.get) if groups else None
    most = f"; the largest share is the {largest} group at {usd(groups[largest])}" if largest else ""
    return [f"The budget gate failed: the projected cost is {usd(b.observed)} per month, above the {usd(b.limit)} "
            f"set by {b.field}{most}." for b in budget_breaches(verdict.thresholds, verdict.observed)]


_EXPLAINERS = {"quality": _quality, "fairness": _fairness, "quantization_parity": _parity, "drift": _drift,
               "edge_latency": _latency, "edge_memory": _memory, "budget": _budget}


def explain_verdict(verdict: GateVerdict) -> str:
    """A failed verdict as one paragraph: the gate, observed vs threshold and spec field, what to try."""
    explainer = _EXPLAINERS.get(verdict.gate)
    try:
        sentences = explainer(verdict) if explainer else []
    except (TypeError, ValueError, KeyError):
        sentences = []
    if not sentences:  # an unknown gate, or figures this code does not recognise: the gate's own words
        sentences = [f"The {verdict.gate.replace('_', ' ')} gate failed: {verdict.reason}."]
    hint = _TRY.get(verdict.gate)
    return " ".join([*sentences, *([hint] if hint else [])])


def explain_rejection(summary) -> list[str]:
    """Each failed (not waived) verdict of a summary (ReleaseSummary, VersionSummary or its JSON
    dict) as plain sentences; without failed verdicts, the summary's own reasons."""
    if isinstance(summary, dict):
        summary = version_summary(summary)
    verdicts = [v if isinstance(v, GateVerdict) else GateVerdict.model_validate(v) for v in summary.verdicts]
    failed = [v for v in verdicts if not v.passed and not v.waived]
    if failed:
        return [explain_verdict(v) for v in failed]
    status = str(summary.status)
    if status in ("released", "in_review"):
        return []
    out = []
    for reason in summary.reasons:
        head, _, rest = reason.partition(": ")
        if head == "approval":
            out.append(f"A person decided: {rest}." if "rejected by" in rest else f"Waiting for approval: {rest}.")
        elif head == "review":
            out.append(f"Waiting for review: {rest}.")
        else:
            out.append(reason)
    return out


# -- the pages ------------------------------------------------------------------------------------
def _row(model: str, spec_path: Path | None, gitops: _GitOps, store: ObjectStore) -> ModelRow:
    problems: list[str] = []
    spec = spec_error = None
    if spec_path is not None:
        spec, spec_error = _load_spec(spec_path)
    base = gitops.bases.get(model)
    deployments = sorted((_deployment(o) for o in gitops.objects.get(model, [])), key=lambda d: d.group)
    last = latest = None
    try:
        key = f"releases/{model}/latest.json"
        data = _read_json(store, key)
        if data:
            last = _outcome(data, _modified(store, key))
            latest = data
    except (StoreError, ValueError) as error:
        problems.append(f"latest release summary not readable: {error}")
    try:
        attempt = next(iter(list_attempts(model, store, 1)), None)
    except (StoreError, ValueError) as error:
        attempt = None
        problems.append(f"release attempts not readable: {error}")
    from pipelines.finops.cost import budget_breaches

    brief = ((base or {}).get("spec") or {}).get("cost") or {}
    deployed_version = str(base["spec"]["modelRef"]["version"]) if base else None
    latest_cost = _number(((latest or {}).get("cost") or {}).get("total_usd_per_month"))
    budget = spec.finops.monthly_budget_usd if spec else _number(
        brief.get("budgetUsdPerMonth", ((latest or {}).get("cost") or {}).get("monthly_budget_usd")))
    deployed_cost = _number(brief.get("totalUsdPerMonth"))
    cost = CostStatus(deployed_usd_per_month=deployed_cost, deployed_version=deployed_version if brief else None,
                      latest_usd_per_month=latest_cost,
                      latest_version=last.version if latest_cost is not None else None,
                      budget_usd_per_month=budget,
                      over_budget=any(budget_breaches({"monthly_budget_usd": budget}, {"total_usd_per_month": c})
                                      for c in (deployed_cost, latest_cost)))
    try:
        drift = _latest_drift(model, store)
    except (StoreError, ValueError, OSError) as error:
        drift = None
        problems.append(f"drift checks not readable: {error}")
    description = " ".join(spec.description.split()) if spec else ""
    owner = spec.owner if spec else (((base or {}).get("metadata") or {}).get("labels") or {}).get(
        "finops.apexlogic.dev/owner")
    # A broken overlay names its file (apps/<model>/...); a repository that cannot be read concerns every model.
    problems += [p for p in gitops.problems if p.startswith(f"apps/{model}/") or not p.startswith("apps/")]
    return ModelRow(model=model, owner=owner, description=description, has_spec=spec_path is not None,
                    spec_error=spec_error, deployed_version=deployed_version, deployments=deployments,
                    last_release=last, last_attempt=attempt, cost=cost, drift=drift, problems=problems)


def _released_models(store: ObjectStore) -> set[str]:
    keys = store.list_keys("releases/")
    return {k.split("/")[1] for k in keys if k.endswith("/latest.json") and k.count("/") == 2}


def list_models(settings: Settings | None = None) -> list[ModelRow]:
    """One row per model with a spec, a deployment in the GitOps repository, or a release summary."""
    settings = _settings(settings)
    store = _store(settings)
    specs = _specs(settings)
    gitops = _gitops(settings)
    names = set(specs) | set(gitops.bases) | set(gitops.objects)
    try:
        names |= _released_models(store)
    except StoreError:
        pass  # each row says what it could not read
    return [_row(name, specs.get(name), gitops, store) for name in sorted(names) if DNS_LABEL.match(name)]


def model_page(model: str, settings: Settings | None = None) -> ModelPage:
    """Everything about one model; UnknownModel when nothing has that name."""
    settings = _settings(settings)
    check_model_name(model)
    store = _store(settings)
    specs = _specs(settings)
    gitops = _gitops(settings)
    row = _row(model, specs.get(model), gitops, store)
    problems = list(row.problems)
    spec = _load_spec(specs[model])[0] if model in specs else None
    try:
        registered, aliases = _registered_versions(model, settings)
    except Exception as error:  # noqa: BLE001 (an unreachable registry must not hide the rest)
        registered, aliases = [], {}
        problems.append(f"MLflow registry not readable: {error}")
    versions = [_version_row(model, v, aliases.get(str(v.version), []), store, problems) for v in registered]
    try:
        history = _history(model, settings)
    except Exception as error:  # noqa: BLE001
        history = []
        problems.append(f"GitOps history not readable: {error}")
    if not (model in specs or row.deployments or row.last_release or versions or history):
        raise UnknownModel(model)
    try:
        field_quality = _latest_quality(model, store)
    except (StoreError, ValueError, OSError) as error:
        field_quality = None
        problems.append(f"field quality checks not readable: {error}")
    try:
        measured_cost = _latest_measured_cost(model, store)
    except (StoreError, ValueError, KeyError, OSError) as error:
        measured_cost = None
        problems.append(f"measured cost not readable: {error}")
    try:
        budget_actions = _budget_actions(model, store)
    except (StoreError, ValueError, TypeError, OSError) as error:
        budget_actions = []
        problems.append(f"budget actions not readable: {error}")
    return ModelPage(model=model, spec=spec_facts(spec) if spec else None, row=row, versions=versions,
                     history=history, drift=row.drift, field_quality=field_quality, measured_cost=measured_cost,
                     budget_actions=budget_actions, problems=problems)


def version_page(model: str, version: str, settings: Settings | None = None) -> VersionPage:
    """One registered version; UnknownModel when the model or the version does not exist."""
    settings = _settings(settings)
    check_model_name(model)
    if not _VERSION.match(str(version)):
        raise UnknownModel(f"{model} v{version}")
    page = model_page(model, settings)
    found = next((v for v in page.versions if v.version == str(version)), None)
    if found is None:
        raise UnknownModel(f"{model} v{version}")
    marker = re.compile(rf"\bversion (\d+ -> )?{re.escape(found.version)}\b")
    commits = [c for c in page.history if c.sha == found.gitops_commit or marker.search(c.subject)]
    return VersionPage(model=model, spec=page.spec, version=found,
                       deployed_to=[d for d in page.row.deployments if d.version == found.version],
                       commits=commits, problems=page.problems)


# -- evidence ---------------------------------------------------------------------------------------
_TYPES = {".json": "application/json", ".csv": "text/csv", ".txt": "text/plain", ".html": "text/html",
          ".png": "image/png", ".md": "text/markdown", ".yaml": "text/plain"}


def evidence_key(uri: str, settings: Settings | None = None) -> str:
    """The store key of an evidence URI; EvidenceError unless it lies inside the artifact store."""
    settings = _settings(settings)
    if not isinstance(uri, str) or urlparse(uri).scheme not in ("file", "s3"):
        raise EvidenceError("only file:// and s3:// URIs of the artifact store are served")
    store = _store(settings)
    try:
        key = store.key_of(uri)
    except StoreError as error:
        raise EvidenceError(str(error)) from None
    decoded = unquote(key)
    parts = decoded.split("/")
    if (not decoded or "\\" in decoded or "\x00" in decoded or decoded.startswith("/")
            or any(p in ("", ".", "..") for p in parts) or posixpath.normpath(decoded) != decoded):
        raise EvidenceError(f"{uri} is not a plain path inside the artifact store")
    local = store.local_path(key)
    if local is not None:
        root = store.local_path("").resolve()
        if not local.resolve().is_relative_to(root):
            raise EvidenceError(f"{uri} leads outside the artifact store")
    return key


def open_evidence(uri: str, settings: Settings | None = None) -> tuple[bytes, str]:
    """(bytes, content type) of an evidence file in the artifact store.

    EvidenceError for a URI outside the store (another scheme, another folder or bucket, `..`);
    FileNotFoundError when the store has no such file.
    """
    settings = _settings(settings)
    key = evidence_key(uri, settings)
    store = _store(settings)
    if not store.exists(key):
        raise FileNotFoundError(uri)
    suffix = posixpath.splitext(key)[1].lower()
    kind = _TYPES.get(suffix) or mimetypes.guess_type(key)[0] or "application/octet-stream"
    if kind.startswith("text/") or kind == "application/json":
        kind += "; charset=utf-8"
    return store.read_bytes(key), kind


def csv_table(data: bytes, limit: int) -> tuple[list[str], list[list[str]], int]:
    """A CSV evidence file as (header, at most `limit` rows, the number of rows)."""
    import csv
    import io

    reader = csv.reader(io.StringIO(data.decode("utf-8", errors="replace")))
    header = next(reader, [])
    rows, total = [], 0
    for row in reader:
        total += 1
        if len(rows) < limit:
            rows.append(row)
    return header, rows, total


def store_prefix(settings: Settings | None = None) -> str:
    """The URI prefix every object of the artifact store starts with."""
    return _store(_settings(settings)).uri("").rstrip("/") + "/"


# -- who may read what ----------------------------------------------------------------------------
# Evidence a viewer reads: reports, verdicts, cards, aggregate tables. Everything else in the store
# (data snapshots, test-row answers, model files, signatures) is training data or the model
# itself, for the people who may run the model's release.
_VIEWER_SUFFIXES = (".json", ".html", ".png", ".md", ".txt", ".yaml")
_VIEWER_CSV = ("fairness_by_group.csv", "focus.csv", "actual_focus.csv")
_MODEL_FOLDERS = ("runs", "models", "releases", "monitoring", "rollouts")


def release_dag_id(model: str) -> str:
    return f"edge_release__{model}"


def is_data_file(key: str) -> bool:
    """Whether a store key is a data snapshot, a model file or anything else that is not evidence
    a viewer may read (deny by default)."""
    name = posixpath.basename(key).lower()
    return not (name.endswith(_VIEWER_SUFFIXES) or name in _VIEWER_CSV)


def evidence_model(key: str) -> str | None:
    """The model a store key belongs to (`runs/<model>/…`, `models/<model>/…`, …), if any."""
    head, _, rest = key.partition("/")
    model = rest.split("/", 1)[0]
    return model if head in _MODEL_FOLDERS and DNS_LABEL.match(model) else None


# -- links ------------------------------------------------------------------------------------------
_SHA = re.compile(r"^[0-9a-f]{7,40}$")


class Links(Record):
    """Where a version's MLflow identifiers lead (the MLflow UI, when configured); commits link
    through `commit_web_url` or the plugin's commit view."""

    mlflow_version: str | None = None
    mlflow_run: str | None = None


def _mlflow_ui(settings: Settings) -> str | None:
    url = settings.mlflow_ui_url
    return url.rstrip("/") if url and url.startswith(("http://", "https://")) else None


def commit_web_url(sha: str | None, settings: Settings | None = None) -> str | None:
    """The Git host's page of a commit (`EDGE_GIT_COMMIT_URL` with `{sha}`); None when not configured."""
    pattern = _settings(settings).git_commit_url
    if not sha or not _SHA.match(sha) or not pattern or "{sha}" not in pattern:
        return None
    return pattern.replace("{sha}", sha)


def version_links(model: str, version: VersionRow, settings: Settings | None = None,
                  experiment_id: str | None = None) -> Links:
    settings = _settings(settings)
    ui = _mlflow_ui(settings)
    return Links(
        mlflow_version=f"{ui}/#/models/{quote(model, safe='')}/versions/{version.version}" if ui else None,
        mlflow_run=f"{ui}/#/experiments/{experiment_id}/runs/{version.run_id}"
        if ui and experiment_id and version.run_id else None)


def experiment_of(run_id: str | None, settings: Settings | None = None) -> str | None:
    """The MLflow experiment of a run, for a link to the MLflow UI (None without one)."""
    settings = _settings(settings)
    if not run_id or not _mlflow_ui(settings):
        return None
    from pipelines import registry

    try:
        return registry.client(settings.tracking_uri).get_run(run_id).info.experiment_id
    except Exception:  # noqa: BLE001 (no link rather than no page)
        return None


# -- one GitOps commit -------------------------------------------------------------------------------
class CommitPage(Record):
    model: str
    sha: str
    date: str
    author: str
    subject: str
    body: str = ""
    kind: str
    files: list[str] = Field(default_factory=list, description="Files of apps/<model>/ the commit changed.")
    diff: str = Field("", description="The change to apps/<model>/ as a unified diff.")
    web_url: str | None = None


def commit_page(model: str, sha: str, settings: Settings | None = None) -> CommitPage:
    """A commit of the GitOps branch that touches `apps/<model>/`; UnknownModel otherwise."""
    settings = _settings(settings)
    check_model_name(model)
    if not isinstance(sha, str) or not _SHA.match(sha):
        raise UnknownModel(f"commit {sha}")
    from pipelines.gitops import repo

    if not repo.has_branch(settings.remote, settings.gitops_branch):
        raise UnknownModel(f"commit {sha}")
    shown = repo.show(settings.remote, settings.gitops_branch, sha, f"apps/{model}",
                      settings.work_dir / "gitops")
    if shown is None or not shown["files"]:
        raise UnknownModel(f"commit {sha}")
    kind = shown["subject"].split("(", 1)[0]
    return CommitPage(model=model, kind=kind if kind in _COMMIT_KINDS else "other",
                      web_url=commit_web_url(shown["sha"], settings), **shown)


# -- two versions side by side -------------------------------------------------------------------------
class VersionFacts(Record):
    """What the comparison shows of one version, beside the row of the model page."""

    row: VersionRow
    data_sha256: str | None = None
    data_rows: int | None = None
    data_source: str | None = None
    params: dict[str, str] = Field(default_factory=dict, description="The MLflow run's training parameters.")


class Comparison(Record):
    model: str
    a: VersionFacts
    b: VersionFacts
    metrics: list[tuple[str, float | None, float | None]] = Field(default_factory=list)
    gates: list[tuple[str, str | None, str | None]] = Field(
        default_factory=list, description="Per gate: pass, fail, waived or None (not run) for a and b.")
    cost: list[tuple[str, float | None, float | None]] = Field(
        default_factory=list, description="$/month per device group and in total for a and b.")
    variants: list[tuple[str, dict | None, dict | None]] = Field(
        default_factory=list, description="Per quantization variant: size, latency and score of a and b.")
    params: list[tuple[str, str | None, str | None]] = Field(default_factory=list)


def _gate_result(verdict: GateVerdict) -> str:
    return "waived" if verdict.waived else ("pass" if verdict.passed else "fail")


def _version_facts(model: str, row: VersionRow, store: ObjectStore, settings: Settings) -> VersionFacts:
    facts = VersionFacts(row=row)
    if row.release_key:
        try:
            check = _read_json(store, f"runs/{model}/{row.release_key}/validation.json") or {}
        except (StoreError, ValueError):
            check = {}
        facts = facts.model_copy(update={"data_sha256": check.get("sha256"), "data_rows": check.get("rows"),
                                         "data_source": check.get("source")})
    if row.run_id and _tracking_exists(settings):
        from pipelines import registry

        try:
            params = registry.client(settings.tracking_uri).get_run(row.run_id).data.params
            facts = facts.model_copy(update={"params": dict(sorted(params.items()))})
        except Exception:  # noqa: BLE001 (a comparison without parameters is still a comparison)
            pass
    return facts


def _pairs(left: dict, right: dict) -> list[tuple]:
    return [(k, left.get(k), right.get(k)) for k in dict.fromkeys([*left, *right])]


def compare_page(model: str, a: str, b: str, settings: Settings | None = None) -> Comparison:
    """Versions `a` and `b` of a model side by side; UnknownModel when either does not exist."""
    settings = _settings(settings)
    check_model_name(model)
    for version in (a, b):
        if not _VERSION.match(str(version)):
            raise UnknownModel(f"{model} v{version}")
    page = model_page(model, settings)
    rows = {v.version: v for v in page.versions}
    for version in (a, b):
        if str(version) not in rows:
            raise UnknownModel(f"{model} v{version}")
    store = _store(settings)
    left, right = (_version_facts(model, rows[str(v)], store, settings) for v in (a, b))
    sa, sb = left.row.summary, right.row.summary

    def cost(summary) -> dict:
        if summary is None or summary.cost is None:
            return {}
        out = {g.group: g.usd_per_month for g in summary.cost.groups if g.change != "removed"}
        return {**out, "total": summary.cost.total_usd_per_month}

    def variants(summary) -> dict:
        return {c.variant: {"size_bytes": c.size_bytes, "latency_p95_ms": c.latency_p95_ms, "score": c.accuracy,
                            "eligible": c.eligible} for c in (summary.quantization_candidates if summary else [])}

    return Comparison(
        model=model, a=left, b=right,
        metrics=_pairs(sa.metrics if sa else {}, sb.metrics if sb else {}),
        gates=_pairs({v.gate: _gate_result(v) for v in (sa.verdicts if sa else [])},
                     {v.gate: _gate_result(v) for v in (sb.verdicts if sb else [])}),
        cost=_pairs(cost(sa), cost(sb)), variants=_pairs(variants(sa), variants(sb)),
        params=_pairs(left.params, right.params))
