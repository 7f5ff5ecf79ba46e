"""The release stages on a small tabular spec, without Airflow (the CLI's path)."""

import json
import subprocess

import pytest
import yaml

from conftest import tabular_frame, write_spec
from pipelines import release
from pipelines.__main__ import main
from pipelines.gitops import manifest
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
    text = _git(remote, "show", f"main:apps/small-model/base/mobileaimodeldeployment.yaml")
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


def test_a_spec_edited_mid_release_is_refused(small_spec, state):
    data = release.validate_data(small_spec)
    doc = yaml.safe_load(small_spec.read_text())
    doc["training"]["seed"] = 99
    small_spec.write_text(yaml.safe_dump(doc))
    with pytest.raises(release.ReleaseError, match="spec or the code changed after validate_data"):
        release.train(small_spec, data)


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
