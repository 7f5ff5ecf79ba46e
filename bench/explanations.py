"""Explanation latency: LIME and SHAP over the shipped ONNX variant, one input at a time (as the
explain route and the field quality monitor call them), and the model card's global summary.

Two models on the release's own stages (`validate_data`, `train`, `export`, `quantize` from
`pipelines.release`, in a temporary state folder): adult-income (sklearn MLP, 9 features, 6 of
them text) and diabetes-progression (a regression, 10 numbers). For each method:

- cold: the first input explained in this process (it imports the explainer; SHAP's import is
  most of it);
- per input: INPUTS held-out rows explained one call each, against the spec's
  `backgroundRows` training rows (seeded), median and p95 of the calls' wall time;
- global summary: `global_summary` over SUMMARY_ROWS held-out rows, as the release's explain
  stage makes it.

    .venv/bin/python bench/explanations.py [--models adult-income diabetes-progression] [--inputs 20]

Writes `$EDGE_STATE_DIR/bench/explanations.json` (default `.edge-state`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.settings import Settings, get_settings  # noqa: E402

SPECS = ROOT / "model_specs"
MODELS = ("adult-income", "diabetes-progression")
METHODS = ("lime", "shap")
INPUTS = 20


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def _shipped(name: str, folder: Path):
    """The model released up to its quantization plan: (spec, the chosen variant's file, the test
    and training rows, task)."""
    from pipelines import release
    from pipelines.release.context import context, splits

    settings = Settings(state_dir=folder / "state")
    spec_path = SPECS / f"{name}.yaml"
    data = release.validate_data(spec_path, settings=settings)
    trained = release.train(spec_path, data, settings=settings)
    exported = release.export(spec_path, data, trained, settings=settings)
    plan = release.quantize(spec_path, data, exported, settings=settings)
    ctx = context(spec_path, settings)
    parts = splits(ctx, data)
    return ctx.spec, ctx.fetch(plan.chosen_candidate.uri), plan.chosen, parts["test"], parts["train"], data


def measure(name: str, folder: Path, inputs: int) -> dict:
    from pipelines.gates.explain import SUMMARY_ROWS, global_summary, local_explanations

    spec, path, variant, test, train, data = _shipped(name, folder)
    seed = spec.training.seed
    background = train[data.features].sample(n=min(spec.responsible_ai.explainability.background_rows, len(train)),
                                             random_state=seed)
    rows = test[data.features].sample(n=inputs + 1, random_state=seed)
    out = {"model": name, "task": data.task, "variant": variant, "features": len(data.features),
           "background_rows": len(background), "inputs": inputs, "methods": {}}
    for method in METHODS:
        began = time.perf_counter()
        local_explanations(path, rows.iloc[[0]], background, method, data.task, seed)
        cold = time.perf_counter() - began
        calls = []
        for i in range(1, inputs + 1):
            began = time.perf_counter()
            local_explanations(path, rows.iloc[[i]], background, method, data.task, seed)
            calls.append((time.perf_counter() - began) * 1000)
        began = time.perf_counter()
        summary = global_summary(path, test[data.features], background, method, data.task, seed)
        out["methods"][method] = {
            "cold_s": round(cold, 2), "median_ms": round(statistics.median(calls), 1), "p95_ms": round(_p95(calls), 1),
            "summary_rows": min(SUMMARY_ROWS, len(test)), "summary_s": round(time.perf_counter() - began, 2),
            "top_features": list(summary)[:3]}
    return out


def _table(results: list[dict]) -> str:
    header = ["model", "method", "cold s", "median ms", "p95 ms", "summary s", "top features (summary)"]
    lines = [header]
    for result in results:
        for method, m in result["methods"].items():
            lines.append([f"{result['model']} ({result['variant']})", method, f"{m['cold_s']:.2f}",
                          f"{m['median_ms']:.1f}", f"{m['p95_ms']:.1f}",
                          f"{m['summary_s']:.2f} ({m['summary_rows']} rows)", ", ".join(m["top_features"])])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--inputs", type=int, default=INPUTS, help="inputs explained one call each per method")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.WARNING)  # Great Expectations sets INFO on its own loggers
    started = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="edge-bench-explain-"))
    try:
        results = [measure(name, folder, args.inputs) for name in args.models]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(_table(results))
    seconds = round(time.perf_counter() - started, 1)
    out = get_settings().state / "bench" / "explanations.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
                    "load_average": os.getloadavg()}, "results": results, "seconds": seconds}, indent=2))
    print(f"\n{len(results)} models in {seconds:.0f} s; written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
