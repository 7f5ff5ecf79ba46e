"""The TUF repository in the artifact store, checked with python-tuf's own client (ngclient)."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import unquote, urlparse

import boto3
import pytest
from tuf.api.exceptions import DownloadHTTPError, RepositoryError, UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Snapshot, Timestamp
from tuf.ngclient import FetcherInterface, Updater

from pipelines.edge.tuf_repo import (
    DEFAULT_EXPIRY,
    TufError,
    TufRepository,
    load_signer,
)
from pipelines.keys import ensure_demo_tuf_keys, generate_key_pair
from pipelines.storage import ObjectStore

GROUP = "groups/loan-tablets-eu.json"
SHA = hashlib.sha256(b"model").hexdigest()
MODEL = f"models/adult-income/{SHA}/model.onnx"


class LocalFetcher(FetcherInterface):
    """Serves file:// URLs; a missing file is an HTTP 404, which ends the client's root probing."""

    def _fetch(self, url: str):
        path = Path(unquote(urlparse(url).path))
        if not path.is_file():
            raise DownloadHTTPError(f"{url} not found", 404)
        return iter([path.read_bytes()])


class Clock:
    def __init__(self):
        self.now = datetime.now(timezone.utc).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now


def _new_key(folder: Path, name: str) -> Path:
    generate_key_pair(folder / f"{name}.key", folder / f"{name}.pub")
    return folder / f"{name}.key"


@pytest.fixture
def keys(tmp_path) -> dict[str, Path]:
    found = ensure_demo_tuf_keys(tmp_path / "keys")
    assert ensure_demo_tuf_keys(tmp_path / "keys") == found, "safe to call again"
    found["targets"] = _new_key(tmp_path / "keys", "targets")
    return found


def _online(keys: dict[str, Path]) -> dict[str, Path]:
    return {"targets_key": keys["targets"], "snapshot_key": keys["snapshot"], "timestamp_key": keys["timestamp"]}


def _repo(tmp_path, keys, **options) -> TufRepository:
    repo = TufRepository(ObjectStore(tmp_path.joinpath("store").as_uri()), **options)
    repo.initialize([keys["root"]], keys["targets"], keys["snapshot"], keys["timestamp"])
    return repo


def _updater(tmp_path, repo: TufRepository, device: str = "device") -> Updater:
    metadata_dir, target_dir = tmp_path / device / "metadata", tmp_path / device / "targets"
    metadata_dir.mkdir(parents=True, exist_ok=True)
    target_dir.mkdir(parents=True, exist_ok=True)
    base = repo.store.uri(repo.prefix)
    return Updater(str(metadata_dir), f"{base}/metadata/", str(target_dir), f"{base}/targets/",
                   fetcher=LocalFetcher(), bootstrap=repo.trusted_root())


def _download(updater: Updater, path: str) -> bytes | None:
    """The target's bytes as a device gets them (refresh first), None when not published."""
    updater.refresh()
    info = updater.get_targetinfo(path)
    return None if info is None else Path(updater.download_target(info)).read_bytes()


def _files(tmp_path) -> dict[str, bytes]:
    store = tmp_path / "store"
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in store.rglob("*") if p.is_file()}


def _metadata(tmp_path, name: str) -> Metadata:
    return Metadata.from_bytes((tmp_path / "store" / "tuf" / "metadata" / name).read_bytes())


