"""Rollback: the previous release's manifests come back in a commit that says who and why."""

import subprocess

import pytest
import yaml
from conftest import release_twice

from pipelines import registry
from pipelines.__main__ import main
from pipelines.gitops.rollback import RollbackError, choose_target
from pipelines.settings import Settings


def _git(remote, *args) -> str:
    return subprocess.run(["git", "--git-dir", str(remote), *args], capture_output=True, text=True,
                          check=True).stdout


@pytest.fixture
def two_releases(tmp_path, state):
    return release_twice(tmp_path, "small-model")


def test_rollback_restores_the_previous_release_and_blocks_its_rerun(two_releases, capsys):
    settings = Settings()
    base = "main:apps/small-model/base/mobileaimodeldeployment.yaml"
    assert yaml.safe_load(_git(settings.remote, "show", base))["spec"]["modelRef"]["version"] == "2"
    capsys.readouterr()
    assert main(["rollback", "small-model", "--reason", "p95 latency doubled on phones", "--by", "ana"]) == 0
    assert "small-model: version 2 -> 1" in capsys.readouterr().out

    doc = yaml.safe_load(_git(settings.remote, "show", base))
    assert doc["spec"]["modelRef"]["version"] == "1"
    assert doc["metadata"]["annotations"]["apexlogic.dev/rollback"] == "true"
    assert doc["metadata"]["annotations"]["apexlogic.dev/rollback-from-version"] == "2"
    message = _git(settings.remote, "log", "-1", "--format=%B", "main")
    assert message.startswith("rollback(small-model): version 2 -> 1")
    assert "Rolled back by: ana" in message and "Reason: p95 latency doubled on phones" in message
    mlflow = registry.client(settings.tracking_uri)
    assert str(mlflow.get_model_version_by_alias("small-model", "champion").version) == "1"
    assert mlflow.get_model_version("small-model", "2").tags["release_status"] == "rolled_back"

    # Re-running the rolled-back release commits nothing and says why.
    commits = _git(settings.remote, "rev-list", "--count", "main")
    assert main(["release", str(two_releases)]) == 2
    assert "version 2 was rolled back by ana" in capsys.readouterr().err
    assert _git(settings.remote, "rev-list", "--count", "main") == commits


def test_rollback_targets_and_errors(two_releases, capsys):
    assert main(["rollback", "small-model", "--to", "v7", "--reason", "testing a bad target"]) == 2
    assert "no release 'v7' of this model; known: v2" in capsys.readouterr().err
    assert main(["rollback", "small-model", "--to", "2", "--reason", "already deployed"]) == 2
    assert "version 2 is what the repository deploys now" in capsys.readouterr().err
    assert main(["rollback", "small-model", "--reason", "ok"]) == 2
    assert "needs a reason" in capsys.readouterr().err
    with pytest.raises(RollbackError, match="only release"):
        choose_target([{"version": "1", "commit": "a" * 40, "checksum": "sha256:x"}], None)
