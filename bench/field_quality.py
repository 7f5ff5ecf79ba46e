"""Field quality monitor throughput: one check over 100k and 1M labelled inferences.

A small classifier is released (logistic regression on a synthetic table with a sensitive
`group` column); then, per size, the window is filled as devices and a business system would
fill it: inference records of 50 sampled inferences each (local JSON lines, one file per
device and day), labels in batches of 100,000 (`store_labels`), and the operator's attributes
table (CSV). The timed part is `check_field_quality` with no action: reading the records and
labels, the joins, every figure with 1,000 bootstrap resamples per version, device group and
sensitive group, Evidently's classification report and 5 LIME explanations. Peak memory is
the process's maximum resident set.

    .venv/bin/python bench/field_quality.py [--rows 100000 1000000]

Writes `$EDGE_STATE_DIR/bench/field_quality.json` (default `.edge-state`).
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
sys.path.insert(0, str(ROOT / "tests"))

SAMPLES_PER_RECORD = 50
DEVICES = 2000


def _fill(settings, rows: int, now: datetime, specs: Path) -> float:
    """Write `rows` sampled inferences with labels and attributes; the seconds it took."""
    import numpy as np
    import pandas as pd
    from conftest import tabular_frame

    from pipelines.edge import telemetry
    from pipelines.operate.feedback import store_labels
    from pipelines.storage import ObjectStore

    began = time.perf_counter()
    store = ObjectStore(settings.telemetry_url)
    pool = tabular_frame(20_000, seed=7)
    rng = np.random.default_rng(rows)
    picked = rng.integers(0, len(pool), rows)
    frame = pool.iloc[picked].reset_index(drop=True)
    ids = [f"req-{i}" for i in range(rows)]
    inputs = frame[["x1", "x2", "colour"]].to_dict("records")
    outputs = ((frame["x1"] + 0.5 * frame["x2"] + (frame["colour"] == "red")) > 0.3).astype(int).to_numpy()
    for start in range(0, rows, SAMPLES_PER_RECORD):
        device = f"dev-{(start // SAMPLES_PER_RECORD) % DEVICES:05d}"
        stop = min(rows, start + SAMPLES_PER_RECORD)
        record = {"kind": "inference", "device_id": device, "model": "bench-field", "version": "1",
                  "group": "phones", "window_start": telemetry.timestamp(now - timedelta(hours=2)),
                  "ts": telemetry.timestamp(now - timedelta(hours=1)), "requests": float(stop - start),
                  "errors": 0.0, "latency_hist": [0.0] * (len(telemetry.LATENCY_EDGES_MS) + 1),
                  "predictions": {}, "privacy": None,
                  "samples": [{"id": ids[i], "inputs": inputs[i], "output": int(outputs[i])} for i in range(start, stop)]}
        telemetry.write_record(store, record)
    for start in range(0, rows, 100_000):
        batch = [{"inference_id": ids[i], "label": int(frame["label"].iat[i])} for i in range(start, min(rows, start + 100_000))]
        store_labels(store, "bench-field", batch, now - timedelta(minutes=30 - start // 100_000))
    pd.DataFrame({"inference_id": ids, "group": frame["group"]}).to_csv(specs / "attributes.csv", index=False)
    return time.perf_counter() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    args = parser.parse_args()
    from conftest import phones_fleet, tabular_frame, write_spec

    from pipelines.operate.quality import check_field_quality
    from pipelines.release import run_release
    from pipelines.settings import Settings

    out_dir = Path(os.environ.get("EDGE_STATE_DIR", ROOT / ".edge-state")) / "bench"
    results = []
    for rows in args.rows:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            specs = folder / "specs"
            specs.mkdir()
            tabular_frame(4000).to_csv(specs / "data.csv", index=False)
            spec = write_spec(specs, "bench-field", "data.csv",
                              monitoring={"field": {"window": "1d", "attributes": "attributes.csv"}},
                              responsibleAI={"fairness": {"biasScore": 0.2, "equalizedOdds": 0.25},
                                             "explainability": {"method": "lime", "samples": 5}})
            (folder / "fleet.yaml").write_text(phones_fleet())
            settings = Settings(state_dir=folder / "state", specs_dir=specs, fleet_file=folder / "fleet.yaml")
            os.environ["EDGE_STATE_DIR"] = str(folder / "state")
            summary = run_release(spec, settings=settings)
            assert summary.status == "released", summary.status
            now = datetime.now(timezone.utc)
            filled = _fill(settings, rows, now, specs)
            began = time.perf_counter()
            check = check_field_quality(spec, settings, now=now + timedelta(seconds=1), act=False)
            seconds = time.perf_counter() - began
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            assert check.labelled == rows, (check.labelled, rows)
            result = {"rows": rows, "check_seconds": round(seconds, 2), "fill_seconds": round(filled, 1),
                      "peak_rss_mib": round(peak), "status": check.status, "explanations": len(check.explanations)}
            print(f"{rows:>9,} labelled inferences: check {seconds:6.1f} s (status {check.status}, "
                  f"{len(check.explanations)} explanations; writing them took {filled:.0f} s); "
                  f"peak RSS so far {peak:,.0f} MiB", flush=True)
            results.append(result)
            shutil.rmtree(folder / "state", ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "field_quality.json").write_text(json.dumps(
        {"machine": platform.machine(), "cpus": os.cpu_count(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
