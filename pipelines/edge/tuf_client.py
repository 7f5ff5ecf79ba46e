"""The device side of The Update Framework (TUF): python-tuf's `Updater` over a frugal fetcher.

A device polls often and almost always finds nothing new, so a quiet poll must cost one small
request: the only mutable file, `timestamp.json`, is fetched with `If-None-Match` and answered
by a 304, and python-tuf's probe for the next root version is answered from a short memory of
its last 404 (see `ConditionalFetcher`). Everything else (versioned metadata, hash-prefixed
targets) never changes, so python-tuf's local cache already avoids fetching it twice.

Every byte is bounded: each download stops reading at the length python-tuf allows (signed
lengths for snapshot/targets/target files, configured maxima otherwise), between bytes after a
read timeout and in total after a deadline, so an endless or dripping server costs the device
neither memory nor a stuck poll. Verification is python-tuf's; nothing here trusts a byte.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit
from urllib.request import url2pathname

import tuf
import urllib3
from tuf.api.exceptions import (
    DownloadError,
    DownloadHTTPError,
    DownloadLengthMismatchError,
    RepositoryError,
    SlowRetrievalError,
)
from tuf.api.metadata import TargetFile
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

_ROOT_PROBE = re.compile(r"(^|/)\d+\.root\.json$")
_MUTABLE = re.compile(r"(^|/)timestamp\.json$")  # every other name is versioned or hash-prefixed
_ERROR_BODY_MAX = 4096  # bytes of an error answer read to keep the connection alive
_USER_AGENT = f"python-tuf/{tuf.__version__} edge"


class _BoundedFetcher(FetcherInterface):
    """Counters, and python-tuf's `max_length` passed down to the stream.

    python-tuf checks the length only after each chunk and leaves an aborted stream open for as
    long as its exception lives (the traceback holds the generator); the streams here know the
    limit, read at most one byte past it and close the source when they stop.
    """

    chunk_size = 65536

    def __init__(self) -> None:
        self.requests = 0
        self.wire_bytes = 0
        self.not_modified = 0
        self._max_length: int | None = None

    @contextlib.contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO]:
        """python-tuf's `download_file`, with `max_length` also enforced while reading."""
        self._max_length = max_length
        try:
            with super().download_file(url, max_length) as file:
                yield file
        finally:
            self._max_length = None

    def _want(self, received: int, limit: int | None) -> int:
        return self.chunk_size if limit is None else min(self.chunk_size, limit + 1 - received)

    @staticmethod
    def _check_length(url: str, received: int, limit: int | None) -> None:
        if limit is not None and received > limit:
            raise DownloadLengthMismatchError(f"{url}: more than the {limit} bytes allowed")


