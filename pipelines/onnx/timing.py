"""One-row ONNX inference timed on one thread in a fresh Python process.

Timing next to live sessions in the calling process was distorted by up to 16x through
thread contention, so the parent writes the feed to a file (`save_feed`) and starts a module's
entry point in a new interpreter (`run_module`, `measure_in_child`); that child loads the feed
and times the session (`time_inference`) and writes its figures as JSON.

onnxruntime is imported inside `time_inference` only, so that importing this module stays cheap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

PACKAGE_ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------- feed


def ort_feed(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The feed as onnxruntime wants it: string tensors as object arrays, not numpy unicode."""
    return {name: (a.astype(object) if a.dtype.kind == "U" else a) for name, a in feed.items()}


def save_feed(path: Path, feed: dict[str, np.ndarray]) -> None:
    """Write `feed` to an .npz that `load_feed` reads back without pickle."""
    arrays: dict[str, np.ndarray] = {"__names__": np.array(list(feed), dtype=str)}
    for i, value in enumerate(feed.values()):
        a = np.asarray(value)
        if a.dtype == object:
            a = a.astype(str)  # unicode arrays load without pickle
        arrays[f"a{i}"] = a
    np.savez(path, **arrays)


def load_feed(path: Path) -> dict[str, np.ndarray]:
    """The feed written by `save_feed`, ready for `session.run`."""
    with np.load(path, allow_pickle=False) as data:
        names = [str(n) for n in data["__names__"]]
        return ort_feed({name: data[f"a{i}"] for i, name in enumerate(names)})


def check_timing_args(feed: dict[str, np.ndarray], warmup: int, runs: int, label: str = "the feed") -> None:
    """Raise ValueError unless runs >= 1, warmup >= 0 and `feed` is one non-empty row."""
    if runs < 1 or warmup < 0:
        raise ValueError("runs must be >= 1 and warmup >= 0")
    if not feed:
        raise ValueError(f"{label} is empty")
    batched = {k: np.shape(v) for k, v in feed.items() if np.ndim(v) and np.shape(v)[0] != 1}
    if batched:
        raise ValueError(f"{label} must hold one row; got shapes {batched}")


# ---------------------------------------------------------------------------------- child side


def time_inference(model_path: Path, feed_path: Path, warmup: int, runs: int) -> dict[str, Any]:
    """Time one-row inference on one thread, in this process; call it in a fresh child only.

    `warmup` untimed runs, then `runs` timed ones; p50, p95 and mean in ms.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    feed = load_feed(feed_path)
    for _ in range(warmup):
        session.run(None, feed)
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times[i] = time.perf_counter() - start
    times *= 1000.0
    return {
        "p50_ms": float(np.percentile(times, 50)),
        "p95_ms": float(np.percentile(times, 95)),
        "mean_ms": float(times.mean()),
        "runs": runs,
        "warmup": warmup,
        "pid": os.getpid(),
        "onnxruntime": ort.__version__,
    }


# --------------------------------------------------------------------------------- parent side


def run_module(module: str, args: Sequence[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run `python -m <module> <args>` in a fresh interpreter with one OpenMP thread.

    Output is captured as text; raises subprocess.TimeoutExpired after `timeout` seconds.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
        text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


def stderr_tail(text: str, lines: int = 15, chars: int = 2000) -> str:
    """The last `lines` lines of a child's stderr, at most `chars` characters."""
    tail = "\n".join(text.strip().splitlines()[-lines:])
    return (tail[-chars:] if len(tail) > chars else tail) or "(no stderr)"


def run_module_checked(
    module: str, args: Sequence[str], cwd: Path, timeout: float, what: str,
    error: type[Exception] = RuntimeError, result: Path | None = None,
) -> None:
    """`run_module`, raising `error` ("<what> timed out/failed ...") if the child times out,
    exits non-zero, or does not write `result`."""
    try:
        done = run_module(module, args, cwd, timeout)
    except subprocess.TimeoutExpired as exc:
        raise error(f"{what} timed out after {timeout:.0f} s") from exc
    if done.returncode != 0 or (result is not None and not result.exists()):
        raise error(f"{what} failed (exit {done.returncode}): {stderr_tail(done.stderr)}")


def measure_in_child(
    module: str, command: str, model_path: Path, feed: dict[str, np.ndarray], warmup: int, runs: int,
    timeout: float, what: str, error: type[Exception] = RuntimeError,
) -> dict[str, Any]:
    """Time `model_path` on `feed` in a fresh process and return the child's JSON result.

    The child is `python -m <module> <command> MODEL FEED RESULT --warmup W --runs R`: it reads
    the feed with `load_feed`, times with `time_inference` and writes the JSON to RESULT.
    """
    with tempfile.TemporaryDirectory(prefix="timing.") as tmp:
        feed_path, result_path = Path(tmp) / "feed.npz", Path(tmp) / "result.json"
        save_feed(feed_path, feed)
        args = [command, str(Path(model_path).resolve()), str(feed_path), str(result_path),
                "--warmup", str(warmup), "--runs", str(runs)]
        run_module_checked(module, args, Path(tmp), timeout, what, error, result_path)
        return json.loads(result_path.read_text())
