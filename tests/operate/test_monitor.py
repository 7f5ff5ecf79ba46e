"""The drift monitor on a small released model: telemetry from the training distribution is
ok, shifted inputs are drift (with the shifted column named), too few samples give no verdict;
the monitor DAG raises the drift Asset event with the figures only when there is drift."""

from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, tabular_frame, write_spec

from pipelines.edge.telemetry import InferenceWindow, write_record
from pipelines.operate.monitor import DriftCheck, check_drift, comparison_view, feature_groups, format_check
from pipelines.settings import Settings
from pipelines.storage import ObjectStore

MODEL = "watched-model"
NOW = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)
MONITORING = {"driftShare": 0.3, "window": "1h", "minRows": 100}


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """One release of a small tabular model; yields (spec path, path of the deployed ONNX file)."""
    from pipelines.release import run_release

    folder = tmp_path_factory.mktemp("monitor")
    patch = pytest.MonkeyPatch()
    patch.setenv("EDGE_STATE_DIR", str(folder / "state"))
    try:
        tabular_frame().to_csv(folder / "data.csv", index=False)
        spec = write_spec(folder, MODEL, "data.csv", monitoring=MONITORING)
        settings = Settings()
        summary = run_release(spec, settings=settings)
        assert summary.status == "released" and summary.model_version == "1"
        store = ObjectStore(settings.store_url)
        yield spec, store.fetch(store.key_of(summary.artifact_uri), settings.work_dir / "cache")
    finally:
        patch.undo()


def _serve(model_path, frame: pd.DataFrame, telemetry_url: str, at: datetime, devices: int = 3) -> list[int]:
    """Serve `frame`'s rows with the deployed model on a few devices, every inference sampled;
    one inference record per device written at `at`. Returns the predictions."""
    from pipelines.data import prepare_features
    from pipelines.onnx.export import predict_proba

    features = ["x1", "x2", "colour"]
    predictions = predict_proba(model_path, prepare_features(frame, features)).argmax(axis=1).tolist()
    store = ObjectStore(telemetry_url)
    for device, rows in enumerate(np.array_split(np.arange(len(frame)), devices)):
        window = InferenceWindow(MODEL, "1", "phones", classes=2, sample_rate=1.0, max_samples=len(rows),
                                 started=at - timedelta(minutes=5))
        for i in rows:
            row = frame.iloc[i]
            window.add(0.2, predictions[i], {"x1": float(row.x1), "x2": float(row.x2), "colour": str(row.colour)})
        write_record(store, window.record(f"phone-{device}", {"apexlogic.dev/device-class": "android-phone"},
                                          now=at))
    return predictions


def _shifted(rows: int, seed: int) -> pd.DataFrame:
    frame = tabular_frame(rows, seed=seed)
    frame["x1"] = frame["x1"] + 2.5
    return frame


def _settings(tmp_path) -> tuple[Settings, str]:
    telemetry = (tmp_path / "telemetry").as_uri()
    return Settings(telemetry_store=telemetry), telemetry


def test_telemetry_from_the_training_distribution_is_ok(released, tmp_path):
    spec, model_path = released
    settings, telemetry = _settings(tmp_path)
    _serve(model_path, tabular_frame(300, seed=5), telemetry, NOW - timedelta(minutes=10))
    # Outside the 1 h window: must not count.
    _serve(model_path, _shifted(300, seed=6), telemetry, NOW - timedelta(hours=2))

    check = check_drift(spec, settings, now=NOW)
    assert check.status == "ok" and not check.drifted, check.reason
    assert check.deployed_version == "1"
    assert check.current_rows == 300 and check.telemetry_records == 3 and check.versions_seen == {"1": 300}
    assert check.reference_rows == 320  # the training split of 400 rows (testSize 0.2)
    assert check.columns == 4  # x1, x2, colour, prediction
    assert check.drifted_share < 0.3 and check.drifted_columns == len(check.drifted_column_names) <= 1
    assert check.prediction_drifted is False and check.prediction_drift_score is not None
    assert (check.window_start, check.window_end) == ("2026-03-02T11:00:00Z", "2026-03-02T12:00:00Z")
    store = ObjectStore(settings.store_url)
    assert check.report_uri == store.uri(f"monitoring/{MODEL}/20260302T120000Z/drift.html")
    html = store.read_bytes(store.key_of(check.report_uri))
    assert b"<!DOCTYPE html>" in html[:100] and b"colour" in html
    stored = DriftCheck.model_validate_json(store.read_bytes(store.key_of(check.summary_uri)))
    assert stored == check
    assert "Drift check of watched-model: ok" in format_check(check)


def test_shifted_inputs_are_drift_and_the_column_is_named(released, tmp_path):
    spec, model_path = released
    settings, telemetry = _settings(tmp_path)
    predictions = _serve(model_path, _shifted(300, seed=7), telemetry, NOW - timedelta(minutes=10))
    assert np.mean(predictions) > 0.8  # shifted x1 pushes the model to class 1

    check = check_drift(spec, settings, now=NOW)
    assert check.status == "drift" and check.drifted, check.reason
    assert "x1" in check.drifted_column_names and "prediction" in check.drifted_column_names
    assert check.prediction_drifted is True
    assert check.drifted_share >= 0.5 and check.drifted_columns >= 2 and check.columns == 4
    assert check.current_rows == 300 and check.reference_rows == 320
    figures = check.figures()
    assert figures["drifted_share"] == check.drifted_share and figures["deployed_version"] == "1"
    assert figures["versions_seen"] == {"1": 300} and figures["report_uri"] == check.report_uri
    table = format_check(check)
    assert "DRIFT" in table and "x1" in table


