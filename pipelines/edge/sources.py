"""Where an agent gets its desired state and its files: TUF over HTTP(S) for fleets, Git for operators.

Both give the agent the same thing, checked the same way: desired-state entries
(`pipelines.edge.desired_state.Entry`) that the release key vouches for, and a `download` of
a file an entry names, bounded by the entry's length and by time.

- `TufDesiredState` reads `groups/<device-group>.json` from a TUF repository through
  python-tuf's client: every byte of metadata, document and artifact is verified (signatures,
  versions, expiry, lengths and hashes) before use. A quiet poll is one conditional GET.
- `GitDesiredState` keeps a shallow clone of the GitOps repository, resolves the overlays as
  `pipelines.edge.desired` does and accepts a model only when its overlays equal what its
  `attestation.json` signs; files come from the one configured artifact store.
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pipelines.edge.desired import GitSource, SourceError
from pipelines.edge.desired_state import (
    Entry,
    EntryError,
    FileRef,
    attested_checkout,
    check_entry,
    is_dns_label,
    public_key,
)
from pipelines.errors import one_line

DOWNLOAD_DEADLINE_S = 300.0
_CHUNK = 1 << 16


class RefusedError(SourceError):
    """The desired state failed verification (a signature, version, length or hash): an attack
    or a broken repository, not an outage."""


class StaleError(SourceError):
    """The desired state is signed but expired (a frozen or unreachable publisher)."""


class DownloadError(RuntimeError):
    """A file could not be fetched within its bounds (one line)."""


@dataclass
class DesiredState:
    """What a source offers one device: entries, and models it refused with the reason."""

    entries: list[Entry]
    refused: dict[str, str] = field(default_factory=dict)


class DesiredStateSource(Protocol):
    def fetch(self) -> DesiredState:
        """The current desired state; SourceError (StaleError) when it cannot be had."""
        ...

    def download(self, ref: FileRef, target: Path, max_length: int) -> None:
        """`ref`'s bytes into the new file `target`, at most `max_length` bytes."""
        ...


# --- bounded reads from the artifact store -------------------------------------------------


def _copy_bounded(reader, writer, max_length: int, deadline: float, what: str) -> int:
    total = 0
    while True:
        if time.monotonic() > deadline:
            raise DownloadError(f"{what}: took longer than {DOWNLOAD_DEADLINE_S:.0f} s")
        chunk = reader.read(min(_CHUNK, max_length + 1 - total))
        if not chunk:
            return total
        total += len(chunk)
        if total > max_length:
            raise DownloadError(f"{what}: larger than the signed {max_length} bytes")
        writer.write(chunk)


