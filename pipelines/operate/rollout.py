"""Health-gated canary rollout: advance, hold or roll back, each by a Git commit.

A spec with `deploymentStrategy.type: Canary` releases a new version to the first step's
share of each device group's devices (`spec.rollout` in the base manifest; agents pick their
slice by a hash of model and device id, so a larger share keeps the devices already in). The
devices outside the share keep the version they run: they are the control cohort.

`step_rollout` (the `edge_rollout__<model>` DAG, or `python -m pipelines rollout <model>`)
reads the inference telemetry both cohorts sent since the step began (the date of the commit
that set it) and applies the spec's analysis:

- error rate of the canary, and its increase over the control's;
- p95 latency of the canary over the control's (from the summed latency histograms);
- prediction shift: total variation distance between the cohorts' predicted-class shares.

A failed check rolls back at once (a commit restoring the previous release, as `edge_rollback`
does); too few canary requests or a pause not yet over hold; otherwise the share advances to
the next step by a commit. Every commit message carries the analysis. A first release has no
control cohort and goes to every device (nothing to compare against).

Every analysis but `no_release` (and none of a dry run) is also saved to the artifact store as
`rollouts/<model>/<YYYYmmddTHHMMSSZ>.json` (an `AnalysisRecord`: the step and when it was made),
after its commit, for the Edge Releases view's canary chart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

from pydantic import Field

from pipelines.edge import telemetry
from pipelines.errors import one_line
from pipelines.records import Record
from pipelines.settings import Settings, get_settings
from pipelines.specs import ModelSpec, load_spec, parse_duration
from pipelines.storage import ObjectStore, StoreError

log = logging.getLogger(__name__)

StepDecision = Literal["advance", "hold", "rollback", "complete", "not_canary", "no_release"]
ROLLOUT_BY = "edge_rollout"
ROLLOUTS_PREFIX = "rollouts"


class RolloutError(RuntimeError):
    """A rollout change that cannot be made (no release, no canary in progress, not held)."""


class CanaryCheck(Record):
    name: str
    observed: float | None
    threshold: float
    passed: bool
    detail: str


class RolloutStep(Record):
    """One analysis of a model's canary and what was done about it."""

    model: str
    version: str | None = None
    previous_version: str | None = None
    step: int | None = None
    steps: int | None = None
    share: int | None = None
    next_share: int | None = None
    since: str | None = None
    decision: StepDecision
    reason: str
    canary: dict = {}
    control: dict = {}
    checks: list[CanaryCheck] = []
    commit: str | None = None

    def lines(self) -> list[str]:
        """The analysis as text (commit messages, task logs, the CLI)."""
        out = [f"Decision: {self.decision}: {self.reason}"]
        if self.version and self.step is not None:
            out.append(f"Canary: v{self.version} at {self.share}% (step {self.step} of {self.steps}) since {self.since}; "
                       f"control: v{self.previous_version}")
        for name, cohort in (("canary", self.canary), ("control", self.control)):
            if cohort:
                out.append(f"{name:>7}: {cohort['devices']} devices, {cohort['requests']:g} requests, "
                           f"error rate {_pct(cohort['error_rate'])}, p95 {_ms(cohort['p95_ms'])}")
        for check in self.checks:
            out.append(f"  [{'pass' if check.passed else 'FAIL'}] {check.name}: {check.detail}")
        return out


class AnalysisRecord(RolloutStep):
    """A saved analysis: the step and when it was made."""

    at: str = Field(description="The `now` of the analysis (UTC, ISO 8601).")


def analysis_key(model: str, moment: datetime) -> str:
    """Where the analysis of `model` made at `moment` is saved."""
    return f"{ROLLOUTS_PREFIX}/{model}/{moment.astimezone(timezone.utc):%Y%m%dT%H%M%SZ}.json"


def save_analysis(result: RolloutStep, now: datetime, settings: Settings) -> str | None:
    """Save `result` as an AnalysisRecord in the artifact store; its URI, or None when the store
    cannot be written (logged, not raised: the decision, and any commit, stand without it)."""
    record = AnalysisRecord(**result.model_dump(), at=telemetry.timestamp(now))
    store = ObjectStore(settings.store_url, settings.s3_endpoint_url)
    try:
        return store.put_bytes(record.model_dump_json(indent=1).encode(), analysis_key(result.model, now))
    except StoreError as error:
        log.warning("rollout analysis of %s not saved: %s", result.model, one_line(error, 300))
        return None


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"



