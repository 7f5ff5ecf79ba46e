"""The rollback DAG, started with its Params as from the trigger form."""

import subprocess

import pytest
import yaml
from conftest import ROOT, release_twice

from pipelines.settings import Settings

pytestmark = pytest.mark.integration


def test_rollback_dag_restores_the_previous_version(airflow_db, monkeypatch, tmp_path):
    from airflow.dag_processing.dagbag import DagBag

    release_twice(tmp_path, "rollback-model")

    from pipelines.edge.simulator import simulate

    before = simulate(12, 2, Settings(), seed=1)["rounds"][-1]["models"]["rollback-model"]
    assert set(before["versions"]) == {"2"} and before["on_desired"] == before["selected"] > 0

    monkeypatch.setenv("EDGE_SPECS_DIR", str(tmp_path))
    dag = DagBag(dag_folder=str(ROOT / "dags")).dags["edge_rollback"]
    assert dag.params["model"] == "rollback-model"
    run = dag.test(run_conf={"model": "rollback-model", "target": "", "reason": "canary error rate 4%"})
    assert str(getattr(run.state, "value", run.state)) == "success"
    remote = Settings().remote
    show = ["git", "--git-dir", remote, "show", "main:apps/rollback-model/base/mobileaimodeldeployment.yaml"]
    restored = yaml.safe_load(subprocess.run(show, capture_output=True, text=True, check=True).stdout)
    assert restored["spec"]["modelRef"]["version"] == "1"
    message = subprocess.run(["git", "--git-dir", remote, "log", "-1", "--format=%B", "main"],
                             capture_output=True, text=True, check=True).stdout
    assert "Reason: canary error rate 4%" in message and "Rolled back by:" in message

    # The same devices reconcile the rollback: they run version 1 again.
    result = simulate(12, 2, Settings(), seed=1, keep=True)
    final = result["rounds"][-1]["models"]["rollback-model"]
    assert final["selected"] > 0 and final["on_desired"] == final["selected"], final
    assert set(final["versions"]) == {"1"}, final
