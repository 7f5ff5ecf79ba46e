"""Desired-state entries: what one device needs to run one model, and the release's signature on them.

An entry is built from one resolved overlay (`apps/<model>/overlays/<group>/`, resolved by
`pipelines.edge.desired.resolve`, the same code an agent on Git uses) and holds what a device
acts on and nothing more: model, version, the artifact's store path, length and sha256, the
signature bundle's path, the selector, the rollout share and bucketing salt, the control
version for devices outside a canary's share, telemetry and privacy settings, resources and
the rollback flag.

Git is writable by people who hold no key, so nothing in Git is trusted by itself. Every
commit the pipeline makes (release, rollout step, rollback) carries
`apps/<model>/attestation.json`: every entry of the model, plus the control entries, signed
with the release key over canonical JSON and numbered by a `sequence` that only grows. The
publisher (and an agent reading Git) rebuilds the entries from the tip and accepts a model
only when they equal the attested ones, the signature verifies and the sequence is not
older than what it already acted on. A Git writer can therefore change nothing a device acts
on: not the version, not the artifact, not the share, not the privacy settings; replaying an
older attestation is refused as a rollback.

Entries are checked (`check_entry`) wherever they are read: names are DNS labels, paths are
`models/<model>/<sha256>/<file>` of the entry's own model, privacy settings are bounded.
"""

from __future__ import annotations

import copy
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipelines.edge.desired import group_of, model_of, resolve
from pipelines.gitops.manifest import base_manifest_path
from pipelines.gitops.rollback import ROLLBACK_ANNOTATION
from pipelines.specs import DNS_LABEL

ATTESTATION_FILE = "attestation.json"
ATTESTATION_TYPE = "edge-desired-state"
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSION = re.compile(r"^[1-9][0-9]{0,8}$")
MAX_EPSILON = 10.0
MAX_SAMPLES = 10_000
MAX_ARTIFACT_BYTES = 2 << 30  # 2 GiB: no model a device runs is larger
MAX_BUNDLE_BYTES = 64 << 10


class EntryError(ValueError):
    """A desired-state entry or attestation is malformed or does not verify (one line)."""


def is_dns_label(name: object) -> bool:
    return isinstance(name, str) and bool(DNS_LABEL.match(name))


def check_name(name: object, what: str) -> str:
    """`name` if it is a DNS label (lowercase letters, digits, '-', at most 63): the only names a
    device turns into folders."""
    if not is_dns_label(name):
        raise EntryError(f"{what} {str(name)[:80]!r} is not a DNS label")
    return str(name)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class FileRef(_Strict):
    """A file in the artifact store (and a target of the TUF repository): its key."""

    path: str
    sha256: str | None = None
    length: int | None = Field(None, ge=0)

    @field_validator("sha256")
    @classmethod
    def _digest(cls, value: str | None) -> str | None:
        if value is not None and not _SHA256.match(value):
            raise ValueError("must be 64 lowercase hexadecimal characters")
        return value


class Artifact(FileRef):
    sha256: str
    length: int = Field(ge=1, le=MAX_ARTIFACT_BYTES)
    variant: str = "fp32"


class Release(_Strict):
    """One version's files: what a device downloads, verifies and runs."""

    version: str
    artifact: Artifact
    signature: FileRef

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        if not _VERSION.match(value):
            raise ValueError("must be a positive integer")
        return value


class Privacy(_Strict):
    epsilon: float = Field(gt=0.0, le=MAX_EPSILON)


class Telemetry(_Strict):
    sample_rate: float = Field(0.0, ge=0.0, le=1.0, alias="sampleRate")
    max_samples: int = Field(0, ge=0, le=MAX_SAMPLES, alias="maxSamples")
    privacy: Privacy | None = None


class Rollout(_Strict):
    share: float = Field(ge=0, le=100)
    salt: str
    control: Release | None = None


class Entry(Release):
    """What a device of the entry's group needs for one model."""

    model: str
    group: str
    sequence: int = Field(0, ge=0)
    selector: dict[str, str] = Field(min_length=1)
    rollout: Rollout | None = None
    telemetry: Telemetry = Telemetry()
    resources: dict[str, dict[str, str | int | float]] = {}
    rollback: bool = False

    @field_validator("model", "group")
    @classmethod
    def _dns(cls, value: str) -> str:
        if not DNS_LABEL.match(value):
            raise ValueError("must be a DNS label")
        return value

    @field_validator("selector")
    @classmethod
    def _selector(cls, labels: dict[str, str]) -> dict[str, str]:
        for key, value in labels.items():
            if not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
                raise ValueError(f"{key}={value} is not a valid label")
        return labels

    @model_validator(mode="after")
    def _paths(self) -> Entry:
        releases = [self] + ([self.rollout.control] if self.rollout and self.rollout.control else [])
        for release in releases:
            for ref, name in ((release.artifact, "artifact"), (release.signature, "signature")):
                check_path(ref.path, self.model, f"{name}.path")
        return self

    def selects(self, labels: dict[str, str]) -> bool:
        """Whether a device with `labels` is one of this entry's group (every matchLabel)."""
        return all(labels.get(k) == v for k, v in self.selector.items())