def analyze(spec: ModelSpec, base: dict, records: list[dict], since: datetime, now: datetime,
            field_checks: Callable[[str, str], list[CanaryCheck]] | None = None) -> RolloutStep:
    """The decision for the deployed base manifest from the telemetry `records` since `since`;
    `field_checks(canary, control)` adds the checks on labelled inferences (field accuracy, the
    fairness gap) once labels have arrived."""
    rollout = base["spec"].get("rollout")
    version = str(base["spec"]["modelRef"]["version"])
    if spec.deployment_strategy.type != "Canary" or spec.deployment_strategy.canary is None:
        return RolloutStep(model=spec.name, version=version, decision="not_canary",
                           reason=f"the spec's deployment strategy is {spec.deployment_strategy.type}")
    if not rollout:
        return RolloutStep(model=spec.name, version=version, decision="complete",
                           reason=f"v{version} runs on every selected device (no canary in progress)")
    canary_spec = spec.deployment_strategy.canary
    steps = canary_spec.steps
    step = int(rollout.get("step", 1))
    share = int(rollout["share"])
    previous = str(rollout.get("previousVersion", ""))
    common = {"model": spec.name, "version": version, "previous_version": previous, "step": step,
              "steps": len(steps), "share": share, "since": telemetry.timestamp(since)}
    if share >= 100:
        return RolloutStep(**common, decision="complete", reason=f"v{version} is at 100% of the devices")
    hold = rollout.get("hold")
    if hold:
        return RolloutStep(**common, decision="hold", reason=(
            f"held by {hold.get('by', 'someone')} since {hold.get('since', '?')}: {hold.get('reason', '')} "
            f"(python -m pipelines rollout {spec.name} --resume lifts the hold)"))
    canary = telemetry.cohort_stats([r for r in records if str(r.get("version")) == version])
    control = telemetry.cohort_stats([r for r in records if str(r.get("version")) == previous])
    analysis = canary_spec.analysis
    common |= {"canary": canary.brief(), "control": control.brief()}
    if canary.requests < analysis.min_requests:
        return RolloutStep(**common, decision="hold",
                           reason=f"{canary.requests:.0f} canary requests of the {analysis.min_requests} "
                                  "the analysis needs")
    checks = _checks(canary, control, analysis) + (field_checks(version, previous) if field_checks else [])
    failed = [c for c in checks if not c.passed]
    common["checks"] = checks
    if failed:
        return RolloutStep(**common, decision="rollback",
                           reason="; ".join(f"{c.name} {c.detail}" for c in failed))
    pause = parse_duration(steps[step - 1].pause)
    waited = (now - since).total_seconds()
    if waited < pause:
        return RolloutStep(**common, decision="hold",
                           reason=f"healthy; step {step} pauses {steps[step - 1].pause}, "
                                  f"{timedelta(seconds=int(waited))} elapsed")
    next_share = steps[step].share if step < len(steps) else 100
    return RolloutStep(**common, decision="advance", next_share=next_share,
                       reason=f"every check passed; {share}% -> {next_share}%")


def _checks(canary: telemetry.CohortStats, control: telemetry.CohortStats, analysis) -> list[CanaryCheck]:
    checks = []
    rate = canary.error_rate or 0.0
    checks.append(CanaryCheck(name="error_rate", observed=rate, threshold=analysis.max_error_rate,
                              passed=rate <= analysis.max_error_rate,
                              detail=f"{rate:.2%} (max {analysis.max_error_rate:.2%})"))
    if control.requests <= 0:
        # No control traffic in the window: only the absolute check can be applied.
        return checks
    increase = rate - (control.error_rate or 0.0)
    checks.append(CanaryCheck(name="error_rate_increase", observed=increase,
                              threshold=analysis.max_error_rate_increase,
                              passed=increase <= analysis.max_error_rate_increase,
                              detail=f"{increase:+.2%} over the control's {_pct(control.error_rate)} "
                                     f"(max +{analysis.max_error_rate_increase:.2%})"))
    canary_p95, control_p95 = canary.latency_quantile(0.95), control.latency_quantile(0.95)
    if canary_p95 is not None and control_p95:
        ratio = canary_p95 / control_p95
        # Below the floor a ratio measures timer noise (a busy host doubles 0.1 ms), not the model.
        floored = canary_p95 < analysis.latency_floor_ms
        checks.append(CanaryCheck(name="p95_latency_ratio", observed=ratio, threshold=analysis.max_p95_latency_ratio,
                                  passed=floored or ratio <= analysis.max_p95_latency_ratio,
                                  detail=f"{ratio:.2f}x ({canary_p95:.2f} vs {control_p95:.2f} ms; "
                                         f"max {analysis.max_p95_latency_ratio:g}x"
                                         + (f"; under the {analysis.latency_floor_ms:g} ms floor, not judged)"
                                            if floored else ")")))
    shift = telemetry.total_variation(canary.prediction_shares(), control.prediction_shares())
    checks.append(CanaryCheck(name="prediction_shift", observed=shift, threshold=analysis.max_prediction_shift,
                              passed=shift <= analysis.max_prediction_shift,
                              detail=f"{shift:.3f} total variation vs the control "
                                     f"(max {analysis.max_prediction_shift:g})"))
    return checks


