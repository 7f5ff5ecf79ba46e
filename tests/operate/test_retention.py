"""Audit retention: a deployed version keeps its audit trail, a retired one keeps it for its
window, and the job removes only what expired, records what it removed, and never asks an
S3 store with Object Lock to remove a locked object early."""

import json
import os
import time
from datetime import datetime, timedelta, timezone

import boto3
import pytest
from conftest import release_twice, write_spec

from pipelines.__main__ import main
from pipelines.operate.retention import apply_retention, plan_retention, record_key
from pipelines.settings import Settings
from pipelines.storage import ObjectStore, StoreError

MODEL = "small-model"


def _age(store_root, keys, moment: datetime) -> None:
    """Make stored files look written at `moment` (a local store dates objects by mtime)."""
    for key in keys:
        os.utime(store_root / key, (moment.timestamp(), moment.timestamp()))


def _items(plan, rule):
    return {item.location: item for item in plan.by_rule(rule)}


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """Two released versions of a small model (v2 deployed, v1 retired by the second commit),
    made once for the module in a state folder of its own."""
    folder = tmp_path_factory.mktemp("retention")
    previous = os.environ.get("EDGE_STATE_DIR")
    os.environ["EDGE_STATE_DIR"] = str(folder / "state")
    try:
        release_twice(folder, MODEL)
    finally:
        os.environ["EDGE_STATE_DIR"] = previous
    return folder / "state"


@pytest.fixture
def state(released, tmp_path, monkeypatch):
    """A copy of the two releases for one test (the tests remove things)."""
    import shutil

    copy = tmp_path / "state"
    shutil.copytree(released, copy, symlinks=True)
    monkeypatch.setenv("EDGE_STATE_DIR", str(copy))
    return copy


def test_deployed_kept_retired_by_its_window_expired_removed(state, capsys):
    settings = Settings()
    store = ObjectStore(settings.store_url)
    root = store.local_path("")
    start = datetime.now(timezone.utc)
    plan = plan_retention(settings, start)
    assert plan.deployed == {MODEL: ["2"]}
    releases = {i.location: i for i in plan.items if i.kind == "release"}
    v1 = next(loc for loc, i in releases.items() if i.versions == ["1"])
    v2 = next(loc for loc, i in releases.items() if i.versions == ["2"])
    assert releases[v2].rule == "deployed" and releases[v1].rule == "within_window"
    assert {i.rule for i in plan.items if i.kind == "attempt" and i.versions == ["2"]} == {"deployed"}

    # Two years old on disk: the deployed version keeps everything; the retired one's clock
    # starts when the GitOps branch stopped deploying it (the second commit, minutes ago).
    everything = store.list_keys("")
    _age(root, [k for k in everything if k.startswith(("runs/", "releases/"))], start - timedelta(days=730))
    plan = plan_retention(settings, start + timedelta(days=10))
    assert releases[v2].location in _items(plan, "deployed")
    assert _items(plan, "within_window")[v1].clock_from >= start - timedelta(minutes=30)
    assert not plan.by_rule("expired")

    # A rejected version written 390 days from now, judged at 400 days: within its window.
    rejected = "runs/small-model/" + "f" * 64 + "/"
    store.put_bytes(json.dumps({"model_version": "3", "status": "rejected", "artifact_sha256": "e" * 64}).encode(),
                    rejected + "summary.json")
    store.put_bytes(b"{}", rejected + "evaluations/" + "a" * 64 + "/gates/quality.json")
    _age(root, store.list_keys(rejected), start + timedelta(days=390))
    later = start + timedelta(days=400)
    plan = plan_retention(settings, later)
    assert set(_items(plan, "expired")) >= {v1} and v2 in _items(plan, "deployed")
    assert rejected in _items(plan, "within_window")
    expired_keys = {k for item in plan.by_rule("expired") for k in item.keys}
    assert any("/evidence/" in k for k in expired_keys) and any(k.endswith("model_card.json") for k in expired_keys)
    assert any(k.startswith(f"releases/{MODEL}/attempts/") for k in expired_keys)

    # A dry run deletes nothing and writes nothing.
    assert main(["retention", "--dry-run", "--now", later.isoformat()]) == 0
    out = capsys.readouterr().out
    assert "(dry run: nothing deleted)" in out and f"would delete {len(expired_keys)} objects" in out
    assert store.list_keys("") == sorted(everything + store.list_keys(rejected))
    assert not store.exists(record_key(later))

    result = apply_retention(settings, later)
    assert set(result.deleted) == expired_keys and not result.refused
    left = store.list_keys("")
    assert not expired_keys & set(left)
    assert set(left) == set(everything + store.list_keys(rejected)) - expired_keys | {record_key(later)}
    assert not (root / v1).exists(), "an emptied release folder goes too"
    untouched = [k for k in everything if k.startswith(("models/", "tuf/", f"releases/{MODEL}/latest"))]
    assert untouched and set(untouched) <= set(left)
    record = json.loads(store.read_bytes(record_key(later)))
    assert {e["key"] for e in record["deleted"]} == expired_keys
    assert {e["rule"] for e in record["deleted"]} == {"expired"}
    assert v2 in record["kept"]["deployed"] and rejected in record["kept"]["within_window"]

    # Again at the same time (a retried task): nothing more goes, the record keeps the first try's.
    again = apply_retention(settings, later)
    assert again.deleted == [] and again.record_uri == result.record_uri
    assert {e["key"] for e in json.loads(store.read_bytes(record_key(later)))["deleted"]} == expired_keys


