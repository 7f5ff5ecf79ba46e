from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest

from pipelines.gitops import manifest, repo
from pipelines.gitops.crd import skeleton_files
from pipelines.gitops.repo import GitError, commit_release, ensure_remote, has_branch, log, read_file, redact
from pipelines.specs import load_spec

AUTHOR = ("edge-release-bot", "edge-release-bot@apexlogic.dev")
BRANCH = "main"
SPECS_DIR = Path(__file__).resolve().parents[2] / "model_specs"


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True
    ).stdout.strip()


def app_files(model: str, version: str = "1", extra: str = "") -> dict[str, str]:
    return {
        f"apps/{model}/kustomization.yaml": "resources: [overlays/g]\n",
        f"apps/{model}/base/mobileaimodeldeployment.yaml": f"version: '{version}'\n{extra}",
        f"apps/{model}/overlays/g/kustomization.yaml": "resources: [../../base]\n",
    }


@pytest.fixture
def remote(tmp_path: Path) -> str:
    path = tmp_path / "remote" / "gitops.git"
    ensure_remote(str(path), BRANCH, AUTHOR)
    return str(path)


def test_ensure_remote_creates_bare_repo_with_skeleton(remote: str, tmp_path: Path) -> None:
    assert git("rev-parse", "--is-bare-repository", cwd=Path(remote)) == "true"
    assert git("symbolic-ref", "HEAD", cwd=Path(remote)) == f"refs/heads/{BRANCH}"
    work = tmp_path / "work"
    readme = read_file(remote, BRANCH, "README.md", work)
    assert readme is not None and "apps/" in readme and "git revert" in readme
    for path, text in skeleton_files().items():
        assert read_file(remote, BRANCH, path, work) == text
    assert read_file(remote, BRANCH, "apps/none.yaml", work) is None
    ensure_remote(remote, BRANCH, AUTHOR)  # idempotent: no second skeleton commit
    history = log(remote, BRANCH, work)
    assert len(history) == 1
    assert git("log", "-1", "--format=%an <%ae>", BRANCH, cwd=Path(remote)) == (
        "edge-release-bot <edge-release-bot@apexlogic.dev>"
    )


def test_ensure_remote_fills_an_existing_empty_repo(tmp_path: Path) -> None:
    path = tmp_path / "empty.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "trunk", str(path)], check=True)
    ensure_remote(str(path), "release", AUTHOR)
    assert git("symbolic-ref", "HEAD", cwd=path) == "refs/heads/release"
    assert read_file(str(path), "release", "apps/.gitkeep", tmp_path / "work") == ""


def test_commit_then_same_files_again_creates_nothing(remote: str, tmp_path: Path) -> None:
    files = app_files("adult-income")
    first = commit_release(remote, BRANCH, "adult-income", files, "Release adult-income v1",
                           AUTHOR, tmp_path / "work")
    assert first.created
    assert first.changed_paths == sorted(files)
    assert first.remote == remote and first.branch == BRANCH
    assert git("rev-parse", BRANCH, cwd=Path(remote)) == first.commit
    assert git("log", "-1", "--format=%an|%ae|%cn|%ce|%s", BRANCH, cwd=Path(remote)) == (
        "edge-release-bot|edge-release-bot@apexlogic.dev|"
        "edge-release-bot|edge-release-bot@apexlogic.dev|Release adult-income v1"
    )
    again = commit_release(remote, BRANCH, "adult-income", files, "Release adult-income v1",
                           AUTHOR, tmp_path / "work")
    assert not again.created and again.changed_paths == [] and again.commit == first.commit
    # Another worker with its own (new) clone reaches the same conclusion.
    other = commit_release(remote, BRANCH, "adult-income", files, "Release adult-income v1",
                           AUTHOR, tmp_path / "other-work")
    assert not other.created and other.commit == first.commit
    assert len(log(remote, BRANCH, tmp_path / "work")) == 2