def step_rollout(spec_path: str | Path, settings: Settings | None = None, now: datetime | None = None,
                 dry_run: bool = False, publish: bool = True) -> RolloutStep:
    """Analyse the model's canary and act on it by a commit (unless `dry_run`); `publish` the
    desired state at once (the CLI; Airflow leaves it to the publisher DAG)."""
    from pipelines.gitops import repo
    from pipelines.gitops.manifest import base_manifest_path, read_manifest

    settings = settings or get_settings()
    spec = load_spec(spec_path)
    now = now or telemetry.utc_now()
    work = settings.work_dir / "gitops"
    path = base_manifest_path(spec.name)
    files, tree = repo.app_files(settings.remote, settings.gitops_branch, spec.name, work) \
        if repo.has_branch(settings.remote, settings.gitops_branch) else ({}, "")
    if path not in files:
        return RolloutStep(model=spec.name, decision="no_release", reason="the model has no release yet")
    base = read_manifest(files[path])
    changes = repo.log(settings.remote, settings.gitops_branch, work, path)
    since = datetime.fromisoformat(changes[0]["date"]) if changes else now
    records = telemetry.read_records(ObjectStore(settings.telemetry_url, settings.s3_endpoint_url), spec.name,
                                     since, now, kind="inference")

    def field_checks(canary: str, control: str) -> list[CanaryCheck]:
        from pipelines.operate.quality import canary_field_checks

        return canary_field_checks(spec_path, settings, records, since, now, canary, control)

    result = analyze(spec, base, records, since, now, field_checks)
    if dry_run:
        return result
    if result.decision not in ("advance", "rollback"):
        save_analysis(result, now, settings)
        return result
    details = "Canary analysis:\n" + "\n".join(result.lines())
    if result.decision == "rollback":
        from pipelines.operate.rollback import rollback_release

        done = rollback_release(spec.name, result.previous_version, f"canary analysis failed: {result.reason}",
                                ROLLOUT_BY, settings, details=details, expect_tree=tree, publish=publish)
        result = result.model_copy(update={"commit": done.commit})
        save_analysis(result, now, settings)
        return result
    step = result.step + 1 if result.next_share < 100 else result.steps
    message = (f"rollout({spec.name}): version {result.version} {result.share}% -> {result.next_share}%\n\n"
               f"{details}\n")
    commit = _commit_rollout(settings, spec.name, lambda rollout: {**rollout, "share": result.next_share, "step": step},
                             message, publish, files=files, tree=tree)
    result = result.model_copy(update={"commit": commit})
    save_analysis(result, now, settings)
    return result


def _commit_rollout(settings: Settings, model: str, change: Callable[[dict], dict | None], message: str,
                    publish: bool, files: dict | None = None, tree: str | None = None,
                    branch: str | None = None) -> str | None:
    """Commit `change` (the base manifest's `spec.rollout` -> its new value, None: nothing to do)
    while a canary is in progress; the commit, or None when nothing changed."""
    from pipelines.operate.commits import ManifestChangeError, change_base_manifest

    def changed(doc: dict) -> dict | None:
        rollout = doc["spec"].get("rollout")
        if not rollout or int(rollout.get("share", 100)) >= 100:
            raise RolloutError(f"{model}: no canary in progress (v{doc['spec']['modelRef']['version']} runs on "
                               "every selected device)")
        new = change(dict(rollout))
        if new is None:
            return None
        doc["spec"]["rollout"] = new
        return doc

    try:
        return change_base_manifest(settings, model, changed, message, publish, files=files, tree=tree,
                                    branch=branch)
    except ManifestChangeError as error:
        raise RolloutError(str(error)) from None


def hold_rollout(model: str, reason: str, by: str, settings: Settings | None = None, details: str = "",
                 publish: bool = True, now: datetime | None = None, branch: str | None = None) -> str | None:
    """Stop the model's canary where it is, by a commit saying who and why (the rollout DAG then
    holds until `resume_rollout`); the commit, or None when it is held already. With `branch`,
    the commit goes to that review branch for a person to merge."""
    settings = settings or get_settings()
    since = telemetry.timestamp(now or telemetry.utc_now())

    def held(rollout: dict) -> dict | None:
        if rollout.get("hold"):
            return None
        return {**rollout, "hold": {"by": by, "since": since, "reason": reason[:500]}}

    message = f"rollout({model}): hold the canary where it is\n\nBy {by}: {reason}\n\n{details}\n".rstrip() + "\n"
    return _commit_rollout(settings, model, held, message, publish, branch=branch)


def resume_rollout(model: str, by: str, settings: Settings | None = None, publish: bool = True) -> str:
    """Lift a hold on the model's canary, by a commit; the rollout DAG judges it again."""
    settings = settings or get_settings()

    def resumed(rollout: dict) -> dict | None:
        if not rollout.get("hold"):
            raise RolloutError(f"{model}: the canary is not held")
        return {k: v for k, v in rollout.items() if k != "hold"}

    return _commit_rollout(settings, model, resumed, f"rollout({model}): resume the canary\n\nBy {by}.\n", publish)
