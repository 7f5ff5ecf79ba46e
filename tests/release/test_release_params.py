"""The release DAG's trigger form (reason, force_retrain, approval, dry_run): real DAG runs
(`dag.test(run_conf=...)`) on the session's Airflow database, and the stage functions."""

import subprocess
import threading

import pytest
from conftest import ROOT, answer_approval, tabular_frame, write_spec

from pipelines import registry, release
from pipelines.__main__ import main
from pipelines.records import DataCheck, GateVerdict, ReleaseOptions
from pipelines.settings import Settings


def _dag(monkeypatch, folder, name, **spec):
    """A spec of a small model and its release DAG; call the result for a freshly parsed DAG.

    Each run gets a DAG parsed anew: in one process, `dag.test(run_conf=...)` leaves the
    conf's values in the DAG's Param objects (ParamsDict resolves the shared Param in place),
    so a later run without conf would inherit them. Workers parse the DAG per task; tests
    must do the same per run."""
    from airflow.dag_processing.dagbag import DagBag

    tabular_frame().to_csv(folder / "data.csv", index=False)
    write_spec(folder, name, "data.csv", **spec)
    monkeypatch.setenv("EDGE_SPECS_DIR", str(folder))

    def parse():
        bag = DagBag(dag_folder=str(ROOT / "dags"))
        assert not bag.import_errors
        return bag.dags[f"edge_release__{name}"]

    return parse


def _states(run) -> dict[str, str]:
    return {ti.task_id: str(getattr(ti.state, "value", ti.state)) for ti in run.get_task_instances()}


def _succeeded(run) -> dict:
    """The run's summary (summarize's XCom), after checking the run succeeded."""
    assert str(getattr(run.state, "value", run.state)) == "success", _states(run)
    return run.get_task_instance("summarize").xcom_pull(task_ids="summarize")


