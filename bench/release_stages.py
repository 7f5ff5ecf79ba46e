"""Release wall time per stage for both demo specs, from the command line and from Airflow.

For each demo spec, two releases from a fresh state folder each (nothing to reuse):
- CLI: `python -m pipelines release SPEC --json` in a new process;
- Airflow: `airflow dags test edge_release__<model>` in a new process (the whole DAG run in
  one process, SQLite metadata migrated beforehand and not counted).
Stage seconds come from the release summary (the CLI's JSON; for Airflow each task's XCom
`seconds`, gathered by the summarize task). The ratio Airflow/CLI of the wall times is the
orchestration overhead: parsing the DAG, scheduling the tasks in-process, XCom.

    .venv/bin/python bench/release_stages.py [--specs model_specs/adult-income.yaml ...]

Writes `$EDGE_STATE_DIR/bench/release_stages.json` (default `.edge-state`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.settings import get_settings  # noqa: E402

BIN = Path(sys.executable).parent
DEMO_SPECS = [ROOT / "model_specs" / "adult-income.yaml", ROOT / "model_specs" / "digit-recognizer.yaml"]


def _env(state: Path) -> dict[str, str]:
    return {**os.environ, "EDGE_STATE_DIR": str(state), "AIRFLOW_HOME": str(state / "airflow"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"), "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING", "PYTHONWARNINGS": "ignore",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def _run(command: list[str], env: dict[str, str], what: str) -> tuple[float, str]:
    began = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"{what} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return seconds, done.stdout


def _summary(model: str, env: dict[str, str]) -> dict:
    _, out = _run([str(BIN / "python"), "-m", "pipelines", "summary", model, "--json"], env, f"summary {model}")
    return json.loads(out.strip().splitlines()[-1])


def measure(spec: Path, work: Path) -> dict:
    import yaml

    model = yaml.safe_load(spec.read_text())["name"]
    cli_env = _env(work / f"{model}-cli")
    cli_wall, out = _run([str(BIN / "python"), "-m", "pipelines", "release", str(spec), "--json"], cli_env,
                         f"release {spec.name}")
    cli = json.loads(out.strip().splitlines()[-1])

    airflow_env = _env(work / f"{model}-airflow")
    Path(airflow_env["AIRFLOW_HOME"]).mkdir(parents=True)
    _run([str(BIN / "airflow"), "db", "migrate"], airflow_env, "airflow db migrate")
    airflow_wall, _ = _run([str(BIN / "airflow"), "dags", "test", f"edge_release__{model}"], airflow_env,
                           f"airflow dags test edge_release__{model}")
    airflow = _summary(model, airflow_env)
    for summary, how in ((cli, "CLI"), (airflow, "Airflow")):
        if summary["status"] != "released":
            raise SystemExit(f"{model} via {how}: {summary['status']} ({summary.get('reasons')})")
    return {"model": model, "cli_wall_s": round(cli_wall, 2), "airflow_wall_s": round(airflow_wall, 2),
            "overhead_ratio": round(airflow_wall / cli_wall, 2),
            "cli_stages_s": cli["stages"], "airflow_stages_s": airflow["stages"],
            "quantization": {"cli": cli["quantization"].get("chosen"), "airflow": airflow["quantization"].get("chosen")}}


def _table(result: dict) -> str:
    cli, airflow = result["cli_stages_s"], result["airflow_stages_s"]
    lines = [f"{result['model']}", f"  {'stage':<16}{'CLI s':>9}{'Airflow s':>11}"]
    for stage in list(dict.fromkeys([*cli, *airflow])):
        c, a = cli.get(stage), airflow.get(stage)
        lines.append(f"  {stage:<16}{'' if c is None else f'{c:9.2f}':>9}{'' if a is None else f'{a:11.2f}':>11}")
    lines.append(f"  {'sum of stages':<16}{sum(cli.values()):9.2f}{sum(airflow.values()):11.2f}")
    lines.append(f"  {'wall (process)':<16}{result['cli_wall_s']:9.2f}{result['airflow_wall_s']:11.2f}"
                 f"   Airflow/CLI {result['overhead_ratio']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--specs", nargs="+", type=Path, default=DEMO_SPECS)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="edge-bench-release-"))
    results = []
    try:
        for spec in args.specs:
            result = measure(spec.resolve(), work)
            print(_table(result), flush=True)
            results.append(result)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = get_settings().state / "bench" / "release_stages.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                           "platform": platform.platform()}, "results": results}, indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
