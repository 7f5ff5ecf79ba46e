"""Drift starts a release, on a separate embedded Airflow (its own SQLite database) with a real
scheduler, dag-processor and api-server bound to 127.0.0.1:

1. an external system raises the drift Asset event through the REST API: a release run
   starts, succeeds, and records the event's figures as its trigger in MLflow;
2. devices report shifted inputs for the released model: the `edge_drift_monitor` DAG,
   started through the REST API, raises the drift event with its figures, and a new release
   run of the model is queued by that event.

One Airflow serves both checks (the second needs the model the first released)."""

from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from conftest import tabular_frame, write_spec

from pipelines.settings import Settings
from stack.airflow_local import EmbeddedAirflow

pytestmark = pytest.mark.integration
MODEL = "drift-model"
RELEASE = f"edge_release__{MODEL}"
MONITOR = "edge_drift_monitor"
ASSET = f"edge-drift://{MODEL}"


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    folder = tmp_path_factory.mktemp("drift-trigger")
    specs = folder / "specs"
    specs.mkdir()
    tabular_frame().to_csv(specs / "data.csv", index=False)
    write_spec(specs, MODEL, "data.csv")  # no schedule: drift events and people only
    state = folder / "state"
    env = {"EDGE_STATE_DIR": str(state), "EDGE_SPECS_DIR": str(specs),
           # Parse each DAG file once: no DAG file changes during the test, and re-parsing every
           # 30 s takes CPU from the runs on a small machine.
           "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "600"}
    with EmbeddedAirflow(folder / "airflow", env=env, log_dir=folder / "logs") as embedded:
        yield embedded


def _state(airflow: EmbeddedAirflow) -> Path:
    return Path(airflow.env["EDGE_STATE_DIR"])


@pytest.fixture(scope="module")
def first_release(airflow):
    """The release run an event posted through the REST API starts (finished)."""
    airflow.wait_dag(RELEASE)
    airflow.wait_asset(ASSET)
    assert airflow.runs(RELEASE) == [], "nothing runs before the event"
    airflow.post_asset_event(ASSET, {"drifted_share": 0.62, "source": "test"})
    started = airflow.wait_for("a release run", lambda: airflow.runs(RELEASE), 90)[0]
    assert started["run_type"] == "asset_triggered"
    return airflow.wait_run(RELEASE, started["dag_run_id"], timeout=420)


def test_a_drift_event_posted_through_the_api_starts_a_release_run(airflow, first_release):
    from pipelines import registry

    assert first_release["state"] == "success", f"see {airflow.log_dir}"
    tags = registry.client(Settings(state_dir=_state(airflow)).tracking_uri).get_model_version(MODEL, "1").tags
    assert tags["trigger"].startswith("asset_triggered") and '"drifted_share": 0.62' in tags["trigger"]


def _report_shifted_inputs(state, rows: int = 300) -> None:
    """Three devices serve shifted inputs with the released model and report every inference."""
    from pipelines.data import prepare_features
    from pipelines.edge.telemetry import InferenceWindow, write_record
    from pipelines.onnx.export import predict_proba
    from pipelines.release import latest_summary
    from pipelines.storage import ObjectStore

    settings = Settings(state_dir=state)
    summary = latest_summary(MODEL, settings)
    store = ObjectStore(settings.store_url)
    model_path = store.fetch(store.key_of(summary.artifact_uri), settings.work_dir / "cache")
    frame = tabular_frame(rows, seed=11)
    frame["x1"] += 2.5
    predictions = predict_proba(model_path, prepare_features(frame, ["x1", "x2", "colour"])).argmax(axis=1)
    now = datetime.now(timezone.utc) - timedelta(minutes=1)
    for device, part in enumerate(np.array_split(np.arange(rows), 3)):
        window = InferenceWindow(MODEL, summary.model_version, "phones", classes=2, sample_rate=1.0,
                                 max_samples=len(part), started=now - timedelta(minutes=5))
        for i in part:
            window.add(0.2, int(predictions[i]), {"x1": float(frame.x1[i]), "x2": float(frame.x2[i]),
                                                  "colour": str(frame.colour[i])})
        write_record(ObjectStore(settings.telemetry_url), window.record(f"phone-{device}", {}, now=now))


def test_the_drift_monitor_raises_the_event_and_a_release_run_follows(airflow, first_release):
    assert first_release["state"] == "success"
    _report_shifted_inputs(_state(airflow))
    airflow.wait_dag(MONITOR)
    run = airflow.trigger(MONITOR)
    finished = airflow.wait_run(MONITOR, run["dag_run_id"], timeout=180)
    assert finished["state"] == "success", f"see {airflow.log_dir}"
    [check] = airflow.task_instances(MONITOR, run["dag_run_id"])
    assert (check["task_id"], check["state"]) == (f"check__{MODEL}", "success")

    events = [e for e in airflow.asset_events(ASSET) if e["source_run_id"] == run["dag_run_id"]]
    assert len(events) == 1 and events[0]["source_dag_id"] == MONITOR
    extra = events[0]["extra"]
    assert extra["status"] == "drift" and extra["drifted_share"] >= 0.3 and "x1" in extra["drifted_column_names"]
    assert extra["deployed_version"] == "1" and extra["current_rows"] == 300

    def queued():
        newer = [r for r in airflow.runs(RELEASE) if r["dag_run_id"] != first_release["dag_run_id"]]
        return newer[0] if newer else None

    second = airflow.wait_for("a release run started by the monitor", queued, 90)
    assert second["run_type"] == "asset_triggered"
    upstream = airflow.request("GET", f"dags/{RELEASE}/dagRuns/{second['dag_run_id']}/upstreamAssetEvents")
    assert [e["source_dag_id"] for e in upstream["asset_events"]] == [MONITOR]
    assert upstream["asset_events"][0]["extra"]["drifted_share"] == extra["drifted_share"]
    # Queued is what this test checks; the retraining itself is the first test's path.
    airflow.request("PATCH", f"dags/{RELEASE}/dagRuns/{second['dag_run_id']}", json={"state": "failed"})
