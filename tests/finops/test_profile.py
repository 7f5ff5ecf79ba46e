"""Graph profiles of hand-built ONNX graphs with exact expected counts, and host measurement."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipelines.finops.profile import (
    OP_CLASSES,
    GraphProfile,
    HostCalibration,
    calibrate_host,
    measure_host,
    predict_latency_ms,
    profile_graph,
)

F32 = 4  # bytes of a float32


def _init(name: str, shape: tuple[int, ...], seed: int = 0) -> onnx.TensorProto:
    rng = np.random.default_rng(seed)
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.1, name)


def _save(path: Path, nodes, inputs, outputs, initializers=(), opsets=(("", 17),)) -> Path:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _io(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


@pytest.fixture
def gemm(tmp_path: Path) -> Path:
    """Y = X[1x64] @ B[64x32] + C[32]; the batch dim is open (None) in the file."""
    return _save(
        tmp_path / "gemm.onnx", [helper.make_node("Gemm", ["x", "b", "c"], ["y"])],
        [_io("x", [None, 64])], [_io("y", [None, 32])], [_init("b", (64, 32)), _init("c", (32,))],
    )


@pytest.fixture
def matmul_chain(tmp_path: Path) -> Path:
    """x[n,64] @ W1[64,128] -> Relu -> @ W2[128,32]; batch named symbolically."""
    return _save(
        tmp_path / "chain.onnx",
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])],
        [_io("x", ["n", 64])], [_io("y", ["n", 32])], [_init("w1", (64, 128)), _init("w2", (128, 32), 1)],
    )


# ------------------------------------------------------------------------------------ counting


def test_gemm_counts_macs_parameters_and_bias(gemm: Path) -> None:
    p = profile_graph(gemm)
    assert p.macs == 64 * 32 == 2048
    assert p.parameters == 64 * 32 + 32
    assert p.weight_bytes == (64 * 32 + 32) * F32
    assert p.flops == 2 * 2048 + 32  # bias add: one FLOP per output element
    assert p.unknown_ops == []
    assert p.file_bytes == gemm.stat().st_size
    assert p.peak_activation_bytes == 32 * F32


def test_matmul_chain(matmul_chain: Path) -> None:
    p = profile_graph(matmul_chain)
    assert p.macs == 64 * 128 + 128 * 32
    assert p.parameters == 64 * 128 + 128 * 32
    assert p.flops == 2 * p.macs + 128  # Relu
    assert p.unknown_ops == []


def test_batched_matmul_broadcasts(tmp_path: Path) -> None:
    path = _save(tmp_path / "bmm.onnx", [helper.make_node("MatMul", ["x", "w"], ["y"])],
                 [_io("x", ["n", 4, 16])], [_io("y", ["n", 4, 8])], [_init("w", (16, 8))])
    assert profile_graph(path).macs == 4 * 16 * 8


def test_conv(tmp_path: Path) -> None:
    path = _save(
        tmp_path / "conv.onnx",
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
        [_io("x", [1, 1, 28, 28])], [_io("y", [1, 8, 28, 28])], [_init("w", (8, 1, 3, 3)), _init("b", (8,))],
    )
    p = profile_graph(path)
    assert p.macs == 8 * 28 * 28 * 9 == 56448
    assert p.parameters == 8 * 9 + 8
    assert p.flops == 2 * 56448 + 8 * 28 * 28
    assert p.unknown_ops == []


def test_grouped_conv_and_conv_transpose(tmp_path: Path) -> None:
    depthwise = _save(
        tmp_path / "dw.onnx",
        [helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=8)],
        [_io("x", [None, 8, 10, 10])], [_io("y", [None, 8, 10, 10])], [_init("w", (8, 1, 3, 3))],
    )
    assert profile_graph(depthwise).macs == 8 * 10 * 10 * 9
    transpose = _save(
        tmp_path / "deconv.onnx",
        [helper.make_node("ConvTranspose", ["x", "w"], ["y"], kernel_shape=[3, 3], strides=[2, 2])],
        [_io("x", [None, 4, 5, 5])], [_io("y", [None, 2, 11, 11])], [_init("w", (4, 2, 3, 3))],
    )
    # Every input element scatters into out_channels x kernel outputs.
    assert profile_graph(transpose).macs == 4 * 5 * 5 * 2 * 9


def test_op_of_unknown_cost_is_listed(tmp_path: Path) -> None:
    path = _save(
        tmp_path / "mystery.onnx",
        [helper.make_node("Gemm", ["x", "b", "c"], ["h"]),
         helper.make_node("Mystery", ["h"], ["y"], domain="custom.test")],
        [_io("x", [None, 64])], [_io("y", None)], [_init("b", (64, 32)), _init("c", (32,))],
        opsets=(("", 17), ("custom.test", 1)),
    )
    p = profile_graph(path)
    assert p.unknown_ops == ["Mystery"]
    assert p.macs == 2048  # what could be counted still is


def test_missing_shape_is_listed_not_fatal(tmp_path: Path) -> None:
    # The weight comes in as an input of unknown shape: the MatMul cannot be costed.
    path = _save(tmp_path / "open.onnx", [helper.make_node("MatMul", ["x", "w"], ["y"])],
                 [_io("x", [None, 64]), helper.make_tensor_value_info("w", TensorProto.FLOAT, None)],
                 [_io("y", None)])
    p = profile_graph(path)
    assert p.unknown_ops == ["MatMul"]
    assert p.macs == 0


def test_peak_activation_of_mlp_is_the_liveness_maximum(tmp_path: Path) -> None:
    f, h1, h2, o = 16, 40, 30, 5
    path = _save(
        tmp_path / "mlp.onnx",
        [helper.make_node("Gemm", ["x", "w1", "b1"], ["g1"]), helper.make_node("Relu", ["g1"], ["r1"]),
         helper.make_node("Gemm", ["r1", "w2", "b2"], ["g2"]), helper.make_node("Relu", ["g2"], ["r2"]),
         helper.make_node("Gemm", ["r2", "w3", "b3"], ["y"])],
        [_io("x", [None, f])], [_io("y", [None, o])],
        [_init("w1", (f, h1)), _init("b1", (h1,)), _init("w2", (h1, h2)), _init("b2", (h2,)),
         _init("w3", (h2, o)), _init("b3", (o,))],
    )
    # Live node outputs per step: {g1}, {g1,r1}, {r1,g2}, {g2,r2}, {r2,y}.
    steps = [h1, 2 * h1, h1 + h2, 2 * h2, h2 + o]
    p = profile_graph(path)
    assert p.peak_activation_bytes == max(steps) * F32 == 320
    assert p.parameters == f * h1 + h1 + h1 * h2 + h2 + h2 * o + o
    assert p.macs == f * h1 + h1 * h2 + h2 * o


def test_peak_activation_keeps_a_skip_connection_alive(tmp_path: Path) -> None:
    path = _save(
        tmp_path / "residual.onnx",
        [helper.make_node("Gemm", ["x", "w1"], ["h1"]), helper.make_node("Relu", ["h1"], ["r1"]),
         helper.make_node("Gemm", ["r1", "w2"], ["h2"]), helper.make_node("Add", ["h2", "r1"], ["s"]),
         helper.make_node("Gemm", ["s", "w3"], ["y"])],
        [_io("x", [None, 8])], [_io("y", [None, 4])],
        [_init("w1", (8, 32)), _init("w2", (32, 32)), _init("w3", (32, 4))],
    )
    # {h1}=32, {h1,r1}=64, {r1,h2}=64, {r1,h2,s}=96, {s,y}=36 floats.
    assert profile_graph(path).peak_activation_bytes == 96 * F32


def test_dynamic_int8_keeps_macs_and_shrinks_weights(matmul_chain: Path, tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantized = tmp_path / "chain.int8.onnx"
    quantize_dynamic(str(matmul_chain), str(quantized), weight_type=QuantType.QInt8)
    assert "MatMulInteger" in {n.op_type for n in onnx.load(str(quantized)).graph.node}
    fp32, int8 = profile_graph(matmul_chain), profile_graph(quantized)
    assert int8.macs == fp32.macs
    assert int8.parameters == fp32.parameters  # int8 weights count, their scales do not
    assert int8.weight_bytes < fp32.weight_bytes / 3
    assert int8.unknown_ops == []


def test_qdq_graph_counts_the_float_op(gemm: Path, tmp_path: Path) -> None:
    w = numpy_helper.from_array(np.ones((64, 32), np.int8), "w_q")
    path = _save(
        tmp_path / "qdq.onnx",
        [helper.make_node("DequantizeLinear", ["w_q", "scale", "zero"], ["w"]),
         helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["xq"]),
         helper.make_node("DequantizeLinear", ["xq", "scale", "zero"], ["xd"]),
         helper.make_node("MatMul", ["xd", "w"], ["y"])],
        [_io("x", [None, 64])], [_io("y", [None, 32])],
        [w, numpy_helper.from_array(np.array(0.1, np.float32), "scale"),
         numpy_helper.from_array(np.array(0, np.int8), "zero")],
    )
    p = profile_graph(path)
    assert p.macs == 2048
    assert p.parameters == 64 * 32
    # Q and DQ of the activation count; DQ of the constant weight is folded at session creation.
    assert p.flops == 2 * 2048 + 64 + 64


def test_sklearn_pipeline_with_float_and_string_inputs(tmp_path: Path) -> None:
    import pandas as pd
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"amount": rng.normal(size=120).astype(np.float32),
                          "city": rng.choice(["oslo", "lima", "pune"], size=120)})
    y = (frame["amount"] > 0).astype(int) + (frame["city"] == "oslo")
    clf = LogisticRegression(max_iter=200)
    pipe = Pipeline([
        ("prep", ColumnTransformer([("num", StandardScaler(), ["amount"]),
                                    ("cat", OneHotEncoder(handle_unknown="ignore"), ["city"])])),
        ("clf", clf),
    ]).fit(frame, y)
    onx = convert_sklearn(
        pipe, initial_types=[("amount", FloatTensorType([None, 1])), ("city", StringTensorType([None, 1]))],
        options={id(clf): {"zipmap": False}}, target_opset={"": 17, "ai.onnx.ml": 3},
    )
    path = tmp_path / "lr.onnx"
    path.write_bytes(onx.SerializeToString())
    p = profile_graph(path)
    assert isinstance(p, GraphProfile)
    assert p.parameters > 0
    # Three classes over 1 scaled + 3 one-hot features.
    assert p.macs == 3 * 4
    assert p.file_bytes == path.stat().st_size


# ----------------------------------------------------------------------------------- measuring


def test_measure_host(gemm: Path) -> None:
    m = measure_host(gemm, {"x": np.ones((1, 64), np.float32)}, warmup=10, runs=200)
    assert 0 < m.latency_p50_ms <= m.latency_p95_ms
    assert m.peak_rss_bytes >= m.baseline_rss_bytes > 0
    assert m.threads == 1


def test_measure_host_wants_one_row(gemm: Path) -> None:
    with pytest.raises(ValueError, match="one row"):
        measure_host(gemm, {"x": np.ones((4, 64), np.float32)})


def test_calibration_and_prediction() -> None:
    cal = calibrate_host(runs=30, warmup=5, rounds=1)
    assert isinstance(cal, HostCalibration)
    assert cal.gflops > 0 and cal.overhead_ms > 0 and cal.node_ms > 0
    # The peak of the three footprints: a reference that overflows the cache measures memory.
    assert set(cal.gflops_by_weights_mib) == {"0.5", "2.0", "8.0"}
    assert cal.gflops == pytest.approx(max(cal.gflops_by_weights_mib.values()), rel=1e-3)
    # A positive rate for every class that costs time, and a compute peak at least the MatMul one.
    assert set(cal.gflops_by_class) == set(OP_CLASSES) - {"fused"}
    assert all(rate > 0 for rate in cal.gflops_by_class.values())
    assert cal.peak_gflops >= cal.gflops
    assert cal.node_cost_ms("conv") >= cal.node_ms and cal.node_cost_ms("int8_conv") >= cal.node_ms
    assert 0 < cal.seconds < 60
    assert cal.predict_ms(0) == pytest.approx(cal.overhead_ms)
    assert predict_latency_ms(2_000_000_000, 4.0) == pytest.approx(500.0)
    assert predict_latency_ms(2_000_000_000, 4.0, 0.5) == pytest.approx(500.5)


CALIBRATION = HostCalibration(
    gflops=50.0, overhead_ms=0.004, node_ms=0.001, node_ms_by_class={"conv": 0.002},
    gflops_by_weights_mib={"0.5": 50.0, "2.0": 25.0, "8.0": 12.5}, peak_gflops=200.0,
    gflops_by_class={"matmul": 50.0, "conv": 200.0, "pointwise": 200.0, "depthwise": 20.0, "elementwise": 5.0,
                     "int8_matmul": 100.0, "int8_conv": 25.0},
)


def test_prediction_from_a_profile_prices_each_class() -> None:
    profile = GraphProfile(
        parameters=0, weight_bytes=0, macs=0, flops=3_000_000, peak_activation_bytes=0, file_bytes=0,
        unknown_ops=[], flops_by_class={"conv": 2_000_000, "elementwise": 500_000, "fused": 500_000},
        nodes=3, nodes_by_class={"conv": 2, "elementwise": 1})
    # 2e6 / 200e9 s = 0.01 ms; 5e5 / 5e9 s = 0.1 ms; fused work is free; 2 conv nodes + 1 other.
    assert CALIBRATION.breakdown_ms(profile) == pytest.approx(
        {"overhead": 0.004, "nodes": 0.005, "conv": 0.01, "elementwise": 0.1})
    assert CALIBRATION.predict_ms(profile) == pytest.approx(0.119)
    # A profile stored before the classes existed is priced at the MatMul peak, as it was.
    old = profile.model_copy(update={"flops_by_class": {}, "nodes": 0, "nodes_by_class": {}})
    assert CALIBRATION.predict_ms(old) == pytest.approx(3e6 / 50e9 * 1e3 + 0.004)
    assert GraphProfile.model_validate_json(old.model_dump_json()).flops_by_class == {}


def test_matmul_rate_follows_the_weight_footprint() -> None:
    mib = 1 << 20
    assert CALIBRATION.matmul_gflops(256 * 1024) == 50.0  # within the peak's footprint
    assert CALIBRATION.matmul_gflops(1 * mib) == pytest.approx(37.5)  # halfway (in log) from 0.5 to 2 MiB
    assert CALIBRATION.matmul_gflops(64 * mib) == 12.5  # beyond the largest: memory speed
    assert CALIBRATION.matmul_gflops(0) == 50.0


# ------------------------------------------------------------------------------------ classes


def _conv(tmp_path: Path, name: str, cin: int, cout: int, k: int, group: int = 1, activation: str | None = None) -> Path:
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[k, k], pads=[k // 2] * 4, group=group)]
    if activation:
        nodes.append(helper.make_node(activation, ["c"], ["y"]))
    return _save(tmp_path / f"{name}.onnx", nodes, [_io("x", [1, cin, 8, 8])], [_io("y" if activation else "c", None)],
                 [_init("w", (cout, cin // group, k, k)), _init("b", (cout,))])


def test_class_split_of_convolutions(tmp_path: Path) -> None:
    conv = profile_graph(_conv(tmp_path, "conv", 4, 8, 3, activation="Relu"))
    # The Relu after the Conv is fused by onnxruntime: counted, but in `fused`, no node of its own.
    assert conv.flops_by_class == {"conv": 2 * 8 * 64 * 36 + 8 * 64, "fused": 8 * 64}
    assert sum(conv.flops_by_class.values()) == conv.flops
    assert conv.nodes == 1 and conv.nodes_by_class == {"conv": 1}
    pointwise = profile_graph(_conv(tmp_path, "pw", 4, 8, 1))
    assert set(pointwise.flops_by_class) == {"pointwise"}
    depthwise = profile_graph(_conv(tmp_path, "dw", 8, 8, 3, group=8))
    assert set(depthwise.flops_by_class) == {"depthwise"}


def test_class_split_of_matmul_elementwise_and_int8(matmul_chain: Path, tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = profile_graph(matmul_chain)
    # onnxruntime fuses no Relu into a plain MatMul (only a bias Add, making it a Gemm).
    assert fp32.flops_by_class == {"matmul": 2 * (64 * 128 + 128 * 32), "elementwise": 128}
    assert fp32.nodes == 3
    assert fp32.matmul_weight_bytes == (64 * 128 + 128 * 32) * F32
    quantized = tmp_path / "chain.int8.onnx"
    quantize_dynamic(str(matmul_chain), str(quantized), weight_type=QuantType.QInt8)
    int8 = profile_graph(quantized)
    assert int8.flops_by_class["int8_matmul"] == 2 * (64 * 128 + 128 * 32)
    assert "matmul" not in int8.flops_by_class and int8.matmul_weight_bytes == 0
    assert int8.flops_by_class["elementwise"] > 0  # quantizing the activations, scaling the results
    assert sum(int8.flops_by_class.values()) == int8.flops
    residual = _save(tmp_path / "residual.onnx",
                     [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "x"], ["y"])],
                     [_io("x", [1, 16])], [_io("y", [1, 16])], [_init("w", (16, 16))])
    # An Add of two activations is a residual sum, not a bias: elementwise work and a node.
    assert profile_graph(residual).flops_by_class == {"matmul": 2 * 256, "elementwise": 16}
    biased = _save(tmp_path / "biased.onnx",
                   [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["a"]),
                    helper.make_node("Relu", ["a"], ["y"])],
                   [_io("x", [1, 16])], [_io("y", [1, 16])], [_init("w", (16, 16)), _init("b", (16,))])
    # MatMul + bias Add is a Gemm, and Gemm + Relu a FusedGemm: one node.
    assert profile_graph(biased).flops_by_class == {"matmul": 2 * 256, "fused": 32}
    assert profile_graph(biased).nodes == 1


def test_qdq_matmul_is_an_integer_kernel(tmp_path: Path) -> None:
    w = numpy_helper.from_array(np.ones((64, 32), np.int8), "w_q")
    path = _save(
        tmp_path / "qdq.onnx",
        [helper.make_node("DequantizeLinear", ["w_q", "scale", "zero"], ["w"]),
         helper.make_node("MatMul", ["x", "w"], ["y"])],
        [_io("x", [None, 64])], [_io("y", [None, 32])],
        [w, numpy_helper.from_array(np.array(0.1, np.float32), "scale"),
         numpy_helper.from_array(np.array(0, np.int8), "zero")],
    )
    assert profile_graph(path).flops_by_class == {"int8_matmul": 2 * 64 * 32}