def check_path(path: str, model: str, what: str = "path") -> str:
    """`path` when it is `models/<model>/<sha256>/[variants/<variant>/]<file>`: a relative key of
    this very model, with no `..`, no absolute part and no odd characters."""
    parts = path.split("/")
    variant = len(parts) == 6 and parts[3] == "variants" and bool(DNS_LABEL.match(parts[4]))
    if len(parts) not in (4, 6) or (len(parts) == 6 and not variant) or parts[0] != "models" \
            or parts[1] != model or not _SHA256.match(parts[2]) or not _FILE_NAME.match(parts[-1]):
        raise EntryError(f"{what} {path[:120]!r} is not models/{model}/<sha256>/[variants/<variant>/]<file>")
    return path


def check_entry(data: Any, where: str = "entry") -> Entry:
    """`data` as an Entry, or EntryError naming the first bad field (one line)."""
    try:
        return Entry.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "entry"
        more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
        raise EntryError(f"{where}: {field}: {first['msg']}{more}") from None
    except EntryError as error:
        raise EntryError(f"{where}: {error}") from None


def canonical(data: Any) -> bytes:
    """Sorted-key JSON without spaces: what is signed and what is compared. (OLPC canonical
    JSON, which TUF metadata uses, has no floats; shares and sample rates are floats.)"""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


# --- from a resolved overlay -----------------------------------------------------------------


def _store_key(uri: str, store_root: str) -> str:
    prefix = store_root.rstrip("/") + "/"
    if not uri.startswith(prefix):
        raise EntryError(f"{uri[:120]!r} is not inside the artifact store {store_root}")
    return uri[len(prefix):]


def entry_of(obj: dict, store_root: str) -> dict:
    """The entry (a plain dict, without `sequence` and `control`) of one resolved overlay."""
    spec, meta = obj.get("spec") or {}, obj.get("metadata") or {}
    ref = spec.get("modelRef") or {}
    model, group = model_of(obj), group_of(obj)
    checksum = str(ref.get("checksum", ""))
    sha = checksum.removeprefix("sha256:")
    signature_uri = (ref.get("signatureRef") or {}).get("uri")
    if not signature_uri:
        raise EntryError(f"{model}/{group}: spec.modelRef.signatureRef: unsigned artifacts are not shipped")
    entry: dict[str, Any] = {
        "model": model, "group": group, "version": str(ref.get("version", "")),
        "artifact": {"path": _store_key(str(ref.get("sourceUri", "")), store_root), "sha256": sha,
                     "length": ref.get("sizeBytes"), "variant": str(ref.get("variant", "fp32"))},
        "signature": {"path": _store_key(str(signature_uri), store_root)},
        "selector": ((spec.get("targetDevices") or {}).get("selector") or {}).get("matchLabels") or {},
        "telemetry": copy.deepcopy(spec.get("telemetry") or {}),
        "resources": copy.deepcopy(spec.get("resources") or {}),
        "rollback": str(((meta.get("annotations") or {}).get(ROLLBACK_ANNOTATION))).lower() == "true",
    }
    rollout = spec.get("rollout")
    if rollout and float(rollout.get("share", 100)) < 100:
        entry["rollout"] = {"share": rollout["share"], "salt": model}
    return entry


def entries_of_checkout(checkout: Path, model: str, store_root: str) -> dict[str, dict]:
    """The model's entries by group, from a checkout of the GitOps repository (only
    `apps/<model>/` is read). EntryError (one line) for anything that does not render."""
    errors: list[str] = []
    objects = resolve(checkout, errors, model=model)
    if errors:
        raise EntryError(errors[0])
    entries = {}
    for obj in objects:
        try:
            entries[group_of(obj)] = entry_of(obj, store_root)
        except EntryError:
            raise
        except (TypeError, AttributeError, KeyError, ValueError) as error:  # a hand-edited shape
            raise EntryError(f"apps/{model}/overlays/{group_of(obj)}: cannot be read "
                             f"({type(error).__name__}): {' '.join(str(error).split())[:200]}") from None
    return entries


