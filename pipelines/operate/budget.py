"""Budget policies that act: what the daily FinOps job does when a model's 30-day spend
forecast, or its spend measured on the devices the day before, breaches its monthly budget,
as the spec's `finops.onBreach` says, in order:

- `notify`: the caller's alert channels (Airflow sends `budget_breach`);
- `lower_sampling`: a commit halving the devices' `telemetry.sampleRate` in the deployed base
  manifest (never below `finops.minSampleRate`): fewer sampled inputs, fewer bytes of telemetry
  egress. Each day the breach lasts halves it again, down to the floor. `python -m pipelines
  finops-restore <model>` commits the spec's own telemetry settings back (a release renders
  them too);
- `cheaper_variant`: a commit switching each device group to the cheapest variant of the
  deployed release that passed its gates (signed and published beside it by the release), fits
  the group's memory and costs less than what the group runs, by the release's own estimate per
  variant: the release already chose the cheapest *within the latency SLO*, so this trades the
  SLO for the budget, and says by how much. `finops-restore` commits the release's own choice back;
- `pause_rollout`: a commit holding a canary where it is (`pipelines.operate.rollout`), lifted
  by `python -m pipelines rollout <model> --resume`.

With `finops.review`, the commits go to the review branch `finops/<model>/<date>` (one per day
of breach, each action a commit on it) for a person to merge, and the GitOps branch does not move.
Every commit's message carries the forecast; the actions and their commits are recorded beside
the day's report, `finops/<model>/<date>/actions.json`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Literal

from pipelines.errors import one_line
from pipelines.records import Record
from pipelines.settings import Settings, get_settings

log = logging.getLogger(__name__)

BUDGET_BY = "edge_finops_report"


class BudgetActionRecord(Record):
    """One budget action and what came of it."""

    action: Literal["notify", "lower_sampling", "cheaper_variant", "pause_rollout"]
    status: Literal["done", "skipped", "failed"]
    detail: str
    commit: str | None = None
    branch: str | None = None


def _telemetry_commit(settings: Settings, model: str, rate_of: Callable[[float], float | None], message: str,
                      publish: bool, branch: str | None = None) -> tuple[str | None, float | None, float | None]:
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

    commit = change_base_manifest(settings, model, change, message, publish, branch=branch)
    return commit, seen["before"], seen["after"]


def lower_sampling(model: str, floor: float, reason: str, settings: Settings | None = None, publish: bool = True,
                   details: str = "", branch: str | None = None) -> BudgetActionRecord:
    """Halve the deployed telemetry sample rate, not below `floor`, by a commit (to the review
    `branch` when given)."""
    settings = settings or get_settings()

    def halved(current: float) -> float | None:
        return None if current <= floor else max(floor, round(current / 2, 4))

    message_for = "finops({model}): lower telemetry sampling\n\nBy {by}: {reason}\n\n{details}"
    commit, before, after = _telemetry_commit(
        settings, model, halved, message_for.format(model=model, by=BUDGET_BY, reason=reason, details=details).rstrip()
        + "\n", publish, branch)
    if commit is None:
        return BudgetActionRecord(action="lower_sampling", status="skipped", branch=branch,
                                  detail=f"telemetry.sampleRate {before:g} is at the floor {floor:g} "
                                         "(finops.minSampleRate)")
    return BudgetActionRecord(action="lower_sampling", status="done", commit=commit, branch=branch,
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


class _Deployed(Record):
    """The deployed release as the variant policies need it: its base variant, the variants it
    signed and published (ref per variant), and its per-group estimate of every variant."""

    base_variant: str
    refs: dict[str, dict]
    groups: dict[str, dict]


def _deployed_release(settings: Settings, model: str, files: dict[str, str]) -> _Deployed:
    """What the deployed base manifest's release signed and estimated (from its release summary)."""
    import yaml

    from pipelines.gitops.manifest import base_manifest_path
    from pipelines.operate.commits import ManifestChangeError
    from pipelines.records import ReleaseSummary
    from pipelines.storage import ObjectStore

    path = base_manifest_path(model)
    if path not in files:
        raise ManifestChangeError(f"{model} has no release yet")
    doc = yaml.safe_load(files[path])
    release_key = (doc["metadata"].get("annotations") or {}).get("apexlogic.dev/release-key", "")
    store = ObjectStore(settings.store_url, settings.s3_endpoint_url)
    key = f"runs/{model}/{release_key}/summary.json"
    # The annotation comes from Git: only a release key (a sha256) may become part of a store key.
    if not re.fullmatch(r"[0-9a-f]{64}", release_key) or not store.exists(key):
        raise ManifestChangeError(f"{model}: the deployed release's summary is not in the store ({key})")
    summary = ReleaseSummary.model_validate_json(store.read_bytes(key))
    folder = f"models/{model}/{summary.artifact_sha256}"
    refs: dict[str, dict] = {}
    for candidate in summary.quantization.candidates:
        if not candidate.eligible or candidate.variant == summary.quantization.chosen:
            continue
        file = f"{folder}/variants/{candidate.variant}/model.onnx"
        if store.exists(file) and store.exists(f"{file}.sig"):
            refs[candidate.variant] = {"variant": candidate.variant, "sourceUri": store.uri(file),
                                       "sha256": candidate.sha256, "sizeBytes": candidate.size_bytes,
                                       "signatureUri": store.uri(f"{file}.sig")}
    groups = {g["group"]: g for g in (summary.cost or {}).get("groups", [])}
    return _Deployed(base_variant=summary.quantization.chosen, refs=refs, groups=groups)


