"""A drift event raised through the REST API starts a release run, on a separate embedded
Airflow (its own SQLite database) with a real scheduler, dag-processor and api-server bound to
127.0.0.1; the run records the drift figures as its trigger."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import tabular_frame, write_spec

pytestmark = pytest.mark.integration
AIRFLOW = str(Path(sys.executable).parent / "airflow")


def _wait(what: str, check, timeout: float, logs: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except (requests.RequestException, OSError):
            value = None  # still starting: refused, or accepted but not answering yet
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}; logs in {logs}")


def test_a_drift_event_starts_a_release_run(tmp_path):
    specs = tmp_path / "specs"
    specs.mkdir()
    tabular_frame().to_csv(specs / "data.csv", index=False)
    write_spec(specs, "drift-model", "data.csv")  # no schedule: drift events and people only
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow"), "EDGE_STATE_DIR": str(tmp_path / "state"),
           "EDGE_SPECS_DIR": str(specs), "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
           "AIRFLOW__CORE__PARALLELISM": "2", "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
           "AIRFLOW__API__HOST": "127.0.0.1", "AIRFLOW__API__PORT": str(port), "PYTHONWARNINGS": "ignore",
           "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/"}
    subprocess.run([AIRFLOW, "db", "migrate"], env=env, check=True, capture_output=True)
    logs = tmp_path / "logs"
    logs.mkdir()
    commands = {"api-server": [AIRFLOW, "api-server", "-H", "127.0.0.1", "-p", str(port), "--workers", "1"],
                "dag-processor": [AIRFLOW, "dag-processor"],
                "scheduler": [AIRFLOW, "scheduler", "--skip-serve-logs"]}
    processes = {name: subprocess.Popen(cmd, env=env, stdout=open(logs / f"{name}.log", "wb"),
                                        stderr=subprocess.STDOUT, start_new_session=True)
                 for name, cmd in commands.items()}
    base = f"http://127.0.0.1:{port}"
    dag_id = "edge_release__drift-model"
    try:
        _wait("the api-server", lambda: requests.get(f"{base}/api/v2/monitor/health", timeout=5).ok, 120, logs)
        password = json.loads((tmp_path / "airflow" / "simple_auth_manager_passwords.json.generated").read_text())
        token = requests.post(f"{base}/auth/token", json={"username": "admin", "password": password["admin"]},
                              timeout=10).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}

        def asset_id():
            found = requests.get(f"{base}/api/v2/assets", headers=headers, timeout=10,
                                 params={"uri_pattern": "edge-drift://drift-model"}).json()["assets"]
            return found[0]["id"] if found else None

        asset = _wait("the drift asset to be registered", asset_id, 120, logs)
        assert requests.get(f"{base}/api/v2/dags/{dag_id}/dagRuns", headers=headers,
                            timeout=10).json()["total_entries"] == 0, "nothing runs before the event"
        reply = requests.post(f"{base}/api/v2/assets/events", headers=headers, timeout=10,
                              json={"asset_id": asset, "extra": {"drifted_share": 0.62, "source": "test"}})
        assert reply.status_code == 200, reply.text

        def run():
            runs = requests.get(f"{base}/api/v2/dags/{dag_id}/dagRuns", headers=headers, timeout=10).json()
            return runs["dag_runs"][0] if runs["total_entries"] else None

        started = _wait("a release run", run, 90, logs)
        assert started["run_type"] == "asset_triggered"
        finished = _wait("the release run to finish",
                         lambda: (r := run()) and r["state"] in ("success", "failed") and r, 420, logs)
        assert finished["state"] == "success", f"see {logs}"
    finally:
        for process in processes.values():
            os.killpg(process.pid, signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)

    from pipelines import registry

    tracking = f"sqlite:///{tmp_path / 'state' / 'mlflow' / 'mlflow.db'}"
    tags = registry.client(tracking).get_model_version("drift-model", "1").tags
    assert tags["trigger"].startswith("asset_triggered") and '"drifted_share": 0.62' in tags["trigger"]