def _git(settings, *args) -> str:
    return subprocess.run(["git", "--git-dir", settings.remote, *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def _commits(settings) -> int:
    return int(_git(settings, "rev-list", "--count", "main")) if (settings.state / "gitops.git").exists() else 0


def _versions(settings, name) -> list[str]:
    found = registry.client(settings.tracking_uri).search_model_versions(f"name = '{name}'")
    return sorted(str(v.version) for v in found)


@pytest.mark.integration
def test_dry_run_decides_then_publishes_and_commits_nothing(airflow_db, monkeypatch, tmp_path, state):
    dag = _dag(monkeypatch, tmp_path, "dry-model")
    run = dag().test(run_conf={"dry_run": True, "reason": "what would happen?"})
    states = _states(run)
    summary = _succeeded(run)
    assert states["decide"] == "success"
    assert states["approve_release"] == states["publish"] == states["commit"] == "skipped"
    assert summary["status"] == "dry_run" and summary["would"] == "release"
    assert summary["reasons"][0] == "dry run: would release (every gate passed); nothing was published or committed"
    assert summary["options"]["dry_run"] and summary["options"]["reason"] == "what would happen?"
    assert summary["gitops_commit"] is None and summary["artifact_uri"] is None
    assert len(summary["verdicts"]) == 7 and all(v["passed"] for v in summary["verdicts"])

    settings = Settings()
    assert not (settings.state / "artifacts" / "models").exists()
    assert _commits(settings) == 0
    assert release.latest_summary("dry-model", settings) is None  # a dry run is not a release
    assert release.latest_summary("dry-model", settings, dry_run=True).status == "dry_run"
    mlflow = registry.client(settings.tracking_uri)
    version = mlflow.get_model_version("dry-model", summary["model_version"])
    assert version.tags["release_status"] == "dry_run" and version.tags["dry_run.outcome"] == "release"
    tags = mlflow.get_run(summary["run_id"]).data.tags
    assert tags["release.dry_run"] == "true" and tags["release.reason"] == "what would happen?"
    assert tags["release.force_retrain"] == "false" and tags["release.approval"] == "spec"

    # The same inputs without dry_run: the stored stages are reused and this time it ships.
    summary = _succeeded(dag().test())
    assert summary["status"] == "released" and summary["model_version"] == str(version.version)
    assert _commits(settings) == 2  # the repository's skeleton, then the release
    assert mlflow.get_model_version("dry-model", version.version).tags["release_status"] == "released"


@pytest.mark.integration
def test_force_retrain_makes_a_new_version_where_a_plain_rerun_reuses(airflow_db, monkeypatch, tmp_path, state):
    settings = Settings()
    dag = _dag(monkeypatch, tmp_path, "forced-model")
    first = _succeeded(dag().test())
    commits = _commits(settings)
    again_run = dag().test()
    again = _succeeded(again_run)
    assert _trained(again_run)["reused"]
    assert again["release_key"] == first["release_key"] and again["model_version"] == first["model_version"]
    assert not again["gitops_commit_created"] and _commits(settings) == commits
    assert _versions(settings, "forced-model") == ["1"]

    forced_run = dag().test(run_conf={"force_retrain": True, "reason": "new hardware"})
    forced = _succeeded(forced_run)
    assert forced["status"] == "released" and forced["model_version"] == "2"
    assert forced["release_key"] != first["release_key"]
    assert forced["options"]["force_retrain"] and forced["options"]["salt"] == forced_run.run_id
    assert forced["gitops_commit_created"] and _commits(settings) == commits + 1
    assert _versions(settings, "forced-model") == ["1", "2"]
    tags = registry.client(settings.tracking_uri).get_run(forced["run_id"]).data.tags
    assert tags["release.force_retrain"] == "true" and tags["release.salt"] == forced_run.run_id
    assert not _trained(forced_run)["reused"]  # trained again, not taken from the store

    # A plain run afterwards resumes the forced release: no new version, no commit back to v1.
    after_run = dag().test()
    after = _succeeded(after_run)
    assert _trained(after_run)["reused"]
    assert after["release_key"] == forced["release_key"] and after["model_version"] == "2"
    assert not after["gitops_commit_created"] and _commits(settings) == commits + 1
    assert _versions(settings, "forced-model") == ["1", "2"]


def _trained(run) -> dict:
    return run.get_task_instance("train").xcom_pull(task_ids="train")


@pytest.mark.integration
def test_manual_approval_on_an_auto_spec_waits_for_a_person(api_server, monkeypatch, tmp_path, state):
    base, token = api_server
    dag = _dag(monkeypatch, tmp_path, "stricter-model")
    outcome: dict = {}
    person = threading.Thread(target=answer_approval, args=(base, token, "edge_release__stricter-model", "Approve", outcome),
                              daemon=True)
    person.start()
    run = dag().test(run_conf={"approval": "manual"})
    person.join(timeout=5)

    assert outcome.get("status") == 200, outcome
    body = outcome["body"]
    assert "approval parameter asks for a person's approval (the spec says auto)" in body
    assert "[stricter-model version 1](/edge/models/stricter-model/versions/1)" in body
    summary = _succeeded(run)
    assert _states(run)["approve_release"] == "success"
    assert summary["status"] == "released" and summary["approval"]["by"] == "admin"
    assert summary["options"]["approval"] == "manual"
    assert "Approved by: admin" in _git(Settings(), "log", "-1", "--format=%B", "main")


@pytest.mark.integration
@pytest.mark.parametrize("conf", [{"approval": "auto"}, {"approval": "none"}, {"force_retrain": "yes"},
                                  {"dry_run": 1}])
def test_invalid_conf_is_refused_before_anything_runs(airflow_db, monkeypatch, tmp_path, state, conf):
    from airflow.exceptions import ParamValidationError

    dag = _dag(monkeypatch, tmp_path, "strict-model")
    with pytest.raises(ParamValidationError, match=next(iter(conf))):
        dag().test(run_conf=conf)
    assert not (Settings().state / "mlflow").exists()


def test_options_never_relax_a_manual_spec():
    with pytest.raises(ValueError, match="can never relax a manual spec"):
        ReleaseOptions(approval="auto")
    with pytest.raises(ValueError, match="can never relax a manual spec"):
        release.release_options({"approval": "auto"}, "run-1")
    options = release.release_options({"reason": "r", "force_retrain": True, "dry_run": False, "salt": "x"}, "run-1")
    assert options == ReleaseOptions(reason="r", force_retrain=True, salt="run-1")
    assert release.release_options({}, "run-2") == ReleaseOptions()


def test_cli_refuses_to_relax_approval(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["release", "model_specs/adult-income.yaml", "--approval", "auto"])
    assert exit_.value.code == 2
    assert "invalid choice: 'auto'" in capsys.readouterr().err


@pytest.mark.parametrize("spec_mode,asked,gates_pass,expected", [
    ("auto", "spec", True, "release"),
    ("auto", "manual", True, "await_approval"),
    ("manual", "spec", True, "await_approval"),
    ("manual", "manual", True, "await_approval"),
    ("auto", "manual", False, "reject"),
])
def test_decide_asks_a_person_when_the_spec_or_the_run_does(tmp_path, spec_mode, asked, gates_pass, expected):
    spec = write_spec(tmp_path, "decided-model", "data.csv", approval={"mode": spec_mode})
    verdicts = [GateVerdict(gate="quality", passed=gates_pass, reason="r")]
    started = DataCheck(passed=True, source="data.csv", sha256="0", rows=1, schema={}, features=["x"],
                        snapshot_uri="", report_uri="", release_key="0")
    decision = release.decide(spec, started, verdicts, ReleaseOptions(approval=asked))
    assert decision.outcome == expected


def test_cli_force_retrain_and_dry_run(tmp_path, state, capsys):
    import json

    tabular_frame().to_csv(tmp_path / "data.csv", index=False)
    spec = write_spec(tmp_path, "cli-model", "data.csv")

    def cli(*flags) -> dict:
        assert main(["release", str(spec), "--json", *flags]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    dry = cli("--dry-run", "--reason", "look first")
    assert dry["status"] == "dry_run" and dry["gitops_commit"] is None and dry["trigger"] == "cli: look first"
    first = cli()
    assert first["status"] == "released" and first["model_version"] == dry["model_version"]
    forced = cli("--force-retrain")
    assert forced["model_version"] == str(int(first["model_version"]) + 1)
    assert forced["options"]["salt"].startswith("cli__")
    assert cli()["model_version"] == forced["model_version"]