def test_rendered_release_round_trips(remote: str, tmp_path: Path) -> None:
    spec = load_spec(SPECS_DIR / "adult-income.yaml")
    inputs = manifest.ManifestInputs(
        model_version="3", mlflow_run_id="r1", release_key="k1", source_uri="file:///m.onnx",
        sha256="ab" * 32, size_bytes=10, variant="fp32", metrics={"accuracy": 0.9},
    )
    files = manifest.render_release_files(spec, inputs)
    result = commit_release(remote, BRANCH, spec.name, files, "Release adult-income 3",
                            AUTHOR, tmp_path / "work")
    assert result.created
    text = read_file(remote, BRANCH, "apps/adult-income/base/mobileaimodeldeployment.yaml",
                     tmp_path / "reader")
    assert text == files["apps/adult-income/base/mobileaimodeldeployment.yaml"]
    assert manifest.manifest_checksum(manifest.read_manifest(text)) == "ab" * 32


def test_stale_clone_is_rebased_and_both_models_land(
    remote: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work_a, work_b = tmp_path / "work-a", tmp_path / "work-b"
    # Worker B clones now, before A's release exists.
    assert read_file(remote, BRANCH, "README.md", work_b) is not None
    a = commit_release(remote, BRANCH, "model-a", app_files("model-a"), "Release model-a",
                       AUTHOR, work_a)
    assert a.created

    # B's first fetch "happens before" A's push: it commits on the stale tip and is rejected.
    real_fetch, real_push = repo._fetch, repo._push
    fetches: list[Path] = []
    pushes: list[bool] = []

    def stale_first_fetch(clone: Path, branch: str) -> None:
        fetches.append(clone)
        if len(fetches) > 1:
            real_fetch(clone, branch)

    def counting_push(clone: Path, branch: str) -> tuple[str, str]:
        outcome = real_push(clone, branch)
        pushes.append(outcome[0])
        return outcome

    monkeypatch.setattr(repo, "_fetch", stale_first_fetch)
    monkeypatch.setattr(repo, "_push", counting_push)
    b = commit_release(remote, BRANCH, "model-b", app_files("model-b"), "Release model-b",
                       AUTHOR, work_b)
    monkeypatch.undo()

    assert pushes == ["moved", "pushed"]
    assert b.created and b.changed_paths == sorted(app_files("model-b"))
    assert git("rev-parse", f"{b.commit}^", cwd=Path(remote)) == a.commit
    reader = tmp_path / "reader"
    for model in ("model-a", "model-b"):
        for path, text in app_files(model).items():
            assert read_file(remote, BRANCH, path, reader) == text
    assert [c["subject"] for c in log(remote, BRANCH, reader)] == [
        "Release model-b", "Release model-a", "Initialise the GitOps repository",
    ]


@pytest.mark.parametrize("message", ["Release model-a", "Release model-a (retried task)"])
def test_racing_identical_release_creates_no_second_commit(
    remote: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, message: str
) -> None:
    work_b = tmp_path / "work-b"
    read_file(remote, BRANCH, "README.md", work_b)
    files = app_files("model-a")
    a = commit_release(remote, BRANCH, "model-a", files, "Release model-a", AUTHOR,
                       tmp_path / "work-a")
    real_fetch = repo._fetch
    calls = []

    def stale_first_fetch(clone: Path, branch: str) -> None:
        calls.append(clone)
        if len(calls) > 1:
            real_fetch(clone, branch)

    monkeypatch.setattr(repo, "_fetch", stale_first_fetch)
    # Same message: within one second B's stale commit can be byte-identical to A's (same
    # sha), so the push is a no-op. Other message: B is rejected, replays, finds no change.
    b = commit_release(remote, BRANCH, "model-a", files, message, AUTHOR, work_b)
    assert not b.created and b.commit == a.commit and b.changed_paths == []
    assert git("rev-list", "--count", BRANCH, cwd=Path(remote)) == "2"
    if message != "Release model-a":
        assert len(calls) == 2


def test_concurrent_releases_of_different_models_all_land(remote: str, tmp_path: Path) -> None:
    models = ["model-a", "model-b", "model-c"]
    results: dict[str, object] = {}

    def release(model: str) -> None:
        try:
            results[model] = commit_release(remote, BRANCH, model, app_files(model),
                                            f"Release {model}", AUTHOR, tmp_path / model)
        except Exception as error:  # surfaced by the assertion below
            results[model] = error

    threads = [threading.Thread(target=release, args=(m,)) for m in models]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(getattr(results[m], "created", False) for m in models), results
    reader = tmp_path / "reader"
    for model in models:
        for path, text in app_files(model).items():
            assert read_file(remote, BRANCH, path, reader) == text
    assert len(log(remote, BRANCH, reader)) == 1 + len(models)


@pytest.mark.parametrize(
    "path",
    [
        "apps/other-model/base/x.yaml",
        "clusters/prod/kustomization.yaml",
        "README.md",
        "apps/model-a/../other-model/x.yaml",
        "/apps/model-a/x.yaml",
        "apps/model-a",
        "apps/model-a/.git/config",
        "apps/model-a//x.yaml",
        "apps/model-a-extra/x.yaml",
    ],
)
def test_paths_outside_the_model_folder_are_refused(remote: str, tmp_path: Path, path: str) -> None:
    files = {**app_files("model-a"), path: "x: 1\n"}
    with pytest.raises(ValueError):
        commit_release(remote, BRANCH, "model-a", files, "bad", AUTHOR, tmp_path / "work")
    assert git("rev-list", "--count", BRANCH, cwd=Path(remote)) == "1"


def test_stale_files_of_the_model_go_and_other_models_stay(remote: str, tmp_path: Path) -> None:
    work = tmp_path / "work"
    old = {
        **app_files("model-a"),
        "apps/model-a/overlays/retired/kustomization.yaml": "resources: [../../base]\n",
    }
    commit_release(remote, BRANCH, "model-a", old, "Release model-a v1", AUTHOR, work)
    commit_release(remote, BRANCH, "model-b", app_files("model-b"), "Release model-b", AUTHOR, work)

    new = app_files("model-a", version="2")
    result = commit_release(remote, BRANCH, "model-a", new, "Release model-a v2", AUTHOR, work)
    assert result.created
    assert result.changed_paths == [
        "apps/model-a/base/mobileaimodeldeployment.yaml",
        "apps/model-a/overlays/retired/kustomization.yaml",
    ]
    tree = git("ls-tree", "-r", "--name-only", BRANCH, cwd=Path(remote)).splitlines()
    assert sorted(tree) == sorted(
        [*skeleton_files(), *new, *app_files("model-b")]
    )
    assert read_file(remote, BRANCH, "apps/model-a/overlays/retired/kustomization.yaml",
                     work) is None
    history_a = log(remote, BRANCH, work, path="apps/model-a")
    assert [c["subject"] for c in history_a] == ["Release model-a v2", "Release model-a v1"]


def test_history_and_files_at_read_past_commits(remote: str, tmp_path: Path) -> None:
    work = tmp_path / "work"
    base = manifest.base_manifest_path("model-a")
    v1 = commit_release(remote, BRANCH, "model-a", app_files("model-a"), "v1", AUTHOR, work)
    commit_release(remote, BRANCH, "model-b", app_files("model-b"), "b", AUTHOR, work)
    gone = commit_release(remote, BRANCH, "model-a", {}, "remove model-a", AUTHOR, work)
    v2 = commit_release(remote, BRANCH, "model-a", app_files("model-a", version="2"), "v2", AUTHOR, work)

    reader = tmp_path / "reader"
    assert repo.history(remote, BRANCH, base, reader) == [
        (v2.commit, "version: '2'\n"), (gone.commit, None), (v1.commit, "version: '1'\n"),
    ]
    assert repo.files_at(remote, v1.commit, "apps/model-a/", reader) == app_files("model-a")
    assert repo.files_at(remote, gone.commit, "apps/model-a/", reader) == {}
    with repo.fetched(remote, BRANCH, reader) as clone:
        tip = git("rev-parse", f"refs/remotes/origin/{BRANCH}", cwd=clone)
        assert tip == v2.commit and not (clone / "apps").exists()  # fetched, nothing checked out


@pytest.mark.parametrize("model", ["a" * 64, "Model-a", "-model", "model-", "model_a", "model/a"])
def test_a_model_name_that_is_no_dns_label_is_refused(remote: str, tmp_path: Path, model: str) -> None:
    with pytest.raises(ValueError, match="not a valid model name"):
        commit_release(remote, BRANCH, model, {}, "bad", AUTHOR, tmp_path / "work")


def test_a_63_character_model_name_is_accepted(remote: str, tmp_path: Path) -> None:
    model = "m" * 63
    assert commit_release(remote, BRANCH, model, app_files(model), "long", AUTHOR, tmp_path / "work").created


def test_commit_message_body_is_kept(remote: str, tmp_path: Path) -> None:
    work = tmp_path / "work"
    commit_release(remote, BRANCH, "model-a", app_files("model-a"),
                   "Release model-a 4\n\nrelease-key: k4\nchecksum: sha256:00", AUTHOR, work)
    (newest, *_rest) = log(remote, BRANCH, work)
    assert newest["subject"] == "Release model-a 4"
    assert newest["body"] == "release-key: k4\nchecksum: sha256:00"
    assert len(newest["sha"]) == 40


def test_relative_local_remote_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ensure_remote("state/gitops.git", BRANCH, AUTHOR)
    result = commit_release("state/gitops.git", BRANCH, "model-a", app_files("model-a"),
                            "Release model-a", AUTHOR, Path("state/work"))
    assert result.created
    assert git("rev-parse", BRANCH, cwd=tmp_path / "state" / "gitops.git") == result.commit


def test_credentials_never_appear_in_errors(tmp_path: Path) -> None:
    assert redact("fatal: https://bot:s3cret@git.example.com/x.git") == (
        "fatal: https://***@git.example.com/x.git"
    )
    assert redact("ssh://git@host/x.git and git@host:x.git") == "ssh://***@host/x.git and git@host:x.git"
    # Port 9 (discard) on localhost refuses the connection at once.
    url = "http://bot:s3cret@127.0.0.1:9/gitops.git"
    with pytest.raises(GitError) as caught:
        commit_release(url, BRANCH, "model-a", app_files("model-a"), "m", AUTHOR, tmp_path / "w")
    # The credentials go to git as a header, never in the URL it is given.
    assert "s3cret" not in str(caught.value) and "http://127.0.0.1:9/gitops.git" in str(caught.value)


def test_missing_branch_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "bare.git"
    subprocess.run(["git", "init", "-q", "--bare", str(path)], check=True)
    with pytest.raises(GitError, match="ensure_remote"):
        commit_release(str(path), BRANCH, "model-a", app_files("model-a"), "m", AUTHOR,
                       tmp_path / "work")


def test_a_dirty_clone_left_by_a_crashed_run_is_recovered(remote: str, tmp_path: Path) -> None:
    work = tmp_path / "work"
    commit_release(remote, BRANCH, "model-a", app_files("model-a"), "v1", AUTHOR, work)
    (clone,) = [p for p in work.iterdir() if p.is_dir()]
    (clone / "README.md").write_text("half-written\n")
    (clone / "apps" / "stray.yaml").write_text("x: 1\n")
    (clone / ".git" / "index.lock").write_text("")
    result = commit_release(remote, BRANCH, "model-a", app_files("model-a", version="2"), "v2",
                            AUTHOR, work)
    assert result.changed_paths == ["apps/model-a/base/mobileaimodeldeployment.yaml"]
    assert read_file(remote, BRANCH, "README.md", work) == repo.README
    assert read_file(remote, BRANCH, "apps/stray.yaml", work) is None


def test_a_git_failure_is_one_line(tmp_path: Path) -> None:
    # git explains a missing remote over several lines; the error keeps them on one.
    (tmp_path / "not-a-repo").mkdir()
    with pytest.raises(GitError) as caught:
        has_branch(str(tmp_path / "not-a-repo"), BRANCH)
    message = str(caught.value)
    assert "\n" not in message and "does not appear to be a git repository" in message
    assert "Could not read from remote repository" in message


def test_reading_a_remote_without_the_branch_yet_finds_nothing(tmp_path: Path) -> None:
    """An empty repository (served remotes start so) and a remote not created yet read as
    nothing: no release is deployed. One fetch, no separate probe of the remote."""
    empty = tmp_path / "empty.git"
    subprocess.run(["git", "init", "-q", "--bare", str(empty)], check=True)
    assert read_file(str(empty), BRANCH, "apps/m/base/x.yaml", tmp_path / "w") is None
    assert read_file(str(tmp_path / "absent.git"), BRANCH, "apps/m/base/x.yaml", tmp_path / "w") is None
    (tmp_path / "not-a-repo.git").mkdir()
    with pytest.raises(GitError, match="does not appear to be a git repository"):
        read_file(str(tmp_path / "not-a-repo.git"), BRANCH, "apps/m/base/x.yaml", tmp_path / "w")
