"""A release DAG run's attempt record (plugins/edge_airflow/attempts.py), in real DAG runs
(`dag.test()`): a task that fails records the run as failed in that task with its error, and a
person's answer in Required Actions (given through the REST API of an api-server on the same
metadata database, with a comment) is recorded on the attempt the summary then finishes."""

import threading

import pytest
from conftest import ROOT, answer_approval, tabular_frame, write_spec

from pipelines.release import attempts, latest_summary
from pipelines.settings import Settings
from pipelines.storage import ObjectStore

pytestmark = pytest.mark.integration


def _dag(monkeypatch, folder, dag_id):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("EDGE_SPECS_DIR", str(folder))
    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert not bag.import_errors
    return bag.dags[dag_id]


def _state(thing) -> str:
    return str(getattr(thing.state, "value", thing.state))


def _attempts(model: str) -> list[attempts.Attempt]:
    return attempts.list_attempts(model, ObjectStore(Settings().store_url))


def test_a_failing_task_records_the_run_as_failed_in_that_task(airflow_db, state, monkeypatch, tmp_path):
    tabular_frame().drop(columns=["colour"]).to_csv(tmp_path / "data.csv", index=False)
    write_spec(tmp_path, "failing-dag", "data.csv")
    run = _dag(monkeypatch, tmp_path, "edge_release__failing-dag").test()
    assert _state(run) == "failed"

    [failed] = _attempts("failing-dag")
    assert (failed.run_id, failed.status, failed.failed_stage, failed.trigger) == (
        run.run_id, "failed", "validate_data", "manual")
    assert "colour" in failed.error and not failed.error.startswith("AirflowFailException"), failed.error
    assert failed.started_at and failed.finished_at and failed.version is None
    assert latest_summary("failing-dag") is None, "no summary: only the attempt says what happened"


def test_a_persons_approval_is_recorded_on_the_attempt_with_the_comment(api_server, state, monkeypatch,
                                                                        tmp_path):
    base, token = api_server
    tabular_frame().to_csv(tmp_path / "data.csv", index=False)
    write_spec(tmp_path, "approved-dag", "data.csv", approval={"mode": "manual"})
    dag = _dag(monkeypatch, tmp_path, "edge_release__approved-dag")
    outcome: dict = {}
    answering = threading.Thread(target=answer_approval, args=(base, token, dag.dag_id, "Approve", outcome),
                                 kwargs={"params_input": {"comment": "fairness reviewed"}}, daemon=True)
    answering.start()
    run = dag.test()
    answering.join(timeout=5)
    assert outcome.get("status") == 200, outcome
    assert set(outcome["params"]) == {"comment"}, "the form asks for a comment only"
    assert _state(run) == "success", {ti.task_id: _state(ti) for ti in run.get_task_instances()}

    [attempt] = _attempts("approved-dag")
    assert (attempt.run_id, attempt.status, attempt.trigger, attempt.version) == (
        run.run_id, "released", "manual", "1")
    assert (attempt.approval.approved, attempt.approval.by, attempt.approval.comment) == (
        True, "admin", "fairness reviewed")
    assert attempt.approval.at.startswith(attempt.started_at[:10]) and attempt.gitops_commit
    summary = latest_summary("approved-dag")
    assert (summary.trigger, summary.approval) == ("manual", attempt.approval)
