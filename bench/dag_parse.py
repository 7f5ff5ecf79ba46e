"""DAG parse time per DAG file, and the modules a parse imports.

The dag-processor parses every file again and again, so what a DAG file imports at the top is
paid on every parse: the heavy libraries (torch, MLflow, scikit-learn, Evidently,
onnxruntime, pandas) belong inside the tasks. Two views:

- `airflow dags report` (one process, files one after another, as the dag-processor sees them
  when modules are already loaded);
- each file alone in a fresh process: seconds to parse it with Airflow's DagBag after
  `airflow.sdk` is imported (the baseline every DAG file pays), the modules the parse adds,
  and which heavy packages among them.

    .venv/bin/python bench/dag_parse.py

Writes `$EDGE_STATE_DIR/bench/dag_parse.json` (default `.edge-state`).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.settings import get_settings  # noqa: E402

HEAVY = ("torch", "mlflow", "sklearn", "evidently", "onnxruntime", "onnx", "pandas", "fairlearn",
         "great_expectations", "boto3", "numpy", "scipy")
PROBE = """
import json, sys, time
import airflow.sdk  # the baseline: every DAG file imports Airflow
from airflow.dag_processing.dagbag import DagBag
before = set(sys.modules)
began = time.perf_counter()
bag = DagBag(dag_folder=sys.argv[1])
seconds = time.perf_counter() - began
added = sorted(set(sys.modules) - before)
print(json.dumps({"seconds": seconds, "dags": len(bag.dags), "errors": {str(k): str(v)[:300] for k, v in
                  bag.import_errors.items()}, "added": added}))
"""


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "AIRFLOW_HOME": str(home), "EDGE_STATE_DIR": str(home / "state"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False", "AIRFLOW__LOGGING__LOGGING_LEVEL": "ERROR",
            "PYTHONWARNINGS": "ignore"}


def main() -> int:
    home = Path(tempfile.mkdtemp(prefix="edge-bench-parse-"))
    airflow = str(Path(sys.executable).parent / "airflow")
    try:
        env = _env(home)
        subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True)
        report = subprocess.run([airflow, "dags", "report", "-o", "json"], env=env, check=True, capture_output=True,
                                text=True).stdout
        report = json.loads(report[report.index("["):])
        fresh = {}
        for path in sorted((ROOT / "dags").glob("*.py")):
            out = subprocess.run([sys.executable, "-c", PROBE, str(path)], env=env, check=True, capture_output=True,
                                 text=True).stdout
            fresh[path.name] = json.loads(out.strip().splitlines()[-1])
    finally:
        shutil.rmtree(home, ignore_errors=True)

    def seconds(duration: str) -> float:
        h, m, s = duration.split(":")
        return int(h) * 3600 + int(m) * 60 + float(s)

    rows = []
    print(f"{'DAG file':<24}{'dags':>5}{'report ms':>11}{'alone ms':>10}{'+modules':>10}  heavy packages imported")
    for entry in sorted(report, key=lambda e: e["file"]):
        alone = fresh[entry["file"]]
        heavy = sorted({name.split(".")[0] for name in alone["added"] if name.split(".")[0] in HEAVY})
        rows.append({"file": entry["file"], "dags": int(entry["dag_num"]), "tasks": int(entry["task_num"]),
                     "report_ms": round(seconds(entry["duration"]) * 1000, 1),
                     "alone_ms": round(alone["seconds"] * 1000, 1), "modules_added": len(alone["added"]),
                     "heavy": heavy, "errors": alone["errors"]})
        print(f"{entry['file']:<24}{rows[-1]['dags']:>5}{rows[-1]['report_ms']:>11.1f}{rows[-1]['alone_ms']:>10.1f}"
              f"{rows[-1]['modules_added']:>10}  {', '.join(heavy) or '-'}")
        if alone["errors"]:
            print(f"  import errors: {alone['errors']}")
    out = get_settings().state / "bench" / "dag_parse.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                               "files": rows}, indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