def test_initialize_publish_and_a_client_downloads(tmp_path, keys):
    repo = TufRepository(ObjectStore(tmp_path.joinpath("store").as_uri()))
    assert not repo.exists()
    repo.initialize([keys["root"]], keys["targets"], keys["snapshot"], keys["timestamp"])
    assert repo.exists() and repo.targets() == {}
    with pytest.raises(TufError, match="already exists"):
        repo.initialize([keys["root"]], keys["targets"], keys["snapshot"], keys["timestamp"])
    content = {GROUP: b'{"model": "adult-income"}', MODEL: b"onnx bytes", f"{MODEL}.sig": b"bundle"}

    report = repo.publish(content, **_online(keys))

    assert report.changed and report.added == sorted(content) and report.removed == [] and report.bins == 0
    assert (report.targets_version, report.snapshot_version, report.timestamp_version) == (2, 2, 2)
    assert "3 added" in report.line()
    files = _files(tmp_path)
    group_sha = hashlib.sha256(content[GROUP]).hexdigest()
    assert files[f"tuf/targets/groups/{group_sha}.loan-tablets-eu.json"] == content[GROUP]
    assert files["tuf/metadata/1.root.json"] == repo.trusted_root() == files["tuf/metadata/root.json"]
    assert not any(b"PRIVATE KEY" in data for data in files.values()), "no secret in the store"
    root = Metadata[Root].from_bytes(repo.trusted_root()).signed
    assert root.consistent_snapshot and root.roles["root"].threshold == 1
    timestamp = _metadata(tmp_path, "timestamp.json").signed
    assert timestamp.snapshot_meta.length == len(files["tuf/metadata/2.snapshot.json"])
    assert _metadata(tmp_path, "2.snapshot.json").signed.meta["targets.json"].hashes["sha256"] == \
        hashlib.sha256(files["tuf/metadata/2.targets.json"]).hexdigest()

    updater = _updater(tmp_path, repo)
    assert _download(updater, GROUP) == content[GROUP]
    assert _download(_updater(tmp_path, repo), f"{MODEL}.sig") == b"bundle"
    assert repo.read_target(MODEL) == b"onnx bytes"


def test_republishing_the_same_targets_writes_nothing(tmp_path, keys):
    repo = _repo(tmp_path, keys)
    content = {GROUP: b"{}", MODEL: b"onnx"}
    repo.publish(content, **_online(keys))
    before = _files(tmp_path)

    again = repo.publish(dict(content), **_online(keys))
    kept = repo.publish(repo.targets(), **_online(keys))  # TargetFiles: the model is not re-read
    mixed = repo.publish({GROUP: b"{}", MODEL: repo.targets()[MODEL]}, **_online(keys))

    assert [r.changed for r in (again, kept, mixed)] == [False, False, False]
    assert again.line().startswith("TUF unchanged") and again.targets_version == 2
    assert _files(tmp_path) == before


def test_a_changed_target_bumps_versions_and_the_client_follows(tmp_path, keys):
    repo = _repo(tmp_path, keys)
    repo.publish({GROUP: b"v1", MODEL: b"onnx"}, **_online(keys))
    assert _download(_updater(tmp_path, repo), GROUP) == b"v1"

    report = repo.publish({GROUP: b"v2", MODEL: repo.targets()[MODEL]}, **_online(keys))

    assert report.changed and report.updated == [GROUP] and report.added == report.removed == []
    assert (report.targets_version, report.snapshot_version, report.timestamp_version) == (3, 3, 3)
    assert _download(_updater(tmp_path, repo), GROUP) == b"v2"
    assert repo.read_target(GROUP) == b"v2"

    dropped = repo.publish({MODEL: repo.targets()[MODEL]}, **_online(keys))
    assert dropped.removed == [GROUP]
    assert _download(_updater(tmp_path, repo), GROUP) is None
    assert (tmp_path / "store/tuf/metadata/3.targets.json").is_file(), "old versions stay for clients mid-update"


