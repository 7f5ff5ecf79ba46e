"""The repository side of The Update Framework (TUF) for desired-state documents and models.

Devices fetch what they run (group documents, ONNX models and their signatures) through a
TUF client, so a compromised store or mirror cannot serve them stale, altered or mixed
files. This module keeps a TUF repository in the artifact store (`ObjectStore`), built on
python-tuf's Metadata API and its `Repository` base class (which provides the snapshot and
timestamp bookkeeping). Layout under the prefix (default `tuf`):

    metadata/1.root.json, 2.root.json, ...   every root version (clients walk the chain)
    metadata/root.json                       copy of the latest root
    metadata/N.targets.json, N.bins-x.json   targets and hashed-bin roles, by version
    metadata/N.snapshot.json                 versions, lengths and hashes of the above
    metadata/timestamp.json                  the only file clients poll: points at a snapshot
    targets/<dir>/<sha256>.<name>            target files, named by content (consistent snapshot)

Every write goes payload first, pointer last: target files, then bin and targets metadata,
then the snapshot, then the timestamp. A client therefore never reads metadata that points at
a file not yet written. Old versions stay in place because a client mid-update may still need
them. More than `bins_threshold` targets are spread over succinct hashed bins (TAP 15) signed
by the targets key, so a device downloads one small bin instead of every target's entry.

Keys are PEM files; only public keys and signatures reach the store. One publisher at a time:
concurrent publishers would race on version numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from securesystemslib.signer import CryptoSigner, Signer, SSlibKey
from tuf.api.exceptions import LengthOrHashMismatchError, RepositoryError
from tuf.api.metadata import (
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Signed,
    Snapshot,
    SuccinctRoles,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer
from tuf.repository import Repository

from pipelines.errors import one_line
from pipelines.storage import ObjectStore, StoreError

DEFAULT_EXPIRY = {
    "root": timedelta(days=365),
    "targets": timedelta(days=90),
    "snapshot": timedelta(days=7),
    "timestamp": timedelta(days=1),
}
BINS_THRESHOLD = 256  # more targets than this: hashed-bin delegations
BIN_PREFIX = "bins"
ONLINE_ROLES = (Targets.type, Snapshot.type, Timestamp.type)

_NEW_SIGNED = {Root.type: Root, Targets.type: Targets, Snapshot.type: Snapshot, Timestamp.type: Timestamp}
_PRETTY = JSONSerializer(compact=False)  # sorted keys, one key per line: deterministic and diffable


class TufError(RuntimeError):
    """A repository operation failed; the message is one line naming the file or role."""


@dataclass
class PublishReport:
    """What publish/refresh/rotation wrote."""

    changed: bool
    targets_version: int
    snapshot_version: int
    timestamp_version: int
    added: list[str]
    removed: list[str]
    bins: int  # number of bin roles (0 = none)
    updated: list[str] = field(default_factory=list)  # published before, new content now

    def line(self) -> str:
        versions = f"targets v{self.targets_version}, snapshot v{self.snapshot_version}, " \
                   f"timestamp v{self.timestamp_version}"
        bins = f", {self.bins} bins" if self.bins else ""
        if not self.changed:
            return f"TUF unchanged: {versions}{bins}"
        return (f"TUF published {versions}: {len(self.added)} added, {len(self.updated)} updated, "
                f"{len(self.removed)} removed{bins}")


# --- keys --------------------------------------------------------------------------------


def _read_pem(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise TufError(f"cannot read key {path}: {error.strerror or one_line(error)}") from error


def load_signer(path: str | Path) -> CryptoSigner:
    """A signer for an unencrypted PEM private key file (PKCS8, as `generate_key_pair` writes)."""
    from cryptography.hazmat.primitives import serialization

    path = Path(path)
    pem = _read_pem(path)
    try:
        private_key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as error:
        raise TufError(f"{path} is not an unencrypted PEM private key") from error
    try:
        return CryptoSigner(private_key)
    except (ValueError, TypeError) as error:
        raise TufError(f"unsupported key in {path}: {one_line(error)}") from error


def load_public_key(path: str | Path) -> SSlibKey:
    """The public key of a PEM file holding either a public or a private key."""
    from cryptography.hazmat.primitives import serialization

    path = Path(path)
    pem = _read_pem(path)
    if b"PRIVATE KEY" in pem:
        return load_signer(path).public_key
    try:
        return SSlibKey.from_crypto(serialization.load_pem_public_key(pem))
    except (ValueError, TypeError) as error:
        raise TufError(f"{path} is not a PEM public or private key") from error



# --- one operation over the store ----------------------------------------------------------


class _Session(Repository):
    """python-tuf's `Repository` over the store, for one operation: loads each role once,
    and `close()` bumps version and expiry, signs, checks the signatures against the
    delegator and writes the file."""

    def __init__(self, repo: TufRepository, signers: dict[str, list[tuple[Signer, Path]]], *, fresh: bool = False):
        self._repo = repo
        self._signers = signers
        self._fresh = fresh  # initialize(): every role starts from scratch
        self._loaded: dict[str, Metadata] = {}
        self._targets_infos: dict[str, MetaFile] | None = {} if fresh else None
        self._snapshot_info: MetaFile | None = None
        self.delegator: Targets | None = None  # targets being written, to check bins against
        self.written: list[str] = []

    # -- Repository interface ---------------------------------------------------------------
    @property
    def targets_infos(self) -> dict[str, MetaFile]:
        if self._targets_infos is None:
            self._targets_infos = deepcopy(self.snapshot().meta)
        return self._targets_infos

    @property
    def snapshot_info(self) -> MetaFile:
        if self._snapshot_info is None:
            self._snapshot_info = deepcopy(self.timestamp().snapshot_meta)
        return self._snapshot_info

    def open(self, role: str) -> Metadata:
        if role not in self._loaded:
            expected, name = self._where(role)
            if name is None:
                md = Metadata(_NEW_SIGNED.get(role, Targets)())
                md.signed.version = 0  # close() makes it 1
                return md
            data = self._repo._read(f"metadata/{name}")
            if expected is not None and (expected.length is not None or expected.hashes):
                try:
                    expected.verify_length_and_hashes(data)
                except LengthOrHashMismatchError as error:
                    raise TufError(f"{self._repo._uri('metadata/' + name)} does not match the length or hash "
                                   f"the repository recorded for it ({one_line(error)})") from error
            md = Metadata.from_bytes(data)
            if md.signed.type != _NEW_SIGNED.get(role, Targets).type:
                raise TufError(f"{self._repo._uri('metadata/' + name)} is {md.signed.type} metadata, not {role}")
            self._loaded[role] = md
        return deepcopy(self._loaded[role])

    def close(self, role: str, md: Metadata) -> None:
        signed = md.signed
        signed.version += 1
        signed.expires = self._repo._now() + self._repo._expiry_of(role)
        md.signatures.clear()
        signers = self._signers.get(role if role in _NEW_SIGNED else Targets.type, [])
        for signer, _path in signers:
            md.sign(signer, append=True)
        self._check_signatures(role, md, signers)
        data = md.to_bytes(_PRETTY)
        if role == Root.type:
            self._put(f"{signed.version}.root.json", data)
            self._put("root.json", data)
        elif role == Timestamp.type:
            self._put("timestamp.json", data)
        else:
            self._put(f"{signed.version}.{role}.json", data)
            info = MetaFile.from_data(signed.version, data, ["sha256"])
            if role == Snapshot.type:
                self._snapshot_info = info
            else:
                self.targets_infos[f"{role}.json"] = info
        self._loaded[role] = md

    # -- helpers ----------------------------------------------------------------------------
    def _where(self, role: str) -> tuple[MetaFile | None, str | None]:
        """What the repository recorded about the role's current file, and its name (None: new)."""
        if self._fresh:
            return None, None
        if role == Root.type:
            return None, "root.json"
        if role == Timestamp.type:
            return None, "timestamp.json"
        info = self.snapshot_info if role == Snapshot.type else self.targets_infos.get(f"{role}.json")
        return (info, f"{info.version}.{role}.json") if info is not None else (None, None)

    def _put(self, name: str, data: bytes) -> None:
        self._repo._write(f"metadata/{name}", data)
        self.written.append(name)

    def _check_signatures(self, role: str, md: Metadata, signers: list[tuple[Signer, Path]]) -> None:
        """Write only metadata a client will accept: the threshold of the delegator's keys."""
        if role == Root.type:
            previous = self._loaded.get(Root.type)
            result = md.signed.get_root_verification_result(previous.signed if previous else None,
                                                            md.signed_bytes, md.signatures)
            delegator = f"root v{previous.signed.version}" if previous else "itself"
        elif role in _NEW_SIGNED:
            root = self.root()
            result = root.get_verification_result(role, md.signed_bytes, md.signatures)
            delegator = f"root v{root.version}"
        else:
            result = (self.delegator or self.targets()).get_verification_result(role, md.signed_bytes,
                                                                                 md.signatures)
            delegator = "targets"
        if not result:
            keys = ", ".join(str(path) for _signer, path in signers) or "no key"
            raise TufError(f"{role} signed with {keys} is not trusted by {delegator} (wrong key for {role}?)")

    def bit_length(self) -> int | None:
        """The bins' bit length of the current targets, None without bins."""
        delegations = self.targets().delegations
        return delegations.succinct_roles.bit_length if delegations and delegations.succinct_roles else None

    def published(self) -> dict[str, TargetFile]:
        """Every published target, from top-level targets and all bins."""
        top = self.targets()
        found = dict(top.targets)
        if top.delegations and top.delegations.succinct_roles:
            for name in top.delegations.succinct_roles.get_roles():
                found.update(self.targets(name).targets)
        return found

    def write_targets(self, files: dict[str, TargetFile], bit_length: int | None, *, force: bool = False) -> None:
        """New versions of the bins whose content changed (or near expiry, or `force`), then of
        targets if its own content or the delegation changed."""
        top = self.open(Targets.type)
        bins: dict[str, dict[str, TargetFile]] = {}
        if bit_length is None:
            delegations, own = None, dict(sorted(files.items()))
        else:
            key = self._signers[Targets.type][0][0].public_key
            succinct = SuccinctRoles([key.keyid], 1, bit_length, BIN_PREFIX)
            delegations, own = Delegations({key.keyid: key}, roles=None, succinct_roles=succinct), {}
            bins = {name: {} for name in succinct.get_roles()}
            for path in sorted(files):
                bins[succinct.get_role_for_target(path)][path] = files[path]
        self.delegator = Targets(delegations=delegations)
        for name, content in bins.items():
            md = self.open(name)
            if force or md.signed.version == 0 or md.signed.targets != content or self._repo._due(md.signed, name):
                md.signed.targets = content
                self.close(name, md)
        if (force or top.signed.targets != own or top.signed.delegations != delegations
                or self._repo._due(top.signed, Targets.type)):
            top.signed.targets, top.signed.delegations = own, delegations
            self.close(Targets.type, top)
        self.delegator = None


