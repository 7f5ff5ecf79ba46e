"""The TUF device client over real HTTP on 127.0.0.1: what each poll costs, and hostile servers.

Each test signs a small consistent-snapshot repository (P-256 keys) and serves it with
`http_server.StaticServer`, whose own request log is the measure of what a device sends.
"""

from __future__ import annotations

import hashlib
import time
import tracemalloc
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from http_server import StaticServer
from securesystemslib.signer import CryptoSigner
from tuf.api.exceptions import (
    DownloadHTTPError,
    DownloadLengthMismatchError,
    ExpiredMetadataError,
    LengthOrHashMismatchError,
    SlowRetrievalError,
)
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp

from pipelines.edge.tuf_client import ConditionalFetcher, TufClient, parse_tuf_url

MODEL = bytes(range(256)) * 800  # 200 kB
MODEL_PATH = "models/m.bin"
MODEL_URL = f"/edge/targets/models/{hashlib.sha256(MODEL).hexdigest()}.m.bin"
TIMESTAMP = "/edge/metadata/timestamp.json"


class Repo:
    """A consistent-snapshot TUF repository on disk, one P-256 key per top-level role."""

    def __init__(self, base: Path):
        self.base = base
        (base / "metadata").mkdir(parents=True)
        (base / "targets").mkdir()
        self.keys = {role: _new_key() for role in ("root", "timestamp", "snapshot", "targets")}
        expires = _in(timedelta(days=1))
        self.root = Metadata(Root(expires=expires, consistent_snapshot=True))
        for role, key in self.keys.items():
            self.root.signed.add_key(key.public_key, role)
        self.targets = Metadata(Targets(expires=expires))
        self.snapshot = Metadata(Snapshot(expires=expires))
        self.timestamp = Metadata(Timestamp(expires=expires))
        self._write(self.root, f"{self.root.signed.version}.root.json")
        self.trusted_root = (base / "metadata" / "1.root.json").read_bytes()
        self._published = False

    def add_target(self, path: str, data: bytes) -> None:
        info = TargetFile.from_data(path, data, ["sha256"])
        folder, _, name = path.rpartition("/")
        file = self.base / "targets" / folder / f"{info.hashes['sha256']}.{name}"
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(data)
        self.targets.signed.targets[path] = info

    def publish(self, timestamp_expires: datetime | None = None) -> None:
        """Sign and write the next targets, snapshot and timestamp."""
        if self._published:
            for md in (self.targets, self.snapshot, self.timestamp):
                md.signed.version += 1
        self._published = True
        self.snapshot.signed.meta["targets.json"] = MetaFile(version=self.targets.signed.version)
        self.timestamp.signed.snapshot_meta = MetaFile(version=self.snapshot.signed.version)
        self.timestamp.signed.expires = timestamp_expires or _in(timedelta(days=1))
        self._write(self.targets, f"{self.targets.signed.version}.targets.json")
        self._write(self.snapshot, f"{self.snapshot.signed.version}.snapshot.json")
        self._write(self.timestamp, "timestamp.json")

    def rotate(self, role: str) -> None:
        """Replace `role`'s key in a new root version, signed by the (unchanged) root key."""
        old, self.keys[role] = self.keys[role], _new_key()
        self.root.signed.revoke_key(old.public_key.keyid, role)
        self.root.signed.add_key(self.keys[role].public_key, role)
        self.root.signed.version += 1
        self._write(self.root, f"{self.root.signed.version}.root.json")

    def _write(self, md: Metadata, name: str) -> None:
        md.sign(self.keys[md.signed.type])
        (self.base / "metadata" / name).write_bytes(md.to_bytes())


def _new_key() -> CryptoSigner:
    return CryptoSigner(ec.generate_private_key(ec.SECP256R1()))


def _in(delta: timedelta) -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0) + delta


@dataclass
class World:
    repo: Repo
    server: StaticServer
    url: str
    device: Path

    def client(self, device: Path | None = None, **kwargs) -> TufClient:
        return TufClient(self.url, device or self.device, self.repo.trusted_root, **kwargs)

    def hits(self, action) -> list[tuple[str, int]]:
        """(path, status) of the requests `action` made."""
        start = self.server.count
        action()
        return [(hit.path, hit.status) for hit in self.server.log[start:]]


