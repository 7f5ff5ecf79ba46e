"""Manual approval: the release waits in Airflow's Required Actions until a person answers
through the REST API of an api-server on the same metadata database."""

import threading

import pytest
from conftest import ROOT, answer_approval, tabular_frame, write_spec

from pipelines import registry
from pipelines.settings import Settings

pytestmark = pytest.mark.integration


def _git(remote, *args) -> str:
    import subprocess

    return subprocess.run(["git", "--git-dir", str(remote), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.parametrize("choice", ["Reject", "Approve"])
def test_manual_release_waits_for_a_person(api_server, monkeypatch, tmp_path, choice):
    from airflow.dag_processing.dagbag import DagBag

    base, token = api_server
    name = f"manual-{choice.lower()}"
    tabular_frame().to_csv(tmp_path / "data.csv", index=False)
    write_spec(tmp_path, name, "data.csv", approval={"mode": "manual"})
    monkeypatch.setenv("EDGE_SPECS_DIR", str(tmp_path))
    dag = DagBag(dag_folder=str(ROOT / "dags")).dags[f"edge_release__{name}"]

    outcome: dict = {}
    answer = threading.Thread(target=answer_approval, args=(base, token, dag.dag_id, choice, outcome), daemon=True)
    answer.start()
    run = dag.test()
    answer.join(timeout=5)

    assert outcome.get("status") == 200, outcome
    assert "passed every gate" in outcome["body"] and "Model card" in outcome["body"]
    assert "(/edge/evidence?uri=" in outcome["body"] and "file://" not in outcome["body"], \
        "evidence opens through the Edge Releases view, never as a store path"
    states = {ti.task_id: str(getattr(ti.state, "value", ti.state)) for ti in run.get_task_instances()}
    assert str(getattr(run.state, "value", run.state)) == "success", states
    settings = Settings()
    version = registry.client(settings.tracking_uri).get_model_version(name, "1")
    if choice == "Approve":
        assert states["commit"] == "success"
        assert version.tags["release_status"] == "released"
        message = _git(settings.remote, "log", "-1", "--format=%B", "main")
        assert f"release({name})" in message and "Approved by: admin" in message
    else:
        assert states["publish"] == "skipped" and states["commit"] == "skipped"
        assert states["summarize"] == "success"
        assert version.tags["release_status"] == "rejected"
        assert "rejected by admin" in version.tags["release_reasons"]
        if (settings.state / "gitops.git").exists():
            assert f"apps/{name}" not in _git(settings.remote, "ls-tree", "-r", "--name-only", "main")