def test_hashed_bins_past_the_threshold_and_back(tmp_path, keys):
    repo = _repo(tmp_path, keys, bins_threshold=8)
    many = {f"groups/g{i:02d}.json": f"group {i}".encode() for i in range(40)}

    report = repo.publish(many, **_online(keys))

    assert report.bins == 16
    top = _metadata(tmp_path, f"{report.targets_version}.targets.json").signed
    assert top.targets == {} and top.delegations.succinct_roles.bit_length == 4
    assert len([name for name in _files(tmp_path) if ".bins-" in name]) == 16
    for path in ("groups/g00.json", "groups/g17.json", "groups/g39.json"):
        assert _download(_updater(tmp_path, repo), path) == many[path]
    assert repo.read_target("groups/g21.json") == b"group 21" and len(repo.targets()) == 40

    before = _files(tmp_path)
    changed = repo.publish({**many, "groups/g05.json": b"changed"}, **_online(keys))
    new_files = sorted(_files(tmp_path).keys() - before.keys())
    assert changed.targets_version == report.targets_version, "same delegation: targets untouched"
    assert len([n for n in new_files if ".bins-" in n]) == 1 and any(".snapshot." in n for n in new_files)
    assert _download(_updater(tmp_path, repo), "groups/g05.json") == b"changed"

    few = repo.publish({p: many[p] for p in list(many)[:5]}, **_online(keys))
    assert few.bins == 0 and len(few.removed) == 35
    assert _download(_updater(tmp_path, repo), "groups/g01.json") == b"group 1"
    assert _download(_updater(tmp_path, repo), "groups/g30.json") is None

    back = repo.publish(many, **_online(keys))
    assert back.bins == 16
    assert _download(_updater(tmp_path, repo), "groups/g30.json") == b"group 30"
    assert _download(_updater(tmp_path, repo, "new-device"), "groups/g05.json") == b"group 5"


def test_timestamp_refresh_near_expiry(tmp_path, keys):
    clock = Clock()
    repo = _repo(tmp_path, keys, clock=clock)
    repo.publish({GROUP: b"{}"}, **_online(keys))
    start = clock.now

    clock.now = start + timedelta(hours=1)
    assert not repo.refresh_timestamp(keys["snapshot"], keys["timestamp"]).changed

    clock.now = start + timedelta(hours=13)  # within half a day of the one-day expiry
    refreshed = repo.refresh_timestamp(keys["snapshot"], keys["timestamp"])
    assert refreshed.changed and (refreshed.timestamp_version, refreshed.snapshot_version) == (3, 2)
    timestamp = _metadata(tmp_path, "timestamp.json")
    assert timestamp.signed.expires == clock.now + DEFAULT_EXPIRY["timestamp"]
    root = Metadata[Root].from_bytes(repo.trusted_root()).signed
    root.verify_delegate(Timestamp.type, timestamp.signed_bytes, timestamp.signatures)
    assert not repo.refresh_timestamp(keys["snapshot"], keys["timestamp"]).changed
    assert repo.refresh_timestamp(keys["snapshot"], keys["timestamp"], force=True).timestamp_version == 4

    clock.now = start + timedelta(hours=30)  # unchanged targets, timestamp due: only a new timestamp
    before = _files(tmp_path)
    report = repo.publish({GROUP: b"{}"}, **_online(keys))
    assert report.changed and (report.targets_version, report.snapshot_version, report.timestamp_version) == (2, 2, 5)
    after = _files(tmp_path)
    assert after.keys() == before.keys()
    assert [k for k in after if after[k] != before[k]] == ["tuf/metadata/timestamp.json"]

    clock.now = start + timedelta(days=4)  # the 7-day snapshot is within its margin too
    both = repo.refresh_timestamp(keys["snapshot"], keys["timestamp"])
    assert (both.snapshot_version, both.timestamp_version) == (3, 6)
    snapshot = _metadata(tmp_path, "3.snapshot.json")
    root.verify_delegate(Snapshot.type, snapshot.signed_bytes, snapshot.signatures)
    assert snapshot.signed.expires == clock.now + DEFAULT_EXPIRY["snapshot"]
    assert repo.refresh_timestamp(keys["snapshot"], keys["timestamp"], margin=timedelta(minutes=5)).changed is False