@pytest.fixture
def world(tmp_path):
    repo = Repo(tmp_path / "srv" / "edge")
    repo.add_target(MODEL_PATH, MODEL)
    repo.publish()
    with StaticServer(tmp_path / "srv") as server:
        yield World(repo, server, f"tuf+{server.url}/edge", tmp_path / "device")


def test_cold_quiet_and_update_polls(world):
    cold = world.client()
    assert world.hits(lambda: cold.target_bytes(MODEL_PATH)) == [
        ("/edge/metadata/2.root.json", 404),
        (TIMESTAMP, 200),
        ("/edge/metadata/1.snapshot.json", 200),
        ("/edge/metadata/1.targets.json", 200),
        (MODEL_URL, 200),
    ]
    assert world.server.connections == 1  # keep-alive
    assert cold.target_bytes(MODEL_PATH) == MODEL
    assert cold.stats["requests"] == 5

    # After a restart: the root probe is remembered, the timestamp answered 304.
    quiet = world.client()
    start = world.server.count
    assert world.hits(quiet.refresh) == [(TIMESTAMP, 304)]
    [hit] = world.server.log[start:]
    assert hit.bytes_in + hit.bytes_out < 1000
    assert quiet.stats["requests"] == 1 and quiet.stats["not_modified"] == 1
    assert quiet.stats["wire_bytes"] < 1000
    assert abs(quiet.stats["wire_bytes"] - hit.bytes_in - hit.bytes_out) < 100  # the estimate is close

    # A second poll of the same client (a new Updater): one 304, the target from the local cache.
    assert world.hits(lambda: (quiet.refresh(), quiet.target_bytes(MODEL_PATH))) == [(TIMESTAMP, 304)]

    world.repo.add_target("models/n.bin", b"new model")
    world.repo.publish()
    assert world.hits(quiet.refresh) == [
        (TIMESTAMP, 200),
        ("/edge/metadata/2.snapshot.json", 200),
        ("/edge/metadata/2.targets.json", 200),
    ]
    assert quiet.targetinfo("models/n.bin").length == len(b"new model")
    assert quiet.targetinfo("models/none.bin") is None and quiet.target_bytes("models/none.bin") is None
    with pytest.raises(LookupError):
        quiet.download("models/none.bin", world.device / "none.bin")


def test_endless_body_is_cut_at_the_signed_length(world, tmp_path):
    client = world.client()
    client.refresh()
    world.server.attack("/edge/targets/", "endless")
    dest = tmp_path / "model.bin"
    received = client.stats["wire_bytes"]
    tracemalloc.start()
    started = time.monotonic()
    with pytest.raises(DownloadLengthMismatchError) as raised:
        client.download(MODEL_PATH, dest)
    elapsed = time.monotonic() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 2
    assert peak < 1 << 20
    assert client.stats["wire_bytes"] - received < len(MODEL) + 1000  # read up to the signed length only
    # The connection is closed while the exception (and its traceback) is still alive.
    assert raised.value is not None and world.server.client_left.wait(2)
    assert world.server.cut[0][0] == MODEL_URL
    assert not dest.exists() and not list((world.device / "targets-tmp").iterdir())


def test_slow_body_hits_the_deadline(world):
    client = world.client(fetcher=ConditionalFetcher(world.device / "http-cache", deadline_s=2.0))
    client.refresh()
    world.server.attack("/edge/targets/", "slow")
    started = time.monotonic()
    with pytest.raises(SlowRetrievalError):
        client.target_bytes(MODEL_PATH)
    assert 2.0 <= time.monotonic() - started < 3.0
    assert world.server.client_left.wait(3)


def test_hostile_answers(world):
    client = world.client()
    client.refresh()
    world.server.attack(TIMESTAMP, "status", 500)
    with pytest.raises(DownloadHTTPError) as raised:
        world.client().refresh()
    assert raised.value.status_code == 500
    world.server.calm()
    world.server.attack("/edge/targets/", "replace", b"x" * len(MODEL))
    with pytest.raises(LengthOrHashMismatchError):
        client.target_bytes(MODEL_PATH)
    world.server.attack("/edge/targets/", "replace", MODEL + b"x")
    with pytest.raises(DownloadLengthMismatchError):
        client.target_bytes(MODEL_PATH)
    with pytest.raises(DownloadLengthMismatchError):
        client.target_bytes(MODEL_PATH, max_length=1000)


