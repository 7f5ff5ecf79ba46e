"""How well counted FLOPs predict measured latency on this host.

Builds small torch models (MLPs and CNNs of different sizes, random weights), exports them to
ONNX, calibrates the host once (`calibrate_host`), then compares, per model, the latency
predicted from the graph's FLOPs with the p50 measured by `measure_host` (batch 1, one thread,
fresh process). Dynamic-int8 variants of two models are added to show what a FLOP count cannot
see; the summary is given for the fp32 models and for all.

    .venv/bin/python bench/estimator_accuracy.py

Writes `$EDGE_STATE_DIR/bench/estimator_accuracy.json` (default `.edge-state`).
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.finops.profile import calibrate_host, measure_host, profile_graph  # noqa: E402
from pipelines.settings import get_settings  # noqa: E402


def _models() -> dict[str, tuple[object, tuple[int, ...]]]:
    """Name -> (torch module, input shape at batch 1)."""
    import torch
    from torch import nn

    def mlp(*widths: int) -> nn.Module:
        layers: list[nn.Module] = []
        for i in range(len(widths) - 1):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    def cnn(c1: int, c2: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(c2 * 7 * 7, 10),
        )

    torch.manual_seed(0)
    return {
        "mlp-64-128-10": (mlp(64, 128, 10), (1, 64)),
        "mlp-784-256-10": (mlp(784, 256, 10), (1, 784)),
        "mlp-784-1024-1024-10": (mlp(784, 1024, 1024, 10), (1, 784)),
        "cnn-28x28-8-16": (cnn(8, 16), (1, 1, 28, 28)),
        "cnn-28x28-32-64": (cnn(32, 64), (1, 1, 28, 28)),
    }


def _export(module: object, shape: tuple[int, ...], path: Path) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated; fine here
        torch.onnx.export(
            module.eval(), (torch.zeros(shape),), str(path), input_names=["x"], output_names=["y"],
            dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17, dynamo=False,
        )


def main() -> int:
    import torch

    from pipelines.onnx.quantize import build_candidates

    torch.set_num_threads(1)  # shared machine
    started = time.perf_counter()
    calibration = calibrate_host(runs=200, warmup=20, rounds=3)
    print(f"host: {calibration.gflops:.2f} GFLOPS (1 thread, batch-1 MatMul), "
          f"overhead {calibration.overhead_ms * 1000:.1f} us per run")

    rows = []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="estimator-bench.") as tmp:
        folder = Path(tmp)
        files: list[tuple[str, Path, tuple[int, ...], str]] = []
        for name, (module, shape) in _models().items():
            path = folder / f"{name}.onnx"
            _export(module, shape, path)
            files.append((name, path, shape, "fp32"))
            if name in ("mlp-784-1024-1024-10", "cnn-28x28-8-16"):
                built = build_candidates(path, ["dynamic"], [], folder / name)
                if isinstance(built.get("dynamic"), Path):
                    files.append((f"{name} int8", built["dynamic"], shape, "dynamic"))
        for name, path, shape, variant in files:
            profile = profile_graph(path)
            predicted = calibration.predict_ms(profile.flops)
            feed = {"x": rng.standard_normal(shape).astype(np.float32)}
            measured = measure_host(path, feed, warmup=50, runs=500)
            rows.append({
                "model": name, "variant": variant, "parameters": profile.parameters,
                "mflops": profile.flops / 1e6, "predicted_ms": predicted,
                "measured_p50_ms": measured.latency_p50_ms, "measured_p95_ms": measured.latency_p95_ms,
                "relative_error": abs(predicted - measured.latency_p50_ms) / measured.latency_p50_ms,
                "peak_rss_mib": measured.peak_rss_bytes / 2**20,
                "rss_over_baseline_mib": (measured.peak_rss_bytes - measured.baseline_rss_bytes) / 2**20,
                "unknown_ops": profile.unknown_ops,
            })

    header = f"{'model':<26}{'params':>11}{'MFLOPs':>9}{'pred ms':>10}{'meas ms':>10}{'rel.err':>9}{'RSS+ MiB':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:<26}{r['parameters']:>11,}{r['mflops']:>9.3f}{r['predicted_ms']:>10.4f}"
              f"{r['measured_p50_ms']:>10.4f}{r['relative_error']:>9.1%}{r['rss_over_baseline_mib']:>10.1f}")

    def summary(subset: list[dict]) -> dict[str, float | str]:
        errors = [r["relative_error"] for r in subset]
        worst = max(subset, key=lambda r: r["relative_error"])
        return {"models": len(subset), "median_relative_error": float(np.median(errors)),
                "worst_relative_error": worst["relative_error"], "worst_model": worst["model"]}

    summaries = {"fp32": summary([r for r in rows if r["variant"] == "fp32"]), "all": summary(rows)}
    for label, s in summaries.items():
        print(f"{label:>5}: median relative error {s['median_relative_error']:.1%}, "
              f"worst {s['worst_relative_error']:.1%} ({s['worst_model']}) over {s['models']} models")

    out = get_settings().state / "bench" / "estimator_accuracy.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "calibration": calibration.model_dump(), "rows": rows, "summary": summaries,
        "host": {"machine": platform.machine(), "python": platform.python_version()},
        "seconds": round(time.perf_counter() - started, 1),
    }, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
