"""Publish the GitOps tip as signed desired state: one document per device group, in a TUF repository.

`publish_desired_state` reads the tip of the GitOps branch, takes each model's entries only
when they equal what the release key attested (`pipelines.edge.desired_state`) and their
sequence is not older than what is already published, and renders for every device group of
the fleet file the document `groups/<group>.json`: every entry whose selector the group's
labels satisfy. The documents, each artifact and each signature bundle they name become
targets of the TUF repository (`pipelines.edge.tuf_repo`) in the artifact store; an artifact
is copied only after its length, sha256 and signature check out. A model that is refused
keeps what was published for it before, and the report says why; so does a model whose
folder is gone from the tip (nothing signed takes a model off the devices).

Idempotent: the same tip publishes nothing new (no targets, snapshot or timestamp version),
except a timestamp that is within half its lifetime of expiry, which is signed again.
Review branches are never read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from datetime import timedelta
from pathlib import Path

from pipelines.edge.desired_state import (
    MAX_BUNDLE_BYTES,
    Entry,
    EntryError,
    Release,
    attested_checkout,
    check_entry,
    check_name,
    entry_dict,
    public_key,
    verify_files,
)
from pipelines.edge.sources import group_target
from pipelines.errors import one_line
from pipelines.records import Record
from pipelines.settings import Settings, get_settings

log = logging.getLogger(__name__)


class DesiredStatePublished(Record):
    """What one publication did."""

    commit: str | None
    changed: bool
    targets_version: int
    snapshot_version: int
    timestamp_version: int
    groups: dict[str, list[str]]  # device group -> "model vN" it is offered
    refused: dict[str, str]  # model -> why its new desired state was not published
    added: list[str]
    removed: list[str]
    bins: int = 0

    def lines(self) -> list[str]:
        head = (f"desired state {'published' if self.changed else 'unchanged'}: targets v{self.targets_version}, "
                f"snapshot v{self.snapshot_version}, timestamp v{self.timestamp_version}"
                + (f", {self.bins} hashed bins" if self.bins else "") + f" (GitOps {str(self.commit)[:12]})")
        out = [head]
        for group, offered in sorted(self.groups.items()):
            out.append(f"  {group:<24} {', '.join(offered) or '-'}")
        for path in self.added:
            out.append(f"  + {path}")
        for path in self.removed:
            out.append(f"  - {path}")
        for model, reason in sorted(self.refused.items()):
            out.append(f"  REFUSED {model}: {reason}")
        return out


def repository(settings: Settings):
    """The TUF repository of the settings' artifact store."""
    from pipelines.edge.tuf_repo import DEFAULT_EXPIRY, TufRepository
    from pipelines.storage import ObjectStore

    expiry = {**DEFAULT_EXPIRY, "timestamp": timedelta(hours=settings.tuf_timestamp_expiry_hours)}
    return TufRepository(ObjectStore(settings.store_url, settings.s3_endpoint_url), settings.tuf_prefix,
                         expiry=expiry)


def ensure_repository(settings: Settings):
    """The repository, created on first use when a root key is at hand (the embedded set-up);
    in production `python -m pipelines tuf-init` creates it with the offline root key."""
    from pipelines.edge.tuf_repo import TufError

    repo = repository(settings)
    if not repo.exists():
        keys = settings.tuf_keys()
        if not keys["root"]:
            raise TufError(f"no TUF repository at {settings.store_url}/{settings.tuf_prefix}: create it with "
                           "`python -m pipelines tuf-init` and the root key")
        repo.initialize([keys["root"]], keys["targets"], keys["snapshot"], keys["timestamp"])
    return repo


def _published_entries(repo, published: dict) -> dict[str, list[Entry]]:
    """The entries each model has in the published documents (the last good state)."""
    by_model: dict[str, dict[str, Entry]] = {}
    for path in sorted(p for p in published if p.startswith("groups/")):
        try:
            document = json.loads(repo.read_target(path))
            for item in document.get("entries", []):
                entry = check_entry(item, path)
                by_model.setdefault(entry.model, {})[entry.group] = entry
        except (ValueError, AttributeError, EntryError) as error:
            log.warning("ignoring published %s: %s", path, one_line(error))
    return {model: list(groups.values()) for model, groups in by_model.items()}


def _releases(entry: Entry) -> list[Release]:
    return [entry] + ([entry.rollout.control] if entry.rollout and entry.rollout.control else [])


def _artifact_targets(entries: list[Entry], published: dict, settings: Settings) -> dict:
    """Target path -> bytes (new) or TargetFile (already published) for every artifact and bundle."""
    from pipelines.edge.sources import StoreFiles

    store = StoreFiles(settings.store_url, settings.s3_endpoint_url)
    release_key = settings.signing_keys()[1]
    targets: dict = {}
    for release in {r.artifact.path: r for e in entries for r in _releases(e)}.values():
        artifact, bundle = release.artifact.path, release.signature.path
        known = published.get(artifact)
        if known is not None and known.length == release.artifact.length \
                and known.hashes.get("sha256") == release.artifact.sha256 and bundle in published:
            targets[artifact], targets[bundle] = known, published[bundle]
            continue
        with tempfile.TemporaryDirectory(prefix="publish-") as folder:
            model_file, bundle_file = Path(folder) / "model.onnx", Path(folder) / "model.onnx.sig"
            store.download(release.artifact, model_file, release.artifact.length)
            store.download(release.signature, bundle_file, MAX_BUNDLE_BYTES)
            try:
                verify_files(model_file, bundle_file, release, release_key)
            except EntryError as error:
                raise EntryError(f"{artifact}: the store's file is not the attested one: {error}") from None
            targets[artifact], targets[bundle] = model_file.read_bytes(), bundle_file.read_bytes()
    return targets