class ConditionalFetcher(_BoundedFetcher):
    """HTTP(S) through one urllib3.PoolManager (keep-alive), with conditional GETs and bounds.

    - `timestamp.json` is fetched with `If-None-Match`; its ETag and body live in `cache_dir`
      and a 304 hands python-tuf the cached body (same version: it keeps what it trusts).
    - A 404/403 to python-tuf's probe for the next root (`<N+1>.root.json`) is remembered for
      `root_check_interval_s` and answered from memory. This bounds how fast a device learns of
      a root rotation, that is of a key revocation, to that interval (one hour by default);
      0 disables the memory and probes on every poll. `TufClient.refresh` forgets it and
      retries once when verification fails, so a rotated key never blocks a device for long.
    - Bodies are streamed: at most python-tuf's `max_length` (+1 byte to notice excess),
      `read_timeout` between bytes and `deadline_s` per download, else `SlowRetrievalError`.

    `clock` is the time source of deadlines and of the root-probe memory (its values are stored
    in `cache_dir`; a value from the future, e.g. after a reboot, counts as expired). `pool`
    replaces the PoolManager, e.g. by a urllib3.ProxyManager (environment proxies are not read)
    or one with a private CA. Not thread safe, like python-tuf's Updater.
    """

    def __init__(
        self,
        cache_dir: Path,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 10.0,
        deadline_s: float = 60.0,
        root_check_interval_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
        pool: urllib3.PoolManager | None = None,
    ) -> None:
        super().__init__()
        self.cache_dir = _private_dir(Path(cache_dir))
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.deadline_s = deadline_s
        self.root_check_interval_s = root_check_interval_s
        self.remembered_probes = 0  # root probes answered from memory, without a request
        self._clock = clock
        self._pool = pool or urllib3.PoolManager(num_pools=4, maxsize=1)
        # A stale keep-alive connection is worth one retry; redirects are followed.
        self._retries = urllib3.Retry(total=None, connect=1, read=1, redirect=3, status=0, other=0)
        self._state_file = self.cache_dir / "conditional.json"
        self._state = self._load_state()

    def forget_root_probes(self) -> None:
        """Probe for a new root on the next poll again."""
        if self._state["absent"]:
            self._state["absent"] = {}
            self._save_state()

    def _fetch(self, url: str) -> Iterator[bytes]:
        limit, now = self._max_length, self._clock()
        deadline = now + self.deadline_s
        path = urlsplit(url).path
        probe, mutable = bool(_ROOT_PROBE.search(path)), bool(_MUTABLE.search(path))
        if probe and 0 <= now - self._state["absent"].get(url, -1e18) < self.root_check_interval_s:
            self.remembered_probes += 1
            raise DownloadHTTPError(f"{url}: not found (remembered)", 404)

        headers = {"User-Agent": _USER_AGENT}
        cached = self._cached(url) if mutable else None
        if cached is not None:
            headers["If-None-Match"] = cached[0]
        timeout = urllib3.Timeout(
            connect=min(self.connect_timeout, self.deadline_s), read=min(self.read_timeout, self.deadline_s)
        )
        try:
            resp = self._pool.request(
                "GET", url, headers=headers, preload_content=False, retries=self._retries, timeout=timeout
            )
        except urllib3.exceptions.HTTPError as e:
            if isinstance(getattr(e, "reason", e), urllib3.exceptions.TimeoutError):
                raise SlowRetrievalError(f"{url}: no answer in time") from e
            raise DownloadError(f"{url}: {getattr(e, 'reason', e)}") from e

        self.requests += 1 + len(resp.retries.history if resp.retries else ())
        self.wire_bytes += _request_size(url, headers) + _head_size(resp)
        if resp.status == 304 and cached is not None:
            self.not_modified += 1
            self._discard(url, resp, deadline)
            return iter((cached[1],))
        if resp.status != 200:
            self._discard(url, resp, deadline)
            if probe and resp.status in (403, 404) and self.root_check_interval_s > 0:
                self._state["absent"][url] = now
                self._save_state()
            raise DownloadHTTPError(f"{url}: HTTP {resp.status}", resp.status)
        if limit is not None and (resp.length_remaining or 0) > limit:
            resp.close()
            raise DownloadLengthMismatchError(f"{url}: {resp.length_remaining} bytes announced, {limit} allowed")
        chunks = self._stream(url, resp, limit, deadline)
        return self._remember(url, resp.headers.get("ETag"), chunks) if mutable else chunks

    def _stream(self, url: str, resp, limit: int | None, deadline: float) -> Iterator[bytes]:
        """The body in chunks; closes the connection unless the body was read to its end."""
        received, complete, sock = 0, False, None
        try:
            while True:
                left = deadline - self._clock()
                if left <= 0:
                    raise SlowRetrievalError(f"{url}: not complete within {self.deadline_s:g} s")
                if left < self.read_timeout:  # the deadline also cuts a read that is waiting
                    sock = sock or getattr(resp.connection, "sock", None)
                    if sock is not None:
                        sock.settimeout(left)
                chunk = resp.read1(self._want(received, limit))
                if not chunk:
                    break
                received += len(chunk)
                self.wire_bytes += len(chunk)
                self._check_length(url, received, limit)
                yield chunk
            complete = True
        except urllib3.exceptions.TimeoutError as e:
            raise SlowRetrievalError(f"{url}: no byte for {self.read_timeout:g} s or past the deadline") from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise DownloadError(f"{url}: {e}") from e
        finally:
            if not complete:
                resp.close()
            elif sock is not None:
                sock.settimeout(self.read_timeout)
            resp.release_conn()

    def _discard(self, url: str, resp, deadline: float) -> None:
        """Read a small error body so the connection stays usable; drop the connection otherwise."""
        with contextlib.suppress(DownloadError):
            for _ in self._stream(url, resp, _ERROR_BODY_MAX, deadline):
                pass

    def _remember(self, url: str, etag: str | None, chunks: Iterator[bytes]) -> Iterator[bytes]:
        """Pass `chunks` through and keep the complete body under its ETag."""
        body = []
        for chunk in chunks:
            body.append(chunk)
            yield chunk
        data = b"".join(body)
        entry = self._state["etags"]
        if etag:
            _write_atomic(self._body_file(url), data)
            entry[url] = {"etag": etag, "sha256": hashlib.sha256(data).hexdigest()}
        else:
            entry.pop(url, None)
        self._save_state()

    def _cached(self, url: str) -> tuple[str, bytes] | None:
        """(ETag, body) of `url` if both are on disk and intact."""
        entry = self._state["etags"].get(url)
        if not entry:
            return None
        try:
            body = self._body_file(url).read_bytes()
        except OSError:
            return None
        if hashlib.sha256(body).hexdigest() != entry.get("sha256"):
            return None
        return entry["etag"], body

    def _body_file(self, url: str) -> Path:
        return self.cache_dir / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}.body"

    def _load_state(self) -> dict:
        try:
            state = json.loads(self._state_file.read_text())
            if isinstance(state.get("etags"), dict) and isinstance(state.get("absent"), dict):
                return state
        except (OSError, ValueError, AttributeError):
            pass
        return {"etags": {}, "absent": {}}

    def _save_state(self) -> None:
        now = self._clock()
        self._state["absent"] = {
            url: t for url, t in self._state["absent"].items() if 0 <= now - t < self.root_check_interval_s
        }
        _write_atomic(self._state_file, json.dumps(self._state, sort_keys=True).encode())


