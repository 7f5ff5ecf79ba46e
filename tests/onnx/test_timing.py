"""The shared child-process timing: feed files, argument checks, child launch and its errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from pipelines.onnx import timing


@pytest.fixture(scope="module")
def add_one(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """y = x + 1 on a [1, 4] float input."""
    one = onnx.numpy_helper.from_array(np.ones((1, 4), np.float32), "one")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])], "add_one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [one],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("timing") / "add_one.onnx"
    onnx.save(model, str(path))
    return path


def test_feed_round_trip_keeps_names_order_and_strings(tmp_path: Path) -> None:
    feed = {"b": np.arange(3, dtype=np.float32).reshape(1, 3),
            "a": np.array([["oslo"]], dtype=object), "c": np.array([["lima"]])}
    timing.save_feed(tmp_path / "feed.npz", feed)
    loaded = timing.load_feed(tmp_path / "feed.npz")
    assert list(loaded) == ["b", "a", "c"]
    np.testing.assert_array_equal(loaded["b"], feed["b"])
    assert loaded["a"].dtype == object and loaded["c"].dtype == object  # as onnxruntime wants
    assert loaded["a"][0, 0] == "oslo" and loaded["c"][0, 0] == "lima"


def test_timing_args_are_checked() -> None:
    row = {"x": np.zeros((1, 4), np.float32)}
    timing.check_timing_args(row, 0, 1)
    with pytest.raises(ValueError, match="runs must be >= 1"):
        timing.check_timing_args(row, 0, 0)
    with pytest.raises(ValueError, match="warmup >= 0"):
        timing.check_timing_args(row, -1, 5)
    with pytest.raises(ValueError, match="^the latency feed is empty$"):
        timing.check_timing_args({}, 1, 1, "the latency feed")
    with pytest.raises(ValueError, match="the feed must hold one row"):
        timing.check_timing_args({"x": np.zeros((2, 4), np.float32)}, 1, 1)


def test_stderr_tail() -> None:
    text = "\n".join(f"line {i}" for i in range(30)) + "\n"
    assert timing.stderr_tail(text).splitlines() == [f"line {i}" for i in range(15, 30)]
    assert timing.stderr_tail(text, lines=1) == "line 29"
    assert timing.stderr_tail("x" * 50, chars=10) == "x" * 10
    assert timing.stderr_tail("  \n") == "(no stderr)"


def test_time_inference_in_a_child(add_one: Path) -> None:
    result = timing.measure_in_child(
        "pipelines.onnx.quantize", "latency", add_one, {"x": np.zeros((1, 4), np.float32)}, 2, 20, 120, "add_one",
    )
    assert result["pid"] != os.getpid()
    assert (result["warmup"], result["runs"]) == (2, 20)
    assert 0 < result["p50_ms"] <= result["p95_ms"]


def test_child_failures_raise_the_callers_error(tmp_path: Path) -> None:
    class Oops(RuntimeError):
        pass

    with pytest.raises(Oops, match=r"^probe failed \(exit 2\): .*\S"):
        timing.run_module_checked("pipelines.onnx.quantize", ["no-such-command"], tmp_path, 120, "probe", Oops)
    with pytest.raises(Oops, match=r"^probe failed \(exit 0\): "):
        timing.run_module_checked("json.tool", ["--help"], tmp_path, 120, "probe", Oops, tmp_path / "missing.json")
    with pytest.raises(Oops, match=r"^probe timed out after 0 s$"):
        timing.run_module_checked("pipelines.onnx.quantize", [], tmp_path, 0.001, "probe", Oops)