def test_too_few_samples_give_no_verdict(released, tmp_path):
    spec, model_path = released
    settings, telemetry = _settings(tmp_path)
    _serve(model_path, _shifted(60, seed=8), telemetry, NOW - timedelta(minutes=10))
    check = check_drift(spec, settings, now=NOW)
    assert check.status == "insufficient_data" and not check.drifted
    assert check.current_rows == 60 and check.min_rows == 100 and check.drifted_share is None
    assert "60 sampled rows" in check.reason and check.report_uri is None


def test_a_model_without_release_has_no_check(tmp_path):
    tabular_frame().to_csv(tmp_path / "data.csv", index=False)
    spec = write_spec(tmp_path, "unreleased-model", "data.csv")
    check = check_drift(spec, Settings(state_dir=tmp_path / "empty-state"), now=NOW)
    assert check.status == "no_release" and check.deployed_version is None


def test_glob_groups_are_compared_as_row_wise_mean_and_std():
    frame = pd.DataFrame({"p_0": [0.0, 10.0], "p_1": [2.0, 10.0], "p_2": [4.0, 10.0], "colour": ["red", None],
                          "x": [1, 2], "prediction": [1, 0]})
    plain, groups = feature_groups(["x", "p_*", "colour"], ["x", "p_0", "p_1", "p_2", "colour"])
    assert plain == ["x", "colour"] and groups == {"p_*": ["p_0", "p_1", "p_2"]}
    view = comparison_view(frame, plain, groups, categorical={"colour"})
    assert list(view.columns) == ["x", "colour", "mean(p_*)", "std(p_*)", "prediction"]
    np.testing.assert_allclose(view["mean(p_*)"], [2.0, 10.0])
    np.testing.assert_allclose(view["std(p_*)"], [np.sqrt(8 / 3), 0.0])
    assert view["colour"].tolist() == ["red", "__missing__"] and str(view["colour"].dtype) == "category"
    assert str(view["prediction"].dtype) == "category" and view["prediction"].tolist() == ["1", "0"]


def _asset_events(run_id: str) -> list:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(select(AssetEvent, AssetModel.uri).join(AssetModel, AssetModel.id == AssetEvent.asset_id)
                               .where(AssetEvent.source_run_id == run_id)).all()
        return [(uri, dict(event.extra), event.source_dag_id, event.source_task_id) for event, uri in rows]


def _state(value) -> str:
    return str(getattr(value, "value", value))


def test_monitor_dag_raises_the_drift_event_with_the_figures_only_on_drift(released, airflow_db, monkeypatch,
                                                                           tmp_path):
    from airflow.dag_processing.dagbag import DagBag

    spec, model_path = released
    monkeypatch.setenv("EDGE_SPECS_DIR", str(spec.parent))
    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert not bag.import_errors
    dag = bag.dags["edge_drift_monitor"]
    assert [t.task_id for t in dag.tasks] == [f"check__{MODEL}"]
    outlets = [a.uri for a in dag.get_task(f"check__{MODEL}").outlets]
    release = bag.dags[f"edge_release__{MODEL}"]
    assert outlets == [f"edge-drift://{MODEL}/"]
    assert outlets[0] in [a.uri for a in release.timetable.asset_condition.objects]

    now = datetime.now(timezone.utc)
    steady = (tmp_path / "steady").as_uri()
    _serve(model_path, tabular_frame(300, seed=5), steady, now - timedelta(minutes=5))
    monkeypatch.setenv("EDGE_TELEMETRY_STORE", steady)
    run = dag.test()
    assert _state(run.state) == "success"
    assert {ti.task_id: _state(ti.state) for ti in run.get_task_instances()} == {f"check__{MODEL}": "skipped"}
    assert _asset_events(run.run_id) == []

    shifted = (tmp_path / "shifted").as_uri()
    _serve(model_path, _shifted(300, seed=7), shifted, now - timedelta(minutes=5))
    monkeypatch.setenv("EDGE_TELEMETRY_STORE", shifted)
    run = dag.test()
    assert {ti.task_id: _state(ti.state) for ti in run.get_task_instances()} == {f"check__{MODEL}": "success"}
    [(uri, extra, source_dag, source_task)] = _asset_events(run.run_id)
    assert uri == f"edge-drift://{MODEL}/" and (source_dag, source_task) == ("edge_drift_monitor", f"check__{MODEL}")
    assert extra["status"] == "drift" and extra["drifted_share"] >= 0.5 and extra["drift_share_threshold"] == 0.3
    assert "x1" in extra["drifted_column_names"] and extra["deployed_version"] == "1"
    assert extra["current_rows"] == 300 and extra["reference_rows"] == 320 and extra["versions_seen"] == {"1": 300}
    assert extra["report_uri"].endswith("/drift.html")
