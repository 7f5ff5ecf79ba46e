"""A model's history (plugins/edge_ui/history.py) on real releases, a real canary rollout
step, a real rollback and a failed release, in a private state folder; and its table."""

import time
from datetime import timedelta

import pytest
import yaml
from conftest import tabular_frame, write_spec
from edge_ui import history, views

from pipelines import release
from pipelines.edge import telemetry
from pipelines.operate.rollback import rollback_release
from pipelines.operate.rollout import step_rollout
from pipelines.records import Approval, ReleaseOptions
from pipelines.release import attempts
from pipelines.settings import Settings
from pipelines.storage import ObjectStore

MODEL = "history-model"
CANARY = {"type": "Canary", "canary": {"steps": [{"share": 30, "pause": "10m"}, {"share": 100}],
                                       "analysis": {"minRequests": 200}}}
TRAINING = {"framework": "sklearn", "estimator": "logistic_regression", "seed": 1}
FAILING_TRAINER = '''
def fit(features, target, params, seed):
    raise ValueError("no GPU left")
'''


def _serve(store: ObjectStore, version: str, devices: int, when) -> None:
    """Healthy inference windows of `devices` devices on `version`, written as agents write them."""
    for device in range(devices):
        window = telemetry.InferenceWindow(MODEL, version, "phones", 2, started=when)
        for i in range(100):
            window.add(0.5, i % 2)
        telemetry.write_record(store, window.record(f"v{version}-dev-{device}", {}, now=when))


def _edit(spec, **changes) -> None:
    doc = yaml.safe_load(spec.read_text())
    doc.update(changes)
    spec.write_text(yaml.safe_dump(doc))


def _approval(approved: bool, by: str, comment: str) -> Approval:
    """A person's answer, given (unlike a test) some time after the run before ended."""
    time.sleep(0.01)
    return Approval(approved=approved, by=by, at=attempts.now(), comment=comment)


@pytest.fixture(scope="module")
def lived(tmp_path_factory):
    """A model with every kind of event, in a state folder of its own: two releases, a rollout
    step, a rollback, a dry run, a release waiting for a person, one a person rejected, one a
    person approved, and a failed one. Yields (settings, the summaries by name)."""
    folder = tmp_path_factory.mktemp("history")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGE_STATE_DIR", str(folder / "state"))
        tabular_frame().to_csv(folder / "data.csv", index=False)
        spec = write_spec(folder, MODEL, "data.csv", deploymentStrategy=CANARY)
        settings = Settings(specs_dir=folder)
        done = {"v1": release.run_release(spec, trigger="cli: first")}
        _edit(spec, training={**TRAINING, "params": {"C": 5.0}})
        done["v2"] = release.run_release(spec)
        start = telemetry.utc_now()
        _serve(ObjectStore(settings.telemetry_url), "2", 3, start)
        _serve(ObjectStore(settings.telemetry_url), "1", 6, start)
        assert step_rollout(spec, settings, now=start + timedelta(hours=1), publish=False).decision == "advance"
        rollback_release(MODEL, None, "kiosks answer too slowly", "ana", settings, publish=False)
        time.sleep(1)  # a commit's date is a whole second: the next run ends in a later one
        done["dry"] = release.run_release(spec, options=ReleaseOptions(dry_run=True))
        _edit(spec, approval={"mode": "manual"}, training={**TRAINING, "params": {"C": 2.0}})
        done["waiting"] = release.run_release(spec)
        done["no"] = release.run_release(spec, approval=_approval(False, "bo", "wait for the audit"))
        done["yes"] = release.run_release(spec, trigger="manual: audited",
                                          approval=_approval(True, "ana", "audit done"))
        done["again"] = release.run_release(spec)  # the released version asks a person again
        (folder / "trainer.py").write_text(FAILING_TRAINER)
        _edit(spec, training={"entrypoint": "trainer:fit", "seed": 1})
        with pytest.raises(release.ReleaseError):
            release.run_release(spec, trigger="cli: retrain on own code")
        yield settings, done


