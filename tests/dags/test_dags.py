"""DAG integrity and policy: parse cleanly, one DAG per spec, no heavy imports at parse time."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, write_spec

HEAVY = ["torch", "onnx", "onnxruntime", "mlflow", "evidently", "fairlearn", "great_expectations",
         "sklearn", "pandas"]


def _bag(specs_dir: Path | None = None, monkeypatch=None):
    from airflow.dag_processing.dagbag import DagBag

    if specs_dir is not None:
        monkeypatch.setenv("EDGE_SPECS_DIR", str(specs_dir))
    return DagBag(dag_folder=str(ROOT / "dags"))


def test_dagbag_has_no_import_errors_and_one_dag_per_spec():
    bag = _bag()
    assert bag.import_errors == {}
    specs = {p.stem for p in (ROOT / "model_specs").glob("*.yaml")}
    assert {f"edge_release__{s}" for s in specs} <= set(bag.dag_ids)


def test_operations_dags_are_there():
    bag = _bag()
    assert {"edge_rollback", "edge_finops_report"} <= set(bag.dag_ids)
    rollback = bag.dags["edge_rollback"]
    assert type(rollback.timetable).__name__ == "NullTimetable"  # manual only
    assert set(rollback.params) == {"model", "target", "reason"}
    finops = bag.dags["edge_finops_report"]
    assert {t.task_id for t in finops.tasks} >= {"forecast__adult-income", "alert__adult-income"}
    quality = bag.dags["edge_quality_monitor"]
    assert quality.timetable.expression == "0 * * * *"
    check, retrain = quality.get_task("check__adult-income"), quality.get_task("retrain__adult-income")
    assert check.downstream_task_ids == {"retrain__adult-income"}
    assert [a.uri for a in check.outlets] == ["edge-desired-state://gitops/"]
    assert [a.uri for a in retrain.outlets] == ["edge-quality://adult-income/"]
    assert [t.task_id for t in bag.dags["edge_audit_retention"].tasks] == ["apply_retention"]


def test_release_dag_shape():
    dag = _bag().dags["edge_release__adult-income"]
    assert [t.task_id for t in dag.topological_sort()][:1] == ["validate_data"]
    assert {t.task_id for t in dag.tasks} == {
        "validate_data", "train", "export", "quantize", "register", "quality_gate", "fairness_gate", "parity_gate",
        "drift_gate", "edge_cost", "explain", "model_card", "decide", "approve_release", "publish", "commit",
        "summarize"}
    # An auto spec still has the approval task: the run's `approval` parameter may ask for it.
    assert dag.get_task("decide").downstream_task_ids == {"publish", "approve_release"}
    assert dag.get_task("approve_release").downstream_task_ids == {"publish"}
    assert dag.get_task("publish").trigger_rule == "none_failed_min_one_success"
    assert dag.get_task("summarize").trigger_rule == "none_failed_min_one_success"
    assert dag.get_task("model_card").upstream_task_ids >= {"quality_gate", "fairness_gate", "parity_gate",
                                                            "drift_gate", "explain"}
    assert dag.max_active_runs == 1
    assert dag.get_task("register").retries == 3 and dag.get_task("publish").retries == 3
    assert dag.get_task("commit").retries == 3 and dag.get_task("train").retries == 0
    assert dag.get_task("commit").upstream_task_ids >= {"publish", "register"}
    assert set(dag.params) == {"reason", "force_retrain", "approval", "dry_run"}
    # The spec's cron OR a drift event OR a field quality breach that asks to retrain starts a release.
    assert type(dag.timetable).__name__ == "AssetOrTimeSchedule"
    assert dag.timetable.timetable.expression == "0 3 * * 1"
    assert type(dag.timetable.asset_condition).__name__ == "AssetAny"
    assert [a.uri for a in dag.timetable.asset_condition.objects] == ["edge-drift://adult-income/",
                                                                      "edge-quality://adult-income/"]


def test_a_manual_spec_waits_for_a_person_before_publishing(tmp_path, monkeypatch):
    write_spec(tmp_path, "manual-model", "data.csv", approval={"mode": "manual"})
    dag = _bag(tmp_path, monkeypatch).dags["edge_release__manual-model"]
    approval = dag.get_task("approve_release")
    from airflow.providers.standard.operators.hitl import ApprovalOperator

    assert isinstance(approval, ApprovalOperator)
    assert dag.get_task("decide").downstream_task_ids == {"approve_release", "publish"}
    assert approval.downstream_task_ids == {"publish"}
    # No schedule in the spec: only a drift or quality event (or a person) starts a release.
    assert [a.uri for a in dag.timetable.asset_condition.objects] == ["edge-drift://manual-model/",
                                                                      "edge-quality://manual-model/"]


def test_parsing_the_dag_file_imports_no_heavy_library():
    probe = (
        "import sys, json\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"bag = DagBag(dag_folder={str(ROOT / 'dags')!r})\n"
        "assert not bag.import_errors, bag.import_errors\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"}, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_an_invalid_spec_gets_a_failing_dag_and_spares_the_others(tmp_path, monkeypatch):
    write_spec(tmp_path, "good-model", "data.csv")
    write_spec(tmp_path, "bad-model", "data.csv", finops={"costCenter": "cc-1", "project": "p",
                                                          "monthlyBudgetUsd": -3})
    bag = _bag(tmp_path, monkeypatch)
    assert bag.import_errors == {}
    assert {"edge_release__good-model", "edge_release__bad-model"} <= set(bag.dag_ids)
    bad = bag.dags["edge_release__bad-model"]
    assert [t.task_id for t in bad.tasks] == ["spec_is_invalid"]
    assert "finops.monthlyBudgetUsd" in bad.description


def test_every_gitops_commit_raises_the_desired_state_asset_and_the_publisher_runs_on_it():
    from edge_airflow.assets import DESIRED_STATE_ASSET_URI

    bag = _bag()
    publisher = bag.dags["edge_publish_desired_state"]
    assert type(publisher.timetable).__name__ == "AssetOrTimeSchedule"
    assert [t.task_id for t in publisher.tasks] == ["publish"] and publisher.max_active_runs == 1
    committing = [bag.dags["edge_release__adult-income"].get_task("commit"),
                  bag.dags["edge_rollback"].get_task("roll_back")]
    committing += [d.get_task("analyze_and_act") for i, d in bag.dags.items() if i.startswith("edge_rollout__")]
    assert len(committing) >= 3
    for task in committing:
        assert DESIRED_STATE_ASSET_URI.rstrip("/") in {o.uri.rstrip("/") for o in task.outlets}, task.task_id


def test_each_release_task_passes_its_stage_the_records_it_takes_in_order():
    """A task body is one `run_stage` call whose arguments the XCom codec decodes by the stage's
    signature: a changed signature shows here rather than in a DAG run."""
    import ast
    import inspect

    from pipelines import release

    read_by = {"every_verdict": "verdicts", "decided": "decision", "answer": "approval", "stage_seconds": "stages",
               "trigger": "trigger", "options": "options"}
    pulled = {"publish": "published", "commit": "committed"}

    def meaning(node) -> str:
        if isinstance(node, ast.Name):
            return "spec_path" if node.id == "path" else node.id
        if node.func.id == "pulled":
            return pulled[node.args[0].value]
        return read_by[node.func.id]

    tree = ast.parse((ROOT / "dags" / "edge_release.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "run_stage"]
    assert {c.args[0].value for c in calls} == {*release.STAGES, "summarize"} - {"decide"}  # decide: a branch
    for call in calls:
        parameters = list(inspect.signature(getattr(release, call.args[0].value)).parameters)
        given = [meaning(a) for a in call.args[1:]]
        assert given == parameters[:len(given)], call.args[0].value
        assert {k.arg for k in call.keywords} - {"signing"} <= set(parameters[len(given):]), call.args[0].value
