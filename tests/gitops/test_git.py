"""The git runner shared by the pipeline's clones and a device's clone."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pipelines.gitops import git


def test_a_failure_is_one_redacted_line(tmp_path: Path) -> None:
    with pytest.raises(git.GitError) as caught:
        git.run("ls-remote", "https://bot:s3cret@127.0.0.1:9/x.git", cwd=tmp_path)
    message = str(caught.value)
    assert "\n" not in message and "s3cret" not in message
    assert message.startswith("git ls-remote https://***@127.0.0.1:9/x.git failed (")


def test_unchecked_failures_are_returned(tmp_path: Path) -> None:
    result = git.run("rev-parse", "HEAD", cwd=tmp_path, check=False)
    assert result.returncode != 0 and "not a git repository" in result.stderr


def test_a_command_that_runs_too_long_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def slow(*args, **kwargs):
        raise subprocess.TimeoutExpired(args[0], kwargs["timeout"])

    monkeypatch.setattr(git.subprocess, "run", slow)
    with pytest.raises(git.GitTimeout, match=r"^git fetch https://\*\*\*@host/x timed out after 5s$"):
        git.run("fetch", "https://user:pw@host/x", cwd=tmp_path, timeout=5)


def test_config_comes_before_the_command_and_wins_over_the_clone(tmp_path: Path) -> None:
    git.run("init", "-q", str(tmp_path))
    git.run("config", "core.hooksPath", "hooks-of-the-clone", cwd=tmp_path)
    git.run("config", "core.fsmonitor", "touch planted", cwd=tmp_path)
    for key, value in git.UNTRUSTED_CLONE.items():
        assert git.run("config", key, cwd=tmp_path, config=git.UNTRUSTED_CLONE).stdout.strip() == value


def test_the_environment_cannot_redirect_git(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY"):
        monkeypatch.setenv(name, "/elsewhere")
    env = git.environment()
    assert not {"GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY"} & env.keys()
    assert env["GIT_TERMINAL_PROMPT"] == "0" and env["LC_ALL"] == "C"


@pytest.mark.parametrize(("remote", "path"), [
    ("state/gitops.git", True), ("/srv/gitops.git", True), ("file:///srv/gitops.git", False),
    ("https://host/gitops.git", False), ("git@host:gitops.git", False), ("host:gitops.git", False),
])
def test_is_path(remote: str, path: bool) -> None:
    assert git.is_path(remote) is path
