"""Quantized variants of an exported ONNX model, each measured, one chosen.

Quantization is never assumed to help. Measured on x86 with AVX2 and no VNNI: dynamic int8
makes an MLP ~4x smaller and faster, but a small CNN 4-6x slower (static QDQ 1.3-1.5x slower),
and a skl2onnx logistic regression grows (ai.onnx.ml ops are not quantized). So every variant
is built, scored by the caller's `evaluate`, timed alone in a fresh process, and
`choose_variant` picks one with the figures in its reason.

Heavy imports (onnx, onnxruntime) stay inside functions so that importing this module, e.g.
while Airflow parses DAGs, stays cheap.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.onnx.timing import (
    check_timing_args,
    measure_in_child,
    ort_feed,
    run_module,
    stderr_tail,
    time_inference,
)
from pipelines.records import QuantCandidate, QuantizationPlan
from pipelines.storage import sha256_file

VARIANTS: tuple[str, ...] = ("fp32", "dynamic", "static")
_MODULE = "pipelines.onnx.quantize"
_EPS = 1e-9


class QuantizationError(RuntimeError):
    """A variant could not be built, or could not be measured."""


def file_name(variant: str) -> str:
    """The file a variant is written to inside `out_dir`."""
    return f"model.{variant}.onnx"


# --------------------------------------------------------------------------------------- build


def _calibration_reader(feeds: Sequence[dict[str, np.ndarray]]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = [ort_feed(f) for f in feeds]
            self._range = (0, len(self._feeds))
            self._next = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self._next >= self._range[1]:
                return None
            self._next += 1
            return self._feeds[self._next - 1]

        def __len__(self) -> int:
            return len(self._feeds)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._range = (start_index, min(end_index, len(self._feeds)))
            self._next = start_index

    return _Reader()


def _verify(path: Path) -> None:
    """Raise unless `path` is one self-contained file that onnxruntime can load."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise QuantizationError(f"{path.name} keeps {len(external)} tensors in external data")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    del session


def _copy_fp32(src: Path, dst: Path) -> None:
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        # The shipped artifact must be one file: pull external tensors in.
        onnx.save(onnx.load(str(src)), str(dst), save_as_external_data=False)
    else:
        shutil.copyfile(src, dst)


def _preprocess_here(src: Path, dst: Path) -> None:
    """Child side of `_preprocess`: raises if no attempt works."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = onnx.load(str(src), load_external_data=False)
    # Symbolic shape inference knows only ONNX and com.microsoft ops (not ai.onnx.ml).
    known = all(n.domain in ("", "ai.onnx", "com.microsoft") for n in model.graph.node)
    attempts = (False, True) if known else (True,)
    for i, skip_symbolic in enumerate(attempts):
        try:
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=skip_symbolic)
            _verify(dst)
            return
        except Exception:
            if i == len(attempts) - 1:
                raise


def _preprocess(src: Path, dst: Path) -> str:
    """Run ORT's quantization pre-processing into `dst`; return "" or why it was skipped.

    In a child process whose working directory is scratch: on failure, symbolic shape
    inference dumps `sym_shape_infer_temp.onnx` (plus external data) into the current
    directory, and a crash in ORT's optimizer must not take the release down.
    """
    with tempfile.TemporaryDirectory(prefix="preprocess.") as tmp:
        try:
            done = run_module(_MODULE, ["preprocess", str(src.resolve()), str(dst.resolve())], Path(tmp), 600.0)
        except subprocess.TimeoutExpired:
            done = None
    if done is not None and done.returncode == 0 and dst.exists():
        return ""
    dst.unlink(missing_ok=True)
    why = "timed out" if done is None else stderr_tail(done.stderr, lines=1, chars=200)
    return f"pre-processing skipped ({why})"


def _has_conv(path: Path) -> bool:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(n.op_type in ("Conv", "ConvTranspose") for n in model.graph.node)


class _DropUntypedTensorNotes(logging.Filter):
    """onnxruntime's quantizer logs one root warning per tensor of an ai.onnx.ml graph it
    cannot type; they are expected there and drown the task log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("failed to infer the type of tensor")