def test_every_attempt_approval_rollback_and_rollout_newest_first(lived):
    settings, done = lived
    assert [s.status for s in done.values()] == ["released", "released", "dry_run", "awaiting_approval",
                                                 "rejected", "released", "awaiting_approval"]
    events = history.model_history(MODEL, settings)
    assert [(e.kind, e.status) for e in events] == [
        ("attempt", "failed"),
        ("attempt", "awaiting_approval"),
        ("attempt", "released"), ("approval", "approved"),
        ("attempt", "rejected"), ("approval", "rejected"),
        ("attempt", "awaiting_approval"),
        ("attempt", "dry_run"),
        ("rollback", "rollback"),
        ("rollout", "rollout"),
        ("attempt", "released"),
        ("attempt", "released"),
    ]
    failed, again, yes, approved, no, rejected, waiting, dry, rollback, rollout, v2, v1 = events

    assert (failed.what, failed.badge, failed.stage, failed.version, failed.who) == ("failed", "bad", "train", None,
                                                                                     "cli")
    assert failed.reason.startswith("train: ") and "no GPU left" in failed.reason
    assert failed.trigger == "cli: retrain on own code" and failed.run_id.startswith("cli__")

    assert (again.version, again.badge, again.trigger) == ("3", "wait", "cli")
    assert (yes.badge, yes.version, yes.commit) == ("ok", done["yes"].model_version, done["yes"].gitops_commit)
    assert yes.trigger == "manual: audited"
    assert (approved.who, approved.reason, approved.badge, approved.version) == ("ana", "audit done", "ok", "3")
    assert approved.run_id == yes.run_id
    assert (no.badge, no.version) == ("bad", "3") and "rejected by bo" in no.reason
    assert (rejected.who, rejected.reason, rejected.badge) == ("bo", "wait for the audit", "bad")
    assert (waiting.what, waiting.badge) == ("waiting for approval", "wait")
    assert waiting.reason.startswith("approval: waiting for a person")
    assert (dry.what, dry.badge, dry.version) == ("dry run", "neutral", "2") and dry.reason.startswith("dry run:")

    assert (rollback.badge, rollback.from_version, rollback.version, rollback.who, rollback.reason) == (
        "warn", "2", "1", "ana", "kiosks answer too slowly")
    assert (rollout.badge, rollout.version, rollout.share_before, rollout.share_after, rollout.who) == (
        "wait", "2", 30.0, 100.0, "canary analysis")
    assert rollout.reason.startswith("advance:") and rollout.commit

    assert (v2.version, v2.commit, v2.trigger, v2.who) == ("2", done["v2"].gitops_commit, "cli", "cli")
    assert (v1.version, v1.trigger) == ("1", "cli: first")
    assert len({e.run_id for e in events if e.kind == "attempt"}) == 8

    assert history.model_history(MODEL, settings, limit=3) == events[:3]


def test_the_index_sees_a_failed_run_after_a_release(lived):
    settings, done = lived
    last = history.last_attempt(MODEL, settings)
    assert (last.status, last.badge, last.stage) == ("failed", "bad", "train")
    # What the index showed before: the latest summary, of the run before.
    [row] = views.list_models(settings)
    assert (row.last_release.status, row.last_release.version) == ("awaiting_approval", done["yes"].model_version)
    assert history.last_attempt("never-released", settings) is None
    with pytest.raises(views.UnknownModel):
        history.model_history("../etc", settings)


def test_a_released_version_keeps_its_release_when_a_later_run_of_it_waits(lived):
    """The version page after a person's approval: the run that released it and the approval,
    not a later run of the same inputs that asked again (nor the run that registered it)."""
    settings, done = lived
    page = views.version_page(MODEL, done["yes"].model_version, settings)
    assert (page.version.status, page.version.trigger) == ("released", "manual: audited")
    summary = page.version.summary
    assert (summary.status, summary.trigger, summary.approved_by, summary.approval_comment) == (
        "released", "manual: audited", "ana", "audit done")
    assert page.version.explanation == []
    # The later run is the model's latest summary and the newest attempt but one.
    [row] = views.list_models(settings)
    assert (row.last_release.status, row.last_release.version) == ("awaiting_approval", "3")


def test_releases_from_before_attempts_were_recorded_come_from_the_gitops_log(lived):
    settings, done = lived
    store = ObjectStore(settings.store_url)
    [first] = [a for a in attempts.list_attempts(MODEL, store, limit=None) if a.version == "1"]
    [key] = [k for k in store.list_keys(attempts.folder(MODEL)) if k.endswith(f"-{attempts.run_slug(first.run_id)}.json")]
    kept = store.read_bytes(key)
    store.local_path(key).unlink()  # as if v1 was released before attempts were recorded
    try:
        events = history.model_history(MODEL, settings)
    finally:
        store.put_bytes(kept, key)
    oldest = events[-1]
    assert (oldest.kind, oldest.status, oldest.badge, oldest.version, oldest.commit) == (
        "release", "released", "ok", "1", done["v1"].gitops_commit)
    assert oldest.reason.startswith(f"release({MODEL}): version 1") and oldest.run_id is None
    assert [e.kind for e in events].count("release") == 1, "commits of recorded attempts are not repeated"


def test_the_history_table_renders_each_event_with_its_badge(lived):
    from edge_ui.app import templates

    settings, _ = lived
    events = history.model_history(MODEL, settings)
    html = templates.from_string('{% from "history.html" import history_table %}{{ history_table(events) }}').render(
        events=events)
    assert html.count("<tr class=\"history-") == len(events)
    assert '<span class="badge bad">failed</span> <span class="history-stage">in train</span>' in html
    assert '<span class="badge warn">rollback</span>' in html and "v2 → v1" in html
    assert '<span class="badge wait">rollout step</span>' in html and "30% → 100%" in html
    assert '<span class="badge ok">approved</span>' in html and "audit done" in html
    assert "style=" not in html and "<script" not in html, "the CSP allows neither"
    empty = templates.from_string('{% from "history.html" import history_table %}{{ history_table([]) }}').render()
    assert "No release attempt" in empty
