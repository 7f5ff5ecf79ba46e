"""Four releases at once on the production profile against the same four one after another on
the embedded set-up.

- production: the native stack of `stack.prod_stack` (Airflow on PostgreSQL with the
  CeleryExecutor, Redis, one Celery worker taking `--concurrency` tasks at once, an MLflow
  server on PostgreSQL with S3 artifacts, moto's S3 server, git daemon); the four release DAGs
  triggered together through the REST API; wall time from the first trigger to the last
  finished run.
- embedded: `EmbeddedAirflow` as `make ui` runs it (SQLite, LocalExecutor with two task slots,
  local stores, a bare Git repo); the same four DAGs triggered one after another, each once the
  previous run finished.

The four are the demo specs twice each under names of their own (adult-income-p1, -p2,
digit-recognizer-p1, -p2), without their cron schedules. Every run must succeed. Figures go to
`$EDGE_STATE_DIR/bench/parallel_releases.json` (default `.edge-state`).

    .venv/bin/python bench/parallel_releases.py [--concurrency 4]

Needs PostgreSQL and Redis on 127.0.0.1 (EDGE_TEST_POSTGRES_URL, EDGE_TEST_REDIS_URL). Takes
about 7 minutes on a two-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.settings import get_settings  # noqa: E402
from stack.airflow_local import EmbeddedAirflow  # noqa: E402
from stack.prod_stack import POSTGRES_URL, REDIS_URL, ProductionStack, demo_spec_copies  # noqa: E402

MODELS = ("adult-income-p1", "adult-income-p2", "digit-recognizer-p1", "digit-recognizer-p2")


def _run(airflow: EmbeddedAirflow, model: str) -> dict:
    return airflow.trigger(f"edge_release__{model}", {"reason": "benchmark"})


def _finish(airflow: EmbeddedAirflow, model: str, run: dict) -> float:
    """Wait for the run; its own duration (start to end, as Airflow recorded it)."""
    from datetime import datetime

    done = airflow.wait_run(f"edge_release__{model}", run["dag_run_id"], timeout=1800)
    if done["state"] != "success":
        raise SystemExit(f"{model}: the release run {done['state']}; logs in {airflow.home}")
    start, end = (datetime.fromisoformat(done[key]) for key in ("start_date", "end_date"))
    return (end - start).total_seconds()


def production(root: Path, concurrency: int) -> dict:
    specs = demo_spec_copies(root / "specs", MODELS)
    with ProductionStack(root / "stack", root / "specs", concurrency=concurrency,
                         postgres_url=os.environ.get("EDGE_TEST_POSTGRES_URL", POSTGRES_URL),
                         redis_url=os.environ.get("EDGE_TEST_REDIS_URL", REDIS_URL)) as stack:
        airflow = stack.airflow
        for model in specs:
            airflow.wait_dag(f"edge_release__{model}")
        began = time.monotonic()
        runs = {model: _run(airflow, model) for model in specs}
        durations = {model: _finish(airflow, model, run) for model, run in runs.items()}
        wall = time.monotonic() - began
    return {"wall_seconds": round(wall, 1), "run_seconds": {m: round(s, 1) for m, s in durations.items()},
            "celery_concurrency": concurrency}


def embedded(root: Path) -> dict:
    specs = demo_spec_copies(root / "specs", MODELS)
    env = {"EDGE_STATE_DIR": str(root / "state"), "EDGE_SPECS_DIR": str(root / "specs")}
    with EmbeddedAirflow(root / "airflow", env=env, log_dir=root / "logs") as airflow:
        for model in specs:
            airflow.wait_dag(f"edge_release__{model}")
        began = time.monotonic()
        durations = {model: _finish(airflow, model, _run(airflow, model)) for model in specs}
        wall = time.monotonic() - began
    return {"wall_seconds": round(wall, 1), "run_seconds": {m: round(s, 1) for m, s in durations.items()},
            "executor": "LocalExecutor", "parallelism": 2}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=4, help="tasks one Celery worker runs at once")
    args = parser.parse_args(argv)
    # SIGTERM stops the stacks as Ctrl-C does (their processes run in sessions of their own).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    work = Path(tempfile.mkdtemp(prefix="edge-bench-parallel-"))
    try:
        prod = production(work / "production", args.concurrency)
        print(f"production, 4 at once:       {prod['wall_seconds']:7.1f} s  {prod['run_seconds']}", flush=True)
        emb = embedded(work / "embedded")
        print(f"embedded, one after another: {emb['wall_seconds']:7.1f} s  {emb['run_seconds']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = emb["wall_seconds"] / prod["wall_seconds"]
    print(f"speed-up of the parallel releases: {ratio:.2f}x")
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform()},
              "models": list(MODELS), "production_parallel": prod, "embedded_sequential": emb,
              "speedup": round(ratio, 2)}
    out = get_settings().state / "bench" / "parallel_releases.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
