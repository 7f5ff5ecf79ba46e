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
7. The loan book reports the outcomes of the requests served so far (labels keyed by inference
   id, posted to Edge Releases); the operator's table holds the applicants' sex and race. The
   field quality monitor DAG judges version 2: quality and fairness hold.
8. The world changes for women applicants (half of the negative outcomes turn out positive);
   their labels arrive; the monitor finds the fairness breach and alerts the webhook (a
   receiver in this process); version 1 is no better on the same window, so it does not roll
   back; it raises the retraining event, and the release DAG retrains on the labelled
   applications of the new period.

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
ON_BREACH = ["notify", "rollback", "retrain"]


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
    # Field quality: labels of the whole loop, the operator's attributes table beside the spec.
    doc["monitoring"]["field"] = {"window": "1d", "attributes": "attributes.csv"}
    doc["responsibleAI"]["onBreach"] = ON_BREACH
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
    from pipelines.edge.simulator import Fleet, OutcomeShift, parse_fault
    from pipelines.release import latest_summary
    from stack.airflow_local import EmbeddedAirflow

    specs = prepare(state)
    settings = Settings(state_dir=state, specs_dir=specs)
    receiver = AlertReceiver()
    # The alerts' webhook: a receiver in this process, as an Airflow connection.
    webhook = json.dumps({"conn_type": "http", "host": receiver.url})
    env = {"EDGE_STATE_DIR": str(state), "EDGE_SPECS_DIR": str(specs), "AIRFLOW_CONN_EDGE_ALERTS_WEBHOOK": webhook}
    started = time.monotonic()
    _say(f"State: {_shown(state)} (Airflow, MLflow, artifact store, GitOps remote, fleet)")
    with EmbeddedAirflow(state / "airflow", env=env, log_dir=state / "logs") as airflow:
        _say(f"Airflow api-server on {airflow.base_url} (scheduler, dag-processor, LocalExecutor); "
             f"logs in {_shown(state / 'logs')}")
        release_dag, rollout_dag = f"edge_release__{MODEL}", f"edge_rollout__{MODEL}"
        for dag_id in (release_dag, "edge_drift_monitor", rollout_dag, "edge_quality_monitor"):
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

        _step(7, "The loan book reports outcomes; the field quality monitor judges them")
        _report_outcomes(airflow, fleet, specs, None)
        _say("   " + "\n   ".join(_quality(airflow, settings).splitlines()))

        _step(8, "The world changes for women applicants; the monitor alerts and retrains")
        shift = OutcomeShift("sex", "Female", 1, 0.5)
        _say(f"   {shift.describe()} (the model was trained before)")
        _serve(fleet, [drift], rounds=2)
        before = {r["dag_run_id"] for r in airflow.runs(release_dag)}
        _report_outcomes(airflow, fleet, specs, shift, drift.shift)
        _say("   " + "\n   ".join(_quality(airflow, settings).splitlines()))
        retrain = airflow.wait_for("the retraining run", lambda: next(
            (r for r in airflow.runs(release_dag) if r["dag_run_id"] not in before), None), 180)
        _say(f"   {release_dag} run {retrain['dag_run_id']} ({retrain['run_type']}) queued by the scheduler")
        retrain = airflow.wait_run(release_dag, retrain["dag_run_id"], timeout=900)
        summary = latest_summary(MODEL, settings)
        _say(f"   finished: {retrain['state']}; {summary.headline()}")
        fleet.poll_round()
        _say(f"   fleet: {_versions(fleet)}")
        for alert in receiver.received:
            _say(f"   webhook received: [{alert.get('severity')}] {alert.get('event')}: {alert.get('title')} "
                 f"({alert.get('link')})")
    _say(f"\nLoop done in {time.monotonic() - started:.0f} s. GitOps history:")
    from pipelines.gitops import repo

    for commit in repo.log(settings.remote, settings.gitops_branch, settings.work_dir / "gitops",
                           f"apps/{MODEL}")[::-1]:
        _say(f"   {commit['sha'][:10]} {commit['subject']}")
    return 0


class AlertReceiver:
    """An HTTP endpoint on 127.0.0.1 keeping the JSON of every POST (the alerts' webhook)."""

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                received.append(json.loads(body or b"{}"))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"


def _report_outcomes(airflow, fleet, specs: Path, shift, inputs_shift: dict | None = None) -> None:
    """What the loan book learned about the requests served since it last reported: labels posted
    to Edge Releases by inference id; sex and race into the operator's attributes table. With
    `inputs_shift` (the applications as they were in the new period), the labelled applications
    also join the training data."""
    import pandas as pd
    import requests

    outcomes = fleet.outcomes(MODEL, shift, inputs=True)
    labels = outcomes[["inference_id", "label"]].to_dict("records")
    stored = 0
    for start in range(0, len(labels), 50_000):
        reply = requests.post(f"{airflow.base_url}/edge/api/models/{MODEL}/feedback", headers=airflow.headers,
                              json={"labels": labels[start:start + 50_000]}, timeout=120)
        reply.raise_for_status()
        stored += reply.json()["labels"]
    table = specs / "attributes.csv"
    rows = outcomes[["inference_id", "sex", "race"]]
    rows.to_csv(table, mode="a", header=not table.exists(), index=False)
    female = outcomes[outcomes["sex"] == "Female"]
    _say(f"   {stored:,} labels posted to /edge/api/models/{MODEL}/feedback (positive: "
         f"{outcomes['label'].mean():.0%} overall, {female['label'].mean():.0%} of women); "
         f"{len(pd.read_csv(table)):,} rows in the operator's attributes table")
    if inputs_shift is not None:
        path = specs / f"{MODEL}-train.csv"
        applications = outcomes.drop(columns=["inference_id"]).rename(columns={"label": "income_over_50k"})
        for column, amount in inputs_shift.items():
            applications[column] = applications[column] + amount
        _append_rows(path, applications)
        _say(f"   the {len(applications):,} labelled applications join {path.name} for the next training")


def _append_rows(path: Path, rows) -> None:
    """Append rows to a CSV in its own column order (columns the rows lack stay empty)."""
    import pandas as pd

    header = list(pd.read_csv(path, nrows=0).columns)
    rows.reindex(columns=header).to_csv(path, mode="a", header=False, index=False)


def _quality(airflow, settings: Settings) -> str:
    """Run the field quality monitor DAG; its check as text."""
    from pipelines.operate.quality import QualityCheck
    from pipelines.storage import ObjectStore

    run = airflow.wait_run("edge_quality_monitor", airflow.trigger("edge_quality_monitor")["dag_run_id"])
    states = {t["task_id"]: t["state"] for t in airflow.task_instances("edge_quality_monitor", run["dag_run_id"])}
    store = ObjectStore(settings.store_url, settings.s3_endpoint_url)
    keys = [k for k in store.list_keys(f"monitoring/{MODEL}/") if k.endswith("quality.json")]
    check = QualityCheck.model_validate_json(store.read_bytes(keys[-1])) if keys else None
    text = "\n".join(check.lines()).replace(settings.store_url, "<artifact store>") if check else "no check recorded"
    return f"edge_quality_monitor: {run['state']}; tasks {states}\n{text}"


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