class FileFetcher(_BoundedFetcher):
    """`file://` URLs for the embedded set-up: a missing file is a `DownloadHTTPError` 404.

    `requests` counts files looked up, `wire_bytes` bytes read.
    """

    def _fetch(self, url: str) -> Iterator[bytes]:
        limit = self._max_length
        parts = urlsplit(url)
        if parts.scheme != "file":
            raise DownloadError(f"{url}: not a file:// URL")
        self.requests += 1
        try:
            file = open(url2pathname(parts.path), "rb")  # closed by the generator
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
            raise DownloadHTTPError(f"{url}: not found", 404) from e
        size = os.fstat(file.fileno()).st_size
        if limit is not None and size > limit:
            file.close()
            raise DownloadLengthMismatchError(f"{url}: {size} bytes, {limit} allowed")
        return self._read(url, file, limit)

    def _read(self, url: str, file: IO[bytes], limit: int | None) -> Iterator[bytes]:
        received = 0
        with file:
            while chunk := file.read(self._want(received, limit)):
                received += len(chunk)
                self.wire_bytes += len(chunk)
                self._check_length(url, received, limit)
                yield chunk


class TufClient:
    """One device's view of one TUF repository.

    Metadata is cached in `device_dir/metadata` (python-tuf's layout), targets are downloaded
    through `device_dir/targets-tmp`; both are private (0700). Each `refresh()` runs a new
    python-tuf Updater over that cache, so the trusted state survives restarts.
    """

    def __init__(
        self,
        url: str,
        device_dir: Path,
        trusted_root: bytes,
        *,
        fetcher: FetcherInterface | None = None,
        root_check_interval_s: float = 3600.0,
    ) -> None:
        self._metadata_url, self._targets_url = parse_tuf_url(url)
        device_dir = Path(device_dir)
        self._own = [device_dir, device_dir / "metadata", device_dir / "targets-tmp", device_dir / "http-cache"]
        _no_links(self._own)
        self._metadata_dir = _private_dir(device_dir / "metadata")
        self._targets_dir = _private_dir(device_dir / "targets-tmp")
        if fetcher is None:
            if self._metadata_url.startswith("file:"):
                fetcher = FileFetcher()
            else:
                fetcher = ConditionalFetcher(device_dir / "http-cache", root_check_interval_s=root_check_interval_s)
        self.fetcher = fetcher
        self._trusted_root = bytes(trusted_root)
        self._config = UpdaterConfig()
        self._updater: Updater | None = None

    def refresh(self) -> None:
        """Refresh the top-level metadata with a new Updater; python-tuf's exceptions pass unchanged.

        If verification fails while the root probe was answered from memory, the probe is
        forgotten and the refresh tried once more: a rotated root (new keys) shows up at once.
        """
        _no_links(self._own)  # the device's disk may have changed since the last poll
        remembered = getattr(self.fetcher, "remembered_probes", 0)
        try:
            self._refresh_once()
        except RepositoryError:
            if getattr(self.fetcher, "remembered_probes", 0) == remembered:
                raise
            self.fetcher.forget_root_probes()
            self._refresh_once()

    def _refresh_once(self) -> None:
        self._updater = None
        updater = Updater(
            str(self._metadata_dir),
            self._metadata_url,
            str(self._targets_dir),
            self._targets_url,
            fetcher=self.fetcher,
            config=self._config,
            bootstrap=self._trusted_root,
        )
        updater.refresh()
        self._updater = updater

    def targetinfo(self, path: str) -> TargetFile | None:
        """The signed `TargetFile` of `path`, or None; refreshes first if no poll succeeded yet."""
        if self._updater is None:
            self.refresh()
        return self._updater.get_targetinfo(path)

    def target_bytes(self, path: str, max_length: int | None = None) -> bytes | None:
        """The bytes of target `path`, verified (length and hashes), or None if it is not signed.

        Kept in `targets-tmp`, so an unchanged target is read once. DownloadLengthMismatchError
        when its signed length exceeds `max_length`.
        """
        info = self.targetinfo(path)
        if info is None:
            return None
        if max_length is not None and info.length > max_length:
            raise DownloadLengthMismatchError(f"{path}: {info.length} bytes signed, {max_length} allowed")
        local = self._updater.find_cached_target(info) or self._updater.download_target(info)
        return Path(local).read_bytes()

    def download(self, path: str, dest: Path) -> int:
        """Write target `path`, verified, to `dest` (replaced atomically); returns its length.

        LookupError for a target that is not signed. On failure `dest` is left as it was and no
        partial file remains.
        """
        info = self._require(path)
        dest = Path(dest)
        fd, tmp = tempfile.mkstemp(dir=self._targets_dir, prefix=".download-")
        os.close(fd)
        try:
            self._updater.download_target(info, filepath=tmp)
            try:
                os.replace(tmp, dest)
            except OSError as e:  # another file system: copy next to `dest`, then rename
                if e.errno != errno.EXDEV:
                    raise
                fd, near = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
                os.close(fd)
                try:
                    shutil.copyfile(tmp, near)
                    os.replace(near, dest)
                except BaseException:
                    Path(near).unlink(missing_ok=True)
                    raise
        finally:
            Path(tmp).unlink(missing_ok=True)
        return info.length

    @property
    def stats(self) -> dict:
        """Requests, wire bytes and 304 answers of the fetcher since it was created."""
        return {name: getattr(self.fetcher, name, 0) for name in ("requests", "wire_bytes", "not_modified")}

    def _require(self, path: str) -> TargetFile:
        info = self.targetinfo(path)
        if info is None:
            raise LookupError(f"{path}: not a target of the repository")
        return info


