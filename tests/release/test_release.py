"""The release stages on a small tabular spec, without Airflow (the CLI's path)."""

import json
import subprocess

import pytest
from conftest import tabular_frame, write_spec

from pipelines import release
from pipelines.__main__ import main
from pipelines.gitops import manifest
from pipelines.records import usd
from pipelines.settings import Settings
from pipelines.storage import sha256_file


def _git(remote, *args) -> str:
    return subprocess.run(["git", "--git-dir", str(remote), *args], capture_output=True, text=True,
                          check=True).stdout


def _versions(settings: Settings, model: str) -> list:
    from pipelines.registry import client

    return client(settings.tracking_uri).search_model_versions(f"name = '{model}'")


@pytest.fixture
def small_spec(tmp_path, state):
    tabular_frame().to_csv(tmp_path / "data.csv", index=False)
    return write_spec(tmp_path, "small-model", "data.csv")


def test_cli_release_prints_json_and_a_rerun_changes_nothing(small_spec, state, capsys):
    assert main(["release", str(small_spec), "--json"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(first) >= {"model", "model_version", "artifact_uri", "artifact_sha256", "gitops_commit",
                          "quantization", "stages"}
    assert list(first["stages"]) == list(release.STAGES)
    assert first["quantization"]["chosen"] in {c["variant"] for c in first["quantization"]["candidates"]}
    artifact = first["artifact_uri"].removeprefix("file://")
    assert sha256_file(artifact) == first["artifact_sha256"]

    settings = Settings()
    remote = settings.remote
    text = _git(remote, "show", "main:apps/small-model/base/mobileaimodeldeployment.yaml")
    doc = manifest.read_manifest(text)
    assert manifest.manifest_checksum(doc) == first["artifact_sha256"]
    assert doc["spec"]["modelRef"]["sourceUri"] == first["artifact_uri"]
    subject = _git(remote, "log", "-1", "--format=%B", "main")
    assert "small-model" in subject and first["artifact_sha256"] in subject and first["run_id"] in subject
    commits = _git(remote, "rev-list", "--count", "main")

    assert main(["release", str(small_spec), "--json"]) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["gitops_commit"] == first["gitops_commit"] and not second["gitops_commit_created"]
    assert second["model_version"] == first["model_version"]
    assert _git(remote, "rev-list", "--count", "main") == commits
    assert len(_versions(settings, "small-model")) == 1


def test_stages_reuse_their_outputs(small_spec, state):
    data = release.validate_data(small_spec)
    trained = release.train(small_spec, data)
    assert not trained.reused
    again = release.train(small_spec, release.validate_data(small_spec))
    assert again.reused and again.model_uri == trained.model_uri and again.metrics == trained.metrics


def test_a_registration_cut_off_after_its_run_began_leaves_no_orphan_run(small_spec, state):
    """A run an earlier attempt started (MLflow went away before the version was made) is
    deleted by the retry, which registers once: one live run per version."""
    from pipelines import registry

    settings = Settings()
    data = release.validate_data(small_spec)
    trained = release.train(small_spec, data)
    exported = release.export(small_spec, data, trained)
    plan = release.quantize(small_spec, data, exported)
    client = registry.client(settings.tracking_uri)
    experiment = registry.experiment_id(client, "small-model", settings.mlflow_artifacts)
    orphan = client.create_run(experiment, tags={"release_key": data.release_key}).info.run_id

    version = release.register(small_spec, data, trained, exported, plan)
    live = client.search_runs([experiment], filter_string=f"tags.release_key = '{data.release_key}'")
    assert [run.info.run_id for run in live] == [version.run_id] and version.run_id != orphan
    assert client.get_run(orphan).info.lifecycle_stage == "deleted"
    assert [str(v.version) for v in _versions(settings, "small-model")] == [version.version]
    again = release.register(small_spec, data, trained, exported, plan)
    assert (again.version, again.run_id, again.created) == (version.version, version.run_id, False)


def test_a_run_keeps_the_spec_it_started_with_when_the_file_changes(small_spec, state):
    data = release.validate_data(small_spec)
    started = small_spec.read_text()
    small_spec.write_text("training: {framework: not-a-framework\n")  # mid-edit: not even YAML
    trained = release.train(small_spec, data)
    exported = release.export(small_spec, data, trained)
    plan = release.quantize(small_spec, data, exported)
    registered = release.register(small_spec, data, trained, exported, plan)
    assert registered.created and trained.framework == "sklearn"
    small_spec.write_text(started)
    again = release.validate_data(small_spec)
    assert (again.release_key, again.spec_sha256) == (data.release_key, data.spec_sha256)
    assert release.train(small_spec, again).reused


@pytest.mark.parametrize("breakage,expected", [
    ("drop-column", "column 'x2': expect_column_to_exist(); the column is missing"),
    ("nulls", "column 'colour': expect_column_values_to_not_be_null(mostly=0.95)"),
])
def test_bad_data_stops_before_anything_is_registered_or_committed(tmp_path, state, capsys, breakage, expected):
    frame = tabular_frame()
    if breakage == "drop-column":
        frame = frame.drop(columns=["x2"])
    else:
        frame.loc[:100, "colour"] = None
    frame.to_csv(tmp_path / "data.csv", index=False)
    spec = write_spec(tmp_path, "small-model", "data.csv")
    assert main(["release", str(spec)]) == 2
    err = capsys.readouterr().err
    assert f"error: {spec}: data data.csv failed" in err and expected in err
    settings = Settings()
    assert not (settings.state / "artifacts" / "models").exists()
    assert not (settings.state / "gitops.git").exists()
    assert not (settings.state / "mlflow").exists()


def _mlflow(settings):
    from pipelines.registry import client

    return client(settings.tracking_uri)


def test_a_failed_gate_commits_nothing_and_tags_the_version_rejected(tmp_path, state, capsys):
    tabular_frame().to_csv(tmp_path / "data.csv", index=False)
    spec = write_spec(tmp_path, "weak-model", "data.csv",
                      gates={"quality": {"accuracy": {"minValue": 0.99}}})
    assert main(["release", str(spec), "--json"]) == 0  # a rejection is an outcome, not an error
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["status"] == "rejected" and summary["gitops_commit"] is None
    [quality] = [v for v in summary["verdicts"] if v["gate"] == "quality"]
    assert not quality["passed"] and quality["thresholds"]["accuracy.min_value"] == 0.99
    assert 0.5 < quality["observed"]["accuracy.candidate"] < 0.99
    assert summary["reasons"] == [f"quality: {quality['reason']}"]
    settings = Settings()
    assert not (settings.state / "gitops.git").exists()
    assert not (settings.state / "artifacts" / "models").exists()
    version = _mlflow(settings).get_model_version("weak-model", summary["model_version"])
    assert version.tags["release_status"] == "rejected"
    assert "accuracy" in version.tags["release_reasons"] and "< min 0.99" in version.tags["release_reasons"]
    assert "champion" not in version.aliases
    run = _mlflow(settings).get_run(summary["run_id"])
    assert run.data.tags["gate.quality.passed"] == "false"
    assert run.data.metrics["gate.quality.accuracy.candidate"] == quality["observed"]["accuracy.candidate"]


def test_model_card_is_published_and_referenced_by_checksum(small_spec, state):
    summary = release.run_release(small_spec)
    assert summary.status == "released"
    settings = Settings()
    doc = manifest.read_manifest(_git(settings.remote, "show",
                                      "main:apps/small-model/base/mobileaimodeldeployment.yaml"))
    card_ref = doc["spec"]["modelRef"]["modelCard"]
    card_path = card_ref["uri"].removeprefix("file://")
    assert card_ref["checksum"] == f"sha256:{sha256_file(card_path)}"
    card = json.loads(open(card_path).read())
    assert card["model"]["artifact_sha256"] == summary.artifact_sha256
    assert {v["gate"] for v in card["verdicts"]} == {"quality", "fairness", "quantization_parity", "drift",
                                                    "edge_memory", "edge_latency", "budget"}
    assert card["cost"]["diff"][0] == f"Cost vs new: +{usd(summary.cost['total_usd_per_month'])}/month"
    assert card["intended_use"] == "" and card["explainability"]["method"] == "permutation_importance"
    assert set(card["explainability"]["importances"]) == {"x1", "x2", "colour"}
    html_text = open(card_path.replace(".json", ".html")).read()
    assert "<title>Model card: small-model version 1</title>" in html_text
    assert [b["gate"] for b in doc["spec"]["evaluation"]["verdicts"]] == [
        "quality", "fairness", "quantization_parity", "drift", "edge_memory", "edge_latency", "budget"]
    versions = _mlflow(settings).get_model_version_by_alias("small-model", "champion")
    assert str(versions.version) == summary.model_version
    run = _mlflow(settings).get_run(summary.run_id)
    artifacts = {a.path for a in _mlflow(settings).list_artifacts(summary.run_id, "evidence/fairness")}
    assert {"evidence/fairness/fairness_by_group.png", "evidence/fairness/fairness.json"} <= artifacts
    assert run.data.tags["model_card_sha256"] == card_ref["checksum"].removeprefix("sha256:")


def test_manual_approval_on_the_command_line(tmp_path, state, capsys):
    tabular_frame().to_csv(tmp_path / "data.csv", index=False)
    spec = write_spec(tmp_path, "manual-model", "data.csv", approval={"mode": "manual"})
    assert main(["release", str(spec), "--json"]) == 0
    waiting = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert waiting["status"] == "awaiting_approval" and waiting["gitops_commit"] is None
    assert main(["release", str(spec), "--json", "--approve-as", "ana"]) == 0
    approved = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert approved["status"] == "released" and approved["approval"]["by"] == "ana"
    assert "Approved by: ana" in _git(Settings().remote, "log", "-1", "--format=%B", "main")


def test_a_group_that_requires_review_puts_the_release_on_a_review_branch(tmp_path, state):
    tabular_frame().to_csv(tmp_path / "data.csv", index=False)
    spec = write_spec(tmp_path, "reviewed-model", "data.csv", targets=[{
        "name": "phones", "requiresReview": True,
        "selector": {"matchLabels": {"apexlogic.dev/device-class": "android-phone"}}}])
    summary = release.run_release(spec)
    assert summary.status == "in_review"
    assert "release/reviewed-model/1" in summary.reasons[0]
    settings = Settings()
    assert "reviewed-model" not in _git(settings.remote, "ls-tree", "-r", "--name-only", "main")
    notes = _git(settings.remote, "show", "release/reviewed-model/1:apps/reviewed-model/RELEASE.md")
    assert notes.startswith("# reviewed-model version 1")
    assert "Device groups that require review: phones" in notes and "| budget | pass |" in notes
    version = _mlflow(settings).get_model_version("reviewed-model", "1")
    assert version.tags["release_status"] == "in_review" and "champion" not in version.aliases
    again = release.run_release(spec)
    assert again.gitops_commit == summary.gitops_commit and not again.gitops_commit_created


