"""The artifact store: a local folder or an S3 bucket, addressed by URI.

Stages write through `ObjectStore`, so the same code serves the embedded demo (file://) and
production (s3://, or any S3-compatible store via an endpoint URL). Writes go to a temporary
name first and are renamed (local) or are atomic by nature (S3 PUT), so a reader never sees
half a file.

S3 calls that cannot reach the store (connection refused or reset, timeouts) are retried
`STORE_ATTEMPTS` times in all, `STORE_BACKOFF_S` apart and doubling, before one StoreError
line says what failed; other errors (a missing bucket, denied access) fail at once.

Audit evidence is written with `retain_until`: on an S3 store made with `object_lock="governance"`
(a bucket created with Object Lock enabled) the object version is locked in governance mode until
then, and the store refuses to delete it earlier; a local folder has no lock and ignores it.
`delete` removes a key with every version an S3 bucket keeps of it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

from pipelines.errors import one_line

log = logging.getLogger(__name__)

STORE_ATTEMPTS = 4  # the first call and up to 3 retries, for connection failures only
STORE_BACKOFF_S = 0.5  # doubles after each failed attempt


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class StoreError(RuntimeError):
    """The store could not be read or written."""


OBJECT_LOCK_MODES = {"governance": "GOVERNANCE"}  # compliance mode cannot be undone by anyone: not offered


@dataclass(frozen=True)
class StoredObject:
    """A key of the store and when it was last written (UTC)."""

    key: str
    modified: datetime
    size: int


def _unreachable(error: Exception) -> bool:
    """Whether an S3 call failed for want of a connection (worth retrying)."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError
    from s3transfer.exceptions import RetriesExceededError

    return isinstance(error, (BotoConnectionError, HTTPClientError, RetriesExceededError))