# --- the repository ----------------------------------------------------------------------


class TufRepository:
    """A TUF repository under `prefix` in an artifact store (see the module docstring)."""

    def __init__(self, store: ObjectStore, prefix: str = "tuf", *, expiry: dict | None = None,
                 bins_threshold: int = BINS_THRESHOLD, clock=lambda: datetime.now(timezone.utc)):
        self.store = store
        self.prefix = prefix.strip("/")
        self.expiry = {**DEFAULT_EXPIRY, **(expiry or {})}
        self.bins_threshold = bins_threshold
        self.clock = clock

    # -- store access -----------------------------------------------------------------------
    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _uri(self, name: str) -> str:
        return self.store.uri(self._key(name))

    def _read(self, name: str) -> bytes:
        return self.store.read_bytes(self._key(name))

    def _write(self, name: str, data: bytes) -> None:
        self.store.put_bytes(data, self._key(name))

    def _now(self) -> datetime:
        return self.clock().astimezone(timezone.utc)

    def _expiry_of(self, role: str) -> timedelta:
        return self.expiry[role if role in _NEW_SIGNED else Targets.type]

    def _due(self, signed: Signed, role: str, margin: timedelta | None = None) -> bool:
        """Whether `signed` expires within `margin` (default: half its role's expiry period)."""
        margin = self._expiry_of(role) / 2 if margin is None else margin
        return signed.expires - self._now() <= margin

    @contextmanager
    def _failures(self, what: str) -> Iterator[None]:
        """Errors from the store and python-tuf as one TufError line."""
        try:
            yield
        except TufError:
            raise
        except StoreError as error:
            raise TufError(f"TUF {what}: {one_line(error)}") from error
        except (RepositoryError, ValueError, KeyError, TypeError) as error:
            raise TufError(f"TUF {what} at {self._uri('')}: {type(error).__name__}: {one_line(error)}") from error

    def _require(self) -> None:
        if not self.exists():
            raise TufError(f"no TUF repository at {self._uri('metadata/1.root.json')} (initialize it first)")

    def _session(self, **key_paths: Path) -> _Session:
        """A session whose signers (one key per online role) are checked against the current root."""
        self._require()
        signers = {role: [(load_signer(path), Path(path))] for role, path in key_paths.items()}
        session = _Session(self, signers)
        root = session.root()
        for role, [(signer, path)] in signers.items():
            _check_key(root, role, signer, path)
        return session

    # -- reading ----------------------------------------------------------------------------
    def exists(self) -> bool:
        """Whether the repository has been initialized (1.root.json is present)."""
        with self._failures("lookup"):
            return self.store.exists(self._key("metadata/1.root.json"))

    def trusted_root(self) -> bytes:
        """Bytes of 1.root.json: the trust anchor a device is provisioned with."""
        with self._failures("read"):
            self._require()
            return self._read("metadata/1.root.json")

    def targets(self) -> dict[str, TargetFile]:
        """The currently published targets, path -> TargetFile (top-level or across bins)."""
        with self._failures("read"):
            self._require()
            return _Session(self, {}).published()

    def read_target(self, path: str) -> bytes:
        """Bytes of a published target, checked against its TargetFile length and hashes."""
        with self._failures("read"):
            info = self.targets().get(path)
            if info is None:
                raise TufError(f"target {path} is not published in {self._uri('')}")
            name = f"targets/{info.get_prefixed_paths()[0]}"
            data = self._read(name)
            try:
                info.verify_length_and_hashes(data)
            except LengthOrHashMismatchError as error:
                raise TufError(f"{self._uri(name)} does not match its TUF length or hash") from error
            return data

    # -- writing ----------------------------------------------------------------------------
    def initialize(self, root_keys: list[Path], targets_key: Path, snapshot_key: Path, timestamp_key: Path,
                   *, root_threshold: int = 1) -> None:
        """Create 1.root.json and empty targets, snapshot and timestamp (v1); error if it exists."""
        with self._failures("initialize"):
            if self.exists():
                raise TufError(f"a TUF repository already exists at {self._uri('metadata/1.root.json')}")
            if not root_keys:
                raise TufError("initialize needs at least one root key")
            root_signers = [(load_signer(path), Path(path)) for path in root_keys]
            online = {role: (load_signer(path), Path(path)) for role, path in
                      ((Targets.type, targets_key), (Snapshot.type, snapshot_key), (Timestamp.type, timestamp_key))}
            if len({signer.public_key.keyid for signer, _ in root_signers}) < root_threshold:
                raise TufError(f"root threshold {root_threshold} needs as many distinct root keys")
            session = _Session(self, {Root.type: root_signers, **{r: [s] for r, s in online.items()}}, fresh=True)
            with session.edit_root() as root:
                for signer, _path in sorted(root_signers, key=lambda item: item[0].public_key.keyid):
                    root.add_key(signer.public_key, Root.type)
                root.roles[Root.type].threshold = root_threshold
                for role, (signer, _path) in online.items():
                    root.add_key(signer.public_key, role)
            with session.edit_targets():
                pass
            with session.edit_snapshot() as snapshot:
                snapshot.meta = deepcopy(session.targets_infos)
            with session.edit_timestamp() as timestamp:
                timestamp.snapshot_meta = deepcopy(session.snapshot_info)

    def publish(self, targets: dict[str, bytes | TargetFile], targets_key: Path, snapshot_key: Path,
                timestamp_key: Path) -> PublishReport:
        """Make `targets` (path -> content, or a TargetFile to keep as published) the complete
        published set. Writes nothing when nothing changed, except a new timestamp (and
        snapshot) when due for re-signing; targets and bins are re-signed when near expiry."""
        with self._failures("publish"):
            session = self._session(targets=targets_key, snapshot=snapshot_key, timestamp=timestamp_key)
            current = session.published()
            files, payloads = self._desired(targets)
            for path, info in files.items():
                if current.get(path) == info:
                    continue  # already published: its file is in place
                name = f"targets/{info.get_prefixed_paths()[0]}"
                if path in payloads:
                    if not self.store.exists(self._key(name)):  # content-addressed: present means identical
                        self._write(name, payloads[path])
                elif not self.store.exists(self._key(name)):
                    raise TufError(f"target {path}: {self._uri(name)} is not in the store (pass its bytes)")
            session.write_targets(files, self._bit_length(len(files), session.bit_length()))
            session.do_snapshot(force=self._due(session.snapshot(), Snapshot.type))
            session.do_timestamp(force=self._due(session.timestamp(), Timestamp.type))
            return self._report(session, added=sorted(files.keys() - current.keys()),
                                removed=sorted(current.keys() - files.keys()),
                                updated=sorted(p for p in files.keys() & current.keys() if files[p] != current[p]))

    def refresh_timestamp(self, snapshot_key: Path, timestamp_key: Path, *, margin: timedelta | None = None,
                          force: bool = False) -> PublishReport:
        """Re-sign the timestamp when it expires within `margin` or `force`, and the snapshot when
        it expires within `margin` (default: half of each role's expiry period). For a schedule."""
        with self._failures("timestamp refresh"):
            session = self._session(snapshot=snapshot_key, timestamp=timestamp_key)
            session.do_snapshot(force=self._due(session.snapshot(), Snapshot.type, margin))
            session.do_timestamp(force=force or self._due(session.timestamp(), Timestamp.type, margin))
            return self._report(session)

    def rotate_root(self, old_root_keys: list[Path], new_root_keys: list[Path] | None = None, *,
                    replace: dict[str, Path] | None = None, snapshot_key: Path, timestamp_key: Path,
                    targets_key: Path) -> int:
        """Write root version N+1, signed by the old root keys (their threshold) and the new ones;
        returns N+1. `new_root_keys` (private) replace the root keys, `replace` maps an online
        role to its new key (public or private). Roles whose key changed are then re-signed
        with new versions. The key that signs a role afterwards is `replace[role]` when that is
        a private key, else the role's keyword key; each must be trusted by the new root."""
        replace = dict(replace or {})
        with self._failures("root rotation"):
            self._require()
            for role in replace:
                if role not in ONLINE_ROLES:
                    raise TufError(f"cannot replace the key of role {role!r} (one of {', '.join(ONLINE_ROLES)}; "
                                   "root keys go in new_root_keys)")
            old = [(load_signer(path), Path(path)) for path in old_root_keys]
            new = [(load_signer(path), Path(path)) for path in new_root_keys] if new_root_keys is not None else old
            if not new:
                raise TufError("root rotation needs at least one new root key")
            new_keys = {role: load_public_key(path) for role, path in replace.items()}
            online = {}
            for role, path in ((Targets.type, targets_key), (Snapshot.type, snapshot_key),
                               (Timestamp.type, timestamp_key)):
                if role in replace and b"PRIVATE KEY" in _read_pem(Path(replace[role])):
                    path = replace[role]
                online[role] = [(load_signer(path), Path(path))]
            root_signers = list({signer.public_key.keyid: (signer, path) for signer, path in old + new}.values())
            session = _Session(self, {Root.type: root_signers, **online})
            current = session.root()
            trusted = {s.public_key.keyid for s, p in old if _check_key(current, Root.type, s, p, threshold=False)}
            if len(trusted) < current.roles[Root.type].threshold:
                raise TufError(f"root v{current.version} needs {current.roles[Root.type].threshold} of its keys "
                               f"to sign the rotation, got {len(trusted)}")
            with session.edit_root() as root:
                if new_root_keys is not None:
                    for keyid in list(root.roles[Root.type].keyids):
                        root.revoke_key(keyid, Root.type)
                    for signer, _path in sorted(new, key=lambda item: item[0].public_key.keyid):
                        root.add_key(signer.public_key, Root.type)
                    if len(root.roles[Root.type].keyids) < root.roles[Root.type].threshold:
                        raise TufError(f"new root keys: {root.roles[Root.type].threshold} needed by the root "
                                       f"threshold, got {len(root.roles[Root.type].keyids)}")
                for role, key in new_keys.items():
                    for keyid in list(root.roles[role].keyids):
                        root.revoke_key(keyid, role)
                    root.add_key(key, role)
                # Checked before anything is written: the re-signing below must succeed.
                for role, [(signer, path)] in online.items():
                    hint = f"; pass its new private key in replace or as {role}_key" if role in replace else ""
                    _check_key(root, role, signer, path, version=current.version + 1, hint=hint)
            if Targets.type in replace:  # the bins delegate to the targets key too
                session.write_targets(session.published(), session.bit_length(), force=True)
            session.do_snapshot(force=Snapshot.type in replace)
            session.do_timestamp(force=Timestamp.type in replace)
            return session.root().version

    # -- helpers ----------------------------------------------------------------------------
    def _desired(self, targets: dict[str, bytes | TargetFile]) -> tuple[dict[str, TargetFile], dict[str, bytes]]:
        files, payloads = {}, {}
        for path in sorted(targets):
            _check_target_path(path)
            value = targets[path]
            if isinstance(value, TargetFile):
                if value.path != path:
                    raise TufError(f"target {path}: its TargetFile is for {value.path}")
                files[path] = value
            elif isinstance(value, (bytes, bytearray, memoryview)):
                payloads[path] = bytes(value)
                files[path] = TargetFile.from_data(path, payloads[path])
            else:
                raise TufError(f"target {path}: expected bytes or a TargetFile, got {type(value).__name__}")
        return files, payloads

    def _bit_length(self, count: int, current: int | None) -> int | None:
        """Bins for `count` targets: None up to the threshold, else enough bins for about half the
        threshold each. Never fewer bins than now, so a shrinking set does not rewrite every bin."""
        if count <= self.bins_threshold:
            return None
        per_bin = max(1, self.bins_threshold // 2)
        needed = max(1, math.ceil(math.log2(math.ceil(count / per_bin))))
        return min(32, max(needed, current or 0))

    def _report(self, session: _Session, added: list[str] | None = None, removed: list[str] | None = None,
                updated: list[str] | None = None) -> PublishReport:
        bits = session.bit_length()
        return PublishReport(changed=bool(session.written), targets_version=session.targets().version,
                             snapshot_version=session.snapshot().version,
                             timestamp_version=session.timestamp().version, added=added or [],
                             removed=removed or [], bins=2**bits if bits else 0, updated=updated or [])


def _check_key(root: Root, role: str, signer: Signer, path: Path, *, version: int | None = None,
               threshold: bool = True, hint: str = "") -> bool:
    """Raise TufError unless the root trusts `signer` for `role` (alone, when `threshold`)."""
    delegation = root.roles[role]
    where = f"root v{version or root.version}"
    if signer.public_key.keyid not in delegation.keyids:
        raise TufError(f"{path} is not a {role} key of {where} (wrong key for {role}{hint})")
    if threshold and delegation.threshold > 1:
        raise TufError(f"{role} needs {delegation.threshold} signatures in {where}; one key was given ({path})")
    return True


def _check_target_path(path: str) -> None:
    parts = path.split("/")
    if not path or path.startswith("/") or "\\" in path or any(part in ("", ".", "..") for part in parts):
        raise TufError(f"invalid target path {path!r} (relative, '/'-separated, no empty, '.' or '..' parts)")
