"""The artifact store on a local folder and on S3 over real HTTP (moto's server)."""

import hashlib

import boto3
import pytest
from conftest import tabular_frame, write_spec

from pipelines import release
from pipelines.gitops import manifest
from pipelines.settings import Settings
from pipelines.storage import ObjectStore, StoreError


@pytest.fixture
def aws(monkeypatch, s3_endpoint):
    for name, value in {"AWS_ACCESS_KEY_ID": "AKIAEDGETEST", "AWS_SECRET_ACCESS_KEY": "edge-test-secret",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    return client


def test_local_store_round_trip(tmp_path):
    store = ObjectStore((tmp_path / "store").as_uri())
    uri = store.put_bytes(b"hello", "a/b.txt")
    assert store.exists("a/b.txt") and not store.exists("a/c.txt")
    assert store.key_of(uri) == "a/b.txt"
    assert store.read_bytes("a/b.txt") == b"hello"
    assert not list((tmp_path / "store" / "a").glob(".*")), "no temporary files left behind"
    with pytest.raises(StoreError, match="does not exist"):
        store.get_file("missing", tmp_path / "x")
    with pytest.raises(StoreError, match="unsupported artifact store URL"):
        ObjectStore("ftp://host/x")


def test_s3_store_round_trip(aws, s3_endpoint, tmp_path):
    aws.create_bucket(Bucket="roundtrip")
    store = ObjectStore("s3://roundtrip/prefix", endpoint_url=s3_endpoint)
    uri = store.put_bytes(b"payload", "k/v.bin")
    assert uri == "s3://roundtrip/prefix/k/v.bin"
    assert aws.get_object(Bucket="roundtrip", Key="prefix/k/v.bin")["Body"].read() == b"payload"
    assert store.exists("k/v.bin") and not store.exists("k/none")
    assert store.fetch("k/v.bin", tmp_path).read_bytes() == b"payload"


def test_release_with_data_and_artifacts_on_s3(aws, s3_endpoint, tmp_path, state, monkeypatch):
    aws.create_bucket(Bucket="edge-artifacts")
    aws.create_bucket(Bucket="edge-data")
    frame_path = tmp_path / "upload.csv"
    tabular_frame().to_csv(frame_path, index=False)
    aws.upload_file(str(frame_path), "edge-data", "tables/small.csv")
    monkeypatch.setenv("EDGE_ARTIFACT_STORE", "s3://edge-artifacts/releases")
    monkeypatch.setenv("EDGE_S3_ENDPOINT_URL", s3_endpoint)
    spec = write_spec(tmp_path, "s3-model", "s3://edge-data/tables/small.csv")

    summary = release.run_release(spec, trigger="test")

    assert summary.artifact_uri.startswith("s3://edge-artifacts/releases/models/s3-model/")
    key = summary.artifact_uri.removeprefix("s3://edge-artifacts/")
    body = aws.get_object(Bucket="edge-artifacts", Key=key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == summary.artifact_sha256
    import subprocess

    text = subprocess.run(["git", "--git-dir", Settings().remote, "show",
                           "main:apps/s3-model/base/mobileaimodeldeployment.yaml"],
                          capture_output=True, text=True, check=True).stdout
    assert manifest.read_manifest(text)["spec"]["modelRef"]["sourceUri"] == summary.artifact_uri
    assert "edge-test-secret" not in text
    assert not (Settings().state / "artifacts").exists(), "nothing went to the local store"


def test_telemetry_on_s3_is_listed_and_read_back_by_window(aws, s3_endpoint):
    from datetime import datetime, timedelta, timezone

    from pipelines.edge import telemetry

    aws.create_bucket(Bucket="edge-telemetry")
    store = ObjectStore("s3://edge-telemetry/fleet", s3_endpoint)
    start = datetime(2026, 11, 27, 23, 50, tzinfo=timezone.utc)
    for minutes in (0, 5, 20):  # the last one lands in the next day's partition
        window = telemetry.InferenceWindow("m", "1", "kiosks", 2)
        window.add(1.0, 1)
        telemetry.write_record(store, window.record("dev-1", {}, now=start + timedelta(minutes=minutes)))
    keys = store.list_keys("telemetry/m/")
    assert len(keys) == 3 and all(k.startswith("telemetry/m/2026-11-2") and "/kiosks/dev-1-" in k for k in keys)
    assert {k.split("/")[2] for k in keys} == {"2026-11-27", "2026-11-28"}
    records = telemetry.read_records(store, "m", start + timedelta(minutes=1), start + timedelta(hours=1))
    assert [r["ts"] for r in records] == [telemetry.timestamp(start + timedelta(minutes=m)) for m in (5, 20)]
    assert telemetry.cohort_stats(records).requests == 2


def test_error_text_is_one_line():
    from pipelines.errors import one_line

    assert one_line(ValueError("first\n  second\tthird")) == "first second third"
    assert one_line(TimeoutError()) == "TimeoutError" and one_line("") == "no detail"
    assert one_line("x" * 500, limit=10) == "x" * 9 + "…" and one_line("short", limit=10) == "short"
    assert len(one_line("y" * 5000)) == 5000  # no limit: the reason at the end stays


def test_local_store_lists_dates_and_deletes(tmp_path):
    store = ObjectStore((tmp_path / "store").as_uri(), object_lock="governance")
    store.put_bytes(b"a", "runs/m/k/evidence/x.json", retain_until=None)
    store.put_bytes(b"bb", "runs/m/k/other.json")
    (listed,) = [o for o in store.objects("runs/") if o.key == "runs/m/k/other.json"]
    assert listed.size == 2 and listed.modified.tzinfo is not None
    assert store.retained_until("runs/m/k/other.json") is None  # a local folder has no lock
    store.delete("runs/m/k/evidence/x.json")
    store.delete("runs/m/k/evidence/x.json")  # absent: nothing to do
    assert not (tmp_path / "store" / "runs" / "m" / "k" / "evidence").exists(), "an emptied folder goes"
    assert store.list_keys("runs/") == ["runs/m/k/other.json"]
    with pytest.raises(StoreError, match="unsupported object lock mode 'compliance'"):
        ObjectStore((tmp_path / "store").as_uri(), object_lock="compliance")


def test_s3_object_lock_refuses_an_early_delete(aws, s3_endpoint):
    from datetime import datetime, timedelta, timezone

    aws.create_bucket(Bucket="lockable", ObjectLockEnabledForBucket=True)
    store = ObjectStore("s3://lockable/p", endpoint_url=s3_endpoint, object_lock="governance")
    until = datetime.now(timezone.utc) + timedelta(days=7)
    store.put_bytes(b"v1", "ev/report.json", retain_until=until)
    store.put_bytes(b"free", "ev/free.json")
    assert abs(store.retained_until("ev/report.json") - until) < timedelta(seconds=1)
    with pytest.raises(StoreError, match="cannot delete s3://lockable/p/ev/report.json: .*AccessDenied"):
        store.delete("ev/report.json")
    assert store.read_bytes("ev/report.json") == b"v1"
    store.delete("ev/free.json")
    assert [o.key for o in store.objects("ev/")] == ["ev/report.json"]
    assert not aws.list_object_versions(Bucket="lockable", Prefix="p/ev/free.json").get("Versions")
