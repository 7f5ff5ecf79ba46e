"""Drift monitor throughput: the telemetry read and Evidently on 10k, 50k and 200k rows.

The monitor's work per check, on the Adult census model's features: read the window's
inference records from the telemetry store (local JSON lines, 50 sampled rows per record, as
devices send them) into a frame, then Evidently's DataDriftPreset of 5,000 reference rows
against those rows (the HTML report included, as the monitor saves it), after one
uncounted warm-up report of 1,000 rows (imports, first-use set-up). The rows are census
test rows drawn with replacement, with a random predicted class; half of the windows are
shifted (age + 15) so the report has drift to find.

    .venv/bin/python bench/drift_throughput.py [--rows 10000 50000 200000]

Writes `$EDGE_STATE_DIR/bench/drift_throughput.json` (default `.edge-state`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.operate.monitor import REFERENCE_ROWS  # noqa: E402
from pipelines.settings import get_settings  # noqa: E402

SAMPLES_PER_RECORD = 50
SPEC = ROOT / "model_specs" / "adult-income.yaml"


def _data():
    from pipelines.data import read_source, resolve_features
    from pipelines.specs import load_spec, spec_dir

    spec = load_spec(SPEC)
    train = read_source(spec.data, spec_dir(SPEC))
    test = read_source(spec.data.model_copy(update={"source": spec.data.current_source}), spec_dir(SPEC))
    features = resolve_features(spec.data.features, list(train.columns))
    return train, test, features


def _write_window(store, test, features, rows: int, shift: bool, seed: int, now: datetime) -> int:
    import numpy as np

    from pipelines.edge.telemetry import write_record

    rng = np.random.default_rng(seed)
    picked = test[features].iloc[rng.integers(0, len(test), size=rows)].reset_index(drop=True)
    if shift:
        picked["age"] = picked["age"] + 15
    outputs = rng.integers(0, 2, size=rows)
    records = 0
    for start in range(0, rows, SAMPLES_PER_RECORD):
        chunk = picked.iloc[start:start + SAMPLES_PER_RECORD]
        samples = [{"inputs": {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()},
                    "output": int(outputs[start + i])} for i, row in enumerate(chunk.to_dict("records"))]
        device = f"dev-{records % 500:05d}"
        write_record(store, {"kind": "inference", "device_id": device, "model": "adult-income", "version": "1",
                             "group": "android-tablets", "window_start": now.isoformat(), "ts": now.isoformat(),
                             "requests": float(len(samples)), "errors": 0.0, "latency_hist": [], "predictions": {},
                             "samples": samples, "privacy": None})
        records += 1
    return records


def measure(rows: int, shift: bool, train, test, features, work: Path) -> dict:
    import numpy as np

    from pipelines.data import is_categorical
    from pipelines.edge.telemetry import read_records, samples_frame
    from pipelines.gates.drift import drift_report
    from pipelines.operate.monitor import PREDICTION, comparison_view
    from pipelines.storage import ObjectStore

    store = ObjectStore((work / f"telemetry-{rows}").as_uri())
    now = datetime.now(timezone.utc)
    records = _write_window(store, test, features, rows, shift, rows, now)

    began = time.perf_counter()
    current = samples_frame(read_records(store, "adult-income", now - timedelta(hours=1), kind="inference"))
    read_s = time.perf_counter() - began

    reference = train[features].sample(n=REFERENCE_ROWS, random_state=0).copy()
    reference[PREDICTION] = np.random.default_rng(1).integers(0, 2, size=len(reference))
    columns = [*features, PREDICTION]
    categorical = {c for c in columns if is_categorical(reference[c])}
    began = time.perf_counter()
    ref_view = comparison_view(reference, columns, {}, categorical)
    cur_view = comparison_view(current, columns, {}, categorical)
    figures = drift_report(ref_view, cur_view[ref_view.columns], 0.3, work / f"drift-{rows}.html")
    evidently_s = time.perf_counter() - began
    return {"rows": len(current), "records": records, "shifted": shift, "read_s": round(read_s, 2),
            "evidently_s": round(evidently_s, 2), "rows_per_s": round(len(current) / (read_s + evidently_s)),
            "drifted_columns": figures["drifted_columns"], "columns": len(ref_view.columns),
            "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    args = parser.parse_args(argv)
    train, test, features = _data()
    work = Path(tempfile.mkdtemp(prefix="edge-bench-drift-"))
    results = []
    print(f"{'rows':>8}{'records':>9}{'shift':>7}{'read s':>8}{'evidently s':>13}{'rows/s':>9}{'drifted':>9}"
          f"{'max RSS MiB':>13}")
    try:
        # Evidently's first report pays for its imports and set-up: once, not counted.
        measure(1_000, False, train, test, features, work)
        for index, rows in enumerate(args.rows):
            result = measure(rows, index % 2 == 1, train, test, features, work)
            results.append(result)
            print(f"{result['rows']:>8,}{result['records']:>9,}{'yes' if result['shifted'] else 'no':>7}"
                  f"{result['read_s']:>8.2f}{result['evidently_s']:>13.2f}{result['rows_per_s']:>9,}"
                  f"{result['drifted_columns']:>5} of {result['columns']}{result['max_rss_mib']:>9}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = get_settings().state / "bench" / "drift_throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                           "platform": platform.platform()},
                               "reference_rows": REFERENCE_ROWS, "results": results}, indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
