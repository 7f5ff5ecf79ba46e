"""A change to a model's deployed files as one attested GitOps commit: what the rollout (advance,
hold, resume) and the budget policies (lower sampling, a cheaper variant for a device group)
commit. The desired state of the change is attested like a release's, so devices act on it only
through the signed channel.

A change goes to the GitOps branch, or to a review branch (`branch`): made from the GitOps
branch the first time, built on by later changes, merged by a person; nothing is published
for a review branch (its merge is, by the desired-state publisher)."""

from __future__ import annotations

from collections.abc import Callable

from pipelines.settings import Settings


class ManifestChangeError(RuntimeError):
    """The change cannot be made (no release, or the change refuses the manifest as it is)."""


def change_app_files(settings: Settings, model: str, change: Callable[[dict[str, str]], dict[str, str] | None],
                     message: str | Callable[[], str], publish: bool, files: dict | None = None, tree: str | None = None,
                     branch: str | None = None) -> str | None:
    """Commit `change` (the model's files under `apps/<model>/` -> the new files; None: nothing
    to do) on the GitOps branch, or on the review `branch`; the commit, or None when nothing
    changed. `message` may be a function, called after `change`. `files` and `tree`: the model's
    files as already read from the GitOps branch (the commit fails if the branch moved since)."""
    from pipelines.edge.desired_state import attest_commit
    from pipelines.edge.publish import publish_after_commit
    from pipelines.gitops import repo

    work = settings.work_dir / "gitops"
    author = (settings.git_author_name, settings.git_author_email)
    main = settings.gitops_branch
    if branch is not None:
        files = tree = None  # the review branch's own files: earlier changes on it are kept
        if repo.has_branch(settings.remote, main):
            repo.ensure_branch(settings.remote, main, branch, work)
    target = branch or main
    if files is None:
        files, tree = repo.app_files(settings.remote, target, model, work) \
            if repo.has_branch(settings.remote, target) else ({}, "")
    if not files:
        raise ManifestChangeError(f"{model} has no release yet")
    changed = change(dict(files))
    if changed is None or changed == files:
        return None
    changed = attest_commit(settings, model, changed, branch=branch)
    text = message() if callable(message) else message
    committed = repo.commit_release(settings.remote, target, model, changed, text, author, work, expect_tree=tree)
    if publish and branch is None:
        publish_after_commit(settings)
    return committed.commit


def change_base_manifest(settings: Settings, model: str, change: Callable[[dict], dict | None], message: str,
                         publish: bool, files: dict | None = None, tree: str | None = None,
                         branch: str | None = None) -> str | None:
    """Commit `change` (the base manifest as a document -> the new document; None: nothing to
    do), as `change_app_files` does."""
    import yaml

    from pipelines.gitops.manifest import base_manifest_path, dump

    path = base_manifest_path(model)

    def changed(current: dict[str, str]) -> dict[str, str] | None:
        if path not in current:
            raise ManifestChangeError(f"{model} has no release yet")
        doc = change(yaml.safe_load(current[path]))
        return None if doc is None else {**current, path: dump(doc)}

    return change_app_files(settings, model, changed, message, publish, files=files, tree=tree, branch=branch)
