"""Quantization per model: size, latency and accuracy of fp32 / dynamic int8 / static int8, and
the variant the planner chose.

Four models on the release's own stages (`validate_data`, `train`, `export`, `quantize` from
`pipelines.release`, in a temporary state folder):
- adult-income and digit-recognizer: the demo specs as they are (sklearn MLP on UCI Adult,
  the small torch CNN on 5,000 MNIST digits);
- digit-mlp-large (784-1024-1024-10) and digit-cnn-large (32/64 channels, hidden 128): the
  digit spec with only its training section changed (3 epochs, same seed), so they train,
  export and quantize exactly as a release of such a spec would.

The quantize stage builds the candidates, scores each on the spec's test split, times each
with `measure_latency` (batch 1, one thread, a fresh process per measurement; the stage's
counts: 50 warm-up + 500 timed runs, median of 3 rounds) and chooses one within the spec's
accuracy budget (0.5 pt for adult-income, 1 pt for the digit models). The native model is
timed the same way in fresh processes of this script (`--child`): torch eager with
`torch.set_num_threads(1)` under `inference_mode`, and for the sklearn model its
`predict_proba` on a one-row frame (there is no torch eager: "n/a"). The timed row is the first
test row, the same one the quantize stage times.

Ratios are variant / baseline: size and p50 vs the fp32 ONNX file, p50 vs torch eager; below 1
is smaller or faster. Accuracy of the native row is the train stage's test accuracy.

    .venv/bin/python bench/quantization.py [--models adult-income digit-cnn-large ...]

Writes `$EDGE_STATE_DIR/bench/quantization.json` (default `.edge-state`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.settings import Settings, get_settings  # noqa: E402

SPECS = ROOT / "model_specs"
# name -> (spec it derives from, training section to replace; None keeps the spec as it is)
MODELS: dict[str, tuple[str, dict | None]] = {
    "adult-income": ("adult-income", None),
    "digit-recognizer": ("digit-recognizer", None),
    "digit-mlp-large": ("digit-recognizer", {
        "framework": "torch", "architecture": "mlp", "seed": 7,
        "params": {"hidden_layers": [1024, 1024], "input_scale": 255.0, "epochs": 3, "batch_size": 64,
                   "learning_rate": 0.001}}),
    "digit-cnn-large": ("digit-recognizer", {
        "framework": "torch", "architecture": "cnn", "seed": 7,
        "params": {"conv_channels": [32, 64], "hidden": 128, "image_shape": [1, 28, 28], "epochs": 3,
                   "batch_size": 64, "learning_rate": 0.002}}),
}
WARMUP, RUNS, ROUNDS = 50, 500, 3  # as the quantize stage times the ONNX variants


# ---------------------------------------------------------------------------- native, child side


def _child(framework: str, model_path: Path, row_path: Path, warmup: int, runs: int) -> None:
    """Time the native model on one row in this (fresh) process; print JSON."""
    import numpy as np

    from pipelines import training

    model = training.load(framework, model_path)
    if framework == "torch":
        import torch

        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
        x = torch.from_numpy(np.load(row_path))

        def call() -> None:
            with torch.inference_mode():
                model(x)
    else:
        import pandas as pd

        row = pd.read_pickle(row_path)

        def call() -> None:
            model.predict_proba(row)
    for _ in range(warmup):
        call()
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        call()
        times[i] = time.perf_counter() - start
    print(json.dumps({"p50_ms": float(np.percentile(times, 50) * 1000),
                      "p95_ms": float(np.percentile(times, 95) * 1000), "pid": os.getpid()}))


def _native_latency(framework: str, model_path: Path, row_path: Path) -> dict:
    """Median p50/p95 over ROUNDS fresh single-threaded processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    samples = []
    for _ in range(ROUNDS):
        done = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child", framework, str(model_path), str(row_path),
             "--warmup", str(WARMUP), "--runs", str(RUNS)],
            env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0:
            raise SystemExit(f"native timing of {model_path.name} failed:\n{done.stderr[-2000:]}")
        samples.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {"p50_ms": statistics.median(s["p50_ms"] for s in samples),
            "p95_ms": statistics.median(s["p95_ms"] for s in samples), "rounds": ROUNDS}


# ------------------------------------------------------------------------------------- releases