def test_expired_timestamp_is_refused_even_when_answered_304(world):
    world.repo.publish(timestamp_expires=_in(-timedelta(hours=1)))
    client = world.client()
    with pytest.raises(ExpiredMetadataError):
        client.refresh()

    def poll():
        with pytest.raises(ExpiredMetadataError):
            client.refresh()

    assert (TIMESTAMP, 304) in world.hits(poll)


def test_root_probe_memory(world, tmp_path):
    now = [0.0]
    fetcher = ConditionalFetcher(world.device / "http-cache", root_check_interval_s=100, clock=lambda: now[0])
    client = world.client(fetcher=fetcher)
    client.refresh()
    now[0] = 99.0
    assert world.hits(client.refresh) == [(TIMESTAMP, 304)]
    now[0] = 100.0
    assert world.hits(client.refresh) == [("/edge/metadata/2.root.json", 404), (TIMESTAMP, 304)]

    always = world.client(tmp_path / "other-device", root_check_interval_s=0)
    always.refresh()
    assert world.hits(always.refresh) == [("/edge/metadata/2.root.json", 404), (TIMESTAMP, 304)]


def test_rotated_key_is_learned_despite_the_probe_memory(world):
    client = world.client()
    client.refresh()
    world.repo.rotate("timestamp")
    world.repo.publish()
    assert world.hits(client.refresh) == [
        (TIMESTAMP, 200),  # signed by the new key: refused, so the root probe is sent after all
        ("/edge/metadata/2.root.json", 200),
        ("/edge/metadata/3.root.json", 404),
        (TIMESTAMP, 304),
        ("/edge/metadata/2.snapshot.json", 200),
        ("/edge/metadata/2.targets.json", 200),
    ]
    assert world.hits(world.client().refresh) == [(TIMESTAMP, 304)]


def test_file_url(tmp_path):
    repo = Repo(tmp_path / "repo")
    repo.add_target(MODEL_PATH, MODEL)
    repo.publish()
    client = TufClient(f"tuf+file://{repo.base}", tmp_path / "device", repo.trusted_root)
    assert client.target_bytes(MODEL_PATH) == MODEL
    assert client.stats["requests"] == 5 and client.stats["wire_bytes"] > len(MODEL)
    client.refresh()
    assert client.stats["requests"] == 7  # root probe + timestamp

    for file in (repo.base / "targets" / "models").iterdir():
        file.unlink()
    with pytest.raises(DownloadHTTPError) as raised:
        client.download(MODEL_PATH, tmp_path / "m.bin")
    assert raised.value.status_code == 404 and not (tmp_path / "m.bin").exists()


@pytest.mark.parametrize(
    "url, expected",
    [
        (
            "tuf+http://127.0.0.1:8080/edge",
            ("http://127.0.0.1:8080/edge/metadata/", "http://127.0.0.1:8080/edge/targets/"),
        ),
        ("tuf+https://repo.example/", ("https://repo.example/metadata/", "https://repo.example/targets/")),
        ("tuf+file:///srv/tuf", ("file:///srv/tuf/metadata/", "file:///srv/tuf/targets/")),
    ],
)
def test_parse_tuf_url(url, expected):
    assert parse_tuf_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "http://repo.example/edge",
        "tuf+ftp://repo.example/edge",
        "tuf+https://user:secret@repo.example/edge",
        "tuf+https://repo.example/edge?x=1",
        "tuf+https://repo.example/edge#top",
        "tuf+https://repo.example:99999/edge",
        "tuf+file://host/srv/tuf",
        "tuf+file:relative",
        "tuf+https:///edge",
    ],
)
def test_parse_tuf_url_rejects(url):
    with pytest.raises(ValueError, match="bad TUF repository URL") as raised:
        parse_tuf_url(url)
    assert "\n" not in str(raised.value)
