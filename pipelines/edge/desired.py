"""Desired state from a GitOps checkout, resolved on the device without kubectl or kustomize.

Every `apps/<model>/overlays/<group>/kustomization.yaml` yields one object: the base
`MobileAIModelDeployment` with the overlay's JSON6902 patch applied and its `nameSuffix`,
which is what `kustomize build` would print for that overlay. Only what the release writes
is supported: `resources` (files and folders), `patches` with inline or file JSON6902 ops
(`add`, `replace`, `remove`), `namePrefix` and `nameSuffix`.

Where the desired state comes from is pluggable (`DesiredStateSource`); `GitSource` keeps a
shallow clone and fetches incrementally, recording how many bytes each poll brought in.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import posixpath
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from pipelines.gitops import git
from pipelines.gitops.manifest import DEVICE_GROUP_LABEL, KIND

log = logging.getLogger(__name__)

_KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
_MAX_DEPTH = 8
_GIT_TIMEOUT_S = 120
_BRANCH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
# Fetched objects stay packs and nothing repacks on its own (see GitSource); the clone lives on
# the device's disk, which may be hostile, so no hook or fsmonitor its .git/config names runs.
_GIT_CONFIG = {"gc.auto": "0", "maintenance.auto": "false", "fetch.unpackLimit": "1",
               "transfer.unpackLimit": "1", **git.UNTRUSTED_CLONE}
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class DesiredStateError(ValueError):
    """An overlay cannot be resolved (bad YAML, bad patch, missing resource)."""


class SourceError(RuntimeError):
    """The desired state could not be fetched (remote unreachable, git failed)."""


# --- JSON6902 ----------------------------------------------------------------------------


def _tokens(pointer: str) -> list[str]:
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise DesiredStateError(f"JSON pointer {pointer!r} must start with '/'")
    # ~1 before ~0, so "~01" means the literal "~1" (RFC 6901).
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer[1:].split("/")]


def _index(container: list, token: str, pointer: str, allow_end: bool) -> int:
    if allow_end and token == "-":
        return len(container)
    if not re.fullmatch(r"0|[1-9][0-9]*", token):
        raise DesiredStateError(f"{pointer}: {token!r} is not an array index")
    index = int(token)
    if index > len(container) or (index == len(container) and not allow_end):
        raise DesiredStateError(f"{pointer}: index {index} is out of range")
    return index


def _parent(doc: Any, tokens: list[str], pointer: str) -> Any:
    node = doc
    for token in tokens[:-1]:
        if isinstance(node, dict):
            if token not in node:
                raise DesiredStateError(f"{pointer}: {token!r} does not exist")
            node = node[token]
        elif isinstance(node, list):
            node = node[_index(node, token, pointer, allow_end=False)]
        else:
            raise DesiredStateError(f"{pointer}: cannot descend into a {type(node).__name__}")
    return node


def apply_patch(doc: Any, operations: list[dict]) -> Any:
    """`doc` with JSON6902 `operations` applied (a new object; `doc` is left as it was)."""
    doc = copy.deepcopy(doc)
    for op in operations:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise DesiredStateError(f"not a JSON6902 operation: {op!r}")
        kind, pointer = op["op"], op["path"]
        tokens = _tokens(pointer)
        if kind not in ("add", "replace", "remove"):
            raise DesiredStateError(f"{pointer}: operation {kind!r} is not supported (add, replace, remove)")
        if kind in ("add", "replace") and "value" not in op:
            raise DesiredStateError(f"{pointer}: {kind} needs a value")
        value = copy.deepcopy(op.get("value"))
        if not tokens:
            if kind == "remove":
                raise DesiredStateError("cannot remove the whole document")
            doc = value
            continue
        parent, last = _parent(doc, tokens, pointer), tokens[-1]
        if isinstance(parent, dict):
            if kind != "add" and last not in parent:
                raise DesiredStateError(f"{pointer}: cannot {kind} a missing member")
            if kind == "remove":
                del parent[last]
            else:
                parent[last] = value
        elif isinstance(parent, list):
            index = _index(parent, last, pointer, allow_end=kind == "add")
            if kind == "add":
                parent.insert(index, value)
            elif kind == "replace":
                parent[index] = value
            else:
                del parent[index]
        else:
            raise DesiredStateError(f"{pointer}: parent is a {type(parent).__name__}, not an object or array")
    return doc


# --- kustomize, the part the release uses --------------------------------------------------


def _read_yaml_documents(path: Path) -> list[Any]:
    try:
        return [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d is not None]
    except OSError as error:
        raise DesiredStateError(f"{path}: cannot read: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise DesiredStateError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None


def _kustomization_file(folder: Path) -> Path:
    for name in _KUSTOMIZATION_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise DesiredStateError(f"{folder}: no kustomization.yaml")


def _inside(root: Path, folder: Path, relative: str) -> Path:
    # A resource path must not leave the checkout (`../../../etc`): the repo is not trusted
    # to name files on the device.
    target = Path(posixpath.normpath(str(folder / relative)))
    if not target.is_relative_to(root):
        raise DesiredStateError(f"{folder}: resource {relative!r} points outside the repository")
    return target


def _matches(obj: dict, target: dict | None) -> bool:
    if not target:
        return True
    group, _, version = str(obj.get("apiVersion", "")).rpartition("/")
    meta = obj.get("metadata") or {}
    names = {meta.get("name"), obj.get("_originalName")}
    return (target.get("kind") in (None, obj.get("kind"))
            and target.get("group") in (None, group)
            and target.get("version") in (None, version)
            and (target.get("name") is None or target["name"] in names))


def _build(root: Path, folder: Path, depth: int = 0) -> list[dict]:
    if depth > _MAX_DEPTH:
        raise DesiredStateError(f"{folder}: kustomizations nested deeper than {_MAX_DEPTH}")
    path = _kustomization_file(folder)
    documents = _read_yaml_documents(path)
    kustomization = documents[0] if documents else {}
    if not isinstance(kustomization, dict):
        raise DesiredStateError(f"{path}: not a mapping")
    objects: list[dict] = []
    for relative in kustomization.get("resources") or []:
        target = _inside(root, folder, str(relative))
        if target.is_dir():
            objects.extend(_build(root, target, depth + 1))
        elif target.is_file():
            for doc in _read_yaml_documents(target):
                if isinstance(doc, dict):
                    doc.setdefault("_originalName", (doc.get("metadata") or {}).get("name"))
                    objects.append(doc)
        else:
            raise DesiredStateError(f"{path}: resource {relative!r} does not exist")
    for entry in kustomization.get("patches") or []:
        if not isinstance(entry, dict):
            raise DesiredStateError(f"{path}: a patch must be a mapping")
        if "patch" in entry:
            operations = yaml.load(str(entry["patch"]), Loader=_Loader)
        elif "path" in entry:
            operations = (_read_yaml_documents(_inside(root, folder, str(entry["path"]))) or [None])[0]
        else:
            raise DesiredStateError(f"{path}: a patch needs `patch` or `path`")
        if not isinstance(operations, list):
            raise DesiredStateError(f"{path}: only JSON6902 patches (a list of operations) are supported")
        try:
            objects = [apply_patch(o, operations) if _matches(o, entry.get("target")) else o for o in objects]
        except DesiredStateError as error:
            raise DesiredStateError(f"{path}: {error}") from None
    prefix, suffix = kustomization.get("namePrefix") or "", kustomization.get("nameSuffix") or ""
    if prefix or suffix:
        for obj in objects:
            meta = obj.setdefault("metadata", {})
            meta["name"] = f"{prefix}{meta.get('name', '')}{suffix}"
    return objects


def resolve(checkout: Path, errors: list[str] | None = None, model: str | None = None) -> list[dict]:
    """One resolved object per overlay of every app (or of `apps/<model>/` only), ordered by
    model then group.

    An overlay that cannot be resolved is skipped (logged, and appended to `errors`): one
    broken app must not stop a device from reconciling the others. Whoever can push to Git
    writes these files, so any failure to read one (not only a bad patch) is such a skip.
    """
    root = Path(os.path.abspath(checkout))
    resolved = []
    for path in sorted((root / "apps").glob(f"{model or '*'}/overlays/*/kustomization.yaml")):
        try:
            objects = [o for o in _build(root, path.parent) if o.get("kind") == KIND]
        except (DesiredStateError, yaml.YAMLError, TypeError, AttributeError, KeyError, ValueError,
                RecursionError) as error:
            message = str(error) if isinstance(error, DesiredStateError) else \
                f"{path}: cannot be resolved ({type(error).__name__}): {' '.join(str(error).split())}"
            message = message.replace(str(root) + os.sep, "")
            log.warning("skipping overlay: %s", message)
            if errors is not None:
                errors.append(message)
            continue
        for obj in objects:
            obj.pop("_originalName", None)
            resolved.append(obj)
    return resolved


# --- selection ----------------------------------------------------------------------------


def model_of(obj: dict) -> str:
    spec, meta = obj.get("spec") or {}, obj.get("metadata") or {}
    return str((spec.get("modelRef") or {}).get("name")
               or (meta.get("labels") or {}).get("app.kubernetes.io/name") or meta.get("name") or "")


def group_of(obj: dict) -> str:
    spec, meta = obj.get("spec") or {}, obj.get("metadata") or {}
    return str((spec.get("targetDevices") or {}).get("group") or (meta.get("labels") or {}).get(DEVICE_GROUP_LABEL)
               or "")


def match_labels(obj: dict) -> dict[str, str] | None:
    """The object's selector; None when it has none or an empty one (it then selects no device:
    an empty selector must never mean "every device")."""
    target = (obj.get("spec") or {}).get("targetDevices") or {}
    selector = target.get("selector")
    if not isinstance(selector, dict) or not isinstance(selector.get("matchLabels"), dict):
        return None
    return {str(k): str(v) for k, v in selector["matchLabels"].items()} or None


@dataclass(frozen=True)
class Conflict:
    """Several groups of one model select the device; the first by group name wins."""

    model: str
    chosen: str
    ignored: tuple[str, ...]


def select(objects: list[dict], labels: dict[str, str], conflicts: list[Conflict] | None = None) -> list[dict]:
    """Objects whose `matchLabels` are all among the device's labels, one per model."""
    by_model: dict[str, list[dict]] = {}
    for obj in objects:
        wanted = match_labels(obj)
        if wanted is not None and all(labels.get(k) == v for k, v in wanted.items()):
            by_model.setdefault(model_of(obj), []).append(obj)
    chosen = []
    for model in sorted(by_model):
        candidates = sorted(by_model[model], key=group_of)
        chosen.append(candidates[0])
        if len(candidates) > 1:
            conflict = Conflict(model, group_of(candidates[0]), tuple(group_of(o) for o in candidates[1:]))
            log.warning("%s: device matches groups %s; using %s", model,
                        ", ".join([conflict.chosen, *conflict.ignored]), conflict.chosen)
            if conflicts is not None:
                conflicts.append(conflict)
    return chosen