def _spec(name: str, folder: Path) -> Path:
    """The spec file of a benchmark model (a derived one is written to `folder`)."""
    import yaml

    base, training = MODELS[name]
    source = SPECS / f"{base}.yaml"
    if training is None:
        return source
    spec = yaml.safe_load(source.read_text())
    spec["name"] = name
    spec["training"] = training
    path = folder / f"{name}.yaml"  # the spec's name must equal its file name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def measure(name: str, folder: Path) -> dict:
    from pipelines import release
    from pipelines.release.context import context, splits

    settings = Settings(state_dir=folder / "state")
    spec_path = _spec(name, folder)
    stages: dict[str, float] = {}

    def timed(stage: str, fn, *args):
        began = time.perf_counter()
        result = fn(spec_path, *args, settings=settings)
        stages[stage] = round(time.perf_counter() - began, 2)
        return result

    data = timed("validate_data", release.validate_data)
    trained = timed("train", release.train, data)
    # torch (imported by now) resets its loggers on import; its exporter's notes about
    # torchvision are noise here.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    exported = timed("export", release.export, data, trained)
    plan = timed("quantize", release.quantize, data, exported)

    ctx = context(spec_path, settings)
    native_path = ctx.fetch(trained.model_uri)
    test = splits(ctx, data)["x_test"]
    if trained.framework == "torch":
        import numpy as np

        row_path = folder / f"{name}.row.npy"
        np.save(row_path, test.iloc[:1].to_numpy(np.float32), allow_pickle=False)
    else:
        row_path = folder / f"{name}.row.pkl"
        test.iloc[:1].to_pickle(row_path)
    began = time.perf_counter()
    native = _native_latency(trained.framework, native_path, row_path)
    stages["native_timing"] = round(time.perf_counter() - began, 2)
    return {
        "model": name, "framework": trained.framework, "accuracy_budget": ctx.spec.export.accuracy_budget,
        "training": ctx.spec.training.model_dump(mode="json"), "test_rows": len(test),
        "native": {"kind": "torch eager" if trained.framework == "torch" else "sklearn predict_proba",
                   "size_bytes": native_path.stat().st_size, "accuracy": trained.metrics["accuracy"], **native},
        "candidates": [c.model_dump(mode="json", exclude={"uri"}) for c in plan.candidates],
        "chosen": plan.chosen, "reason": plan.reason, "stages_s": stages,
    }


# ---------------------------------------------------------------------------------------- table


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _rows(result: dict) -> list[dict]:
    """Flat table rows: each candidate, then the native baseline."""
    fp32 = next(c for c in result["candidates"] if c["variant"] == "fp32")
    native = result["native"]
    torch_ms = native["p50_ms"] if result["framework"] == "torch" else None
    rows = []
    for c in result["candidates"]:
        ok = not c["note"] or c["latency_p50_ms"] > 0
        rows.append({
            "variant": c["variant"], "size_bytes": c["size_bytes"],
            "size_ratio": c["size_bytes"] / fp32["size_bytes"], "p50_ms": c["latency_p50_ms"] if ok else None,
            "vs_fp32_ort": c["latency_p50_ms"] / fp32["latency_p50_ms"] if ok else None,
            "vs_torch_eager": c["latency_p50_ms"] / torch_ms if ok and torch_ms else None,
            "accuracy": c["accuracy"] if ok else None, "accuracy_change": c["accuracy_change"] if ok else None,
            "chosen": c["variant"] == result["chosen"], "eligible": c["eligible"], "note": c["note"],
        })
    rows.append({
        "variant": native["kind"], "size_bytes": native["size_bytes"],
        "size_ratio": native["size_bytes"] / fp32["size_bytes"], "p50_ms": native["p50_ms"],
        "vs_fp32_ort": native["p50_ms"] / fp32["latency_p50_ms"], "vs_torch_eager": 1.0 if torch_ms else None,
        "accuracy": native["accuracy"], "accuracy_change": native["accuracy"] - fp32["accuracy"],
        "chosen": False, "eligible": None, "note": "native model",
    })
    return rows


def _table(results: list[dict]) -> str:
    def ratio(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}x"

    header = (f"{'model':<18}{'variant':<23}{'size':>11}{'size x':>8}{'p50 ms':>9}{'vs fp32':>9}"
              f"{'vs torch':>10}{'accuracy':>10}{'Δ acc pt':>10}  chosen")
    lines = [header, "-" * len(header)]
    for result in results:
        for i, r in enumerate(result["rows"]):
            p50 = "failed" if r["p50_ms"] is None else f"{r['p50_ms']:.4f}"
            acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
            change = "-" if r["accuracy_change"] is None else f"{r['accuracy_change'] * 100:+.2f}"
            mark = "<- chosen" if r["chosen"] else ("over budget" if r["eligible"] is False else "")
            lines.append(f"{result['model'] if i == 0 else '':<18}{r['variant']:<23}{_size(r['size_bytes']):>11}"
                         f"{ratio(r['size_ratio']):>8}{p50:>9}{ratio(r['vs_fp32_ort']):>9}"
                         f"{ratio(r['vs_torch_eager']):>10}{acc:>10}{change:>10}  {mark}")
        lines.append("")
    for result in results:
        lines.append(f"{result['model']} (budget {result['accuracy_budget'] * 100:.1f} pt): {result['reason']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--child", nargs=3, metavar=("FRAMEWORK", "MODEL_FILE", "ROW_FILE"),
                        help="internal: time a native model on one row in this process")
    parser.add_argument("--warmup", type=int, default=WARMUP, help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=int, default=RUNS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        framework, model_file, row_file = args.child
        _child(framework, Path(model_file), Path(row_file), args.warmup, args.runs)
        return 0

    logging.basicConfig(level=logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.WARNING)  # Great Expectations sets INFO on its own loggers
    started = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="edge-bench-quant-"))
    results = []
    try:
        for name in args.models:
            result = measure(name, folder)
            result["rows"] = _rows(result)
            results.append(result)
            print(f"{name}: " + ", ".join(f"{k} {v:.1f} s" for k, v in result["stages_s"].items()), flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print()
    print(_table(results))
    seconds = round(time.perf_counter() - started, 1)
    out = get_settings().state / "bench" / "quantization.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "timing": {"warmup": WARMUP, "runs": RUNS, "rounds": ROUNDS, "threads": 1, "batch": 1},
        "results": results, "seconds": seconds,
    }, indent=2))
    print(f"\n{len(results)} models in {seconds:.0f} s; written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