def test_a_model_without_spec_keeps_its_snapshots_window(state, tmp_path, monkeypatch):
    """The spec file is gone: the windows of the spec snapshots its releases stored decide."""
    monkeypatch.setenv("EDGE_SPECS_DIR", str(tmp_path / "no-specs"))
    (tmp_path / "no-specs").mkdir()
    plan = plan_retention(Settings(), datetime.now(timezone.utc))
    assert {i.window_days for i in plan.items} == {365}


def test_the_command_line_refuses_a_bad_time(state, capsys):
    assert main(["retention", "--now", "yesterday"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --now: 'yesterday' is not an ISO time") and "Traceback" not in err


@pytest.fixture
def aws(monkeypatch, s3_endpoint):
    for name, value in {"AWS_ACCESS_KEY_ID": "AKIAEDGETEST", "AWS_SECRET_ACCESS_KEY": "edge-test-secret",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    return boto3.client("s3", endpoint_url=s3_endpoint)


def test_s3_object_lock_holds_evidence_and_the_job_plans_around_it(aws, s3_endpoint, tmp_path, monkeypatch):
    aws.create_bucket(Bucket="locked-evidence", ObjectLockEnabledForBucket=True)
    specs = tmp_path / "specs"
    specs.mkdir()
    fairness = {"biasScore": 0.2, "equalizedOdds": 0.25}
    write_spec(specs, "short-model", "data.csv", responsibleAI={"auditRetentionDays": 1, "fairness": fairness})
    write_spec(specs, "long-model", "data.csv", responsibleAI={"auditRetentionDays": 30, "fairness": fairness})
    monkeypatch.setenv("EDGE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("EDGE_SPECS_DIR", str(specs))
    monkeypatch.setenv("EDGE_ARTIFACT_STORE", "s3://locked-evidence/edge")
    monkeypatch.setenv("EDGE_S3_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("EDGE_OBJECT_LOCK_MODE", "governance")
    settings = Settings()
    assert settings.object_lock_mode == "governance"
    store = ObjectStore(settings.store_url, s3_endpoint, object_lock=settings.object_lock_mode)
    now = datetime.now(timezone.utc)
    short, long = "runs/short-model/" + "1" * 64 + "/", "runs/long-model/" + "2" * 64 + "/"
    evidence = "evaluations/" + "e" * 64 + "/evidence/fairness/report.json"
    # A rejected release of each model; the short one's lock (2 s here) runs out during the test.
    store.put_bytes(b'{"model_version": "1", "status": "rejected"}', short + "summary.json",
                    retain_until=now + timedelta(seconds=2))
    store.put_bytes(b'{"model_version": "1", "status": "rejected"}', long + "summary.json",
                    retain_until=now + timedelta(days=30))
    store.put_bytes(b"evidence", long + evidence, retain_until=now + timedelta(days=30))
    head = aws.head_object(Bucket="locked-evidence", Key=f"edge/{long}{evidence}")
    assert head["ObjectLockMode"] == "GOVERNANCE"
    assert head["ObjectLockRetainUntilDate"] > now + timedelta(days=29)
    unlocked = ObjectStore(settings.store_url, s3_endpoint)  # no lock mode: retain_until is not enforced
    unlocked.put_bytes(b"x", "scratch/free.json", retain_until=now + timedelta(days=30))
    assert unlocked.retained_until("scratch/free.json") is None

    # The store refuses to remove a locked object before its date (no bypass is ever asked).
    with pytest.raises(StoreError, match="AccessDenied"):
        store.delete(long + evidence)
    assert store.exists(long + evidence)

    # The plan's expiry is never before an object's lock: the job plans from dates.
    time.sleep(2.5)
    later = now + timedelta(days=1, minutes=1)
    plan = plan_retention(settings, later)
    assert {i.location: i.rule for i in plan.items} == {short: "expired", long: "within_window"}
    for item in plan.items:
        for key in item.keys:
            assert store.retained_until(key) <= item.expires_at + timedelta(seconds=1)

    # Past its lock, an expired object goes without any bypass; the locked one is never tried.
    result = apply_retention(settings, later)
    assert result.deleted == [short + "summary.json"] and result.refused == {}
    assert not store.exists(short + "summary.json") and store.exists(long + evidence)
    assert aws.list_object_versions(Bucket="locked-evidence", Prefix=f"edge/{short}").get("Versions", []) == []
    record = aws.head_object(Bucket="locked-evidence", Key=f"edge/{record_key(later)}")
    assert record["ObjectLockMode"] == "GOVERNANCE", "the run's record is audit evidence too"
