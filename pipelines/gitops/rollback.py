"""Rollback: a commit that puts a model's previous release back, saying who and why.

The files of `apps/<model>/` are restored exactly as the target release committed them, with
two annotations added to the base manifest (`apexlogic.dev/rollback: "true"` and the version
rolled back from), so edge agents accept a version lower than the one they run. In MLflow the
alias `champion` moves to the target and the rolled-back version is tagged, so the same
release is not committed again by a re-run.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import yaml

from pipelines.gitops import repo
from pipelines.gitops.manifest import base_manifest_path, dump, read_manifest
from pipelines.records import Record

ROLLBACK_ANNOTATION = "apexlogic.dev/rollback"
ROLLBACK_FROM_ANNOTATION = "apexlogic.dev/rollback-from-version"
_SHA = re.compile(r"^[0-9a-f]{7,40}$")


class RollbackError(ValueError):
    """The rollback cannot be done as asked (unknown model, version or commit)."""


class Rollback(Record):
    model: str
    from_version: str
    to_version: str
    target_commit: str
    commit: str
    created: bool


def _read_base(text: str, where: str) -> dict:
    """A release's base manifest, checked against the CRD: a hand edit may have broken it, and
    a rollback must neither misread it nor commit it again (RollbackError naming file and field)."""
    from pipelines.gitops.crd import validate_object

    try:
        doc = read_manifest(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark else ""
        raise RollbackError(f"{where}: not valid YAML{line}: {getattr(error, 'problem', error)}") from None
    except ValueError as error:
        raise RollbackError(f"{where}: kind: {error}") from None
    problems = validate_object(doc)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise RollbackError(f"{where}: {problems[0]}{more}")
    return doc


def _history_entry(text: str, where: str) -> dict:
    """Version and checksum of one release; `error` instead when its manifest is broken."""
    try:
        ref = _read_base(text, where)["spec"]["modelRef"]
    except RollbackError as error:
        return {"version": None, "checksum": None, "error": str(error)}
    return {"version": str(ref["version"]), "checksum": ref["checksum"]}


def release_history(remote: str, branch: str, model: str, work_dir: Path) -> list[dict]:
    """Commits that changed the model's base manifest, newest first, with the version each set
    (or the `error` that makes its manifest unusable)."""
    path = base_manifest_path(model)
    history = []
    for sha, text in repo.history(remote, branch, path, work_dir):
        if not text:
            continue  # the commit deleted the model
        history.append({"commit": sha, **_history_entry(text, f"{path} at {sha[:8]}")})
    return history


def choose_target(history: list[dict], target: str | None) -> dict:
    """The release to go back to: the newest with another version than the current one, or
    the one named by version (`3`, `v3`) or commit sha."""
    if not history:
        raise RollbackError("the model has no release in the GitOps repository")
    current = history[0]
    if not target:
        for entry in history[1:]:
            if entry["version"] != current["version"]:
                return entry
        raise RollbackError(f"version {current['version']} is the only release: nothing to roll back to")
    wanted = target.strip().lower().removeprefix("v")
    for entry in history:
        if entry["version"] == wanted or (_SHA.match(wanted) and entry["commit"].startswith(wanted)):
            if entry["checksum"] == current["checksum"]:
                raise RollbackError(f"version {entry['version']} is what the repository deploys now")
            return entry
    known = ", ".join(f"v{e['version']} ({e['commit'][:8]})" for e in history)
    raise RollbackError(f"no release {target!r} of this model; known: {known}")


def rollback(remote: str, branch: str, model: str, target: str | None, reason: str, by: str,
             author: tuple[str, str], work_dir: Path, details: str = "", expect_tree: str | None = None,
             attest: Callable[[dict[str, str]], dict[str, str]] | None = None) -> Rollback:
    """Commit the target release's files again, marked as a rollback, with who and why
    (`details` is appended to the commit message; `expect_tree`, see `repo.commit_release`;
    `attest` signs the files' desired state anew, see `pipelines.edge.desired_state`)."""
    if len(reason.strip()) < 5:
        raise RollbackError("reason: a rollback needs a reason (at least 5 characters)")
    history = release_history(remote, branch, model, work_dir)
    current = history[0] if history else None
    if current and current.get("error"):
        raise RollbackError(current["error"])
    chosen = choose_target(history, target)
    if chosen.get("error"):
        raise RollbackError(chosen["error"])
    files = repo.files_at(remote, chosen["commit"], f"apps/{model}/", work_dir)
    base = yaml.safe_load(files[base_manifest_path(model)])
    base["metadata"].setdefault("annotations", {}).update(
        {ROLLBACK_ANNOTATION: "true", ROLLBACK_FROM_ANNOTATION: current["version"]})
    files[base_manifest_path(model)] = dump(base)
    if attest is not None:
        files = attest(files)
    message = (f"rollback({model}): version {current['version']} -> {chosen['version']}\n\n"
               f"Rolled back by: {by}\nReason: {' '.join(reason.split())}\n"
               f"Restores the files of {chosen['commit']} (version {chosen['version']}, {chosen['checksum']}).\n"
               + (f"\n{details.rstrip()}\n" if details.strip() else ""))
    result = repo.commit_release(remote, branch, model, files, message, author, work_dir, expect_tree=expect_tree)
    return Rollback(model=model, from_version=current["version"], to_version=chosen["version"],
                    target_commit=chosen["commit"], commit=result.commit, created=result.created)
