"""A change to a model's deployed base manifest as one attested GitOps commit: what the rollout
(advance, hold, resume) and the budget policies (lower sampling) commit. The desired state of
the change is attested like a release's, so devices act on it only through the signed channel."""

from __future__ import annotations

from collections.abc import Callable

from pipelines.settings import Settings


class ManifestChangeError(RuntimeError):
    """The change cannot be made (no release, or the change refuses the manifest as it is)."""


def change_base_manifest(settings: Settings, model: str, change: Callable[[dict], dict | None], message: str,
                         publish: bool, files: dict | None = None, tree: str | None = None) -> str | None:
    """Commit `change` (the base manifest as a document -> the new document; None: nothing to
    do) on the GitOps branch; the commit, or None when nothing changed. `files` and `tree`: the
    model's files as already read (the commit fails if the branch moved since)."""
    import yaml

    from pipelines.edge.desired_state import attest_commit
    from pipelines.edge.publish import publish_after_commit
    from pipelines.gitops import repo
    from pipelines.gitops.manifest import base_manifest_path, dump

    work = settings.work_dir / "gitops"
    path = base_manifest_path(model)
    if files is None:
        files, tree = repo.app_files(settings.remote, settings.gitops_branch, model, work) \
            if repo.has_branch(settings.remote, settings.gitops_branch) else ({}, "")
    if path not in files:
        raise ManifestChangeError(f"{model} has no release yet")
    changed = change(yaml.safe_load(files[path]))
    if changed is None:
        return None
    files = attest_commit(settings, model, {**files, path: dump(changed)})
    committed = repo.commit_release(settings.remote, settings.gitops_branch, model, files, message,
                                    (settings.git_author_name, settings.git_author_email), work, expect_tree=tree)
    if publish:
        publish_after_commit(settings)
    return committed.commit