def entries_of_files(files: dict[str, str], model: str, store_root: str) -> dict[str, dict]:
    """The model's entries from the files a commit writes (`apps/<model>/...` by path)."""
    with tempfile.TemporaryDirectory(prefix="desired-") as folder:
        root = Path(folder)
        for path, text in files.items():
            target = root / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        return entries_of_checkout(root, model, store_root)


# --- attestation -----------------------------------------------------------------------------


def public_key(path: Path):
    """The release public key (PEM file) as a securesystemslib key; EntryError if unusable."""
    from pipelines.edge.tuf_repo import TufError, load_public_key

    try:
        return load_public_key(path)
    except TufError as error:
        raise EntryError(str(error)) from None


def _control(previous: dict | None, group: str, control_version: str) -> dict | None:
    """The release devices of `group` outside the canary keep: the previous attestation's
    entry of that version, or the control it already named."""
    if not previous:
        return None
    for source in (previous.get("entries") or {}, previous.get("control") or {}):
        found = source.get(group)
        if found and str(found.get("version")) == control_version:
            return {k: copy.deepcopy(found[k]) for k in ("version", "artifact", "signature")}
    return None


def attest(model: str, files: dict[str, str], store_root: str, private_key: Path,
           previous_text: str | None, public_key_path: Path, now: float | None = None) -> dict[str, str]:
    """`files` plus `apps/<model>/attestation.json` signing the entries they resolve to.

    An unchanged set of entries keeps the previous attestation as it is (same bytes, so a
    re-run commits nothing); otherwise the sequence moves past the previous one.
    """
    previous = None
    if previous_text:
        try:
            previous = verify_attestation(previous_text, model, public_key(public_key_path))
        except EntryError:
            previous = None  # not ours (hand-edited or another key): start a new sequence above the clock
    entries = entries_of_files({p: t for p, t in files.items() if not p.endswith(ATTESTATION_FILE)}, model,
                               store_root)
    base = files.get(base_manifest_path(model), "")
    control_version = _rollout_previous(base)
    control = {}
    for group, entry in entries.items():
        if "rollout" in entry and control_version:
            found = _control(previous, group, control_version)
            if found:
                control[group] = found
    signed = {"_type": ATTESTATION_TYPE, "model": model, "entries": entries, "control": control}
    for group, entry in entries.items():
        check_entry({**entry, "sequence": 0,
                     **({"rollout": {**entry["rollout"], "control": control.get(group)}} if "rollout" in entry else {})},
                    f"apps/{model}/overlays/{group}")
    if previous and all(previous.get(k) == signed[k] for k in ("entries", "control")):
        return {**files, f"apps/{model}/{ATTESTATION_FILE}": previous_text}
    clock_ms = int((time.time() if now is None else now) * 1000)
    signed["sequence"] = max(clock_ms, int(previous["sequence"]) + 1 if previous else 0)
    from pipelines.edge.tuf_repo import load_signer

    signature = load_signer(private_key).sign(canonical(signed))
    document = {"signed": signed, "signatures": [{"keyid": signature.keyid, "sig": signature.signature}]}
    return {**files, f"apps/{model}/{ATTESTATION_FILE}": json.dumps(document, indent=1, sort_keys=True) + "\n"}


def _rollout_previous(base_text: str) -> str | None:
    import yaml

    try:
        doc = yaml.safe_load(base_text) or {}
        rollout = (doc.get("spec") or {}).get("rollout") or {}
    except (yaml.YAMLError, AttributeError):
        return None
    version = rollout.get("previousVersion")
    return str(version) if version is not None and float(rollout.get("share", 100)) < 100 else None


def verify_attestation(text: str | bytes, model: str, key) -> dict:
    """The `signed` part of an attestation of `model` when the release key signed it."""
    from securesystemslib.exceptions import UnverifiedSignatureError
    from securesystemslib.signer import Signature

    try:
        document = json.loads(text)
        signed, signatures = document["signed"], document["signatures"]
        if not isinstance(signed, dict) or not isinstance(signatures, list):
            raise TypeError("signed must be an object and signatures a list")
    except (ValueError, KeyError, TypeError) as error:
        raise EntryError(f"apps/{model}/{ATTESTATION_FILE}: not an attestation: {error}") from None
    if signed.get("_type") != ATTESTATION_TYPE or signed.get("model") != model:
        raise EntryError(f"apps/{model}/{ATTESTATION_FILE}: attests {signed.get('model')!r}, not {model!r}")
    data = canonical(signed)
    for item in signatures:
        if not isinstance(item, dict) or item.get("keyid") != key.keyid:
            continue
        try:
            key.verify_signature(Signature(item["keyid"], str(item.get("sig", ""))), data)
            if not isinstance(signed.get("sequence"), int) or not isinstance(signed.get("entries"), dict):
                raise EntryError(f"apps/{model}/{ATTESTATION_FILE}: sequence and entries are missing")
            return signed
        except UnverifiedSignatureError:
            break
    raise EntryError(f"apps/{model}/{ATTESTATION_FILE}: not signed by the release key")


