"""Test session set-up: one fresh state folder and an embedded Airflow for the whole session.

The environment is set before anything imports Airflow, MLflow or the pipelines settings,
so no test touches the user's own `.edge-state`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SESSION_DIR = Path(tempfile.mkdtemp(prefix="edge-test-"))
STATE = SESSION_DIR / "state"

os.environ.update({
    "EDGE_STATE_DIR": str(STATE),
    "AIRFLOW_HOME": str(STATE / "airflow"),
    "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
    "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
    "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
    # SQLite's write lock waited for up to 30 s (see stack.airflow_local.SQLITE_ENV).
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS": "stack.airflow_local.SQLITE_CONNECT_ARGS",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS_ASYNC": "stack.airflow_local.SQLITE_CONNECT_ARGS_ASYNC",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
})
os.environ.pop("EDGE_SPECS_DIR", None)


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == 0:
        shutil.rmtree(SESSION_DIR, ignore_errors=True)
    else:
        print(f"\nstate of the failed session kept in {SESSION_DIR}")


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """The session's Airflow metadata database (SQLite), migrated once."""
    home = STATE / "airflow"
    home.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], check=True,
                   capture_output=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return home / "airflow.db"


@pytest.fixture
def state(tmp_path, monkeypatch) -> Path:
    """A private state folder for one test (stores, MLflow, GitOps remote)."""
    folder = tmp_path / "state"
    monkeypatch.setenv("EDGE_STATE_DIR", str(folder))
    return folder


def write_spec(folder: Path, name: str, data_source: str, **overrides) -> Path:
    """A small tabular spec (logistic regression) for fast release tests."""
    import yaml

    spec = {
        "name": name, "owner": "tests@example.com",
        "data": {"source": data_source, "target": "label", "features": ["x1", "x2", "colour"],
                 "sensitiveFeatures": ["group"],
                 "validation": {"maxNullShare": 0.05, "minRows": 50, "ranges": {"x1": [-10, 10]}}},
        "training": {"framework": "sklearn", "estimator": "logistic_regression", "seed": 1},
        "export": {"opset": 17, "quantization": ["dynamic"], "accuracyBudget": 0.02},
        "finops": {"costCenter": "cc-1", "project": "tests", "monthlyBudgetUsd": 10},
        "targets": [{"name": "phones", "selector": {"matchLabels": {"apexlogic.dev/device-class": "android-phone"}}}],
        "responsibleAI": {"fairness": {"biasScore": 0.2, "equalizedOdds": 0.25}},
    }
    for key, value in overrides.items():
        spec[key] = value
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# A spec of one feature without people in its data, for the cost and gate checks of a model file.
TINY_SPEC = {
    "name": "tiny", "owner": "t@example.com",
    "data": {"source": "d.csv", "target": "y", "features": ["x"]},
    "training": {"framework": "sklearn", "estimator": "logistic_regression"},
    "gates": {"waive": {"fairness": "no attribute of a person is present in this data"}},
    "finops": {"costCenter": "cc-1", "project": "p", "monthlyBudgetUsd": 100},
}


def phones_fleet(devices: int = 100) -> str:
    """A fleet file of one group of Android phones (`apexlogic.dev/device-class: android-phone`)."""
    return f"""
prices:
  egressUsdPerGb: {{value: 0.09, source: test}}
  electricityUsdPerKwh: {{value: 0.17, source: test}}
  trainingUsdPerHour: {{value: 0.17, source: test}}
groups:
  - name: phones
    labels: {{apexlogic.dev/device-class: android-phone}}
    deviceClass: android-phone
    devices: {devices}
    inferencesPerDevicePerDay: 100
    otaUpdatesPerMonth: 4
    telemetryBytesPerDevicePerDay: 1000
"""


def release_twice(folder: Path, name: str) -> Path:
    """Two versions of a small model in the GitOps repository (the second trained with another
    regularisation, so its bytes differ); returns the spec's path."""
    import yaml

    from pipelines.__main__ import main

    tabular_frame().to_csv(folder / "data.csv", index=False)
    spec = write_spec(folder, name, "data.csv")
    assert main(["release", str(spec)]) == 0
    doc = yaml.safe_load(spec.read_text())
    doc["training"]["params"] = {"C": 5.0}
    spec.write_text(yaml.safe_dump(doc))
    assert main(["release", str(spec)]) == 0
    return spec