class ObjectStore:
    """Keys (`models/x/model.onnx`) under a root URL (`file:///...` or `s3://bucket/prefix`)."""

    def __init__(self, root_url: str, endpoint_url: str | None = None, attempts: int | None = None,
                 object_lock: str | None = None):
        self.root_url = root_url.rstrip("/")
        self._attempts = attempts  # None: STORE_ATTEMPTS
        if object_lock is not None and object_lock not in OBJECT_LOCK_MODES:
            raise StoreError(f"unsupported object lock mode {object_lock!r} (governance)")
        self.object_lock = object_lock
        parsed = urlparse(self.root_url)
        self.scheme = parsed.scheme or "file"
        if self.scheme == "file":
            self._root = Path(parsed.path if parsed.scheme else root_url)
        elif self.scheme == "s3":
            self._bucket = parsed.netloc
            self._prefix = parsed.path.strip("/")
            self._endpoint_url = endpoint_url
            self._client = None
        else:
            raise StoreError(f"unsupported artifact store URL {root_url!r} (file:// or s3://)")

    # -- addressing -------------------------------------------------------------------------
    def uri(self, key: str) -> str:
        if self.scheme == "file":
            return (self._root / key).as_uri()
        return f"s3://{self._bucket}/{self._s3_key(key)}"

    def key_of(self, uri: str) -> str:
        """The key of a URI inside this store."""
        prefix = self.uri("").rstrip("/") + "/"
        if not uri.startswith(prefix):
            raise StoreError(f"{uri} is not inside the artifact store {self.root_url}")
        return uri[len(prefix):]

    def _s3_key(self, key: str) -> str:
        return f"{self._prefix}/{key}" if self._prefix else key

    @property
    def s3(self):
        if self._client is None:
            import boto3

            self._client = boto3.client("s3", endpoint_url=self._endpoint_url)
        return self._client

    def _s3_call(self, what: str, key: str, call):
        """`call()`, retried with backoff while the store is unreachable; a failure is one
        StoreError line (`cannot <what> <uri>: ...`)."""
        attempts = max(1, self._attempts or STORE_ATTEMPTS)
        delay = STORE_BACKOFF_S
        for attempt in range(1, attempts + 1):
            try:
                return call()
            except Exception as error:  # boto3 raises several unrelated types
                if attempt < attempts and _unreachable(error):
                    log.warning("cannot %s %s (attempt %d of %d, next in %.1f s): %s", what, self.uri(key),
                                attempt, attempts, delay, one_line(error))
                    time.sleep(delay)
                    delay *= 2
                    continue
                tries = f" ({attempt} attempts)" if attempt > 1 else ""
                raise StoreError(f"cannot {what} {self.uri(key)}: {one_line(error)}{tries}") from error

    # -- operations -------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        if self.scheme == "file":
            return (self._root / key).is_file()
        from botocore.exceptions import ClientError

        def head() -> bool:
            try:
                self.s3.head_object(Bucket=self._bucket, Key=self._s3_key(key))
                return True
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise

        return self._s3_call("reach", key, head)

    def put_file(self, local: str | Path, key: str, retain_until: datetime | None = None) -> str:
        """Write a file under `key`; with `retain_until`, an S3 store with Object Lock locks the
        object until then (a local folder ignores it)."""
        if self.scheme == "file":
            target = self._root / key
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
            os.close(fd)
            shutil.copyfile(local, tmp)
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; store readers (other users, a web server) need read
            os.replace(tmp, target)
        else:
            extra = self._lock_args(retain_until)
            self._s3_call("upload to", key, lambda: self.s3.upload_file(str(local), self._bucket, self._s3_key(key),
                                                                        ExtraArgs=extra or None))
        return self.uri(key)

    def _lock_args(self, retain_until: datetime | None) -> dict:
        """The upload's Object Lock arguments: none without a lock mode or a date."""
        if self.object_lock is None or retain_until is None:
            return {}
        if retain_until.tzinfo is None:
            raise StoreError("retain_until must carry a time zone")
        return {"ObjectLockMode": OBJECT_LOCK_MODES[self.object_lock],
                "ObjectLockRetainUntilDate": retain_until.astimezone(timezone.utc)}

    def put_bytes(self, data: bytes, key: str, retain_until: datetime | None = None) -> str:
        with tempfile.NamedTemporaryFile() as handle:
            handle.write(data)
            handle.flush()
            return self.put_file(handle.name, key, retain_until=retain_until)

    def get_file(self, key: str, local: str | Path) -> Path:
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        if self.scheme == "file":
            source = self._root / key
            if not source.is_file():
                raise StoreError(f"{self.uri(key)} does not exist")
            shutil.copyfile(source, local)
        else:
            self._s3_call("download", key, lambda: self.s3.download_file(self._bucket, self._s3_key(key), str(local)))
        return local

    def read_bytes(self, key: str) -> bytes:
        if self.scheme == "file":
            try:
                return (self._root / key).read_bytes()
            except OSError as error:
                raise StoreError(f"cannot read {self.uri(key)}: {error.strerror}") from error
        return self._s3_call("read", key,
                             lambda: self.s3.get_object(Bucket=self._bucket, Key=self._s3_key(key))["Body"].read())

    def list_keys(self, prefix: str) -> list[str]:
        """Keys under `prefix` (a folder-like prefix ending in `/`), sorted; [] when none."""
        if self.scheme == "file":
            folder = self._root / prefix
            if not folder.is_dir():
                return []
            return sorted(p.relative_to(self._root).as_posix() for p in folder.rglob("*")
                          if p.is_file() and not p.name.startswith("."))
        start = len(self._prefix) + 1 if self._prefix else 0

        def listing() -> list[str]:
            pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self._bucket, Prefix=self._s3_key(prefix))
            return [item["Key"][start:] for page in pages for item in page.get("Contents", [])]

        return sorted(self._s3_call("list", prefix, listing))

    def objects(self, prefix: str) -> list[StoredObject]:
        """Keys under `prefix` with when each was last written, sorted by key; [] when none."""
        if self.scheme == "file":
            found = []
            for key in self.list_keys(prefix):
                stat = (self._root / key).stat()
                found.append(StoredObject(key, datetime.fromtimestamp(stat.st_mtime, timezone.utc), stat.st_size))
            return found
        start = len(self._prefix) + 1 if self._prefix else 0

        def listing() -> list[StoredObject]:
            pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self._bucket, Prefix=self._s3_key(prefix))
            return [StoredObject(item["Key"][start:], item["LastModified"].astimezone(timezone.utc), item["Size"])
                    for page in pages for item in page.get("Contents", [])]

        return sorted(self._s3_call("list", prefix, listing), key=lambda o: o.key)

    def retained_until(self, key: str) -> datetime | None:
        """The Object Lock date of the key's current version; None on a local folder or when unlocked."""
        if self.scheme == "file":
            return None
        def read() -> datetime | None:
            head = self.s3.head_object(Bucket=self._bucket, Key=self._s3_key(key))
            until = head.get("ObjectLockRetainUntilDate")
            return until.astimezone(timezone.utc) if until else None

        return self._s3_call("read the retention of", key, read)

    def delete(self, key: str) -> None:
        """Remove `key` for good (every version an S3 bucket keeps of it; empty folders of a local
        store). A version under Object Lock is refused by S3 until its date: a StoreError, with
        older versions before it already removed, the current one kept. Deleting a key that is absent does nothing."""
        if self.scheme == "file":
            path = self._root / key
            path.unlink(missing_ok=True)
            for folder in path.parents:
                if folder == self._root or not folder.is_relative_to(self._root):
                    break
                if not folder.is_dir():
                    continue
                try:
                    folder.rmdir()  # only an empty folder goes; a file written meanwhile keeps it
                except OSError:
                    break
            return
        full = self._s3_key(key)

        def remove() -> None:
            pages = self.s3.get_paginator("list_object_versions").paginate(Bucket=self._bucket, Prefix=full)
            versions = [item for page in pages for item in [*page.get("DeleteMarkers", []), *page.get("Versions", [])]
                        if item["Key"] == full]
            # The current version last: a refused older version leaves the key readable.
            for item in sorted(versions, key=lambda v: v.get("IsLatest", False)):
                self.s3.delete_object(Bucket=self._bucket, Key=full, VersionId=item["VersionId"])

        self._s3_call("delete", key, remove)

    def local_path(self, key: str) -> Path | None:
        """The file itself for a local store (no copy), None for remote stores."""
        return self._root / key if self.scheme == "file" else None

    def fetch(self, key: str, cache_dir: Path) -> Path:
        """A readable local path for a key: the file itself, or a cached download."""
        local = self.local_path(key)
        if local is not None:
            if not local.is_file():
                raise StoreError(f"{self.uri(key)} does not exist")
            return local
        target = cache_dir / key
        if not target.is_file():
            self.get_file(key, target)
        return target
