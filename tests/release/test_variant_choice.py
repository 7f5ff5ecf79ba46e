"""The variant choice knows the parity gate: an int8 variant that widens a group's gap is not
eligible, and the best eligible variant ships (fp32 included)."""

from types import SimpleNamespace

import numpy as np
from conftest import tabular_frame, write_spec

from pipelines.data import prepare_features
from pipelines.records import QuantCandidate, QuantizationPlan
from pipelines.release.stages import _parity_eligible
from pipelines.specs import load_spec


def _onnx(path, frame, flip_group: str | None):
    """A logistic regression over x1, x2 (one matrix input), exported by skl2onnx; with
    `flip_group`, its answers for that group's rows come out wrong (a variant that is fine
    overall for one group and broken for the other)."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression

    labels = frame["label"].to_numpy().copy()
    if flip_group is not None:
        labels[frame["group"].to_numpy() == flip_group] = 1 - labels[frame["group"].to_numpy() == flip_group]
    x = np.column_stack([frame["x1"], frame["x2"], frame["group"].eq(flip_group or "").astype(float)])
    model = LogisticRegression(C=100).fit(x.astype(np.float32), labels)
    onx = convert_sklearn(model, initial_types=[("features", FloatTensorType([None, 3]))],
                          options={id(model): {"zipmap": False}}, target_opset={"": 17, "ai.onnx.ml": 3})
    path.write_bytes(onx.SerializeToString())
    return path


def _candidate(variant, size, accuracy=0.9, eligible=True):
    return QuantCandidate(variant=variant, uri=f"file:///{variant}.onnx", sha256=variant * 8, size_bytes=size,
                          accuracy=accuracy, accuracy_change=0.0, latency_p50_ms=0.01, latency_p95_ms=0.01,
                          eligible=eligible)


def test_a_variant_that_widens_a_group_gap_is_not_shipped(tmp_path):
    frame = tabular_frame(rows=600, seed=4)
    frame["x3"] = frame["group"].eq("b").astype(float)
    spec = load_spec(write_spec(tmp_path, "parity-choice", "data.csv"))
    test = frame.iloc[:300]
    parts = {"test": test, "x_test": prepare_features(test, ["x1", "x2", "x3"]), "y_test": test["label"].to_numpy(),
             "classes": ["0", "1"]}
    paths = {"fp32": _onnx(tmp_path / "fp32.onnx", frame, None),
             "dynamic": _onnx(tmp_path / "dynamic.onnx", frame, "b")}
    # As the quantize stage planned it, by overall accuracy and size alone: dynamic, 4x smaller.
    plan = QuantizationPlan(candidates=[_candidate("fp32", 4000), _candidate("dynamic", 1000)], chosen="dynamic",
                            reason="chose dynamic: 4.0x smaller than fp32")
    data = SimpleNamespace(task="binary")
    chosen = _parity_eligible(SimpleNamespace(spec=spec), data, plan, paths, parts)
    dynamic = next(c for c in chosen.candidates if c.variant == "dynamic")
    assert chosen.chosen == "fp32"
    assert not dynamic.eligible and "fails quantization parity" in dynamic.note and "by group widens" in dynamic.note
    assert "dynamic is not eligible (fails quantization parity" in chosen.reason

    # The same variant, fair: it stays the choice.
    paths["dynamic"] = _onnx(tmp_path / "fair.onnx", frame, None)
    assert _parity_eligible(SimpleNamespace(spec=spec), data, plan, paths, parts) == plan