def tabular_frame(rows: int = 400, seed: int = 0):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    x1 = rng.normal(size=rows)
    x2 = rng.normal(size=rows)
    colour = rng.choice(["red", "green", "blue"], size=rows)
    label = ((x1 + 0.5 * x2 + (colour == "red")) > 0.3).astype(int)
    return pd.DataFrame({"x1": x1, "x2": x2, "colour": colour,
                         "group": rng.choice(["a", "b"], size=rows), "label": label})


API_USERS = "admin:admin,viewer:viewer"  # SimpleAuthManager's users of the session's api-server


def user_token(base: str, username: str) -> str:
    """A bearer token of one of API_USERS on the session's api-server."""
    import json

    import requests

    passwords = json.loads((STATE / "airflow" / "simple_auth_manager_passwords.json.generated").read_text())
    answer = requests.post(f"{base}/auth/token", json={"username": username, "password": passwords[username]},
                           timeout=10)
    answer.raise_for_status()
    return answer.json()["access_token"]


@contextlib.contextmanager
def running_api_server(env: dict[str, str], log_path: Path):
    """An Airflow api-server bound to 127.0.0.1 with `env` over this process's environment and
    the users of API_USERS; yields its base URL. Stopped by its pid."""
    import socket
    import time

    import requests

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(log_path, "wb")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "airflow"), "api-server", "-H", "127.0.0.1", "-p", str(port),
         "--workers", "1"],
        env={**os.environ, "PYTHONWARNINGS": "ignore", "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": API_USERS, **env},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{base}/api/v2/monitor/health", timeout=5).status_code == 200:
                    break
            except (requests.RequestException, OSError):  # starting: refused or not answering yet
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"api-server did not come up; see {log_path}")
            time.sleep(0.5)
        yield base
    finally:
        stop_group(server)
        log.close()


@pytest.fixture(scope="session")
def api_server(airflow_db):
    """An Airflow api-server on the session's metadata database and state folder.

    Yields (base URL, bearer token of the admin user); `user_token` gives the viewer's.
    """
    with running_api_server({}, SESSION_DIR / "api-server.log") as base:
        yield base, user_token(base, "admin")


def stop_group(process: subprocess.Popen, grace: float = 20) -> None:
    """Stop a server started in a session of its own: SIGTERM to its process group, SIGKILL
    after `grace` seconds."""
    import signal

    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def answer_approval(base: str, token: str, dag_id: str, choice: str, outcome: dict, timeout: float = 300,
                    params_input: dict | None = None) -> None:
    """Wait for a release's approval request, read its body and form, answer it as the admin
    user through the REST API once its task waits for input (what a person does in Required
    Actions; an answer given earlier would not resume it), with `params_input` as the form's
    values; results land in `outcome`."""
    import time

    import requests

    headers = {"Authorization": f"Bearer {token}"}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pending = requests.get(f"{base}/api/v2/dags/{dag_id}/dagRuns/~/hitlDetails", headers=headers,
                               params={"response_received": False}, timeout=10).json()
        for detail in pending.get("hitl_details", []):
            ti = detail["task_instance"]
            if ti.get("state") != "awaiting_input":
                continue
            outcome["body"], outcome["params"] = detail.get("body") or "", detail.get("params")
            url = (f"{base}/api/v2/dags/{dag_id}/dagRuns/{ti['dag_run_id']}/taskInstances/"
                   f"{ti['task_id']}/{ti['map_index']}/hitlDetails")
            reply = requests.patch(url, headers=headers, timeout=10,
                                   json={"chosen_options": [choice], **({"params_input": params_input}
                                                                        if params_input else {})})
            outcome["status"] = reply.status_code
            outcome["reply"] = reply.text
            return
        time.sleep(1)
    outcome["status"] = "timeout"


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """moto's S3 server over real HTTP on a free loopback port, for the session (buckets are
    named per test). Stopped at the end."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def model_page_html(model: str, specs) -> str:
    """The model's page of Edge Releases as the app renders it (the route without the login)."""
    import os
    import sys

    from starlette.requests import Request

    sys.path.insert(0, str(ROOT / "plugins"))
    from edge_ui import app as ui

    before = os.environ.get("EDGE_SPECS_DIR")
    os.environ["EDGE_SPECS_DIR"] = str(specs)
    try:
        request = Request({"type": "http", "method": "GET", "path": f"/models/{model}", "root_path": "",
                           "headers": [], "query_string": b""})
        return ui.model(request, model).body.decode()
    finally:
        if before is None:
            del os.environ["EDGE_SPECS_DIR"]
        else:
            os.environ["EDGE_SPECS_DIR"] = before