class StoreFiles:
    """Files under one configured store root (`file://…` or `s3://bucket/prefix`); nothing else."""

    def __init__(self, root_url: str, s3_endpoint_url: str | None = None,
                 deadline_s: float = DOWNLOAD_DEADLINE_S):
        from pipelines.storage import ObjectStore

        self.store = ObjectStore(root_url, s3_endpoint_url, attempts=1)
        self.deadline_s = deadline_s

    def download(self, ref: FileRef, target: Path, max_length: int) -> None:
        path = ref.path
        if path.startswith("/") or any(p in ("", ".", "..") for p in path.split("/")):
            raise DownloadError(f"{path[:120]!r} is not a relative key of the store")
        what = self.store.uri(path)
        deadline = time.monotonic() + self.deadline_s
        with open(target, "xb") as writer:
            if self.store.scheme == "file":
                self._local(self.store.local_path(""), path, writer, max_length, deadline, what)
            else:
                self._s3(path, writer, max_length, deadline, what)

    @staticmethod
    def _local(root: Path, key: str, writer, max_length: int, deadline: float, what: str) -> None:
        source = root / key
        # A folder on the way may be a link out of the store: the file must resolve inside it.
        if not os.path.realpath(source.parent).startswith(os.path.realpath(root) + os.sep):
            raise DownloadError(f"{what}: resolves outside the artifact store")
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW: the file itself
            # may not be a link out of the store.
            fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise DownloadError(f"{what}: does not exist") from None
        except OSError as error:
            raise DownloadError(f"{what}: {error.strerror}") from None
        with os.fdopen(fd, "rb") as reader:
            info = os.fstat(reader.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise DownloadError(f"{what}: not a regular file")
            if info.st_size > max_length:
                raise DownloadError(f"{what}: {info.st_size} bytes, larger than the signed {max_length}")
            os.set_blocking(reader.fileno(), True)
            _copy_bounded(reader, writer, max_length, deadline, what)

    def _s3(self, key: str, writer, max_length: int, deadline: float, what: str) -> None:
        try:
            # The range asks for one byte more than allowed: a longer object is seen and refused.
            answer = self.store.s3.get_object(Bucket=self.store._bucket, Key=self.store._s3_key(key),
                                              Range=f"bytes=0-{max_length}")
        except Exception as error:  # botocore raises several unrelated types
            raise DownloadError(f"{what}: {one_line(error, 200)}") from None
        _copy_bounded(answer["Body"], writer, max_length, deadline, what)


# --- Git -------------------------------------------------------------------------------------


class GitDesiredState:
    """Attested entries from a shallow clone of the GitOps repository (see the module docstring)."""

    def __init__(self, remote: str, branch: str, cache_dir: Path, store_url: str, public_key_path: Path,
                 s3_endpoint_url: str | None = None):
        self.git = GitSource(remote, branch, cache_dir)
        self.store_url = store_url
        self.key = public_key(public_key_path)
        self.files = StoreFiles(store_url, s3_endpoint_url)
        self._cached: tuple[str, DesiredState] | None = None

    @property
    def stats(self) -> dict:
        """Polls and the pack bytes Git wrote (the ref negotiation is not counted)."""
        return {"requests": len(self.git.stats), "wire_bytes": sum(s.bytes for s in self.git.stats)}

    def fetch(self) -> DesiredState:
        if Path(self.git.cache_dir).is_symlink():
            raise SourceError(f"{self.git.cache_dir} is a symbolic link; the clone is not kept through links")
        commit = self.git.sync()
        if self._cached and self._cached[0] == commit:
            return self._cached[1]
        by_model, refused = attested_checkout(self.git.cache_dir, self.store_url, self.key)
        state = DesiredState([e for model in sorted(by_model) for e in by_model[model]], refused)
        self._cached = (commit, state)
        return state

    def download(self, ref: FileRef, target: Path, max_length: int) -> None:
        self.files.download(ref, target, max_length)


# --- TUF -------------------------------------------------------------------------------------

_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S*?/(?:[0-9a-f]{64}\.)?([^/\s]+?): ")


def _tuf_reason(error: Exception) -> str:
    """python-tuf's message in one line, each URL its fetchers put in front cut to the file's
    name: a full target URL (two digests) would crowd the reason out of the 200 characters."""
    return one_line(_URL.sub(r"\1: ", str(error)), 200)


def group_target(group: str) -> str:
    """The TUF target path of a device group's desired-state document."""
    return f"groups/{group}.json"


class TufDesiredState:
    """The device group's document from a TUF repository (`tuf+http(s)://…`, `tuf+file://…`)."""

    def __init__(self, url: str, group: str, device_dir: Path, trusted_root: bytes, *,
                 root_check_interval_s: float = 3600.0, fetcher=None):
        from pipelines.edge.tuf_client import TufClient

        if not is_dns_label(group):
            raise ValueError(f"device group {group[:80]!r} is not a DNS label")
        self.group = group
        self.client = TufClient(url, Path(device_dir) / "tuf", trusted_root, fetcher=fetcher,
                                root_check_interval_s=root_check_interval_s)

    @property
    def stats(self) -> dict:
        return self.client.stats

    def fetch(self) -> DesiredState:
        from tuf.api import exceptions

        try:
            self.client.refresh()
            data = self.client.target_bytes(group_target(self.group))
        except exceptions.ExpiredMetadataError as error:
            raise StaleError(f"the signed desired state has expired: {_tuf_reason(error)}") from None
        except exceptions.RepositoryError as error:
            raise RefusedError(f"refused by TUF ({type(error).__name__}): {_tuf_reason(error)}") from None
        except exceptions.DownloadError as error:
            raise SourceError(f"download failed ({type(error).__name__}): {_tuf_reason(error)}") from None
        except OSError as error:
            raise SourceError(f"cannot keep TUF metadata: {error.strerror or error}") from None
        if data is None:
            raise SourceError(f"the repository has no desired state for device group {self.group}")
        try:
            document = json.loads(data)
            if document.get("deviceGroup") != self.group or not isinstance(document.get("entries"), list):
                raise ValueError(f"not the document of device group {self.group}")
        except (ValueError, AttributeError) as error:
            raise SourceError(f"{group_target(self.group)}: {one_line(error, 200)}") from None
        entries, refused = [], {}
        for index, item in enumerate(document["entries"]):
            try:
                entries.append(check_entry(item, f"{group_target(self.group)} entries[{index}]"))
            except EntryError as error:
                name = item.get("model") if isinstance(item, dict) else None
                refused[name if is_dns_label(name) else f"entry-{index}"] = one_line(error, 300)
        return DesiredState(entries, refused)

    def download(self, ref: FileRef, target: Path, max_length: int) -> None:
        from tuf.api import exceptions

        info = self.client.targetinfo(ref.path)
        if info is None:
            raise DownloadError(f"{ref.path}: not a target of the repository")
        if info.length > max_length:
            raise DownloadError(f"{ref.path}: the repository signs {info.length} bytes, more than {max_length}")
        try:
            self.client.download(ref.path, target)
        except exceptions.RepositoryError as error:
            raise DownloadError(f"{ref.path}: refused by TUF ({type(error).__name__}): {_tuf_reason(error)}") \
                from None
        except exceptions.DownloadError as error:
            raise DownloadError(f"{ref.path}: {type(error).__name__}: {_tuf_reason(error)}") from None
