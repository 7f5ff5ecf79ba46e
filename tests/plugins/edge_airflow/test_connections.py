"""Settings from Airflow connections (plugins/edge_airflow/connections.py), with Airflow's own
Connection objects; the S3 and signing connections drive a real DAG run in
tests/integration/test_airflow_release.py, the Git one a real HTTP Git server in
tests/release/test_secrets.py."""

from __future__ import annotations

import base64
import json

import pytest
from airflow.sdk import Connection
from edge_airflow.connections import apply_connections, gitops_variables, mlflow_variables, s3_variables


def test_mlflow_from_a_url_or_host_and_port_with_a_token_or_a_login():
    assert mlflow_variables(Connection(conn_id="edge_mlflow", conn_type="http", host="https://mlflow.example.com/",
                                       password="tok")) == {
        "EDGE_MLFLOW_TRACKING_URI": "https://mlflow.example.com", "MLFLOW_TRACKING_TOKEN": "tok"}
    found = mlflow_variables(Connection(conn_id="edge_mlflow", conn_type="http", host="mlflow", port=5000,
                                        login="ci", password="pw", extra=json.dumps({"artifact_root": "s3://b/x"})))
    assert found == {"EDGE_MLFLOW_TRACKING_URI": "http://mlflow:5000", "MLFLOW_TRACKING_USERNAME": "ci",
                     "MLFLOW_TRACKING_PASSWORD": "pw", "EDGE_MLFLOW_ARTIFACT_ROOT": "s3://b/x"}


def test_s3_takes_only_what_the_connection_sets():
    connection = Connection(conn_id="edge_s3", conn_type="aws", login="AKIA1", password="secret",
                            extra=json.dumps({"endpoint_url": "http://minio:9000", "telemetry_store": "s3://t/f"}))
    assert s3_variables(connection) == {"AWS_ACCESS_KEY_ID": "AKIA1", "AWS_SECRET_ACCESS_KEY": "secret",
                                        "EDGE_S3_ENDPOINT_URL": "http://minio:9000", "EDGE_TELEMETRY_STORE": "s3://t/f"}


def test_gitops_credentials_become_a_header_for_that_url_and_reuse_their_slot():
    url = "https://git.example.com/org/edge-gitops.git"
    connection = Connection(conn_id="edge_gitops", conn_type="generic", host=url, login="bot", password="tok",
                            extra=json.dumps({"branch": "fleet"}))
    environ = {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "core.autocrlf", "GIT_CONFIG_VALUE_0": "false"}
    first = gitops_variables(connection, environ)
    assert first["EDGE_GITOPS_REMOTE"] == url and "tok" not in first["EDGE_GITOPS_REMOTE"]
    assert first["EDGE_GITOPS_BRANCH"] == "fleet"
    assert first["GIT_CONFIG_KEY_1"] == f"http.{url}.extraHeader" and first["GIT_CONFIG_COUNT"] == "2"
    assert first["GIT_CONFIG_VALUE_1"] == "Authorization: Basic " + base64.b64encode(b"bot:tok").decode()
    again = gitops_variables(connection, {**environ, **first})
    assert again["GIT_CONFIG_COUNT"] == "2" and "GIT_CONFIG_KEY_2" not in again
    # SSH remotes carry no password: their key is the deployment's ssh configuration.
    assert gitops_variables(Connection(conn_id="edge_gitops", conn_type="generic", host="git@host:org/x.git",
                                       password="ignored"), {}) == {"EDGE_GITOPS_REMOTE": "git@host:org/x.git"}


def test_apply_sets_the_environment_of_existing_connections_only(monkeypatch):
    monkeypatch.setenv("EDGE_MLFLOW_TRACKING_URI", "sqlite:///before.db")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("EDGE_S3_ENDPOINT_URL", raising=False)
    found = {"edge_mlflow": Connection(conn_id="edge_mlflow", conn_type="http", host="http://tracking:5000")}
    assert apply_connections(found.get) == ["edge_mlflow"]
    import os

    assert os.environ["EDGE_MLFLOW_TRACKING_URI"] == "http://tracking:5000"
    assert "AWS_ACCESS_KEY_ID" not in os.environ and "EDGE_S3_ENDPOINT_URL" not in os.environ
    from pipelines.settings import get_settings

    assert get_settings().tracking_uri == "http://tracking:5000"


@pytest.mark.parametrize("dag_file", ["edge_release.py", "edge_drift_monitor.py", "edge_rollout.py",
                                      "edge_rollback.py", "edge_finops_report.py", "edge_publish_desired_state.py"])
def test_every_task_of_every_dag_applies_the_connections_first(dag_file):
    from airflow.dag_processing.dagbag import DagBag
    from conftest import ROOT
    from edge_airflow import connections

    bag = DagBag(dag_folder=str(ROOT / "dags" / dag_file))
    assert bag.dags and not bag.import_errors
    for dag in bag.dags.values():
        for task in dag.tasks:
            assert task._pre_execute_hook is connections.pre_execute, (dag.dag_id, task.task_id)
