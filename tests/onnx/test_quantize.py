"""Quantization candidates on real small models, and the choice rule on hand-made records."""

from __future__ import annotations

import hashlib
import os
import random
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from pipelines.onnx import quantize as q
from pipelines.onnx.quantize import (
    QuantizationError,
    build_candidates,
    choose_variant,
    measure_latency,
    quantize_candidates,
)
from pipelines.onnx.timing import measure_in_child
from pipelines.records import QuantCandidate

# ------------------------------------------------------------------------------------ models


@pytest.fixture(scope="module")
def digits_mlp(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 64-256-256-10 MLP trained briefly on sklearn's digits, exported to ONNX."""
    import torch
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    torch.set_num_threads(1)  # shared machine
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = (x[order] / 16).astype(np.float32), y[order]
    x_train, y_train, x_test, y_test = x[:1200], y[:1200], x[1200:], y[1200:]
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for _ in range(20):
        for i in range(0, len(yt), 100):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[i : i + 100]), yt[i : i + 100]).backward()
            optimizer.step()
    path = tmp_path_factory.mktemp("mlp") / "mlp.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated; fine here
        torch.onnx.export(
            model.eval(), (torch.zeros(1, 64),), str(path), input_names=["x"],
            output_names=["logits"], dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}},
            opset_version=17, dynamo=False,
        )

    def evaluate(p: Path) -> float:
        session = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        return float((session.run(None, {"x": x_test})[0].argmax(1) == y_test).mean())

    return {
        "path": path,
        "evaluate": evaluate,
        "calibration": [{"x": x_train[i : i + 100]} for i in range(0, 500, 100)],
        "row": {"x": x_test[:1]},
    }