def test_root_rotation_revokes_a_leaked_timestamp_key(tmp_path, keys):
    repo = _repo(tmp_path, keys)
    repo.publish({GROUP: b"before"}, **_online(keys))
    assert _download(_updater(tmp_path, repo), GROUP) == b"before"  # the device trusts root v1
    new_timestamp = _new_key(tmp_path / "keys", "timestamp-2")

    version = repo.rotate_root([keys["root"]], replace={"timestamp": new_timestamp.with_suffix(".pub")},
                               **{**_online(keys), "timestamp_key": new_timestamp})

    assert version == 2
    v1 = Metadata[Root].from_bytes(repo.trusted_root()).signed
    v2 = _metadata(tmp_path, "2.root.json")
    assert v2.signed.get_root_verification_result(v1, v2.signed_bytes, v2.signatures).verified
    assert _files(tmp_path)["tuf/metadata/root.json"] == _files(tmp_path)["tuf/metadata/2.root.json"]
    assert load_signer(keys["timestamp"]).public_key.keyid not in v2.signed.keys
    repo.publish({GROUP: b"after"}, **{**_online(keys), "timestamp_key": new_timestamp})
    assert _download(_updater(tmp_path, repo), GROUP) == b"after"
    assert Metadata.from_file(str(tmp_path / "device/metadata/root.json")).signed.version == 2

    # An attacker with the old timestamp key serves a newer timestamp: refused.
    forged = _metadata(tmp_path, "timestamp.json")
    forged.signed.version += 1
    forged.sign(load_signer(keys["timestamp"]))
    (tmp_path / "store/tuf/metadata/timestamp.json").write_bytes(forged.to_bytes())
    for device in ("device", "new-device"):
        with pytest.raises(UnsignedMetadataError):
            _updater(tmp_path, repo, device).refresh()

    with pytest.raises(TufError, match="timestamp key of root v2"):  # the revoked key no longer signs
        repo.refresh_timestamp(keys["snapshot"], keys["timestamp"], force=True)


def test_rotating_root_and_online_keys(tmp_path, keys):
    repo = _repo(tmp_path, keys, bins_threshold=8)
    many = {f"models/m/{i}/model.onnx": f"model {i}".encode() for i in range(12)}
    assert repo.publish(many, **_online(keys)).bins == 4
    _download(_updater(tmp_path, repo), "models/m/3/model.onnx")
    new_root = _new_key(tmp_path / "keys", "root-2")
    new_snapshot = _new_key(tmp_path / "keys", "snapshot-2")
    new_targets = _new_key(tmp_path / "keys", "targets-2")

    assert repo.rotate_root([keys["root"]], [new_root], replace={"snapshot": new_snapshot, "targets": new_targets},
                            **_online(keys)) == 2

    v1 = Metadata[Root].from_bytes(repo.trusted_root()).signed
    v2 = _metadata(tmp_path, "2.root.json")
    result = v2.signed.get_root_verification_result(v1, v2.signed_bytes, v2.signatures)
    assert result.verified and len(v2.signatures) == 2, "signed by the old and the new root key"
    assert _metadata(tmp_path, "timestamp.json").signed.version == 3, "re-signed with the new keys"
    new_keys = {"targets_key": new_targets, "snapshot_key": new_snapshot, "timestamp_key": keys["timestamp"]}
    assert not repo.publish(repo.targets(), **new_keys).changed
    assert _download(_updater(tmp_path, repo), "models/m/3/model.onnx") == b"model 3"
    bin_md = _metadata(tmp_path, f"{repo.publish(many, **new_keys).targets_version}.targets.json")
    assert set(bin_md.signed.delegations.keys) == {load_signer(new_targets).public_key.keyid}

    with pytest.raises(TufError, match="wrong key for targets"):
        repo.publish(many, **_online(keys))
    with pytest.raises(TufError, match="is not a root key of root v2"):
        repo.rotate_root([keys["root"]], **new_keys)
    assert repo.rotate_root([new_root], **new_keys) == 3
    assert _download(_updater(tmp_path, repo, "new-device"), "models/m/11/model.onnx") == b"model 11"


