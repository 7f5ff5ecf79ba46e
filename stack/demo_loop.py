"""The closed loop, end to end, on an embedded Airflow with a real scheduler (`make demo-loop`).

1. A person starts a release of the Adult income model from Airflow (REST API): version 1.
2. A simulated fleet installs it and serves census rows; devices report telemetry.
3. The drift monitor DAG runs: no drift.
4. The world changes: the fleet's inputs shift (older applicants, capital gains), and the
   labelled rows of that period arrive in the training data.
5. The drift monitor DAG runs: drift; its Asset event (figures in `extra`) makes the scheduler
   start a release run, which retrains on the new data: version 2, released as a canary.
6. The fleet moves a share of its devices to version 2 and serves; the rollout DAG compares
   the cohorts and advances the canary step by step (or rolls it back), by commits.

Everything runs under its own state folder (the Makefile uses `<state>/loop`): its own
Airflow database, MLflow, artifact store, GitOps remote and fleet, and a copy of the spec
whose data source is a CSV file there (so new labelled rows can arrive), with no cron
schedule (drift and people start releases) and no pauses between canary steps.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import yaml

from pipelines.settings import PROJECT_ROOT, Settings

MODEL = "adult-income"
DEVICES = 200
REQUESTS = 120
DRIFT = "shift=age:+8;capital_gain:+3000;capital_loss:+500"


def _shown(path: Path) -> str:
    """A path as the person typed it: relative to the current folder when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _say(text: str = "") -> None:
    print(text, flush=True)


def _step(number: int, title: str) -> None:
    _say(f"\n== {number}. {title} " + "=" * max(3, 76 - len(title)))


