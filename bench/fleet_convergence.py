"""How fast a GitOps commit reaches a simulated fleet of edge agents, and what each device pulls.

For each fleet size N: N fresh agents (labels from the fleet file, see
`pipelines.edge.simulator`) poll until every selected device runs the released version
(cold start: the first poll clones), then a new version of the same tiny model is released
for real (`run_release`, about 15 s, not counted) and the fleet polls until every selected
device runs it; one more poll measures a quiet round. Rounds run back to back: the seconds
are this host's time to reconcile the whole fleet one device after another, not a poll
interval (a real fleet converges within one poll interval plus one device's poll time).

    .venv/bin/python bench/fleet_convergence.py [--devices 100 1000] [--no-5000]

Up to 200 devices, every device keeps its own shallow clone; above that (unless --git says
otherwise) one clone is fetched per round for all (see the simulator's docstring: the bytes per
device are the same either way). The releases and the fleet live in
`$EDGE_STATE_DIR/bench/fleet-state` (default `.edge-state`), which a later run reuses; the
figures go to `$EDGE_STATE_DIR/bench/fleet_convergence.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.edge.simulator import Fleet  # noqa: E402
from pipelines.settings import Settings, get_settings  # noqa: E402

MODEL = "fleet-bench"
FIVE_THOUSAND_BUDGET_S = 180


def _spec(folder: Path, description: str) -> Path:
    """A tiny tabular spec (logistic regression on 400 rows) that targets android phones."""
    import numpy as np
    import pandas as pd
    import yaml

    rng = np.random.default_rng(0)
    rows = 400
    x1, x2 = rng.normal(size=rows), rng.normal(size=rows)
    colour = rng.choice(["red", "green", "blue"], size=rows)
    pd.DataFrame({"x1": x1, "x2": x2, "colour": colour, "group": rng.choice(["a", "b"], size=rows),
                  "label": ((x1 + 0.5 * x2 + (colour == "red")) > 0.3).astype(int)}).to_csv(
        folder / "data.csv", index=False)
    spec = {
        "name": MODEL, "owner": "bench@example.com", "description": description,
        "data": {"source": "data.csv", "target": "label", "features": ["x1", "x2", "colour"],
                 "sensitiveFeatures": ["group"],
                 "validation": {"maxNullShare": 0.05, "minRows": 50, "ranges": {"x1": [-10, 10]}}},
        "training": {"framework": "sklearn", "estimator": "logistic_regression", "seed": 1},
        "export": {"opset": 17, "quantization": ["dynamic"], "accuracyBudget": 0.02},
        "finops": {"costCenter": "bench", "project": "fleet-bench", "monthlyBudgetUsd": 1000},
        "targets": [{"name": "phones", "selector": {"matchLabels": {"apexlogic.dev/device-class": "android-phone"}}}],
        "responsibleAI": {"fairness": {"biasScore": 0.2, "equalizedOdds": 0.25}},
    }
    path = folder / f"{MODEL}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _release(settings: Settings) -> str:
    """A real release of the bench spec; each call changes the description, so a new version."""
    from pipelines.release import run_release

    folder = settings.state / "spec"
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    summary = run_release(_spec(folder, f"fleet convergence benchmark, released at {time.time_ns()}"), trigger="bench",
                          settings=settings)
    if summary.status != "released":
        raise SystemExit(f"the bench release was not released: {summary.reasons}")
    print(f"  released {MODEL} v{summary.model_version} in {time.perf_counter() - start:.1f} s", flush=True)
    return summary.model_version


def _current_version(settings: Settings) -> str | None:
    from pipelines.release import latest_summary

    if not (settings.state / "gitops.git").exists():
        return None
    summary = latest_summary(MODEL, settings)
    return summary.model_version if summary and summary.status == "released" else None


def _until_converged(fleet: Fleet, version: str, limit: int = 5) -> tuple[float, int]:
    seconds = 0.0
    for rounds in range(1, limit + 1):
        record = fleet.poll_round()
        seconds += record["seconds"]
        info = record["models"].get(MODEL)
        if info and info["on_desired"] == info["selected"] and info["desired"] == [version]:
            return seconds, rounds
    raise SystemExit(f"{len(fleet.agents)} devices did not converge on v{version} in {limit} rounds")


def run(devices: int, settings: Settings, git: str) -> dict:
    print(f"N = {devices}", flush=True)
    version = _current_version(settings) or _release(settings)
    fleet = Fleet(devices, settings, seed=0, git=git)
    cold_s, cold_rounds = _until_converged(fleet, version)
    first = fleet.rounds[0]
    print(f"  cold start on v{version}: {cold_s:.1f} s", flush=True)
    new_version = _release(settings)
    update_s, update_rounds = _until_converged(fleet, new_version)
    update = fleet.rounds[-update_rounds]
    quiet = fleet.poll_round()
    print(f"  update to v{new_version}: {update_s:.1f} s", flush=True)
    result = fleet.result()
    selected = result["rounds"][-1]["models"][MODEL]["selected"]
    return {
        "devices": devices, "selected": selected, "git_mode": fleet.git_mode,
        "from_version": version, "to_version": new_version,
        "cold_start": {"seconds": round(cold_s, 2), "rounds": cold_rounds},
        "update": {"seconds": round(update_s, 2), "rounds": update_rounds,
                   "device_poll_ms": update["device_poll_ms"]},
        "git_bytes_per_device": {"first_poll": first["git_bytes_per_device"]["mean"],
                                 "update_poll": update["git_bytes_per_device"]["mean"],
                                 "quiet_poll": quiet["git_bytes_per_device"]["mean"]},
        "downloads_per_device": result["downloads_per_device"],
        "rounds": result["rounds"],
    }


def _table(runs: list[dict]) -> str:
    lines = [f"{'N':>6} {'selected':>8} {'git':>10} {'cold s':>7} {'update s':>9} {'poll ms p50/p95':>16}"
             f" {'git B first':>11} {'git B update':>12} {'git B quiet':>11} {'downloads/device':>16}"
             f" {'B/download':>13}"]
    for r in runs:
        d, g, poll = r["downloads_per_device"], r["git_bytes_per_device"], r["update"]["device_poll_ms"]
        lines.append(f"{r['devices']:>6} {r['selected']:>8} {r['git_mode']:>10} {r['cold_start']['seconds']:>7.1f}"
                     f" {r['update']['seconds']:>9.1f} {poll['p50']:>7.1f}/{poll['p95']:<8.1f}"
                     f" {g['first_poll']:>11,.0f} {g['update_poll']:>12,.0f} {g['quiet_poll']:>11,.0f}"
                     f" {d['mean']:>9.2f} ({d['min']}-{d['max']}) {d['bytes_mean'] / d['mean'] if d['mean'] else 0:>13,.0f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--no-5000", action="store_true", help="do not try 5,000 devices")
    parser.add_argument("--git", choices=["auto", "per-device", "shared"], default="auto")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    root = get_settings().state
    # Everything local and under the bench's own folder, whatever EDGE_* points at.
    settings = Settings(state_dir=root / "bench" / "fleet-state", gitops_remote=None, artifact_store=None,
                        mlflow_tracking_uri=None, mlflow_artifact_root=None, s3_endpoint_url=None,
                        signing_key=None, signing_public_key=None)
    runs = [run(devices, settings, args.git) for devices in args.devices]
    if not args.no_5000 and 5000 not in args.devices:
        last = runs[-1]
        projected = (last["cold_start"]["seconds"] + last["update"]["seconds"]) * 5000 / last["devices"]
        if projected < FIVE_THOUSAND_BUDGET_S:
            runs.append(run(5000, settings, args.git))
        else:
            print(f"5,000 devices skipped: projected {projected:.0f} s of polling", flush=True)
    print()
    print(_table(runs))
    out = root / "bench" / "fleet_convergence.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"host": {"python": platform.python_version(), "machine": platform.machine()},
                               "model": MODEL, "runs": runs}, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