def _quantize(
    mode: str, src: Path, dst: Path, calibration_feeds: Sequence[dict[str, np.ndarray]]
) -> None:
    quiet = _DropUntypedTensorNotes()
    logging.getLogger().addFilter(quiet)
    try:
        _quantize_unfiltered(mode, src, dst, calibration_feeds)
    finally:
        logging.getLogger().removeFilter(quiet)


def _quantize_unfiltered(
    mode: str, src: Path, dst: Path, calibration_feeds: Sequence[dict[str, np.ndarray]]
) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    from pipelines.onnx.export import rewrite_canonical

    # skl2onnx graphs mix ai.onnx.ml ops that shape inference cannot type; their tensors are
    # float, so say so instead of failing ("Unable to find data type for weight_name=...").
    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    if mode == "dynamic":
        quantize_dynamic(
            str(src), str(dst), weight_type=QuantType.QInt8, use_external_data_format=False,
            extra_options=extra,
        )
    elif mode == "static":
        if not calibration_feeds:
            raise QuantizationError("static quantization needs calibration feeds, none given")
        quantize_static(
            str(src),
            str(dst),
            _calibration_reader(calibration_feeds),
            quant_format=QuantFormat.QDQ,
            # Per-channel weights recover accuracy for convolutions; for MatMul/Gemm ORT
            # recommends per-tensor for throughput.
            per_channel=_has_conv(src),
            # u8 activations x s8 weights can saturate 16-bit intermediates on x86 without
            # VNNI; 7-bit weights avoid it (ORT's own advice for such CPUs).
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=False,
            extra_options=extra,
        )
    else:
        raise ValueError(f"unknown mode {mode!r}")
    rewrite_canonical(dst)
    _verify(dst)