def parse_tuf_url(url: str) -> tuple[str, str]:
    """(metadata base URL, targets base URL) of a `tuf+http(s)://host/prefix` or `tuf+file:///path` URL."""
    scheme, sep, rest = url.partition("+")
    inner = rest if sep and scheme == "tuf" else ""
    try:
        parts = urlsplit(inner)
        parts.port  # raises on a bad port
    except ValueError as e:
        raise ValueError(f"bad TUF repository URL {url!r}: {e}") from None
    if parts.scheme not in ("http", "https", "file"):
        raise ValueError(f"bad TUF repository URL {url!r}: expected tuf+http://, tuf+https:// or tuf+file:///")
    if "?" in inner or "#" in inner or "@" in parts.netloc or any(c <= " " for c in inner):
        raise ValueError(f"bad TUF repository URL {url!r}: no credentials, query, fragment or spaces")
    if parts.scheme == "file" and (parts.netloc or not parts.path.startswith("/")):
        raise ValueError(f"bad TUF repository URL {url!r}: expected tuf+file:///absolute/path")
    if parts.scheme != "file" and not parts.hostname:
        raise ValueError(f"bad TUF repository URL {url!r}: no host")
    base = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
    return f"{base}/metadata/", f"{base}/targets/"


def _no_links(folders: list[Path]) -> None:
    """OSError when one of the device's own folders is a symbolic link: metadata and downloads
    are never written through a link planted on the device's disk."""
    for folder in folders:
        if folder.is_symlink():
            raise OSError(f"{folder} is a symbolic link; TUF metadata is not kept through links")


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _request_size(url: str, headers: dict[str, str]) -> int:
    """Bytes of the request line and headers (those urllib3 and http.client add included)."""
    parts = urlsplit(url)
    lines = [f"GET {parts.path or '/'} HTTP/1.1", f"Host: {parts.netloc}", "Accept-Encoding: identity"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return sum(len(line) + 2 for line in lines) + 2


def _head_size(resp) -> int:
    """Bytes of the status line and headers as received (approximately)."""
    head = f"HTTP/1.1 {resp.status} {resp.reason or ''}\r\n"
    return len(head) + sum(len(f"{name}: {value}\r\n") for name, value in resp.headers.items()) + 2
