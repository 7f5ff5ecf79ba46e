"""The release identity: only a model's own inputs make a new release.

The end-to-end cases run the command line from a copy of the project, edited as a person
would edit it, against one state folder (MLflow registry, artifact store, GitOps remote).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import ROOT, tabular_frame, write_spec

from pipelines import identity


def _copy_project(folder: Path) -> Path:
    project = folder / "project"
    for name in ("pipelines", "plugins", "dags", "model_specs"):
        shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    return project


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}\n")


def _release(project: Path, spec: Path) -> dict:
    """`python -m pipelines release --json` run from `project` (its own code, not this checkout's)."""
    env = {**os.environ, "PYTHONPATH": str(project), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "pipelines", "release", str(spec), "--json"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _versions(model: str) -> list[str]:
    from pipelines import registry
    from pipelines.settings import Settings

    client = registry.client(Settings().tracking_uri)
    return sorted(str(v.version) for v in client.search_model_versions(f"name = '{model}'"))


def _release_keys(model: str) -> list[str]:
    from pipelines.settings import Settings

    runs = Settings().store_url.removeprefix("file://")
    return sorted(p.parent.name for p in Path(runs, "runs", model).glob("*/train.json"))


def test_the_model_digest_reads_only_the_folders_that_shape_a_model(tmp_path):
    project = _copy_project(tmp_path)
    package = project / "pipelines"

    def digests() -> tuple[str, str]:
        identity.code_digest.cache_clear()
        return (identity.code_digest(identity.MODEL_CODE, package),
                identity.code_digest(identity.EVALUATION_CODE, package))

    try:
        model, evaluation = digests()
        for path in (package / "edge" / "agent.py", package / "__main__.py", package / "operate" / "rollout.py",
                     project / "plugins" / "edge_ui" / "views.py", project / "dags" / "edge_release.py"):
            _append(path, "# not a model's input")
        assert digests() == (model, evaluation)
        _append(package / "gates" / "quality.py", "# a gate's rule")
        assert digests()[0] == model and digests()[1] != evaluation
        _append(package / "training" / "__init__.py", "# training code")
        assert digests()[0] != model
    finally:
        identity.code_digest.cache_clear()


def test_deploy_only_spec_fields_keep_the_model_digest(tmp_path):
    from pipelines.specs import load_spec

    tabular_frame().to_csv(tmp_path / "data.csv", index=False)
    spec = load_spec(write_spec(tmp_path, "digest-model", "data.csv"))
    deployed = spec.model_copy(update={
        "description": "new words", "schedule": "@daily",
        "finops": spec.finops.model_copy(update={"monthly_budget_usd": 99.0}),
        "telemetry": spec.telemetry.model_copy(update={"sample_rate": 0.5}),
        "targets": [*spec.targets, spec.targets[0].model_copy(update={"name": "kiosks", "latency_slo_ms": 5.0})]})
    assert deployed.model_digest() == spec.model_digest() and deployed.digest() != spec.digest()
    retrained = spec.model_copy(update={"training": spec.training.model_copy(update={"seed": 7})})
    assert retrained.model_digest() != spec.model_digest()


def test_editing_the_agent_the_ui_or_the_training_code_releases_nothing_new(tmp_path, state):
    from pipelines.gitops import repo
    from pipelines.settings import Settings

    project = _copy_project(tmp_path)
    tabular_frame().to_csv(tmp_path / "data.csv", index=False)
    spec = write_spec(tmp_path, "stable-model", "data.csv")
    first = _release(project, spec)
    assert (first["status"], first["model_version"], first["gitops_commit_created"]) == ("released", "1", True)
    settings = Settings()
    history = repo.log(settings.remote, settings.gitops_branch, settings.work_dir / "gitops")

    # A platform change: the device agent and the UI.
    _append(project / "pipelines" / "edge" / "agent.py", "# the agent reports one more field")
    _append(project / "plugins" / "edge_ui" / "views.py", "# the page shows one more column")
    second = _release(project, spec)
    assert (second["model_version"], second["gitops_commit_created"]) == ("1", False)
    assert second["release_key"] == first["release_key"], "the agent and the UI are not a model's input"

    # Training code that changes nothing in the model: a new key, a rebuild, the same bytes.
    _append(project / "pipelines" / "training" / "__init__.py", "# a comment in the training code")
    third = _release(project, spec)
    assert third["release_key"] != first["release_key"]
    assert third["artifact_sha256"] == first["artifact_sha256"], "the ONNX file is byte-deterministic"
    assert (third["model_version"], third["gitops_commit_created"]) == ("1", False)

    assert _versions("stable-model") == ["1"]
    assert len(_release_keys("stable-model")) == 2
    assert repo.log(settings.remote, settings.gitops_branch, settings.work_dir / "gitops") == history


def test_a_deploy_only_spec_edit_is_a_deploy_commit_of_the_same_version(tmp_path, state):
    from pipelines.gitops import repo
    from pipelines.gitops.manifest import base_manifest_path
    from pipelines.release import run_release
    from pipelines.settings import Settings

    tabular_frame().to_csv(tmp_path / "data.csv", index=False)
    spec = write_spec(tmp_path, "deployed-model", "data.csv")
    first = run_release(spec)
    assert (first.status, first.model_version) == ("released", "1")

    doc = yaml.safe_load(spec.read_text())
    doc["targets"].append({"name": "kiosks", "latencySloMs": 50,
                           "selector": {"matchLabels": {"apexlogic.dev/device-class": "raspberry-pi-4"}}})
    doc["finops"]["monthlyBudgetUsd"] = 25
    doc["telemetry"] = {"sampleRate": 0.2}
    spec.write_text(yaml.safe_dump(doc, sort_keys=False))
    second = run_release(spec)

    assert (second.status, second.model_version, second.gitops_commit_created) == ("released", "1", True)
    assert second.release_key == first.release_key and second.gitops_commit != first.gitops_commit
    assert _versions("deployed-model") == ["1"] and len(_release_keys("deployed-model")) == 1
    settings = Settings()
    work = settings.work_dir / "gitops"
    files, _ = repo.app_files(settings.remote, settings.gitops_branch, "deployed-model", work)
    assert "apps/deployed-model/overlays/kiosks/kustomization.yaml" in files
    base = yaml.safe_load(files[base_manifest_path("deployed-model")])
    assert str(base["spec"]["modelRef"]["version"]) == "1"
    [latest, *_] = repo.log(settings.remote, settings.gitops_branch, work)
    assert latest["subject"].startswith("deploy(deployed-model): version 1")