def test_caller_errors_are_one_line_tuf_errors(tmp_path, keys):
    store = ObjectStore(tmp_path.joinpath("store").as_uri())
    absent = TufRepository(store, prefix="elsewhere")
    errors = []
    with pytest.raises(TufError, match="no TUF repository") as caught:
        absent.publish({GROUP: b"{}"}, **_online(keys))
    errors.append(caught.value)
    repo = _repo(tmp_path, keys)
    repo.publish({GROUP: b"{}"}, **_online(keys))

    cases = [
        ("wrong key for targets", dict(targets_key=keys["snapshot"]), {GROUP: b"{}"}),
        ("missing.key", dict(timestamp_key=tmp_path / "missing.key"), {GROUP: b"{}"}),
        ("not an unencrypted PEM private key", dict(snapshot_key=keys["root"].with_suffix(".pub")), {GROUP: b"{}"}),
        ("invalid target path", {}, {"../escape.json": b"x"}),
        ("expected bytes or a TargetFile", {}, {GROUP: "text"}),
    ]
    for message, key_overrides, content in cases:
        with pytest.raises(TufError, match=message) as caught:
            repo.publish(content, **{**_online(keys), **key_overrides})
        errors.append(caught.value)

    elsewhere = _repo(tmp_path / "other", keys)
    elsewhere.publish({MODEL: b"only there"}, **_online(keys))
    with pytest.raises(TufError, match="is not in the store") as caught:  # a TargetFile whose file is absent here
        repo.publish({MODEL: elsewhere.targets()[MODEL]}, **_online(keys))
    errors.append(caught.value)
    with pytest.raises(TufError, match="not published") as caught:
        repo.read_target("groups/none.json")
    errors.append(caught.value)

    (tmp_path / "store/tuf/metadata/2.snapshot.json").unlink()  # a store failure
    with pytest.raises(TufError, match="2.snapshot.json") as caught:
        repo.publish({GROUP: b"{}"}, **_online(keys))
    errors.append(caught.value)
    assert all("\n" not in str(error) for error in errors)


def test_s3_store(monkeypatch, s3_endpoint, tmp_path, keys):
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="tuf-repo")
    # Devices read the repository anonymously, as from a public bucket or a CDN in front of it.
    s3.put_bucket_policy(Bucket="tuf-repo", Policy=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::tuf-repo/*"}]}))
    repo = TufRepository(ObjectStore("s3://tuf-repo/releases", s3_endpoint), bins_threshold=4)
    repo.initialize([keys["root"]], keys["targets"], keys["snapshot"], keys["timestamp"])
    content = {f"groups/g{i}.json": f"group {i}".encode() for i in range(6)} | {MODEL: b"onnx"}

    report = repo.publish(content, **_online(keys))

    assert report.changed and report.bins > 0
    assert repo.read_target(MODEL) == b"onnx"
    assert not repo.publish(repo.targets(), **_online(keys)).changed
    # A device over plain HTTP (python-tuf's default fetcher) against the bucket.
    base = f"{s3_endpoint}/tuf-repo/releases/tuf"
    (tmp_path / "device").mkdir()
    updater = Updater(str(tmp_path / "device"), f"{base}/metadata/", str(tmp_path / "device"), f"{base}/targets/",
                      bootstrap=repo.trusted_root())
    assert _download(updater, "groups/g4.json") == b"group 4"
    with pytest.raises(TufError, match="no TUF repository"):
        TufRepository(ObjectStore("s3://tuf-repo/absent", s3_endpoint)).targets()


def test_targets_are_checked_when_read(tmp_path, keys):
    repo = _repo(tmp_path, keys)
    repo.publish({GROUP: b"genuine"}, **_online(keys))
    stored = next((tmp_path / "store/tuf/targets/groups").iterdir())
    stored.write_bytes(b"altered")
    with pytest.raises(TufError, match="does not match"):
        repo.read_target(GROUP)
    with pytest.raises(RepositoryError):  # the client refuses it too (LengthOrHashMismatchError)
        _download(_updater(tmp_path, repo), GROUP)