def _group_variant(overlay: str, base_variant: str) -> str:
    """The variant a device group's overlay runs: its override's, else the base manifest's."""
    import yaml

    for operation in yaml.safe_load(yaml.safe_load(overlay)["patches"][0]["patch"]):
        if operation["path"] == "/spec/modelRef/variant":
            return str(operation["value"])
    return base_variant


def _variant_commit(settings: Settings, model: str, pick: Callable[[str, str, dict, list[str]], tuple[str, str] | None],
                    subject: str, details: str, publish: bool, branch: str | None) -> tuple[str | None, list[str]]:
    """Commit, for each device group, the variant `pick(group, current variant, the release's
    estimate of the group, the variants signed for it)` returns with why (None: leave the group
    as it is); the commit (None: nothing changed) and one line per group changed."""
    from pipelines.gitops.manifest import overlay_path, with_group_variant
    from pipelines.operate.commits import change_app_files

    lines: list[str] = []

    def change(files: dict[str, str]) -> dict[str, str] | None:
        lines.clear()
        deployed = _deployed_release(settings, model, files)
        signed = sorted({deployed.base_variant, *deployed.refs})
        for group, estimate in sorted(deployed.groups.items()):
            path = overlay_path(model, group)
            if path not in files:
                continue
            current = _group_variant(files[path], deployed.base_variant)
            picked = pick(group, current, estimate, signed)
            if picked is None or picked[0] == current:
                continue
            variant, why = picked
            files[path] = with_group_variant(files[path],
                                             None if variant == deployed.base_variant else deployed.refs[variant])
            lines.append(f"{group}: {current} -> {variant} ({why})")
        return files if lines else None

    def message() -> str:
        return f"{subject}\n\n" + "\n".join(f"- {line}" for line in lines) + (f"\n\n{details}" if details else "") + "\n"

    commit = change_app_files(settings, model, change, message, publish, branch=branch)
    return commit, list(lines)


def _money(value: float) -> str:
    return f"${value:,.2f}"


def cheaper_variant(model: str, reason: str, settings: Settings | None = None, publish: bool = True,
                    details: str = "", branch: str | None = None) -> BudgetActionRecord:
    """Switch each device group to the cheapest signed, eligible variant of the deployed release
    that fits its memory and costs less than what it runs, by one commit."""
    settings = settings or get_settings()

    def pick(group: str, current: str, estimate: dict, signed: list[str]) -> tuple[str, str] | None:
        options = (estimate.get("inputs") or {}).get("variants") or {}
        now = options.get(current)
        if now is None:
            return None
        cheaper = [(figures["usd_per_month"], variant) for variant, figures in options.items()
                   if variant in signed and figures.get("fits_memory") and figures["usd_per_month"] < now["usd_per_month"]]
        if not cheaper:
            return None
        usd, variant = min(cheaper)
        figures = options[variant]
        slo = "within its latency SLO" if figures.get("meets_slo") else "over its latency SLO"
        return variant, (f"{_money(now['usd_per_month'])} -> {_money(usd)}/month estimated; p95 "
                         f"{now['latency_p95_ms']:g} -> {figures['latency_p95_ms']:g} ms, {slo}")

    commit, lines = _variant_commit(settings, model, pick, f"finops({model}): cheaper variants for device groups",
                                    f"By {BUDGET_BY}: {reason}\n\n{details}".rstrip(), publish, branch)
    if commit is None:
        return BudgetActionRecord(action="cheaper_variant", status="skipped", branch=branch,
                                  detail="every device group runs the cheapest eligible variant that fits its memory")
    return BudgetActionRecord(action="cheaper_variant", status="done", commit=commit, branch=branch,
                              detail="; ".join(lines))


def restore_variants(model: str, by: str, settings: Settings | None = None, publish: bool = True) -> str | None:
    """Commit the deployed release's own variant for each device group back (undoes
    `cheaper_variant`); the commit, or None when every group runs it already."""
    settings = settings or get_settings()

    def pick(group: str, current: str, estimate: dict, signed: list[str]) -> tuple[str, str] | None:
        wanted = estimate.get("variant")
        return (wanted, "the release's choice") if wanted in signed else None

    commit, _ = _variant_commit(settings, model, pick, f"finops({model}): restore the release's variants",
                                f"By {by}.", publish, None)
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
    branch = f"finops/{spec.name}/{report.as_of}" if spec.finops.review else None
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
                done.append(lower_sampling(spec.name, spec.finops.min_sample_rate, reason, settings, publish, details,
                                           branch))
            elif action == "cheaper_variant":
                done.append(cheaper_variant(spec.name, reason, settings, publish, details, branch))
            elif action == "pause_rollout":
                commit = hold_rollout(spec.name, reason, BUDGET_BY, settings, details=details, publish=publish,
                                      branch=branch)
                done.append(BudgetActionRecord(action=action, status="done" if commit else "skipped", commit=commit,
                                               branch=branch,
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