def prepare(state: Path) -> Path:
    """The loop's spec folder: the demo spec over a CSV copy of its training data."""
    from pipelines.data.builtin import LOADERS

    specs = state / "specs"
    specs.mkdir(parents=True, exist_ok=True)
    doc = yaml.safe_load((PROJECT_ROOT / "model_specs" / f"{MODEL}.yaml").read_text())
    doc["data"]["source"] = f"{MODEL}-train.csv"
    doc.pop("schedule", None)
    canary = doc["deploymentStrategy"]["canary"]
    for step in canary["steps"]:
        step["pause"] = "0s"
    canary["interval"] = "1d"  # the loop triggers the rollout DAG itself
    doc["monitoring"]["window"] = "1h"
    (specs / f"{MODEL}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    LOADERS["uci-adult"]().to_csv(specs / f"{MODEL}-train.csv", index=False)
    return specs


def _latest_check(settings: Settings):
    from pipelines.operate.monitor import DriftCheck
    from pipelines.storage import ObjectStore

    store = ObjectStore(settings.store_url, settings.s3_endpoint_url)
    keys = [k for k in store.list_keys(f"monitoring/{MODEL}/") if k.endswith("drift.json")]
    return DriftCheck.model_validate_json(store.read_bytes(keys[-1])) if keys else None


def _versions(fleet) -> str:
    info = fleet.rounds[-1]["models"].get(MODEL, {})
    return ", ".join(f"v{v}: {n} devices" for v, n in info.get("versions", {}).items()) or "none"


def _serve(fleet, faults, rounds: int = 1) -> None:
    for _ in range(rounds):
        served = fleet.serve_round(REQUESTS, faults).get(MODEL, {})
        _say("   traffic: " + "; ".join(f"v{v} {c['devices']} devices, {c['requests']} requests, "
                                         f"{c['errors']} failed" for v, c in served.items()))


def run(state: Path) -> int:
    from pipelines.edge.simulator import Fleet, parse_fault
    from pipelines.release import latest_summary
    from stack.airflow_local import EmbeddedAirflow

    specs = prepare(state)
    settings = Settings(state_dir=state, specs_dir=specs)
    env = {"EDGE_STATE_DIR": str(state), "EDGE_SPECS_DIR": str(specs)}
    started = time.monotonic()
    _say(f"State: {_shown(state)} (Airflow, MLflow, artifact store, GitOps remote, fleet)")
    with EmbeddedAirflow(state / "airflow", env=env, log_dir=state / "logs") as airflow:
        _say(f"Airflow api-server on {airflow.base_url} (scheduler, dag-processor, LocalExecutor); "
             f"logs in {_shown(state / 'logs')}")
        release_dag, rollout_dag = f"edge_release__{MODEL}", f"edge_rollout__{MODEL}"
        for dag_id in (release_dag, "edge_drift_monitor", rollout_dag):
            airflow.wait_dag(dag_id)

        _step(1, "A person starts a release from Airflow")
        run_ = airflow.wait_run(release_dag, airflow.trigger(release_dag)["dag_run_id"], timeout=900)
        summary = latest_summary(MODEL, settings)
        _say(f"   {release_dag} run {run_['dag_run_id']}: {run_['state']}; version {summary.model_version} "
             f"{summary.status}, commit {(summary.gitops_commit or '')[:10]}")
        if run_["state"] != "success":
            return 1

        _step(2, f"A fleet of {DEVICES} simulated devices installs it and serves census rows")
        fleet = Fleet(DEVICES, settings, seed=11)
        fleet.poll_round()
        _say(f"   {fleet.rounds[-1]['models'][MODEL]['selected']} devices selected by the model's groups; {_versions(fleet)}")
        _serve(fleet, [], rounds=2)

        _step(3, "The drift monitor runs")
        monitor = airflow.wait_run("edge_drift_monitor", airflow.trigger("edge_drift_monitor")["dag_run_id"])
        states = {t["task_id"]: t["state"] for t in airflow.task_instances("edge_drift_monitor", monitor["dag_run_id"])}
        _say(f"   edge_drift_monitor: {monitor['state']}; tasks {states}")
        _say("   " + "\n   ".join(_format(_latest_check(settings), settings).splitlines()))

        _step(4, "The world changes: inputs shift, and labelled rows of the new period arrive")
        drift = parse_fault(DRIFT)
        _say(f"   fault injected on every device: {drift.describe()}")
        _serve(fleet, [drift], rounds=3)
        _arrive(specs, drift.shift)

        _step(5, "The drift monitor runs again; its Asset event starts a retraining run")
        before = {r["dag_run_id"] for r in airflow.runs(release_dag)}
        monitor = airflow.wait_run("edge_drift_monitor", airflow.trigger("edge_drift_monitor")["dag_run_id"])
        _say("   " + "\n   ".join(_format(_latest_check(settings), settings).splitlines()))
        retrain = airflow.wait_for("the drift-triggered release run", lambda: next(
            (r for r in airflow.runs(release_dag) if r["dag_run_id"] not in before), None), 180)
        _say(f"   {release_dag} run {retrain['dag_run_id']} ({retrain['run_type']}) queued by the scheduler")
        retrain = airflow.wait_run(release_dag, retrain["dag_run_id"], timeout=900)
        # Listed once the run has started: Airflow 3.3's event listing fails (500) while a
        # run the event created has no start date yet.
        events = airflow.asset_events(f"edge-drift://{MODEL}")
        if events:
            extra = events[-1].get("extra") or {}
            _say(f"   the Asset event edge-drift://{MODEL} that started it: drifted_share "
                 f"{extra.get('drifted_share')}, columns {extra.get('drifted_column_names')}")
        summary = latest_summary(MODEL, settings)
        trigger = summary.trigger if len(summary.trigger) <= 100 else summary.trigger[:99] + "…"
        _say(f"   finished: {retrain['state']}; version {summary.model_version} {summary.status}; "
             f"recorded trigger: {trigger}")
        if retrain["state"] != "success" or summary.status != "released":
            _say("   the retrained version was not released: no canary to run")
            return 0 if retrain["state"] == "success" else 1

        _step(6, "The canary: devices move in steps, the rollout DAG judges each step")
        for attempt in range(6):
            fleet.poll_round()
            _say(f"   fleet: {_versions(fleet)}")
            _serve(fleet, [drift], rounds=2)
            step = airflow.wait_run(rollout_dag, airflow.trigger(rollout_dag)["dag_run_id"])
            result = _rollout_result(airflow, rollout_dag, step["dag_run_id"])
            _say(f"   {rollout_dag}: {step['state']}")
            _say("   " + "\n   ".join(result.get("lines", [])))
            if result.get("decision") in ("rollback", "complete"):
                break
        fleet.poll_round()
        _say(f"   fleet: {_versions(fleet)}")
    _say(f"\nLoop done in {time.monotonic() - started:.0f} s. GitOps history:")
    from pipelines.gitops import repo

    for commit in repo.log(settings.remote, settings.gitops_branch, settings.work_dir / "gitops",
                           f"apps/{MODEL}")[::-1]:
        _say(f"   {commit['sha'][:10]} {commit['subject']}")
    return 0


def _format(check, settings: Settings) -> str:
    from pipelines.operate.monitor import format_check

    if check is None:
        return "no drift check recorded"
    return format_check(check).replace(settings.store_url, "<artifact store>")


def _rollout_result(airflow, dag_id: str, run_id: str) -> dict:
    from pipelines.operate.rollout import RolloutStep

    entry = airflow.request(
        "GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/analyze_and_act/xcomEntries/return_value")
    value = entry.get("value")
    data = json.loads(value) if isinstance(value, str) else value
    step = RolloutStep.model_validate(data)
    return {"decision": step.decision, "lines": step.lines()}


def _arrive(specs: Path, shift: dict[str, float]) -> None:
    """Labelled rows of the shifted period join the training data (the census test file, shifted)."""
    import pandas as pd

    from pipelines.data.builtin import LOADERS

    rows = LOADERS["uci-adult-test"]()
    for column, amount in shift.items():
        rows[column] = rows[column] + amount
    path = specs / f"{MODEL}-train.csv"
    before = pd.read_csv(path)
    pd.concat([before, rows], ignore_index=True).to_csv(path, index=False)
    _say(f"   {len(rows):,} labelled rows of the new period join {path.name} ({len(before):,} -> "
         f"{len(before) + len(rows):,} rows)")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m stack demo-loop", description=__doc__.splitlines()[0])
    parser.add_argument("--state", type=Path, required=True, help="the loop's own state folder (emptied first)")
    args = parser.parse_args(argv)
    state = args.state.resolve()
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    return run(state)


if __name__ == "__main__":
    sys.exit(main())
