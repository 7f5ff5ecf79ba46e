"""Real Airflow DAG runs (`dag.test()`, in-process, SQLite) on the embedded services.

One pytest session: the first `dag.test()` pays for Airflow's in-process API (~15 s).
"""

import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import ROOT, tabular_frame, write_spec
from release_checks import check_release

from pipelines import registry
from pipelines.settings import Settings

pytestmark = pytest.mark.integration


def _bag(monkeypatch, specs_dir=None):
    from airflow.dag_processing.dagbag import DagBag

    if specs_dir is not None:
        monkeypatch.setenv("EDGE_SPECS_DIR", str(specs_dir))
    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert not bag.import_errors
    return bag


def _git(remote, *args) -> str:
    return subprocess.run(["git", "--git-dir", str(remote), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def _states(run) -> dict[str, str]:
    return {ti.task_id: str(getattr(ti.state, "value", ti.state)) for ti in run.get_task_instances()}


def test_adult_income_release_dag_end_to_end(airflow_db, monkeypatch):
    settings = Settings()
    dag = _bag(monkeypatch).dags["edge_release__adult-income"]
    run = dag.test()
    assert str(getattr(run.state, "value", run.state)) == "success", _states(run)

    doc = check_release(settings, ROOT / "model_specs" / "adult-income.yaml")
    assert doc["spec"]["cost"]["budgetUsdPerMonth"] == 250.0
    assert set(doc["spec"]["cost"]["groups"]) == {"android-tablets", "branch-kiosks"}
    verdicts = {v["gate"]: v for v in doc["spec"]["evaluation"]["verdicts"]}
    assert "columns drifted" in verdicts["drift"]["reason"]  # Evidently ran on the census test file
    version = doc["spec"]["modelRef"]["version"]
    mlflow_client = registry.client(settings.tracking_uri)

    commits = _git(settings.remote, "rev-list", "--count", "main")
    again = dag.test()
    assert str(getattr(again.state, "value", again.state)) == "success", _states(again)
    assert _git(settings.remote, "rev-list", "--count", "main") == commits
    assert [str(v.version) for v in mlflow_client.search_model_versions("name = 'adult-income'")] == [version]


@pytest.mark.parametrize("breakage", ["missing-column", "too-many-nulls"])
def test_bad_data_stops_the_dag_at_validate_data(airflow_db, monkeypatch, tmp_path, breakage):
    settings = Settings()
    frame = tabular_frame()
    if breakage == "missing-column":
        frame = frame.drop(columns=["colour"])
    else:
        frame.loc[:200, "x1"] = None
    frame.to_csv(tmp_path / "data.csv", index=False)
    name = f"broken-{breakage}"
    write_spec(tmp_path, name, "data.csv")
    dag = _bag(monkeypatch, tmp_path).dags[f"edge_release__{name}"]
    run = dag.test()
    states = _states(run)
    assert str(getattr(run.state, "value", run.state)) == "failed"
    assert states["validate_data"] == "failed"
    assert all(states[t] == "upstream_failed" for t in ("train", "register", "publish", "commit"))
    assert not (settings.state / "artifacts" / "models" / name).exists()
    assert registry.find_version(registry.client(settings.tracking_uri), name, "any") is None
    if (settings.state / "gitops.git").exists():
        assert name not in _git(settings.remote, "ls-tree", "-r", "--name-only", "main")


def test_a_rejected_release_is_a_successful_run_without_a_commit(airflow_db, monkeypatch, tmp_path):
    settings = Settings()
    tabular_frame().to_csv(tmp_path / "data.csv", index=False)
    write_spec(tmp_path, "unfair-model", "data.csv",
               responsibleAI={"fairness": {"biasScore": 0.0, "equalizedOdds": 0.0}})
    dag = _bag(monkeypatch, tmp_path).dags["edge_release__unfair-model"]
    run = dag.test()
    states = _states(run)
    assert str(getattr(run.state, "value", run.state)) == "success", states
    assert states["fairness_gate"] == "success" and states["decide"] == "success"
    assert states["publish"] == "skipped" and states["commit"] == "skipped"
    assert states["summarize"] == "success"
    summary = run.get_task_instance("summarize").xcom_pull(task_ids="summarize")
    assert summary["status"] == "rejected"
    assert summary["reasons"][0].startswith("fairness: demographic parity difference")
    version = registry.client(settings.tracking_uri).get_model_version("unfair-model", summary["model_version"])
    assert version.tags["release_status"] == "rejected" and "fairness" in version.tags["release_reasons"]
    if (settings.state / "gitops.git").exists():
        assert "unfair-model" not in _git(settings.remote, "ls-tree", "-r", "--name-only", "main")


def test_finops_report_dag_forecasts_and_alerts_on_a_breach(airflow_db, monkeypatch):
    """Runs after the adult-income release above (same session state)."""
    from datetime import date

    from pipelines.finops.forecast import simulate_history
    from pipelines.operate.finops_report import history_path

    settings = Settings()
    summary_artifact = settings.state / "artifacts" / "releases" / "adult-income" / "latest.json"
    assert summary_artifact.is_file(), "the release test must run first"
    published = next((settings.state / "artifacts" / "models" / "adult-income").glob("*/cards/*/focus.csv"))
    assert published.read_text().startswith("BillingCurrency,ChargeCategory")

    dag = _bag(monkeypatch).dags["edge_finops_report"]
    run = dag.test()
    states = _states(run)
    assert states["forecast__adult-income"] == "success" and states["alert__adult-income"] == "skipped"
    assert states["forecast__digit-recognizer"] in {"skipped", "success"}
    report = run.get_task_instance("forecast__adult-income").xcom_pull(task_ids="forecast__adult-income")
    assert report["simulated"] and not report["breach"]
    assert report["evidence"]["forecast.png"].endswith("forecast.png")

    # A fleet whose telemetry history spends far beyond the budget: forecast breach, alert, Asset event.
    groups = {"android-tablets": {"devices": 5000, "inferences_per_device_per_day": 1000,
                                  "bytes_per_device_per_day": 5e7, "cost_per_inference_usd": 1e-5,
                                  "cost_per_gb_usd": 0.09}}
    history = simulate_history(groups, 60, date(2026, 1, 1), seed=3, trend_per_day=0.01)
    path = history_path(settings, "adult-income")
    path.parent.mkdir(parents=True, exist_ok=True)
    history.to_csv(path, index=False)
    try:
        run = dag.test()
    finally:
        path.unlink()
    states = _states(run)
    assert states["alert__adult-income"] == "success", states
    report = run.get_task_instance("forecast__adult-income").xcom_pull(task_ids="forecast__adult-income")
    assert report["breach"] and report["total_predicted_usd"] > report["monthly_budget_usd"]
    assert not report["simulated"]


def test_settings_from_airflow_connections(airflow_db, monkeypatch, tmp_path, s3_endpoint):
    """Signing keys from `edge_signing`, the artifact store, its endpoint and the S3
    credentials from `edge_s3` (type aws): nothing of them in the worker's environment."""
    import json
    import os

    import boto3
    import pytest as _pytest

    from pipelines.gitops.signing import SignatureError, generate_key_pair, verify_artifact
    from pipelines.storage import ObjectStore

    generate_key_pair(tmp_path / "conn.key", tmp_path / "conn.pub")
    monkeypatch.setenv("AIRFLOW_CONN_EDGE_SIGNING", json.dumps({
        "conn_type": "generic", "password": (tmp_path / "conn.key").read_text(),
        "extra": {"public_key": (tmp_path / "conn.pub").read_text()}}))
    credentials = {"aws_access_key_id": "AKIACONNECTION", "aws_secret_access_key": "connection-secret"}
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", **credentials).create_bucket(
        Bucket="conn-artifacts")
    monkeypatch.setenv("AIRFLOW_CONN_EDGE_S3", json.dumps({
        "conn_type": "aws", "login": credentials["aws_access_key_id"],
        "password": credentials["aws_secret_access_key"],
        "extra": {"endpoint_url": s3_endpoint, "region_name": "us-east-1",
                  "artifact_store": "s3://conn-artifacts/releases"}}))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "EDGE_ARTIFACT_STORE", "EDGE_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    tabular_frame().to_csv(tmp_path / "data.csv", index=False)
    write_spec(tmp_path, "conn-signed", "data.csv")
    environ = dict(os.environ)
    try:  # dag.test() runs the tasks in this process: their pre_execute hook sets its environment
        run = _bag(monkeypatch, tmp_path).dags["edge_release__conn-signed"].test()
    finally:
        os.environ.clear()
        os.environ.update(environ)
    assert str(getattr(run.state, "value", run.state)) == "success", _states(run)
    settings = Settings()
    assert not (settings.state / "artifacts" / "models" / "conn-signed").exists()
    store = ObjectStore("s3://conn-artifacts/releases", s3_endpoint)
    with monkeypatch.context() as patch:
        for name, value in credentials.items():
            patch.setenv(name.upper(), value)
        [key] = [k for k in store.list_keys("models/conn-signed/")
                 if k.endswith("/model.onnx") and "/variants/" not in k]  # the chosen variant
        artifact = store.get_file(key, tmp_path / "model.onnx")
        store.get_file(key + ".sig", tmp_path / "model.onnx.sig")
    verify_artifact(artifact, tmp_path / "model.onnx.sig", tmp_path / "conn.pub")
    with _pytest.raises(SignatureError):
        verify_artifact(artifact, tmp_path / "model.onnx.sig", settings.signing_keys()[1])
    assert not list(Path(tempfile.gettempdir()).glob("edge-signing-*")), "key files were left behind"