def rollout_share(obj: dict) -> float:
    """`spec.rollout.share` (0-100); 100 when absent."""
    share = ((obj.get("spec") or {}).get("rollout") or {}).get("share")
    return 100.0 if share is None else float(share)


def in_rollout(device_id: str, model: str, share: float) -> bool:
    """Whether the device is in the first `share` percent of the model's rollout.

    The bucket hashes model and device, so each model's rollout picks a different slice of
    the fleet and a device keeps its bucket across polls and restarts.
    """
    bucket = int(hashlib.sha256(f"{model}:{device_id}".encode()).hexdigest(), 16) % 100
    return bucket < share


# --- sources ------------------------------------------------------------------------------


class DesiredStateSource(Protocol):
    """Where an agent reads the desired state from."""

    def fetch(self) -> list[dict]:
        """Every resolved object; raises SourceError when the source cannot be read."""
        ...


@dataclass
class FetchStat:
    """One poll of a GitSource: `bytes` is the size of the pack files git wrote."""

    kind: str  # "clone" or "fetch"
    bytes: int
    seconds: float
    commit: str
    changed: bool


def git_url(remote: str) -> str:
    """A local path as a file:// URL: git ignores --depth for plain-path clones (it hardlinks)."""
    if not git.is_path(remote):
        return remote
    return Path(remote).expanduser().resolve().as_uri()