def _build(
    fp32_path: Path,
    modes: Sequence[str],
    calibration_feeds: Sequence[dict[str, np.ndarray]],
    out_dir: Path,
) -> tuple[dict[str, Path | str], str]:
    """`build_candidates`, plus a note on pre-processing for the quantized variants."""
    unknown = [m for m in modes if m not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown quantization modes {unknown}; expected some of {list(VARIANTS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    fp32_out = out_dir / file_name("fp32")
    _copy_fp32(Path(fp32_path), fp32_out)
    built: dict[str, Path | str] = {"fp32": fp32_out}
    wanted = [m for m in dict.fromkeys(modes) if m != "fp32"]
    if not wanted:
        return built, ""
    note = ""
    with tempfile.TemporaryDirectory(prefix="quant.") as tmp:
        source = Path(tmp) / "preprocessed.onnx"
        note = _preprocess(fp32_out, source)
        if note:
            source = fp32_out
        for mode in wanted:
            target = out_dir / file_name(mode)
            target.unlink(missing_ok=True)
            try:
                _quantize(mode, source, target, calibration_feeds)
                built[mode] = target
            except Exception as exc:  # noqa: BLE001 - a failed variant is recorded, not fatal
                target.unlink(missing_ok=True)
                built[mode] = f"{mode} quantization failed: {_short(exc)}"
    return built, note


def build_candidates(
    fp32_path: Path,
    modes: list[str],
    calibration_feeds: list[dict[str, np.ndarray]],
    out_dir: Path,
) -> dict[str, Path | str]:
    """Write `model.<variant>.onnx` for fp32 (a copy) and each requested mode into `out_dir`.

    Values are the written paths, or an error string for a mode that could not be built.
    """
    return _build(fp32_path, modes, calibration_feeds, out_dir)[0]


# ------------------------------------------------------------------------------------- latency


def measure_latency(
    model_path: Path,
    feed: dict[str, np.ndarray],
    warmup: int = 20,
    runs: int = 200,
    *,
    timeout: float = 600.0,
) -> tuple[float, float]:
    """p50 and p95 in ms of one-row inference, timed in a fresh single-threaded process.

    A separate process because timing next to live sessions in this one was distorted by
    up to 16x through thread contention.
    """
    check_timing_args(feed, warmup, runs, "the latency feed")
    result = measure_in_child(
        _MODULE, "latency", Path(model_path), feed, warmup, runs, timeout,
        f"latency of {Path(model_path).name}", QuantizationError,
    )
    return result["p50_ms"], result["p95_ms"]


# -------------------------------------------------------------------------------------- choice


def _size(n: int) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.1f} KiB"
    return f"{n} B"


def _ms(x: float) -> str:
    return f"{x:.3g} ms" if x < 1 else f"{x:.2f} ms"


def _pt(x: float) -> str:
    return f"{x * 100:.2f} pt"


def _slower(c: QuantCandidate, fp32: QuantCandidate) -> str:
    ratio = c.latency_p50_ms / fp32.latency_p50_ms if fp32.latency_p50_ms > 0 else float("inf")
    how = f"{ratio:.1f}x slower" if ratio >= 1.95 else f"{(ratio - 1) * 100:.0f}% slower"
    return f"{how} than fp32 (p50 {_ms(c.latency_p50_ms)} vs {_ms(fp32.latency_p50_ms)})"


def _drop(c: QuantCandidate) -> float:
    return -c.accuracy_change


def _usable(c: QuantCandidate, budget: float) -> bool:
    return c.variant == "fp32" or (c.eligible and _drop(c) <= budget + _EPS)


def _rejection(
    c: QuantCandidate, fp32: QuantCandidate, budget: float, limit: float, metric: str = "accuracy"
) -> str:
    if not c.eligible and _drop(c) <= budget + _EPS:
        return f"{c.variant} is not eligible ({c.note or 'marked ineligible'})"
    problems = []
    if _drop(c) > budget + _EPS:
        problems.append(f"loses {_pt(_drop(c))} {metric}, over the {_pt(budget)} budget")
    if c.size_bytes > fp32.size_bytes:
        problems.append(f"grows the file ({_size(c.size_bytes)} vs {_size(fp32.size_bytes)})")
    elif c.size_bytes == fp32.size_bytes:
        problems.append(f"does not shrink the file ({_size(c.size_bytes)})")
    if c.latency_p50_ms > limit:
        problems.append(f"is {_slower(c, fp32)}")
    return f"{c.variant} " + " and ".join(problems)


def choose_variant(
    candidates: list[QuantCandidate],
    accuracy_budget: float,
    max_artifact_bytes: int | None,
    latency_tolerance: float = 0.10,
    size_tolerance: float = 0.05,
    metric: str = "accuracy",
) -> tuple[str, str]:
    """Pick the variant to ship and say why, with the figures, in one sentence that does not
    name the choice again (every page prints it beside the variant: "Chosen: dynamic. <why>").

    Eligible: usable and losing at most `accuracy_budget` of the task's score `metric` (accuracy,
    or R2 for a regression; a fraction) vs fp32. If
    fp32 exceeds `max_artifact_bytes`, size binds: the fastest eligible variant within the cap,
    else the smallest eligible. Otherwise the smallest eligible variant that is smaller than
    fp32 and at most `latency_tolerance` slower; variants within `size_tolerance` of the
    smallest tie on size, and the faster one wins. Failing that, fp32.
    """
    fp32 = next((c for c in candidates if c.variant == "fp32"), None)
    if fp32 is None:
        raise ValueError("choose_variant needs an fp32 candidate as the baseline")
    order = {c.variant: i for i, c in enumerate(candidates)}
    eligible = [c for c in candidates if _usable(c, accuracy_budget)]
    others = [c for c in candidates if c.variant != "fp32"]

    def figures(c: QuantCandidate) -> str:
        return (
            f"{_size(c.size_bytes)}, p50 {_ms(c.latency_p50_ms)} vs {_ms(fp32.latency_p50_ms)}"
            f" for fp32, {metric} change {c.accuracy_change * 100:+.2f} pt"
        )

    if max_artifact_bytes is not None and fp32.size_bytes > max_artifact_bytes:
        cap = _size(max_artifact_bytes)
        fits = [c for c in eligible if c.size_bytes <= max_artifact_bytes]
        if fits:
            best = min(fits, key=lambda c: (c.latency_p50_ms, c.size_bytes, order[c.variant]))
            return best.variant, (
                f"fp32 ({_size(fp32.size_bytes)}) exceeds the {cap} cap, so size is binding: "
                f"the fastest eligible variant within it ({figures(best)})."
            )
        best = min(eligible, key=lambda c: (c.size_bytes, c.latency_p50_ms, order[c.variant]))
        return best.variant, (
            f"fp32 ({_size(fp32.size_bytes)}) exceeds the {cap} cap and no eligible variant "
            f"fits it: the smallest eligible ({figures(best)}), which still exceeds the cap by "
            f"{_size(best.size_bytes - max_artifact_bytes)}."
        )

    limit = fp32.latency_p50_ms * (1 + latency_tolerance)
    better = [
        c
        for c in eligible
        if c.variant != "fp32" and c.size_bytes < fp32.size_bytes and c.latency_p50_ms <= limit
    ]
    if better:
        smallest = min(c.size_bytes for c in better)
        tied = [c for c in better if c.size_bytes <= smallest * (1 + size_tolerance)]
        best = min(tied, key=lambda c: (c.latency_p50_ms, c.size_bytes, order[c.variant]))
        tie = [c.variant for c in tied if c is not best]
        return best.variant, (
            f"{fp32.size_bytes / max(best.size_bytes, 1):.1f}x smaller "
            f"than fp32 ({_size(best.size_bytes)} vs {_size(fp32.size_bytes)}), p50 "
            f"{_ms(best.latency_p50_ms)} vs {_ms(fp32.latency_p50_ms)}, {metric} change "
            f"{best.accuracy_change * 100:+.2f} pt within the {_pt(accuracy_budget)} budget"
            + (f"; {' and '.join(tie)} {'is' if len(tie) == 1 else 'are'} as small within "
               f"{size_tolerance:.0%} and slower" if tie else "") + "."
        )
    if not others:
        return "fp32", f"No quantized variant was built (fp32: {_size(fp32.size_bytes)})."
    rejected = "; ".join(_rejection(c, fp32, accuracy_budget, limit, metric) for c in others)
    return "fp32", (
        f"No quantized variant qualifies (fp32: {_size(fp32.size_bytes)}, p50 {_ms(fp32.latency_p50_ms)}): "
        f"{rejected}."
    )


# -------------------------------------------------------------------------------------- plan


def quantize_candidates(
    fp32_path: Path,
    modes: list[str],
    calibration_feeds: list[dict[str, np.ndarray]],
    latency_feed: dict[str, np.ndarray],
    evaluate: Callable[[Path], float],
    accuracy_budget: float,
    max_artifact_bytes: int | None,
    out_dir: Path,
    uri_of: Callable[[Path], str] = lambda p: p.as_uri(),
    *,
    warmup: int = 50,
    runs: int = 500,
    rounds: int = 3,
    metric: str = "accuracy",
) -> tuple[QuantizationPlan, dict[str, Path]]:
    """Build, evaluate and time every variant, then choose one.

    Errors of fp32 itself propagate; a quantized variant that fails to build, evaluate or
    run is kept as an ineligible candidate with the error in its note.
    """
    if accuracy_budget < 0:
        raise ValueError("accuracy_budget must be >= 0")
    built, build_note = _build(Path(fp32_path), modes, calibration_feeds, Path(out_dir))
    variants = list(built)  # fp32 first, then the requested modes in order
    paths = {v: p for v, p in built.items() if isinstance(p, Path)}
    errors = {v: p for v, p in built.items() if isinstance(p, str)}

    accuracy: dict[str, float] = {}
    for variant, path in paths.items():
        if variant == "fp32":
            accuracy[variant] = float(evaluate(path))
            continue
        try:
            accuracy[variant] = float(evaluate(path))
        except Exception as exc:  # noqa: BLE001
            errors[variant] = f"evaluation failed: {_short(exc)}"

    # Sessions the caller's evaluate left behind keep idle threads that distort timing.
    gc.collect()
    # Round-robin rounds, median per variant: a burst of load from elsewhere on a shared
    # host then hits one round of every variant instead of all of one variant's runs.
    samples: dict[str, list[tuple[float, float]]] = {}
    for _ in range(rounds):
        for variant, path in paths.items():
            if variant in errors:
                continue
            if variant == "fp32":
                samples.setdefault(variant, []).append(measure_latency(path, latency_feed, warmup, runs))
                continue
            try:
                samples.setdefault(variant, []).append(measure_latency(path, latency_feed, warmup, runs))
            except Exception as exc:  # noqa: BLE001
                errors[variant] = _short(exc)
    latency = {v: (float(np.median([p50 for p50, _ in ts])), float(np.median([p95 for _, p95 in ts])))
               for v, ts in samples.items() if v not in errors}

    base = accuracy["fp32"]
    candidates = []
    for variant in variants:
        if variant in errors:
            path = paths.get(variant)
            candidates.append(
                QuantCandidate(
                    variant=variant,
                    uri=uri_of(path) if path else "",
                    sha256=sha256_file(path) if path else "",
                    size_bytes=path.stat().st_size if path else 0,
                    accuracy=0.0,
                    accuracy_change=0.0,
                    latency_p50_ms=0.0,
                    latency_p95_ms=0.0,
                    eligible=False,
                    note=errors[variant],
                )
            )
            continue
        path = paths[variant]
        change = accuracy[variant] - base
        within = -change <= accuracy_budget + _EPS
        notes = []
        if not within:
            notes.append(f"{metric} drop {_pt(-change)} exceeds the {_pt(accuracy_budget)} budget")
        if variant != "fp32" and build_note:
            notes.append(build_note)
        candidates.append(
            QuantCandidate(
                variant=variant,
                uri=uri_of(path),
                sha256=sha256_file(path),
                size_bytes=path.stat().st_size,
                accuracy=accuracy[variant],
                accuracy_change=change,
                latency_p50_ms=latency[variant][0],
                latency_p95_ms=latency[variant][1],
                eligible=variant == "fp32" or within,
                note="; ".join(notes),
            )
        )
    chosen, reason = choose_variant(candidates, accuracy_budget, max_artifact_bytes, metric=metric)
    plan = QuantizationPlan(candidates=candidates, chosen=chosen, reason=reason, metric=metric)
    return plan, paths


# -------------------------------------------------------------------------------------- util


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {_MODULE}")
    sub = parser.add_subparsers(dest="command", required=True)
    lat = sub.add_parser("latency", help="time one model (internal: used by measure_latency)")
    lat.add_argument("model", type=Path)
    lat.add_argument("feed", type=Path, help=".npz written by measure_latency")
    lat.add_argument("result", type=Path, help="where to write the JSON result")
    lat.add_argument("--warmup", type=int, default=20)
    lat.add_argument("--runs", type=int, default=200)
    pre = sub.add_parser("preprocess", help="quantization pre-processing (internal)")
    pre.add_argument("model", type=Path)
    pre.add_argument("output", type=Path)
    args = parser.parse_args(argv)
    if args.command == "preprocess":
        _preprocess_here(args.model, args.output)
    else:
        args.result.write_text(json.dumps(time_inference(args.model, args.feed, args.warmup, args.runs)))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
