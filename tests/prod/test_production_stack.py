"""`make test-prod`: the production profile, natively on this machine (stack/prod_stack.py).

Airflow's metadata on PostgreSQL and its tasks on Celery workers fed through Redis, MLflow as a
server on PostgreSQL with its artifacts in S3, the artifact and telemetry stores in that S3
(moto's server over HTTP), the GitOps remote behind `git daemon`. The release code is the
embedded set-up's; the checks are the embedded integration test's (tests/release_checks.py).
Releases start from the REST API, as from the UI.
"""

from __future__ import annotations

import os
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from release_checks import check_release

from pipelines import registry
from pipelines.settings import Settings

pytestmark = pytest.mark.prod

DEMO = ("adult-income", "digit-recognizer")  # the demo specs, without their cron schedule
# Four more releases at once: each demo spec twice under names of their own.
PARALLEL = tuple(f"{model}-{n}" for model in DEMO for n in ("p1", "p2"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from stack.prod_stack import POSTGRES_URL, REDIS_URL, ProductionStack, demo_spec_copies

    root = tmp_path_factory.mktemp("prod")
    specs = demo_spec_copies(root / "specs", (*DEMO, *PARALLEL))
    stack = ProductionStack(root / "stack", root / "specs", concurrency=4,
                            postgres_url=os.environ.get("EDGE_TEST_POSTGRES_URL", POSTGRES_URL),
                            redis_url=os.environ.get("EDGE_TEST_REDIS_URL", REDIS_URL))
    stack.spec_paths = specs
    started = time.monotonic()
    with pytest.MonkeyPatch.context() as patch:
        # This process reads the stores, MLflow and Git with the workers' settings.
        for key, value in stack.edge_env.items():
            patch.setenv(key, value)
        with stack:
            stack.started_in = time.monotonic() - started
            yield stack


def _release_at_once(stack, models) -> tuple[dict[str, dict], float]:
    """Trigger every model's release DAG, then wait for all; (finished runs, wall seconds)."""
    airflow = stack.airflow
    for model in models:
        airflow.wait_dag(f"edge_release__{model}")
    began = time.monotonic()
    started = {model: airflow.trigger(f"edge_release__{model}", {"reason": "production profile test"})
               for model in models}
    runs = {model: airflow.wait_run(f"edge_release__{model}", run["dag_run_id"], timeout=1500)
            for model, run in started.items()}
    seconds = time.monotonic() - began
    for model, run in runs.items():
        states = {ti["task_id"]: ti["state"] for ti in airflow.task_instances(f"edge_release__{model}",
                                                                                  run["dag_run_id"])}
        assert run["state"] == "success", (model, states, f"logs in {stack.root}")
    return runs, seconds


def _metadata(stack, query: str, *args) -> list[tuple]:
    """Rows of Airflow's metadata database (PostgreSQL)."""
    import psycopg2

    from stack.prod_stack import _database_url

    url = _database_url(stack.postgres_url, stack.databases["airflow"]).replace("+psycopg2", "")
    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute(query, args)
        return cursor.fetchall()


def _s3_keys(stack, bucket: str) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=stack.s3_url)
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return keys


def test_both_demo_specs_release_at_once_on_the_production_stack(stack):
    runs, seconds = _release_at_once(stack, DEMO)
    settings = Settings()
    assert settings.store_url.startswith("s3://") and settings.remote.startswith("git://")
    assert settings.tracking_uri.startswith("http://127.0.0.1:")
    for model in DEMO:
        check_release(settings, stack.spec_paths[model])

    # Airflow kept its state in PostgreSQL, and the Celery workers ran every task from this
    # stack's queue and left their results in the Celery result backend there.
    rows = _metadata(stack, "SELECT dag_id, state FROM dag_run WHERE dag_id = ANY(%s)",
                     [f"edge_release__{model}" for model in DEMO])
    assert sorted(rows) == [(f"edge_release__{model}", "success") for model in DEMO]
    queues = _metadata(stack, "SELECT DISTINCT queue FROM task_instance WHERE dag_id = ANY(%s)",
                       [f"edge_release__{model}" for model in DEMO])
    assert queues == [(stack.queue,)]
    [(succeeded,)] = _metadata(stack, "SELECT count(*) FROM celery_taskmeta WHERE status = 'SUCCESS'")
    [(ran,)] = _metadata(stack, "SELECT count(*) FROM task_instance WHERE state = 'success' AND dag_id = ANY(%s)",
                         [f"edge_release__{model}" for model in DEMO])
    assert succeeded >= ran > 10

    # MLflow's server wrote the versions' files to its S3 bucket (clients sent them through it).
    mlflow_keys = _s3_keys(stack, "edge-mlflow-artifacts")
    assert sum(key.endswith("/model.onnx") for key in mlflow_keys) >= len(DEMO), mlflow_keys[:20]
    print(f"\nproduction stack up in {stack.started_in:.0f} s; both demo releases at once: {seconds:.0f} s")


def test_a_fleet_updates_over_http_from_the_tuf_repository_and_reports_telemetry_to_s3(stack):
    """Devices take their group's signed desired state and the ONNX files over plain HTTP from
    the TUF repository in the S3 store (every byte verified), and write their telemetry to the
    S3 telemetry store; one device on Git checks the attested manifests over git://."""
    from pipelines.edge.simulator import Fleet
    from pipelines.edge.telemetry import read_records
    from pipelines.storage import ObjectStore

    settings = Settings()
    began = datetime.now(timezone.utc) - timedelta(seconds=1)
    assert settings.device_tuf_url.startswith("tuf+http://127.0.0.1:")
    fleet = Fleet(12, settings, seed=3)
    fleet.poll_round()
    record = fleet.poll_round()
    assert record["states"].get("failed", 0) == 0 and record["states"].get("refused", 0) == 0, record
    assert record["source_bytes_per_device"]["max"] < 1000, record  # a quiet poll: one 304
    assert set(record["models"]) >= set(DEMO), record
    for model in DEMO:
        assert record["models"][model]["selected"] > 0
        assert record["models"][model]["on_desired"] == record["models"][model]["selected"], record
    served = fleet.serve_round(5)
    fleet.poll_round()  # reports the served window
    store = ObjectStore(settings.telemetry_url, settings.s3_endpoint_url)
    assert settings.telemetry_url.startswith("s3://edge-telemetry/")
    for model in DEMO:
        inference = read_records(store, model, began, kind="inference")
        assert inference and all(r["model"] == model for r in inference)
        assert sum(v["requests"] for v in served[model].values()) == 5 * record["models"][model]["selected"]
    assert any(key.startswith("fleet/telemetry/") for key in _s3_keys(stack, "edge-telemetry"))
    # An operator's device on Git: the attested manifests over git://, the files from S3.
    from pipelines.edge.agent import EdgeAgent
    from pipelines.edge.sources import GitDesiredState

    folder = settings.state / "git-device"
    git_device = EdgeAgent(
        "git-device-1", {"apexlogic.dev/device-class": "android-tablet", "apexlogic.dev/app": "loan-advisor"},
        folder, GitDesiredState(settings.remote, settings.gitops_branch, folder / "gitops", settings.store_url,
                                settings.signing_public_key, settings.s3_endpoint_url),
        settings.signing_public_key, settings.telemetry_url, settings.s3_endpoint_url)
    states = {r.model: r.state for r in git_device.poll_once()}
    assert states.get("adult-income") == "active" and not {"failed", "refused"} & set(states.values()), states


def test_four_releases_in_parallel_lose_no_commit_and_no_version(stack):
    from pipelines.gitops import repo

    settings = Settings()
    before = repo.log(settings.remote, settings.gitops_branch, settings.work_dir / "check")
    runs, seconds = _release_at_once(stack, PARALLEL)
    for model in PARALLEL:
        check_release(settings, stack.spec_paths[model])
        versions = registry.client(settings.tracking_uri).search_model_versions(f"name = '{model}'")
        assert [str(v.version) for v in versions] == ["1"], model

    after = repo.log(settings.remote, settings.gitops_branch, settings.work_dir / "check")
    new = after[:len(after) - len(before)]
    assert len(new) == len(PARALLEL), [c["subject"] for c in new]
    touched = {model for model in PARALLEL for c in new if model in c["subject"]}
    assert touched == set(PARALLEL), [c["subject"] for c in new]

    # The four ran at the same time: their training tasks overlapped on the workers.
    windows = _metadata(stack, "SELECT dag_id, start_date, end_date FROM task_instance "
                               "WHERE task_id = 'train' AND dag_id = ANY(%s)",
                        [f"edge_release__{model}" for model in PARALLEL])
    assert len(windows) == len(PARALLEL)
    overlapping = max(sum(1 for _, s, e in windows if s <= start < e) for _, start, _ in windows)
    assert overlapping >= 2, windows
    print(f"\nfour releases in parallel on the production stack: {seconds:.0f} s ({overlapping} trainings at once)")

    # The fleet of the earlier test updates over HTTP: the four new models reach their devices.
    from pipelines.edge.simulator import Fleet

    fleet = Fleet(12, settings, seed=3, keep=True)
    record = fleet.poll_round()
    assert not record["states"].get("failed") and not record["states"].get("refused"), record
    for model in PARALLEL:
        info = record["models"][model]
        assert info["selected"] > 0 and info["on_desired"] == info["selected"], (model, info)
    assert fleet.result()["downloads_per_device"]["total"] >= sum(record["models"][m]["selected"] for m in PARALLEL)
    quiet = fleet.poll_round()
    assert quiet["source_bytes_per_device"]["max"] < 1000 and set(quiet["states"]) == {"unchanged"}, quiet


def test_stopping_the_stack_stops_every_process_it_started(stack):
    pids = stack.pids
    assert set(pids) == {"api-server", "dag-processor", "scheduler", "celery-worker", "s3", "git-daemon", "mlflow"}
    stack.stop()
    alive = {name: pid for name, pid in pids.items() if _alive(pid)}
    assert not alive, alive
    import psycopg2

    with psycopg2.connect(stack.postgres_url) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (f"edge_{stack.token}_%",))
        assert cursor.fetchall() == []
    listening = subprocess.run(["git", "ls-remote", stack.gitops_remote], capture_output=True, timeout=30)
    assert listening.returncode != 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child would still answer: it has exited but not been reaped.
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "State:\tZ" not in status.read_text()
