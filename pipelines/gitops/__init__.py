"""GitOps hand-off: render a release as kustomize manifests and commit them to the GitOps repo."""

from __future__ import annotations

from pipelines.gitops.manifest import (
    ManifestInputs,
    manifest_checksum,
    read_manifest,
    render_release_files,
)
from pipelines.gitops.repo import GitError, commit_release, ensure_remote, log, read_file, redact

__all__ = [
    "GitError",
    "ManifestInputs",
    "commit_release",
    "ensure_remote",
    "log",
    "manifest_checksum",
    "read_file",
    "read_manifest",
    "redact",
    "render_release_files",
]