def attested_entries(checkout: Path, model: str, store_root: str, key) -> list[Entry]:
    """The model's entries at a checkout, when they equal what the release key attested.

    Raises EntryError (one line) when the attestation is missing, forged or another model's,
    or when the overlays in Git no longer resolve to the attested entries (a hand edit).
    """
    path = Path(checkout) / "apps" / model / ATTESTATION_FILE
    try:
        text = path.read_text()
    except OSError:
        raise EntryError(f"apps/{model}/{ATTESTATION_FILE}: missing: the model's manifests are not signed") from None
    signed = verify_attestation(text, model, key)
    rendered = entries_of_checkout(Path(checkout), model, store_root)
    for group in sorted(set(rendered) | set(signed["entries"])):
        if rendered.get(group) != signed["entries"].get(group):
            raise EntryError(f"apps/{model}/overlays/{group}: differs from the attested desired state "
                             "(edited without the release key)")
    out = []
    for group, entry in sorted(signed["entries"].items()):
        data = {**entry, "sequence": signed["sequence"]}
        if "rollout" in data:
            data["rollout"] = {**data["rollout"], "control": (signed.get("control") or {}).get(group)}
        out.append(check_entry(data, f"apps/{model}/overlays/{group}"))
    return out


def attested_checkout(checkout: Path, store_root: str, key) -> tuple[dict[str, list[Entry]], dict[str, str]]:
    """Every model of a checkout: its attested entries, or why it is refused (a folder name
    that is no DNS label, a missing or forged attestation, a hand edit)."""
    entries: dict[str, list[Entry]] = {}
    refused: dict[str, str] = {}
    apps = Path(checkout) / "apps"
    for folder in sorted(apps.iterdir()) if apps.is_dir() else []:
        if folder.is_symlink() or not folder.is_dir() or not (folder / "overlays").is_dir():
            continue
        if not is_dns_label(folder.name):
            refused[f"apps-{len(refused)}"] = f"apps/{folder.name[:63]!r}: the folder name is not a DNS label"
            continue
        try:
            entries[folder.name] = attested_entries(checkout, folder.name, store_root, key)
        except EntryError as error:
            refused[folder.name] = " ".join(str(error).split())[:300]
    return entries, refused


def verify_files(artifact: Path, bundle: Path, release: Release, public_key_path: Path) -> None:
    """The downloaded artifact is the one `release` names (length, sha256) and the release key
    signed it (its model-signing bundle); EntryError (one line) naming what failed."""
    from pipelines.gitops.signing import SignatureError, verify_artifact
    from pipelines.storage import sha256_file

    actual_size = artifact.stat().st_size
    if actual_size != release.artifact.length:
        raise EntryError(f"artifact is {actual_size} bytes, the desired state says {release.artifact.length} "
                         "(download cut off or another file)")
    actual = sha256_file(artifact)
    if actual != release.artifact.sha256:
        raise EntryError(f"sha256 mismatch: artifact is {actual[:12]}…, the desired state says "
                         f"{release.artifact.sha256[:12]}…")
    try:
        verify_artifact(artifact, bundle, public_key_path)
    except SignatureError as error:
        detail = str(error).replace(str(artifact.parent) + "/", "")
        raise EntryError(f"signature check failed ({error.reason}): {' '.join(detail.split())[:200]}") from None


def entry_dict(entry: Entry) -> dict:
    """An entry as JSON data (aliases, no unset optional parts)."""
    return entry.model_dump(mode="json", by_alias=True, exclude_none=True)


def attest_commit(settings, model: str, files: dict[str, str], branch: str | None = None) -> dict[str, str]:
    """`files` of a commit the pipeline is about to make to `branch` (default: the GitOps
    branch), with the model's attestation signed by the release key; the previous one on that
    branch (else on the GitOps branch) gives the sequence and the control."""
    from pipelines.gitops import repo

    private_key, public = settings.signing_keys()
    path, work = f"apps/{model}/{ATTESTATION_FILE}", settings.work_dir / "gitops"
    previous = None
    for name in dict.fromkeys([branch or settings.gitops_branch, settings.gitops_branch]):
        if repo.has_branch(settings.remote, name):
            previous = repo.read_file(settings.remote, name, path, work)
            if previous:
                break
    return attest(model, files, settings.store_url, private_key, previous, public)
