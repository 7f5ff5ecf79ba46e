"""Release attempts (pipelines/release/attempts.py): one record per run in the artifact store,
running, then finished from the summary or failed with the stage and the error; and a real CLI
release whose training code raises leaves a failed attempt naming the stage."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
import yaml
from conftest import tabular_frame, write_spec

from pipelines.__main__ import main
from pipelines.records import Approval, QuantCandidate, QuantizationPlan, ReleaseSummary
from pipelines.release import attempts
from pipelines.settings import Settings
from pipelines.storage import ObjectStore

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)


@pytest.fixture
def store(tmp_path) -> ObjectStore:
    return ObjectStore((tmp_path / "store").as_uri())


def _summary(status: str = "released", approval: Approval | None = None) -> ReleaseSummary:
    plan = QuantizationPlan(chosen="fp32", reason="smallest eligible", candidates=[QuantCandidate(
        variant="fp32", uri="file:///m.onnx", sha256="b" * 64, size_bytes=2048, accuracy=0.9, accuracy_change=0.0,
        latency_p50_ms=1.0, latency_p95_ms=2.0, eligible=True)])
    return ReleaseSummary(
        model="m", model_version="3", status=status, reasons=[] if status == "released" else ["quality: too low"],
        release_key="k" * 64, run_id="mlflow-run", trigger="manual: new data", artifact_uri=None,
        artifact_sha256="b" * 64, gitops_commit="c0ffee" if status == "released" else None,
        gitops_commit_created=status == "released", quantization=plan, metrics={"accuracy": 0.9}, stages={},
        approval=approval)


def _files(store: ObjectStore, model: str = "m") -> list[str]:
    return store.list_keys(attempts.folder(model))


def test_an_attempt_runs_then_finishes_from_its_summary(store):
    started = attempts.start_attempt("m", "manual__2026-03-01T12:00:00+00:00", "manual: new data", store,
                                     started_by="ana", started_at=T0)
    assert (started.status, started.started_at, started.started_by, started.finished_at) == (
        "running", "2026-03-01T12:00:00.000Z", "ana", None)
    [key] = _files(store)
    assert key.startswith("releases/m/attempts/20260301T120000000000Z-manual__2026-03-01T12_00_00_00_00-")

    finished = attempts.finish_attempt(_summary(), "manual__2026-03-01T12:00:00+00:00", store)
    assert (finished.status, finished.version, finished.gitops_commit, finished.started_by) == (
        "released", "3", "c0ffee", "ana")
    assert finished.finished_at and finished.started_at == "2026-03-01T12:00:00.000Z"
    assert _files(store) == [key]
    assert attempts.load_attempt("m", "manual__2026-03-01T12:00:00+00:00", store) == finished

    rejected = attempts.finish_attempt(_summary("rejected"), "scheduled__x", store)  # no start recorded
    assert (rejected.status, rejected.reasons, rejected.trigger) == ("rejected", ["quality: too low"],
                                                                     "manual: new data")


def test_a_failure_names_the_stage_on_one_line_without_credentials(store):
    attempts.start_attempt("m", "r1", "cli", store)
    error = RuntimeError("push to https://bot:tok3n@git.example.com/gitops.git failed\n  fatal: denied")
    failed = attempts.fail_attempt("m", "r1", "commit", error, store, version="4")
    assert (failed.status, failed.failed_stage, failed.version) == ("failed", "commit", "4")
    assert failed.error == "RuntimeError: push to https://***@git.example.com/gitops.git failed fatal: denied"
    [key] = _files(store)
    assert b"tok3n" not in store.read_bytes(key)

    from pipelines.release import ReleaseError

    # The release's own errors are already sentences; a long one is cut.
    line = attempts.error_line(ReleaseError("data.csv: column x is missing " + "x" * 2000))
    assert line.startswith("data.csv: column x is missing") and len(line) <= attempts.ERROR_LIMIT
    assert attempts.error_line(KeyError()) == "KeyError" and attempts.error_line("plain text") == "plain text"


def test_one_record_per_run_id_whatever_is_retried(store):
    attempts.start_attempt("m", "run-a", "scheduled", store, started_at=T0)
    attempts.fail_attempt("m", "run-a", "validate_data", ValueError("store busy"), store)
    again = attempts.start_attempt("m", "run-a", "scheduled", store, started_at=T0 + timedelta(hours=1))
    assert (again.status, again.error, again.failed_stage, again.finished_at) == ("running", None, None, None)
    assert again.started_at == "2026-03-01T12:00:00.000Z", "a retried first task keeps the run's start"

    decided = Approval(approved=True, by="ana", at="2026-03-01T12:30:00+00:00", comment="ship it")
    attempts.record_approval("m", "run-a", decided, store)
    finished = attempts.finish_attempt(_summary(), "run-a", store)
    assert finished.approval == decided, "the summary without an approval keeps the person's decision"
    assert attempts.finish_attempt(_summary(), "run-a", store).status == "released"
    assert len(_files(store)) == 1 and [a.run_id for a in attempts.list_attempts("m", store)] == ["run-a"]


@pytest.mark.parametrize("run_id", ["../../x", "a/../../../etc/passwd", "..", "/abs/olute", "a\\b\x00c", "é" * 300,
                                    "manual__2026-03-01T12:00:00+00:00"])
def test_a_run_id_becomes_a_safe_file_name_inside_the_folder(tmp_path, store, run_id):
    attempts.start_attempt("m", run_id, "manual", store)
    attempts.fail_attempt("m", run_id, "train", "boom", store)
    [key] = _files(store)
    name = key.removeprefix("releases/m/attempts/")
    assert "/" not in name and "\\" not in name and not name.startswith(".") and len(name) < 160
    folder = store.local_path("releases/m/attempts").resolve()
    assert [p.resolve().parent for p in tmp_path.rglob("*") if p.is_file()] == [folder]
    assert attempts.load_attempt("m", run_id, store).run_id == run_id


def test_run_ids_that_clean_up_alike_keep_their_own_records(store):
    for run_id in ("a/b", "a_b", "a b"):
        attempts.start_attempt("m", run_id, "manual", store)
    attempts.fail_attempt("m", "a/b", "train", "boom", store)
    assert len(_files(store)) == 3
    assert {a.run_id: a.status for a in attempts.list_attempts("m", store)} == {
        "a/b": "failed", "a_b": "running", "a b": "running"}


@pytest.mark.parametrize("model", ["../m", "M", "m/n", "", "-m"])
def test_a_model_name_must_be_a_dns_label(store, model):
    with pytest.raises(ValueError):
        attempts.start_attempt(model, "r", "cli", store)
    with pytest.raises(ValueError):
        attempts.list_attempts(model, store)


def test_attempts_are_listed_newest_first_and_limited(store):
    for hours, run_id in ((2, "r2"), (0, "r0"), (1, "r1")):
        attempts.start_attempt("m", run_id, "scheduled", store, started_at=T0 + timedelta(hours=hours))
    # Within one second the microseconds still order them.
    attempts.start_attempt("m", "r3", "scheduled", store, started_at=T0 + timedelta(hours=3, microseconds=2))
    attempts.start_attempt("m", "r4", "scheduled", store, started_at=T0 + timedelta(hours=3, microseconds=5))
    attempts.start_attempt("other", "r9", "scheduled", store)
    assert [a.run_id for a in attempts.list_attempts("m", store)] == ["r4", "r3", "r2", "r1", "r0"]
    assert [a.run_id for a in attempts.list_attempts("m", store, limit=2)] == ["r4", "r3"]
    assert [a.run_id for a in attempts.list_attempts("m", store, limit=None)][-1] == "r0"
    assert attempts.list_attempts("never-released", store) == []


TRAIN_PY = '''
def fit(features, target, params, seed):
    raise RuntimeError("the GPU quota is exhausted;\\n  see https://bot:quota-s3cret@quota.example.com/status")
'''


def test_a_failing_cli_release_leaves_a_failed_attempt_naming_the_stage(tmp_path, state, capsys):
    tabular_frame().to_csv(tmp_path / "data.csv", index=False)
    spec = write_spec(tmp_path, "failing-model", "data.csv")
    assert main(["release", str(spec), "--reason", "first release"]) == 0
    # The same data with training code that raises: the train stage fails.
    (tmp_path / "trainer.py").write_text(TRAIN_PY)
    doc = yaml.safe_load(spec.read_text())
    doc["training"] = {"entrypoint": "trainer:fit", "seed": 1}
    spec.write_text(yaml.safe_dump(doc))
    capsys.readouterr()
    assert main(["release", str(spec)]) == 2
    assert "GPU quota" in capsys.readouterr().err

    settings = Settings()
    store = ObjectStore(settings.store_url)
    failed, released = attempts.list_attempts("failing-model", store)
    assert (released.status, released.trigger, released.version) == ("released", "cli: first release", "1")
    assert released.run_id.startswith("cli__") and released.gitops_commit and released.finished_at
    assert (failed.status, failed.failed_stage, failed.trigger, failed.version) == ("failed", "train", "cli", None)
    assert "the GPU quota is exhausted; see https://***@quota.example.com/status" in failed.error
    assert failed.run_id.startswith("cli__") and failed.run_id != released.run_id
    stored = [store.read_bytes(k) for k in store.list_keys(attempts.folder("failing-model"))]
    assert len(stored) == 2 and not any(b"quota-s3cret" in data for data in stored)
    # The release summary still says v1 was released: only the attempt records the failure.
    latest = json.loads(store.read_bytes("releases/failing-model/latest.json"))
    assert latest["status"] == "released"