def _pack_sizes(clone: Path) -> dict[str, int]:
    folder = clone / ".git" / "objects" / "pack"
    try:
        return {p.name: p.stat().st_size for p in folder.iterdir() if p.suffix == ".pack"}
    except FileNotFoundError:
        return {}


def _loose_bytes(clone: Path) -> int:
    objects = clone / ".git" / "objects"
    if not objects.is_dir():
        return 0
    return sum(f.stat().st_size for d in objects.iterdir() if len(d.name) == 2 for f in d.iterdir())


class GitSource:
    """A shallow clone of one branch, updated incrementally on every `fetch()`.

    First call: `git clone --depth 1 --single-branch`; later calls `git fetch --depth 1` and
    `git reset --hard FETCH_HEAD`. Fetched objects are kept as packs (unpackLimit 1) and
    automatic gc is off, so the new pack files of a poll are what came over the wire; the
    ref advertisement and negotiation (a few hundred bytes) are not counted.
    """

    REPACK_AFTER_PACKS = 20

    def __init__(self, remote: str, branch: str, cache_dir: Path):
        # Both go into the clone's .git/config (`_write_config`): nothing may break out of its line.
        if not _BRANCH.match(branch) or ".." in branch:
            raise SourceError(f"branch {branch!r}: not a plain branch name")
        if any(ch in remote for ch in '\n\r\0"\\'):
            raise SourceError("remote: a URL or path on one line, without quotes or backslashes")
        self.remote = git_url(remote)
        self.branch = branch
        self.cache_dir = Path(cache_dir)
        self.stats: list[FetchStat] = []
        self.commit: str | None = None
        self._objects: list[dict] | None = None

    def _git(self, *args: str, cwd: Path | None = None) -> str:
        try:
            result = git.run(*args, cwd=cwd, config=_GIT_CONFIG, check=False, timeout=_GIT_TIMEOUT_S)
        except git.GitTimeout:
            raise SourceError(f"git {args[0]} timed out after {_GIT_TIMEOUT_S}s") from None
        except OSError as error:
            raise SourceError(f"cannot run git: {error.strerror}") from None
        if result.returncode != 0:
            detail = " ".join((result.stderr.strip() or result.stdout.strip()).split())[-300:]
            raise SourceError(git.redact(f"git {args[0]} {self.remote} failed: {detail}"))
        return result.stdout

    def _clone(self) -> tuple[str, int]:
        self.cache_dir.parent.mkdir(parents=True, exist_ok=True)
        partial = self.cache_dir.with_name(self.cache_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            self._git("clone", "-q", "--depth", "1", "--branch", self.branch, "--single-branch", "--no-tags",
                      self.remote, str(partial))
        except SourceError:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        # Swapped in only when complete: an interrupted clone is never mistaken for a checkout,
        # and a failed re-clone leaves the last good one in place.
        shutil.rmtree(self.cache_dir, ignore_errors=True)
        os.replace(partial, self.cache_dir)
        return "clone", sum(_pack_sizes(self.cache_dir).values()) + _loose_bytes(self.cache_dir)

    def _write_config(self) -> None:
        """Write the clone's `.git/config` anew: the device's disk may be hostile, and a planted
        config can name commands git runs (an upload-pack, a filter, an ssh command)."""
        git_dir = self.cache_dir / ".git"
        if self.cache_dir.is_symlink() or git_dir.is_symlink() or not git_dir.is_dir():
            raise SourceError(f"{self.cache_dir}: not a clone of this agent's (a link, or no .git folder)")
        text = ("[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = false\n"
                f'[remote "origin"]\n\turl = {self.remote}\n'
                f"\tfetch = +refs/heads/{self.branch}:refs/remotes/origin/{self.branch}\n"
                f'[branch "{self.branch}"]\n\tremote = origin\n\tmerge = refs/heads/{self.branch}\n')
        tmp = git_dir / "config.tmp"
        tmp.unlink(missing_ok=True)
        tmp.write_text(text)
        os.replace(tmp, git_dir / "config")

    def _update(self) -> tuple[str, int]:
        self._write_config()
        before, loose = _pack_sizes(self.cache_dir), _loose_bytes(self.cache_dir)
        self._git("fetch", "-q", "--depth", "1", "--no-tags", "origin", self.branch, cwd=self.cache_dir)
        after = _pack_sizes(self.cache_dir)
        fetched = sum(size for name, size in after.items() if name not in before)
        fetched += max(0, _loose_bytes(self.cache_dir) - loose)
        head, target = self._git("rev-parse", "HEAD", "FETCH_HEAD", cwd=self.cache_dir).split()
        if head != target:
            self._git("reset", "-q", "--hard", "FETCH_HEAD", cwd=self.cache_dir)
        if len(after) > self.REPACK_AFTER_PACKS:
            # Outside the measurement: one pack per update would otherwise pile up on a device.
            self._git("repack", "-adq", cwd=self.cache_dir)
        return "fetch", fetched

    def sync(self) -> str:
        """Bring the clone to the remote branch's tip (cloning when needed); its commit."""
        start = time.perf_counter()
        if (self.cache_dir / ".git").is_dir():
            try:
                kind, size = self._update()
            except SourceError as error:
                # A damaged cache (interrupted reset, bad shallow file) heals by cloning again;
                # if the remote is down the clone fails too and the first error is the one to see.
                log.info("fetch failed (%s); cloning again", error)
                try:
                    kind, size = self._clone()
                except SourceError:
                    raise error from None
        else:
            kind, size = self._clone()
        commit = self._git("rev-parse", "HEAD", cwd=self.cache_dir).strip()
        self.stats.append(FetchStat(kind, size, round(time.perf_counter() - start, 4), commit, commit != self.commit))
        self.commit = commit
        return commit

    def fetch(self) -> list[dict]:
        """`sync()`, then every resolved object of the tip (resolved again only when it moved)."""
        before = self.commit
        commit = self.sync()
        if commit != before or self._objects is None:
            self._objects = resolve(self.cache_dir)
        return copy.deepcopy(self._objects)