def document(group: str, labels: dict[str, str], entries: list[Entry]) -> bytes:
    """A device group's desired-state document: the entries its labels select, canonical JSON."""
    chosen = sorted((e for e in entries if e.selects(labels)), key=lambda e: (e.model, e.group))
    data = {"deviceGroup": group, "labels": dict(sorted(labels.items())), "entries": [entry_dict(e) for e in chosen]}
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


@contextlib.contextmanager
def _one_publisher(settings: Settings):
    """One publication at a time on this machine: two would sign the same versions with
    different contents. (Across machines the publisher DAG runs one at a time.)"""
    import fcntl

    settings.work_dir.mkdir(parents=True, exist_ok=True)
    with open(settings.work_dir / "tuf-publish.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def publish_desired_state(settings: Settings | None = None) -> DesiredStatePublished:
    """Render the GitOps tip into the TUF repository (see the module docstring)."""
    settings = settings or get_settings()
    with _one_publisher(settings):
        return _publish(settings)


def _publish(settings: Settings) -> DesiredStatePublished:
    from pipelines.finops.catalog import load_catalog, load_fleet
    from pipelines.gitops import repo as gitrepo

    keys = settings.tuf_keys()
    tuf = ensure_repository(settings)
    published = tuf.targets()
    before = _published_entries(tuf, published)
    key = public_key(settings.signing_keys()[1])
    entries: dict[str, list[Entry]] = {}
    refused: dict[str, str] = {}
    commit = None
    if gitrepo.has_branch(settings.remote, settings.gitops_branch):
        with gitrepo.tip(settings.remote, settings.gitops_branch, settings.work_dir / "gitops") as clone:
            commit = gitrepo.head(clone)
            entries, refused = attested_checkout(Path(clone), settings.store_url, key)
    for model in before.keys() - entries.keys() - refused.keys():
        # Nothing the release key signed takes a model off the devices: a folder gone from the
        # tip is a Git writer's edit like any other.
        refused[model] = f"apps/{model} is gone from the tip without an attested change"
    for model, new in list(entries.items()):
        old = max((e.sequence for e in before.get(model, [])), default=None)
        if new and old is not None and new[0].sequence < old:
            refused[model] = (f"attestation sequence {new[0].sequence} is older than the published {old} "
                              "(a replayed or rewound repository)")
            del entries[model]
    for model in refused:
        if model in before:
            entries[model] = before[model]  # keep serving the last good desired state
    targets: dict = {}
    usable: list[Entry] = []
    for model in sorted(entries):
        try:
            targets.update(_artifact_targets(entries[model], published, settings))
            usable.extend(entries[model])
        except Exception as error:  # a store fault or a swapped file: one model must not block the others
            refused[model] = one_line(error, 300)
            if model in before and before[model] is not entries[model]:
                targets.update(_artifact_targets(before[model], published, settings))
                usable.extend(before[model])
    fleet = load_fleet(settings.fleet_path, load_catalog(settings.device_catalog))
    offered: dict[str, list[str]] = {}
    for group in fleet.groups:
        check_name(group.name, f"{settings.fleet_path}: device group")
        targets[group_target(group.name)] = document(group.name, group.labels, usable)
        offered[group.name] = sorted({f"{e.model} v{e.version}" for e in usable if e.selects(group.labels)})
    report = tuf.publish(targets, keys["targets"], keys["snapshot"], keys["timestamp"])
    result = DesiredStatePublished(
        commit=commit, changed=report.changed, targets_version=report.targets_version,
        snapshot_version=report.snapshot_version, timestamp_version=report.timestamp_version,
        groups=offered, refused=refused, added=report.added, removed=report.removed, bins=report.bins)
    for model, reason in refused.items():
        log.warning("desired state of %s not published: %s", model, reason)
    return result


def refresh_timestamp(settings: Settings | None = None, force: bool = False):
    """Sign the timestamp again when it nears expiry (or `force`); the schedule's job."""
    settings = settings or get_settings()
    keys = settings.tuf_keys()
    with _one_publisher(settings):
        return ensure_repository(settings).refresh_timestamp(keys["snapshot"], keys["timestamp"], force=force)


def publish_after_commit(settings: Settings) -> DesiredStatePublished | None:
    """Publish right after a commit to the GitOps branch; a failure is logged, not raised (the
    commit stands, and the scheduled publisher catches up)."""
    try:
        result = publish_desired_state(settings)
    except Exception as error:  # the commit is done; devices get it on the next scheduled publish
        log.warning("desired state not published after the commit: %s", one_line(error, 300))
        return None
    log.info("%s", result.lines()[0])
    return result