@pytest.fixture(scope="module")
def tabular_lr(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """skl2onnx pipeline: one float and one string column, scaler + one-hot + logistic regression."""
    import pandas as pd
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    rng = np.random.default_rng(1)
    n = 600
    amount = rng.normal(size=n).astype(np.float32)
    city = rng.choice(["oslo", "lima", "pune", "kyiv"], size=n)
    y = (amount + 1.5 * (city == "oslo") + rng.normal(scale=0.4, size=n) > 0.5).astype(np.int64)
    frame = pd.DataFrame({"amount": amount, "city": city})
    clf = LogisticRegression()
    pipe = Pipeline([
        ("prep", ColumnTransformer([
            ("num", StandardScaler(), ["amount"]),
            ("cat", OneHotEncoder(handle_unknown="ignore"), ["city"]),
        ])),
        ("clf", clf),
    ]).fit(frame[:400], y[:400])
    onx = convert_sklearn(
        pipe,
        initial_types=[("amount", FloatTensorType([None, 1])), ("city", StringTensorType([None, 1]))],
        options={id(clf): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    path = tmp_path_factory.mktemp("lr") / "lr.onnx"
    path.write_bytes(onx.SerializeToString())

    def feed(rows: slice) -> dict[str, np.ndarray]:
        return {"amount": amount[rows].reshape(-1, 1), "city": city[rows].reshape(-1, 1)}

    def evaluate(p: Path) -> float:
        session = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        test = {k: v.astype(object) if v.dtype.kind == "U" else v for k, v in feed(slice(400, None)).items()}
        return float((session.run(None, test)[0] == y[400:]).mean())

    return {
        "path": path,
        "evaluate": evaluate,
        "calibration": [feed(slice(i, i + 50)) for i in range(0, 400, 50)],
        "row": feed(slice(400, 401)),
    }


def _single_file(path: Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    return all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------- (a) torch MLP


def test_mlp_dynamic_and_static_are_smaller_and_accurate(digits_mlp: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    plan, paths = quantize_candidates(
        digits_mlp["path"], ["dynamic", "static"], digits_mlp["calibration"], digits_mlp["row"],
        digits_mlp["evaluate"], accuracy_budget=0.02, max_artifact_bytes=None, out_dir=out,
    )
    assert [c.variant for c in plan.candidates] == ["fp32", "dynamic", "static"]
    assert set(paths) == {"fp32", "dynamic", "static"}
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths.values())
    fp32, dynamic, static = plan.candidates
    assert fp32.accuracy > 0.9
    assert _digest(paths["fp32"]) == _digest(digits_mlp["path"]) == fp32.sha256
    for c in (dynamic, static):
        assert c.note == "" and c.eligible, c
        assert _single_file(paths[c.variant])
        assert c.size_bytes == paths[c.variant].stat().st_size
        assert c.size_bytes < 0.4 * fp32.size_bytes  # int8 weights: ~4x smaller
        assert abs(c.accuracy_change) <= 0.02
        assert c.accuracy_change == pytest.approx(c.accuracy - fp32.accuracy)
        assert c.uri == paths[c.variant].as_uri()
    for c in plan.candidates:
        assert 0 < c.latency_p50_ms <= c.latency_p95_ms
    chosen = plan.chosen_candidate
    assert plan.reason.startswith("No quantized variant qualifies") == (chosen.variant == "fp32"), plan.reason
    # Whatever the timings were, the choice obeys the rule.
    if chosen.variant != "fp32":
        assert chosen.size_bytes < fp32.size_bytes
        assert chosen.latency_p50_ms <= fp32.latency_p50_ms * 1.10


def test_build_is_deterministic(digits_mlp: dict, tabular_lr: dict, tmp_path: Path) -> None:
    for model in (digits_mlp, tabular_lr):
        first = build_candidates(model["path"], ["dynamic", "static"], model["calibration"], tmp_path / "1")
        second = build_candidates(model["path"], ["dynamic", "static"], model["calibration"], tmp_path / "2")
        for variant in ("fp32", "dynamic", "static"):
            assert isinstance(first[variant], Path), first[variant]
            assert _digest(first[variant]) == _digest(second[variant]), variant


def test_unbuildable_mode_is_recorded_not_raised(digits_mlp: dict, tmp_path: Path) -> None:
    built = build_candidates(digits_mlp["path"], ["static"], [], tmp_path)
    assert isinstance(built["static"], str) and "calibration" in built["static"]
    assert not (tmp_path / "model.static.onnx").exists()

    plan, paths = quantize_candidates(
        digits_mlp["path"], ["dynamic", "static"], [], digits_mlp["row"], digits_mlp["evaluate"],
        accuracy_budget=0.02, max_artifact_bytes=None, out_dir=tmp_path / "plan",
        warmup=2, runs=20,
    )
    static = next(c for c in plan.candidates if c.variant == "static")
    assert not static.eligible and "calibration" in static.note
    assert (static.size_bytes, static.accuracy, static.latency_p50_ms, static.uri) == (0, 0.0, 0.0, "")
    assert "static" not in paths and plan.chosen != "static"


def test_unknown_mode_is_a_caller_error(digits_mlp: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="int4"):
        build_candidates(digits_mlp["path"], ["int4"], [], tmp_path)


# ------------------------------------------------------------- (b) skl2onnx, string input


def test_tabular_pipeline_never_picks_a_growing_variant(
    tabular_lr: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Symbolic shape inference fails on ai.onnx.ml ops and would dump a file into the cwd.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    plan, paths = quantize_candidates(
        tabular_lr["path"], ["dynamic", "static"], tabular_lr["calibration"], tabular_lr["row"],
        tabular_lr["evaluate"], accuracy_budget=0.01, max_artifact_bytes=None, out_dir=tmp_path / "out",
    )
    fp32 = plan.candidates[0]
    assert fp32.variant == "fp32" and fp32.accuracy > 0.8
    for c in plan.candidates[1:]:
        if c.variant in paths:
            assert _single_file(paths[c.variant])
            assert c.latency_p50_ms > 0 and c.size_bytes > 0
        else:
            assert not c.eligible and c.note  # failed, and says why
        if c.size_bytes >= fp32.size_bytes:
            assert plan.chosen != c.variant
            assert f"{c.variant} grows the file" in plan.reason or "does not shrink" in plan.reason
    assert list(cwd.iterdir()) == []
    assert plan.chosen_candidate.size_bytes <= fp32.size_bytes
    if plan.chosen != "fp32":
        assert plan.chosen_candidate.size_bytes < fp32.size_bytes


# --------------------------------------------------------------------- (c) choose_variant


def cand(
    variant: str, size: int, p50: float, change: float = 0.0, eligible: bool = True, note: str = ""
) -> QuantCandidate:
    return QuantCandidate(
        variant=variant, uri=f"file:///m/{variant}" if size else "", sha256="0" * 64 if size else "",
        size_bytes=size, accuracy=0.9 + change if size else 0.0, accuracy_change=change,
        latency_p50_ms=p50, latency_p95_ms=p50 * 1.2, eligible=eligible, note=note,
    )


FP32 = cand("fp32", 400_000, 1.0)


def test_smaller_and_faster_wins() -> None:
    chosen, reason = choose_variant([FP32, cand("dynamic", 100_000, 0.25, -0.001)], 0.01, None)
    assert chosen == "dynamic"
    assert "4.0x smaller" in reason and "0.25 ms" in reason


def test_a_size_tie_goes_to_the_faster_variant() -> None:
    # The large MLP of the quantization benchmark: dynamic and static int8 the same size within
    # a few percent, static much faster.
    dynamic, static = cand("dynamic", 100_000, 0.58), cand("static", 103_000, 0.38)
    chosen, reason = choose_variant([FP32, dynamic, static], 0.01, None)
    assert chosen == "static"
    assert reason.startswith("3.9x smaller than fp32") and reason.endswith("; dynamic is as small within 5% and slower.")
    # Beyond the tolerance, size wins again.
    assert choose_variant([FP32, dynamic, cand("static", 110_000, 0.38)], 0.01, None)[0] == "dynamic"


def test_much_slower_variant_is_rejected_with_its_factor() -> None:
    chosen, reason = choose_variant([FP32, cand("dynamic", 100_000, 4.2)], 0.01, None)
    assert chosen == "fp32"
    assert "dynamic is 4.2x slower than fp32" in reason


def test_slightly_slower_within_tolerance_is_accepted_beyond_it_rejected() -> None:
    assert choose_variant([FP32, cand("static", 100_000, 1.08)], 0.01, None)[0] == "static"
    chosen, reason = choose_variant([FP32, cand("static", 100_000, 1.3)], 0.01, None)
    assert chosen == "fp32" and "static is 30% slower" in reason
    assert choose_variant([FP32, cand("static", 100_000, 1.3)], 0.01, None, latency_tolerance=0.5)[0] == "static"


def test_growing_file_is_rejected_even_if_faster() -> None:
    chosen, reason = choose_variant(
        [FP32, cand("dynamic", 410_000, 0.9), cand("static", 400_000, 0.9)], 0.01, None
    )
    assert chosen == "fp32"
    assert "dynamic grows the file" in reason and "static does not shrink the file" in reason


def test_accuracy_budget_is_inclusive_and_binding() -> None:
    ok = cand("dynamic", 100_000, 0.5, change=0.90 - 0.91)  # drop 0.01 up to float error
    assert choose_variant([FP32, ok], 0.01, None)[0] == "dynamic"
    chosen, reason = choose_variant([FP32, cand("dynamic", 100_000, 0.5, change=-0.02)], 0.01, None)
    assert chosen == "fp32" and "dynamic loses 2.00 pt accuracy, over the 1.00 pt budget" in reason
    # A record that says eligible but exceeds the budget is still not chosen.
    assert choose_variant([FP32, cand("dynamic", 100_000, 0.5, change=-0.05)], 0.01, None)[0] == "fp32"


def test_failed_build_is_never_chosen() -> None:
    failed = cand("static", 0, 0.0, eligible=False, note="static quantization failed: boom")
    chosen, reason = choose_variant([FP32, failed], 0.01, None)
    assert chosen == "fp32" and "boom" in reason


def test_smallest_qualifying_wins_and_ties_go_to_the_faster() -> None:
    cands = [FP32, cand("dynamic", 100_000, 0.9), cand("static", 120_000, 0.5)]
    assert choose_variant(cands, 0.01, None)[0] == "dynamic"
    cands = [FP32, cand("dynamic", 100_000, 0.9), cand("static", 100_000, 0.5)]
    assert choose_variant(cands, 0.01, None)[0] == "static"


def test_size_binding_picks_fastest_within_cap_even_if_slower_than_fp32() -> None:
    cands = [FP32, cand("dynamic", 100_000, 4.2), cand("static", 110_000, 1.4)]
    chosen, reason = choose_variant(cands, 0.01, max_artifact_bytes=200_000)
    assert chosen == "static"
    assert "size is binding" in reason and "fastest" in reason
    # Only the slow one fits: still chosen, size binds.
    assert choose_variant(cands, 0.01, max_artifact_bytes=105_000)[0] == "dynamic"
    # Ties on speed go to the smaller.
    tied = [FP32, cand("dynamic", 100_000, 1.4), cand("static", 110_000, 1.4)]
    assert choose_variant(tied, 0.01, max_artifact_bytes=200_000)[0] == "dynamic"


def test_size_binding_ignores_ineligible_and_reports_when_nothing_fits() -> None:
    cands = [FP32, cand("dynamic", 100_000, 0.3, change=-0.05), cand("static", 150_000, 1.4)]
    assert choose_variant(cands, 0.01, max_artifact_bytes=200_000)[0] == "static"
    chosen, reason = choose_variant(cands, 0.01, max_artifact_bytes=50_000)
    assert chosen == "static"
    assert "still exceeds the cap" in reason
    chosen, reason = choose_variant([FP32], 0.01, max_artifact_bytes=50_000)
    assert chosen == "fp32" and "still exceeds the cap" in reason


def test_cap_that_fp32_meets_does_not_bind() -> None:
    cands = [FP32, cand("dynamic", 100_000, 4.2)]
    chosen, reason = choose_variant(cands, 0.01, max_artifact_bytes=400_000)
    assert chosen == "fp32" and "4.2x slower" in reason


def test_only_fp32_and_missing_fp32() -> None:
    assert choose_variant([FP32], 0.01, None)[0] == "fp32"
    with pytest.raises(ValueError):
        choose_variant([cand("dynamic", 100_000, 0.5)], 0.01, None)


def test_never_slower_or_bigger_than_fp32_unless_size_binds() -> None:
    rng = random.Random(0)
    for _ in range(500):
        fp32 = cand("fp32", rng.randint(1_000, 10_000), rng.uniform(0.1, 2))
        others = [
            cand(v, rng.randint(500, 12_000), rng.uniform(0.05, 8), change=-rng.uniform(0, 0.03),
                 eligible=rng.random() > 0.2)
            for v in ("dynamic", "static")
        ]
        cap = rng.choice([None, rng.randint(500, 12_000)])
        chosen, reason = choose_variant([fp32, *others], 0.01, cap)
        picked = next(c for c in [fp32, *others] if c.variant == chosen)
        assert reason.endswith(".")
        if chosen != "fp32":
            assert picked.eligible and -picked.accuracy_change <= 0.01 + 1e-9
        if cap is None or fp32.size_bytes <= cap:
            assert picked.size_bytes <= fp32.size_bytes
            assert picked.latency_p50_ms <= fp32.latency_p50_ms * 1.1 + 1e-12


# --------------------------------------------------------------------- (d) measure_latency


def test_latency_runs_in_another_process(digits_mlp: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_session_here(*args: object, **kwargs: object) -> None:
        raise AssertionError("measure_latency created a session in the calling process")

    monkeypatch.setattr(ort, "InferenceSession", no_session_here)
    p50, p95 = measure_latency(digits_mlp["path"], digits_mlp["row"], warmup=5, runs=50)
    assert 0 < p50 <= p95
    detail = measure_in_child(q.__name__, "latency", digits_mlp["path"], digits_mlp["row"], 2, 20, 120, "latency")
    assert detail["pid"] != os.getpid() and detail["runs"] == 20
    assert 0 < detail["p50_ms"] <= detail["p95_ms"]


def test_latency_with_string_inputs(tabular_lr: dict) -> None:
    row = dict(tabular_lr["row"])
    row["city"] = row["city"].astype(object)  # either string form is accepted
    p50, p95 = measure_latency(tabular_lr["path"], row, warmup=2, runs=20)
    assert 0 < p50 <= p95


def test_latency_errors_are_clear(digits_mlp: dict, tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(QuantizationError, match=r"broken\.onnx failed \(exit 1\): .*\S"):
        measure_latency(broken, digits_mlp["row"], warmup=1, runs=1)
    with pytest.raises(ValueError, match="one row"):
        measure_latency(digits_mlp["path"], {"x": np.zeros((2, 64), np.float32)})
