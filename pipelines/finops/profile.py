"""What one inference of an ONNX model costs: counted from the graph, and measured on this host.

`profile_graph` counts from the graph: parameters, weight bytes, multiply-accumulates, FLOPs and
a peak-activation estimate at batch 1. Given a one-row feed it also runs the model once in
onnxruntime, to learn the shapes the graph does not state and the paths its tree ensembles take.
`measure_host` times the model in a fresh single-threaded process (`pipelines.onnx.timing`, as
`pipelines.onnx.quantize.measure_latency` does) and also reports the child's resident memory.
`calibrate_host` turns FLOPs into milliseconds for this host, per operator class (see
`OP_CLASSES`): one rate per class, a cost per node and a cost per run, measured on small
reference graphs, so that `HostCalibration.predict_ms` prices a profile class by class and a
fleet projection can tell the classes apart (docs/estimator.md).

Counting rules (all at batch 1, symbolic dims set to 1):

* Shapes come from ONNX shape inference. Several ai.onnx.ml ops (Scaler, Imputer, Normalizer,
  TreeEnsembleClassifier/Regressor) have no shape function, so what follows them is left open.
  Given a one-row `feed`, the open shapes are filled in from one run of the model in
  onnxruntime, every intermediate value exposed as an output; without one they stay open.
* MACs: MatMul/Gemm/Conv/ConvTranspose (groups included) and their quantized forms
  (MatMulInteger, QLinearMatMul, ConvInteger, QLinearConv, com.microsoft DynamicQuantizeMatMul,
  MatMulIntegerToFloat, QGemm, Fused*), and ai.onnx.ml LinearClassifier/LinearRegressor/SVM*
  from their coefficient attributes. In QDQ graphs the float op between the Q/DQ pairs counts.
* FLOPs = 2 * MACs + one FLOP per output element of bias adds, elementwise, activation,
  normalization and (de)quantization ops; reductions and global pools count input elements,
  windowed pools output elements times window size. Data movement (Reshape, Transpose,
  Concat, Gather, Cast, ...) is free. Nodes whose inputs are all constant are free too:
  onnxruntime folds them when the session is created (e.g. DequantizeLinear of a weight).
* ai.onnx.ml preprocessing: Scaler counts two FLOPs per output element (subtract the offset,
  multiply by the scale); OneHotEncoder, Imputer, Normalizer and Binarizer one per output
  element (for OneHotEncoder: one category test per output column). ZipMap, CastMap,
  LabelEncoder, ArrayFeatureExtractor, FeatureVectorizer and DictVectorizer are data movement.
* Tree ensembles (TreeEnsembleClassifier, TreeEnsembleRegressor, opset-5 TreeEnsemble): one
  FLOP per branch node a prediction visits (its comparison) and one per leaf weight added
  (one per target or class a leaf holds), plus one per output score for base values and one
  for a post_transform. With a feed, each tree is walked from its root on the value the real
  run gave the op, following the node modes and missing-value tracks; `tree_nodes_visited`
  counts the nodes on those paths, branches and leaves. Without a feed, each tree's path is
  taken as its mean leaf depth (every leaf equally likely): an estimate, not a bound, which
  `notes` reports.
* Anything else (If/Loop, RNNs, custom domains) or an op whose shapes are still open is
  listed in `unknown_ops`: the figures are then lower bounds.
* Classes (`flops_by_class`, summing to `flops`): float MatMul/Gemm and the linear ai.onnx.ml
  ops are `matmul`; a float Conv is `pointwise` (1x1 kernel), `depthwise` (group > 1) or
  `conv`; the integer kernels (MatMulInteger, QLinearMatMul, DynamicQuantizeMatMul, ...) are
  `int8_matmul` and `int8_conv`, and so is a float MatMul/Gemm/Conv of a QDQ graph whose
  weight comes from a DequantizeLinear (onnxruntime runs it as an integer kernel);
  everything else (elementwise, normalisation, pools, reductions, tree walks) is
  `elementwise`, except activations, normalisations and bias adds that onnxruntime fuses into
  the Conv/Gemm before them (the output's only consumer): those are `fused` and cost no time.
  `nodes` counts the nodes a run dispatches (not folded, not fused, not Identity/Dropout),
  `nodes_by_class` the same per class of the node's own work (data movement: `elementwise`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import operator
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.onnx.timing import check_timing_args, measure_in_child, run_module_checked, save_feed, time_inference
from pipelines.records import Record

_MODULE = "pipelines.finops.profile"

# Input slots holding weights, per op type; initializers reached from them are parameters.
_WEIGHT_SLOTS: dict[str, tuple[int, ...]] = {
    "MatMul": (0, 1), "Gemm": (0, 1, 2), "Conv": (1, 2), "ConvTranspose": (1, 2),
    "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3), "ConvInteger": (1,), "QLinearConv": (3, 8),
    "DynamicQuantizeMatMul": (1, 4), "MatMulIntegerToFloat": (1, 6), "QGemm": (0, 3, 6),
    "FusedMatMul": (0, 1), "FusedGemm": (0, 1, 2), "FusedConv": (1, 2),
    "Add": (0, 1), "Sub": (0, 1), "Mul": (0, 1), "Div": (0, 1), "PRelu": (1,),
    "BatchNormalization": (1, 2, 3, 4), "LayerNormalization": (1, 2), "InstanceNormalization": (1, 2),
    "GroupNormalization": (1, 2), "Gather": (0,), "Einsum": tuple(range(8)),
    "LSTM": (1, 2, 3), "GRU": (1, 2, 3), "RNN": (1, 2, 3),
}
# Ops a weight may pass through on its way to a compute op (input 0 carries it).
_PASS_THROUGH = {"DequantizeLinear", "QuantizeLinear", "Cast", "Transpose", "Reshape", "Identity",
                 "Squeeze", "Unsqueeze", "Flatten"}
_ELEMENTWISE_ARITHMETIC = {"Add", "Sub", "Mul", "Div"}
# Learned values the ai.onnx.ml ops keep in attributes (lists or tensors) instead of initializers.
_ML_PARAMETER_ATTRS: dict[str, tuple[str, ...]] = {
    "LinearClassifier": ("coefficients", "intercepts"),
    "LinearRegressor": ("coefficients", "intercepts"),
    "SVMClassifier": ("support_vectors", "coefficients", "rho"),
    "SVMRegressor": ("support_vectors", "coefficients", "rho"),
    "Scaler": ("offset", "scale"),
    "TreeEnsembleClassifier": ("nodes_values", "nodes_values_as_tensor", "class_weights", "class_weights_as_tensor"),
    "TreeEnsembleRegressor": ("nodes_values", "nodes_values_as_tensor", "target_weights", "target_weights_as_tensor"),
    "TreeEnsemble": ("nodes_splits", "leaf_weights"),
}
_TREE_ENSEMBLES = {"TreeEnsembleClassifier", "TreeEnsembleRegressor", "TreeEnsemble"}
# Node modes of the tree ensembles; opset-5 TreeEnsemble numbers them in this order.
_BRANCH_TESTS: dict[str, Any] = {
    "BRANCH_LEQ": operator.le, "BRANCH_LT": operator.lt, "BRANCH_GTE": operator.ge, "BRANCH_GT": operator.gt,
    "BRANCH_EQ": operator.eq, "BRANCH_NEQ": operator.ne, "BRANCH_MEMBER": lambda x, members: x in members,
}

# (a index, b index, bias index or None) of matrix-product ops.
_MATMUL_LIKE: dict[str, tuple[int, int, int | None]] = {
    "MatMul": (0, 1, None), "MatMulInteger": (0, 1, None), "QLinearMatMul": (0, 3, None),
    "DynamicQuantizeMatMul": (0, 1, 4), "MatMulIntegerToFloat": (0, 1, 6), "FusedMatMul": (0, 1, None),
}
_GEMM_LIKE: dict[str, tuple[int, int, int | None]] = {
    "Gemm": (0, 1, 2), "FusedGemm": (0, 1, 2), "QGemm": (0, 3, 6),
}
# (x index, w index, bias index or None) of convolutions.
_CONV_LIKE: dict[str, tuple[int, int, int | None]] = {
    "Conv": (0, 1, 2), "FusedConv": (0, 1, 2), "ConvInteger": (0, 1, None), "QLinearConv": (0, 3, 8),
}

_FREE = {
    "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Shape", "Size", "Constant",
    "ConstantOfShape", "Transpose", "Concat", "Split", "Slice", "Gather", "GatherElements", "GatherND",
    "Cast", "CastLike", "Expand", "Tile", "Pad", "Dropout", "Range", "NonZero", "Compress",
    "ZipMap", "CastMap", "FeatureVectorizer", "LabelEncoder", "ArrayFeatureExtractor", "DictVectorizer",
    "SequenceConstruct", "SequenceAt", "SplitToSequence", "ConcatFromSequence",
}
_PER_OUTPUT = {
    "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Exp", "Log", "Abs", "Neg", "Relu",
    "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
    "Softplus", "Softsign", "Gelu", "FastGelu", "Erf", "Clip", "Max", "Min", "Sum", "Mean", "Where",
    "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Not", "And", "Or", "Xor", "Sign",
    "Floor", "Ceil", "Round", "IsNaN", "IsInf", "Mod", "BitShift", "Mish", "ThresholdedRelu", "Sin",
    "Cos", "Softmax", "LogSoftmax", "Hardmax", "BatchNormalization", "LayerNormalization",
    "InstanceNormalization", "GroupNormalization", "LpNormalization", "QuantizeLinear",
    "DequantizeLinear", "DynamicQuantizeLinear", "Scaler", "Normalizer", "Binarizer", "Imputer",
    "OneHotEncoder", "OneHot", "Trilu", "Shrink",
}
# FLOPs per output element where an op of _PER_OUTPUT does more than one operation.
_FLOPS_PER_ELEMENT = {"Scaler": 2}
_BROADCASTING = {
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "Equal", "Greater", "Less",
    "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Mod", "BitShift", "PRelu",
}
_PER_INPUT = {
    "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin", "GlobalAveragePool",
    "GlobalMaxPool", "GlobalLpPool", "TopK",
}
_WINDOWED = {"MaxPool", "AveragePool", "LpPool"}
_KNOWN_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}
_NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                     "Bernoulli"}

# Operator classes of `GraphProfile.flops_by_class`: each runs at its own rate on a CPU (a
# batch-1 MatMul streams its weights, a 3x3 convolution reuses them, a depthwise one and an
# elementwise op are bound by memory, integer kernels are separate code), so one FLOP rate
# cannot price them all. `fused` work is counted in FLOPs but takes no time of its own.
OP_CLASSES = ("matmul", "conv", "pointwise", "depthwise", "elementwise", "int8_matmul", "int8_conv", "fused")
_INT8_MATMUL = {"MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm"}
_INT8_CONV = {"ConvInteger", "QLinearConv"}
# Ops onnxruntime fuses into the Conv/Gemm (FusedConv, FusedGemm, Conv+BN folding) that
# produces their input, when they are its only consumer; after a plain MatMul only a bias Add
# (MatMul + Add into Gemm).
_FUSABLE = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "BatchNormalization", "Add"}
_FUSES_INTO = {"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"}
# Removed by onnxruntime's graph optimisations: no dispatch.
_REMOVED = {"Identity", "Dropout"}


class ProfileError(RuntimeError):
    """A model could not be read, or could not be measured."""


class GraphProfile(Record):
    """Cost of one inference at batch 1, counted from the ONNX graph (and one run, given a feed)."""

    parameters: int
    weight_bytes: int
    macs: int
    flops: int
    peak_activation_bytes: int
    file_bytes: int
    unknown_ops: list[str]
    # Tree-ensemble nodes (branches and leaves) on the paths of one prediction.
    tree_nodes_visited: int = 0
    # Figures that are estimates rather than counts, and why.
    notes: list[str] = []
    # FLOPs per operator class (OP_CLASSES; sums to `flops`), the nodes a run dispatches, and
    # the bytes of float MatMul/Gemm weights (whether they stay in the core's cache). Empty
    # or 0 in profiles stored before the classes existed: `HostCalibration.predict_ms` then
    # prices `flops` at the MatMul peak, as it used to.
    flops_by_class: dict[str, int] = {}
    nodes: int = 0
    nodes_by_class: dict[str, int] = {}
    matmul_weight_bytes: int = 0


class HostMeasurement(Record):
    """One-row latency and resident memory of a model, in a fresh single-threaded process."""

    latency_p50_ms: float
    latency_p95_ms: float
    peak_rss_bytes: int
    baseline_rss_bytes: int
    threads: int = 1


class HostCalibration(Record):
    """This host's single-thread rates per operator class, its cost per node and per run.

    `gflops` is the batch-1 MatMul rate (the highest of the footprints in
    `gflops_by_weights_mib`), what a bare FLOP count is priced at. `gflops_by_class` holds the
    rate of every class of `OP_CLASSES` but `fused`, each net of the per-run and per-node
    costs; `node_ms` is the cost of dispatching one node (`node_ms_by_class` where a class
    costs more); `peak_gflops` is the fastest dense class, the figure a fleet projection
    compares with a device's. A calibration stored before the classes existed has them
    empty and predicts from `gflops` alone.
    """

    gflops: float
    overhead_ms: float
    gflops_by_weights_mib: dict[str, float] = {}
    gflops_by_class: dict[str, float] = {}
    node_ms: float = 0.0
    # Fixed cost of one node of a class where it differs from `node_ms`: a convolution sets up
    # its layout and buffers, an integer convolution more so.
    node_ms_by_class: dict[str, float] = {}
    # The highest rate of the dense classes (MatMul footprints, convolutions): the compute
    # peak, the quantity HPL measures on a device; a fleet projection scales by it.
    peak_gflops: float = 0.0
    # Wall time of the calibration itself (the release runs it once per worker).
    seconds: float = 0.0

    def matmul_gflops(self, weight_bytes: int) -> float:
        """The float MatMul rate for a model holding `weight_bytes` of MatMul weights.

        A batch-1 MatMul reads each weight once per two FLOPs, so its rate is the rate at
        which the weights arrive: from the core's cache while the model's weights fit, from
        memory when they do not. Up to the footprint that measured the peak the rate is the
        peak (a smaller working set is no slower per FLOP); beyond it the rate is
        interpolated, in log of the footprint, between the measured footprints, and beyond
        the largest it stays at that one's rate.
        """
        points = sorted((float(mib), rate) for mib, rate in self.gflops_by_weights_mib.items())
        if not points:
            return self.gflops_by_class.get("matmul") or self.gflops
        if weight_bytes <= 0:
            return max(rate for _, rate in points)
        mib = weight_bytes / (1 << 20)
        top = max(range(len(points)), key=lambda i: points[i][1])
        tail = points[top:]
        if mib <= tail[0][0]:
            return tail[0][1]
        for (m0, r0), (m1, r1) in zip(tail, tail[1:]):
            if mib <= m1:
                t = math.log(mib / m0) / math.log(m1 / m0)
                return min(r0, max(r1, r0 + t * (r1 - r0)))
        return tail[-1][1]

    def class_gflops(self, op_class: str, matmul_weight_bytes: int = 0) -> float:
        """The rate of one operator class (the MatMul peak where the class was not measured)."""
        if op_class == "matmul":
            return self.matmul_gflops(matmul_weight_bytes)
        return self.gflops_by_class.get(op_class) or self.gflops

    def node_cost_ms(self, op_class: str) -> float:
        """Fixed cost of dispatching one node of a class."""
        return self.node_ms_by_class.get(op_class, self.node_ms)

    def breakdown_ms(self, profile: GraphProfile) -> dict[str, float]:
        """Predicted milliseconds per class, plus `nodes` and `overhead`, for one profile."""
        parts = {"overhead": self.overhead_ms}
        if not profile.flops_by_class or not self.gflops_by_class:
            parts["flops"] = profile.flops / (self.gflops * 1e9) * 1e3
            return parts
        by_class = profile.nodes_by_class or {"elementwise": profile.nodes}
        parts["nodes"] = sum(n * self.node_cost_ms(c) for c, n in by_class.items())
        for op_class, flops in profile.flops_by_class.items():
            if op_class != "fused" and flops:
                rate = self.class_gflops(op_class, profile.matmul_weight_bytes)
                parts[op_class] = flops / (rate * 1e9) * 1e3
        return parts

    def predict_ms(self, work: int | GraphProfile) -> float:
        """Latency of one inference: from a profile, class by class (plus nodes and the
        per-run cost); from a bare FLOP count, at the MatMul peak plus the per-run cost."""
        if isinstance(work, GraphProfile):
            return sum(self.breakdown_ms(work).values())
        return predict_latency_ms(work, self.gflops, self.overhead_ms)


def predict_latency_ms(flops: int, host_gflops: float, overhead_ms: float = 0.0) -> float:
    """Latency that `flops` would take at `host_gflops`, plus a fixed per-inference overhead."""
    if host_gflops <= 0:
        raise ValueError("host_gflops must be > 0")
    return flops / (host_gflops * 1e9) * 1e3 + overhead_ms


# ------------------------------------------------------------------------------------- profile


Shape = tuple[int, ...]


def _numel(shape: Iterable[int]) -> int:
    return math.prod(shape)


def _itemsize(elem_type: int) -> int:
    """Bytes per element; 0 for strings and types numpy cannot hold (unknown size)."""
    import onnx

    if elem_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return 0
    try:
        return int(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize)
    except (KeyError, TypeError, ValueError):
        return 0


def _tensor_bytes(t: Any) -> int:
    import onnx

    if t.data_type == onnx.TensorProto.STRING:
        return sum(len(s) for s in t.string_data)
    return _numel(t.dims) * _itemsize(t.data_type)


def _constant_value(node: Any) -> tuple[Shape, int, int] | None:
    """(shape, elem_type, bytes) of a Constant node's value."""
    import onnx

    for attr in node.attribute:
        if attr.name == "value":
            return tuple(attr.t.dims), attr.t.data_type, _tensor_bytes(attr.t)
        if attr.name == "sparse_value":
            values = attr.sparse_tensor.values
            return tuple(attr.sparse_tensor.dims), values.data_type, _tensor_bytes(values)
        if attr.name in ("value_float", "value_int"):
            kind = onnx.TensorProto.FLOAT if attr.name == "value_float" else onnx.TensorProto.INT64
            return (), kind, _itemsize(kind)
        if attr.name in ("value_floats", "value_ints"):
            kind = onnx.TensorProto.FLOAT if attr.name == "value_floats" else onnx.TensorProto.INT64
            n = len(attr.floats) if attr.name == "value_floats" else len(attr.ints)
            return (n,), kind, n * _itemsize(kind)
        if attr.name in ("value_string", "value_strings"):
            return None
    return None


def _pin_batch(model: Any) -> None:
    """Set every symbolic or missing dim of the graph inputs to 1, in place."""
    initializers = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers or not value.type.HasField("tensor_type"):
            continue
        tensor = value.type.tensor_type
        if not tensor.HasField("shape"):
            continue
        for dim in tensor.shape.dim:
            if not dim.HasField("dim_value"):
                dim.dim_value = 1
    # Intermediate annotations from the exporter carry the old symbolic dims; infer afresh.
    del model.graph.value_info[:]


def _inferred(model: Any) -> Any:
    import onnx

    try:
        return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - a graph the inference cannot handle still gets counted
        try:
            return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
        except Exception:  # noqa: BLE001
            return model


def _value_types(graph: Any) -> dict[str, tuple[int, Shape | None]]:
    """Tensor name -> (elem type, shape or None if any dim is unknown)."""
    types: dict[str, tuple[int, Shape | None]] = {}
    for value in (*graph.input, *graph.value_info, *graph.output):
        if not value.type.HasField("tensor_type"):
            continue
        tensor = value.type.tensor_type
        shape: Shape | None = None
        if tensor.HasField("shape"):
            dims = tensor.shape.dim
            if all(d.HasField("dim_value") and d.dim_value >= 0 for d in dims):
                shape = tuple(int(d.dim_value) for d in dims)
        previous = types.get(value.name)
        if previous is None or previous[1] is None:
            types[value.name] = (tensor.elem_type, shape)
    for t in graph.initializer:
        types[t.name] = (t.data_type, tuple(t.dims))
    return types


def _topological(nodes: Sequence[Any], available: set[str]) -> list[Any]:
    """Nodes in an order where every input is produced before use (stable otherwise)."""
    producers = {out: i for i, n in enumerate(nodes) for out in n.output if out}
    done: set[int] = set()
    ready = set(available)
    order: list[Any] = []
    pending = list(range(len(nodes)))
    while pending:
        rest = []
        for i in pending:
            needs = [x for x in nodes[i].input if x and x in producers and x not in ready]
            if needs:
                rest.append(i)
                continue
            order.append(nodes[i])
            done.add(i)
            ready.update(o for o in nodes[i].output if o)
        if len(rest) == len(pending):  # a cycle or a dangling input: keep the file's order
            order.extend(nodes[i] for i in rest)
            break
        pending = rest
    return order


def _attr(node: Any, name: str, default: Any = None) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _input(node: Any, index: int) -> str:
    return node.input[index] if index < len(node.input) else ""


def _broadcast(a: Shape, b: Shape) -> Shape:
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + a, (1,) * (n - len(b)) + b
    return tuple(max(x, y) for x, y in zip(a, b))


def _matmul_macs(a: Shape, b: Shape, trans_a: bool = False, trans_b: bool = False) -> int:
    """MACs of numpy-style matmul of shapes `a` and `b` (1-D operands promoted, batch dims broadcast)."""
    a2 = (1, *a) if len(a) == 1 else a
    b2 = (*b, 1) if len(b) == 1 else b
    m, k = (a2[-1], a2[-2]) if trans_a else (a2[-2], a2[-1])
    n = b2[-2] if trans_b else b2[-1]
    return _numel(_broadcast(a2[:-2], b2[:-2])) * m * k * n


def _conv_out_spatial(node: Any, x: Shape, w: Shape) -> Shape:
    """Output spatial dims of a convolution from its attributes (when inference gave none)."""
    spatial = x[2:]
    kernel = tuple(_attr(node, "kernel_shape", None) or w[2:])
    strides = tuple(_attr(node, "strides", None) or (1,) * len(spatial))
    dilations = tuple(_attr(node, "dilations", None) or (1,) * len(spatial))
    auto_pad = _attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return tuple(-(-s // st) for s, st in zip(spatial, strides))
    n = len(spatial)
    pads = (0,) * (2 * n) if auto_pad == "VALID" else tuple(_attr(node, "pads", None) or (0,) * (2 * n))
    return tuple(
        (spatial[i] + pads[i] + pads[i + n] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1 for i in range(n)
    )


def _attr_size(value: Any) -> int:
    """Number of scalars in an attribute value: a list, a TensorProto or nothing."""
    if value is None:
        return 0
    if hasattr(value, "dims"):
        return _numel(value.dims)
    return len(value)


def _attr_array(node: Any, name: str) -> np.ndarray | None:
    """An attribute held as a list or a tensor, as a numpy array (None when absent)."""
    from onnx import numpy_helper

    value = _attr(node, name, None)
    if value is None:
        return None
    return numpy_helper.to_array(value) if hasattr(value, "dims") else np.asarray(value)


class _Forest:
    """The trees of one tree-ensemble node over a single index space of nodes (leaves included).

    `values[i]` is a branch node's threshold (a set of members for BRANCH_MEMBER), `next_true`
    and `next_false` index the children, `weights[i]` is how many leaf weights node i adds.
    """

    def __init__(self, roots: list[int], modes: list[str], features: list[int], values: list[Any],
                 next_true: list[int], next_false: list[int], missing_true: list[int], weights: list[int]) -> None:
        self.roots, self.modes, self.features, self.values = roots, modes, features, values
        self.next_true, self.next_false, self.missing_true, self.weights = next_true, next_false, missing_true, weights

    @classmethod
    def of(cls, node: Any) -> _Forest:
        return cls._from_opset5(node) if node.op_type == "TreeEnsemble" else cls._from_node_lists(node)

    @classmethod
    def _from_node_lists(cls, node: Any) -> _Forest:
        """TreeEnsembleClassifier/Regressor: nodes named (tree id, node id); a tree's root is its
        first node listed, as in the ONNX reference implementation."""
        tree_ids, node_ids = list(_attr(node, "nodes_treeids")), list(_attr(node, "nodes_nodeids"))
        modes = [m.decode() if isinstance(m, bytes) else str(m) for m in _attr(node, "nodes_modes")]
        at = {(t, n): i for i, (t, n) in enumerate(zip(tree_ids, node_ids))}
        thresholds = _attr_array(node, "nodes_values_as_tensor")
        if thresholds is None:
            thresholds = _attr_array(node, "nodes_values")
        roots: dict[int, int] = {}
        for i, tree in enumerate(tree_ids):
            roots.setdefault(tree, i)

        def children(name: str) -> list[int]:
            ids = _attr(node, name)
            return [-1 if mode == "LEAF" else at[tree, child] for tree, child, mode in zip(tree_ids, ids, modes)]

        kind = "class" if node.op_type == "TreeEnsembleClassifier" else "target"
        held = Counter(zip(_attr(node, f"{kind}_treeids"), _attr(node, f"{kind}_nodeids")))
        return cls(list(roots.values()), modes, list(_attr(node, "nodes_featureids")),
                   [float(v) for v in thresholds], children("nodes_truenodeids"), children("nodes_falsenodeids"),
                   list(_attr(node, "nodes_missing_value_tracks_true", None) or [0] * len(modes)),
                   [held[key] for key in zip(tree_ids, node_ids)])

    @classmethod
    def _from_opset5(cls, node: Any) -> _Forest:
        """ai.onnx.ml opset-5 TreeEnsemble: branch nodes and leaves in separate arrays; leaf i
        becomes node len(branches) + i here. Each leaf holds one weight."""
        names = list(_BRANCH_TESTS)
        modes = [names[int(code)] for code in _attr_array(node, "nodes_modes")]
        splits: list[Any] = [float(v) for v in _attr_array(node, "nodes_splits")]
        n, leaves = len(modes), len(_attr(node, "leaf_targetids"))
        # The sets of the BRANCH_MEMBER nodes, in node order, each closed by a NaN.
        membership = _attr_array(node, "membership_values")
        groups: list[set[float]] = []
        group: set[float] = set()
        for value in membership if membership is not None else ():
            if math.isnan(value):
                groups.append(group)
                group = set()
            else:
                group.add(float(value))
        member_nodes = [i for i, mode in enumerate(modes) if mode == "BRANCH_MEMBER"]
        for i, members in zip(member_nodes, groups, strict=True):
            splits[i] = members
        true_ids, false_ids = _attr(node, "nodes_truenodeids"), _attr(node, "nodes_falsenodeids")
        true_leaf, false_leaf = _attr(node, "nodes_trueleafs"), _attr(node, "nodes_falseleafs")
        roots = [n + true_ids[r] if true_leaf[r] and false_leaf[r] and true_ids[r] == false_ids[r] else r
                 for r in _attr(node, "tree_roots")]
        return cls(roots, modes + ["LEAF"] * leaves, list(_attr(node, "nodes_featureids")) + [0] * leaves,
                   splits + [0.0] * leaves,
                   [n + i if leaf else i for i, leaf in zip(true_ids, true_leaf)] + [-1] * leaves,
                   [n + i if leaf else i for i, leaf in zip(false_ids, false_leaf)] + [-1] * leaves,
                   list(_attr(node, "nodes_missing_value_tracks_true", None) or [0] * n) + [0] * leaves,
                   [0] * n + [1] * leaves)

    def walk(self, row: Sequence[float]) -> tuple[int, int, int]:
        """(branch nodes, leaves, leaf weights) on the paths that `row` takes through the trees.

        A missing value (NaN) goes the way the node's missing-value track says; any other
        value the way its mode's test says.
        """
        branches = leaves = weights = 0
        for i in self.roots:
            for _ in range(len(self.modes)):
                mode = self.modes[i]
                if mode == "LEAF":
                    break
                branches += 1
                x = row[self.features[i]]
                goes_true = bool(self.missing_true[i]) if math.isnan(x) else _BRANCH_TESTS[mode](x, self.values[i])
                i = self.next_true[i] if goes_true else self.next_false[i]
            else:
                raise ValueError("a tree path does not end in a leaf")
            leaves += 1
            weights += self.weights[i]
        return branches, leaves, weights

    def mean_path(self) -> tuple[float, float, float]:
        """What `walk` gives when every tree's path is its mean over leaves (leaf depth, weights)."""
        branches = weights = 0.0
        for root in self.roots:
            depths, held = [], []
            stack = [(root, 0)]
            while stack:
                i, depth = stack.pop()
                if self.modes[i] == "LEAF":
                    depths.append(depth)
                    held.append(self.weights[i])
                elif depth >= len(self.modes):
                    raise ValueError("a tree path does not end in a leaf")
                else:
                    stack += [(self.next_true[i], depth + 1), (self.next_false[i], depth + 1)]
            branches += float(np.mean(depths))
            weights += float(np.mean(held))
        return branches, float(len(self.roots)), weights


def _tree_score_flops(node: Any) -> int:
    """FLOPs per row after the leaf weights are summed: base values and a post_transform, one
    per output score each."""
    if node.op_type == "TreeEnsembleClassifier":
        scores = len(_attr(node, "classlabels_int64s", None) or _attr(node, "classlabels_strings", None) or ())
    else:
        scores = int(_attr(node, "n_targets", 1))
    post = _attr(node, "post_transform", None)
    transformed = post not in (None, 0, b"NONE", "NONE")
    based = bool(_attr_size(_attr(node, "base_values", None)) or _attr_size(_attr(node, "base_values_as_tensor", None)))
    return scores * (int(transformed) + int(based))


class _Counter:
    """Walks the sorted graph once, summing MACs and FLOPs and noting what it could not cost.

    `values` holds the tensors of one run on a feed (empty without one): tree ensembles walk
    their input from it.
    """

    def __init__(self, types: dict[str, tuple[int, Shape | None]], constant: set[str],
                 values: dict[str, np.ndarray], producers: dict[str, Any] | None = None,
                 consumers: Counter[str] | None = None) -> None:
        self.types = types
        self.constant = constant
        self.values = values
        self.producers = producers or {}
        self.consumers = consumers or Counter()
        self.macs = 0
        self.flops = 0
        self.by_class: Counter[str] = Counter()
        self.nodes = 0
        self.nodes_by_class: Counter[str] = Counter()
        self.matmul_weight_bytes = 0
        # Outputs of a Conv/Gemm/MatMul (or of an op fused into one) that a following op can
        # be fused into: "any" (activation, normalisation, bias) or, after a plain MatMul,
        # "bias" only (MatMul + Add becomes a Gemm, which then takes an activation).
        self.fusable: dict[str, str] = {}
        self.op_class = "elementwise"
        self.tree_nodes = 0
        self.unknown: set[str] = set()
        self.notes: list[str] = []

    def shape(self, name: str) -> Shape | None:
        return self.types.get(name, (0, None))[1] if name else None

    def out_elems(self, node: Any) -> int | None:
        shape = self.shape(node.output[0]) if node.output else None
        return None if shape is None else _numel(shape)

    def fallback_shape(self, node: Any) -> Shape | None:
        """Output shape of an elementwise op that inference left open (ai.onnx.ml has few shape
        functions): the inputs broadcast, or input 0 for ops with parameter inputs."""
        if node.op_type in ("OneHotEncoder", "OneHot"):
            return None
        if node.op_type in _BROADCASTING:
            shapes = [self.shape(x) for x in node.input if x]
            if not shapes or any(s is None for s in shapes):
                return None
            out: Shape = ()
            for s in shapes:
                out = _broadcast(out, s)  # type: ignore[arg-type]
            return out
        return self.shape(_input(node, 0))

    def bias_elems(self, node: Any, bias: int | None) -> int:
        if bias is None or not _input(node, bias):
            return 0
        shape = self.shape(node.output[0])
        return 0 if shape is None else _numel(shape)

    def dequantized(self, node: Any, slots: Iterable[int]) -> bool:
        """Whether an input of a float op comes from a DequantizeLinear: a QDQ graph, which
        onnxruntime runs as an integer kernel."""
        for slot in slots:
            producer = self.producers.get(_input(node, slot))
            if producer is not None and producer.op_type == "DequantizeLinear":
                return True
        return False

    def fused(self, node: Any) -> bool:
        """Whether onnxruntime fuses `node` into the Conv/Gemm/MatMul that produces its input."""
        if node.op_type not in _FUSABLE or not node.input or self.consumers[node.input[0]] != 1:
            return False
        kind = self.fusable.get(node.input[0])
        if kind is None or (kind == "bias" and node.op_type != "Add"):
            return False
        # An Add fuses as a bias (a constant operand), not as a residual sum of two activations.
        return node.op_type != "Add" or all(x in self.constant for x in node.input[1:] if x)

    def weight_bytes(self, node: Any, slots: Iterable[int]) -> int:
        total = 0
        for slot in slots:
            name = _input(node, slot)
            elem, shape = self.types.get(name, (0, None))
            if name in self.constant and shape is not None:
                total += _numel(shape) * _itemsize(elem)
        return total

    def add(self, node: Any) -> None:
        if node.output and all(o in self.constant for o in node.output if o):
            return  # folded into a constant when the session is created
        fused = self.fused(node)
        self.op_class = "fused" if fused else "elementwise"
        if fused or node.op_type in _FUSES_INTO:
            kind = "bias" if node.op_type in ("MatMul", "FusedMatMul") else "any"
            self.fusable.update((o, kind) for o in node.output if o)
        self._add(node)
        if not fused and node.op_type not in _REMOVED:
            self.nodes += 1
            self.nodes_by_class[self.op_class] += 1

    def _add(self, node: Any) -> None:
        op = node.op_type
        if node.domain not in _KNOWN_DOMAINS:
            self.unknown.add(op)
            return
        if op in _MATMUL_LIKE:
            ia, ib, bias = _MATMUL_LIKE[op]
            a, b = self.shape(_input(node, ia)), self.shape(_input(node, ib))
            if a is None or b is None:
                self.unknown.add(op)
                return
            self.op_class = "int8_matmul" if op in _INT8_MATMUL or self.dequantized(node, (ia, ib)) else "matmul"
            if self.op_class == "matmul":
                self.matmul_weight_bytes += self.weight_bytes(node, (ia, ib))
            macs = _matmul_macs(a, b, bool(_attr(node, "transA", 0)), bool(_attr(node, "transB", 0)))
            self._mac(macs, self.bias_elems(node, bias))
        elif op in _GEMM_LIKE:
            ia, ib, bias = _GEMM_LIKE[op]
            a, b = self.shape(_input(node, ia)), self.shape(_input(node, ib))
            if a is None or b is None or len(a) != 2 or len(b) != 2:
                self.unknown.add(op)
                return
            self.op_class = "int8_matmul" if op in _INT8_MATMUL or self.dequantized(node, (ia, ib)) else "matmul"
            if self.op_class == "matmul":
                self.matmul_weight_bytes += self.weight_bytes(node, (ia, ib))
            macs = _matmul_macs(a, b, bool(_attr(node, "transA", 0)), bool(_attr(node, "transB", 0)))
            self._mac(macs, self.bias_elems(node, bias))
        elif op in _CONV_LIKE:
            ix, iw, bias = _CONV_LIKE[op]
            x, w = self.shape(_input(node, ix)), self.shape(_input(node, iw))
            out = self.shape(node.output[0])
            if out is None and x is not None and w is not None and len(x) == len(w) >= 3:
                out = (x[0], w[0], *_conv_out_spatial(node, x, w))
            if w is None or out is None:
                self.unknown.add(op)
                return
            if op in _INT8_CONV or self.dequantized(node, (ix, iw)):
                self.op_class = "int8_conv"
            elif int(_attr(node, "group", 1)) > 1:
                self.op_class = "depthwise"
            else:
                self.op_class = "pointwise" if all(k == 1 for k in w[2:]) else "conv"
            # Each output element reads C/group x kernel inputs: w is [M, C/group, k...].
            self._mac(_numel(out) * _numel(w[1:]), self.bias_elems(node, bias))
        elif op == "ConvTranspose":
            x, w = self.shape(_input(node, 0)), self.shape(_input(node, 1))
            if x is None or w is None:
                self.unknown.add(op)
                return
            self.op_class = "conv"
            # Each input element scatters into M/group x kernel outputs: w is [C, M/group, k...].
            self._mac(_numel(x) * _numel(w[1:]), self.bias_elems(node, 2))
        elif op in ("LinearClassifier", "LinearRegressor", "SVMClassifier", "SVMRegressor"):
            self.op_class = "matmul"
            x = self.shape(_input(node, 0))
            rows = x[0] if x else 1  # batch is pinned to 1
            per_row = sum(len(_attr(node, a, None) or ()) for a in ("support_vectors", "coefficients"))
            self._mac(rows * per_row, rows * len(_attr(node, "intercepts", None) or _attr(node, "rho", None) or ()))
        elif op in _TREE_ENSEMBLES:
            self.trees(node)
        elif op in _FREE:
            return
        elif op in _PER_OUTPUT:
            n = self.out_elems(node)
            if n is None:
                shape = self.fallback_shape(node)
                n = None if shape is None else _numel(shape)
            if n is None:
                self.unknown.add(op)
            else:
                self._count(n * _FLOPS_PER_ELEMENT.get(op, 1))
        elif op in _PER_INPUT:
            shape = self.shape(_input(node, 0))
            if shape is None:
                self.unknown.add(op)
            else:
                self._count(_numel(shape))
        elif op in _WINDOWED:
            n, kernel = self.out_elems(node), _attr(node, "kernel_shape", None)
            if n is None or not kernel:
                self.unknown.add(op)
            else:
                self._count(n * _numel(kernel))
        else:
            self.unknown.add(op)

    def trees(self, node: Any) -> None:
        """Count a tree ensemble along the paths of the run's input, or of average paths."""
        x = self.values.get(_input(node, 0))
        try:
            forest = _Forest.of(node)
            if x is None:
                rows = 1
                branches, leaves, weights = forest.mean_path()
            else:
                table = np.asarray(x, np.float64).reshape(len(x) if np.ndim(x) > 1 else 1, -1)
                rows = len(table)
                branches, leaves, weights = (sum(c) for c in zip(*(forest.walk(row.tolist()) for row in table)))
        except (KeyError, IndexError, TypeError, ValueError):
            self.unknown.add(node.op_type)
            return
        if x is None:
            self.notes.append(f"{node.op_type} (output {node.output[0]}): no feed, so each tree's path is "
                              "taken as its mean leaf depth (an estimate)")
        self.tree_nodes += round(branches + leaves)
        self._count(round(branches + weights) + rows * _tree_score_flops(node))

    def _mac(self, macs: int, bias_adds: int) -> None:
        self.macs += macs
        self._count(2 * macs + bias_adds)

    def _count(self, flops: int) -> None:
        self.flops += flops
        self.by_class[self.op_class] += flops


def _parameters(nodes: Sequence[Any], sizes: dict[str, int], kinds: dict[str, int],
                producers: dict[str, Any]) -> int:
    """Scalars of the initializers (and Constants) that reach a weight slot of a compute op."""
    import onnx

    # Operands of arithmetic that are size 1 (scales, epsilons) or int64/bool (shape arithmetic)
    # are not learned weights.
    not_weights = {onnx.TensorProto.INT64, onnx.TensorProto.BOOL}
    counted: set[str] = set()

    def source(name: str) -> str | None:
        seen = 0
        while name and name not in sizes and seen < 16:
            node = producers.get(name)
            if node is None or node.op_type not in _PASS_THROUGH:
                return None
            name, seen = _input(node, 0), seen + 1
        return name if name in sizes else None

    for node in nodes:
        for slot in _WEIGHT_SLOTS.get(node.op_type, ()):
            found = source(_input(node, slot))
            if found and not (node.op_type in _ELEMENTWISE_ARITHMETIC
                              and (sizes[found] <= 1 or kinds.get(found) in not_weights)):
                counted.add(found)
    total = sum(sizes[name] for name in counted)
    for node in nodes:
        for name in _ML_PARAMETER_ATTRS.get(node.op_type, ()):
            total += _attr_size(_attr(node, name, None))
    return total


def _peak_activation(nodes: Sequence[Any], types: dict[str, tuple[int, Shape | None]],
                     constant: set[str], outputs: set[str]) -> int:
    """Max over steps of the bytes of node outputs alive at that step.

    A tensor lives from the step that produces it to its last consumer (graph outputs to the
    end); at each step the node's inputs and outputs are alive together. Graph inputs
    (caller-owned), weights and folded constants are not counted; strings and tensors of
    unknown shape count 0 bytes.
    """
    last_use: dict[str, int] = {}
    for step, node in enumerate(nodes):
        for name in node.input:
            if name:
                last_use[name] = step

    def size(name: str) -> int:
        elem, shape = types.get(name, (0, None))
        return 0 if shape is None else _numel(shape) * _itemsize(elem)

    live: dict[str, int] = {}
    peak = 0
    for step, node in enumerate(nodes):
        for name in node.output:
            if name and name not in constant:
                live[name] = size(name)
        peak = max(peak, sum(live.values()))
        for name in list(live):
            if name in outputs:
                continue
            if last_use.get(name, step) <= step:
                del live[name]
    return peak


def _elem_type(array: np.ndarray) -> int:
    import onnx

    if array.dtype.kind in "OUS":
        return onnx.TensorProto.STRING
    return int(onnx.helper.np_dtype_to_tensor_dtype(array.dtype))


def _run_once(model: Any, feed: dict[str, np.ndarray], folder: Path, label: str) -> dict[str, np.ndarray]:
    """Every top-level tensor of one run of `model` on `feed`: the feed itself and each node's
    outputs, read from a copy of the model that lists them all as graph outputs."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    if any(onnx.external_data_helper.uses_external_data(t) for t in probe.graph.initializer):
        onnx.load_external_data_for_model(probe, str(folder))
    listed = {o.name for o in probe.graph.output}
    for name in dict.fromkeys(o for node in probe.graph.node for o in node.output if o and o not in listed):
        probe.graph.output.add(name=name)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every value
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        results = session.run(None, feed)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ProfileError(f"cannot run {label} on the feed: {exc}") from exc
    values = {name: np.asarray(value) for name, value in feed.items()}
    for meta, value in zip(session.get_outputs(), results):
        if isinstance(value, np.ndarray):  # sequences and maps (ZipMap) have no tensor shape
            values[meta.name] = value
    return values


def profile_graph(path: Path, feed: dict[str, np.ndarray] | None = None) -> GraphProfile:
    """Count parameters, weight bytes, MACs, FLOPs and peak activations of one ONNX file at batch 1.

    `feed` (input name -> one-row array, as `pipelines.onnx.export.feeds` gives) is used when
    the graph alone leaves something open: shapes that inference could not give, or the paths
    of tree ensembles. The model is then run once on it in onnxruntime (see the counting rules).
    `file_bytes` is the size of the .onnx file itself (external data is read only for that run:
    weight sizes come from the tensors' dims).
    """
    import onnx

    path = Path(path)
    if feed is not None:
        check_timing_args(feed, warmup=0, runs=1, label="the profile feed")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001
        raise ProfileError(f"cannot read {path.name}: {exc}") from exc
    graph = model.graph

    sizes: dict[str, int] = {t.name: _numel(t.dims) for t in graph.initializer}
    kinds: dict[str, int] = {t.name: t.data_type for t in graph.initializer}
    weight_bytes = sum(_tensor_bytes(t) for t in graph.initializer)
    for sparse in graph.sparse_initializer:
        sizes[sparse.values.name] = _numel(sparse.values.dims)
        kinds[sparse.values.name] = sparse.values.data_type
        weight_bytes += _tensor_bytes(sparse.values) + _tensor_bytes(sparse.indices)
    constant_types: dict[str, tuple[int, Shape | None]] = {}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            value = _constant_value(node)
            if value is not None:
                shape, elem, nbytes = value
                sizes[node.output[0]] = _numel(shape)
                kinds[node.output[0]] = elem
                constant_types[node.output[0]] = (elem, shape)
                weight_bytes += nbytes

    pinned = onnx.ModelProto()
    pinned.CopyFrom(model)
    _pin_batch(pinned)
    types = _value_types(_inferred(pinned).graph)
    for name, value in constant_types.items():
        types.setdefault(name, value)

    initializers = {t.name for t in graph.initializer} | {s.values.name for s in graph.sparse_initializer}
    graph_inputs = {v.name for v in graph.input} - initializers
    nodes = _topological(list(graph.node), graph_inputs | initializers)
    constant = set(initializers)
    for node in nodes:
        inputs = [x for x in node.input if x]
        if node.op_type == "Constant" or (
            inputs and all(x in constant for x in inputs) and node.op_type not in _NONDETERMINISTIC
            and node.domain in ("", "ai.onnx")
        ):
            constant.update(o for o in node.output if o)

    values: dict[str, np.ndarray] = {}
    open_shapes = any(types.get(o, (0, None))[1] is None for n in nodes for o in n.output if o and o not in constant)
    if feed is not None and (open_shapes or any(n.op_type in _TREE_ENSEMBLES for n in nodes)):
        values = _run_once(model, feed, path.parent, path.name)
        for name, value in values.items():
            elem, shape = types.get(name, (0, None))
            if shape is None:
                types[name] = (elem or _elem_type(value), tuple(value.shape))

    producers = {out: n for n in nodes for out in n.output if out}
    consumers: Counter[str] = Counter(x for n in nodes for x in n.input if x)
    consumers.update(o.name for o in graph.output)
    counter = _Counter(types, constant, values, producers, consumers)
    for node in nodes:
        if node.op_type in ("If", "Loop", "Scan"):
            counter.unknown.add(node.op_type)
            continue
        counter.add(node)

    return GraphProfile(
        parameters=_parameters(nodes, sizes, kinds, producers),
        weight_bytes=weight_bytes,
        macs=counter.macs,
        flops=counter.flops,
        peak_activation_bytes=_peak_activation(nodes, types, constant, {o.name for o in graph.output}),
        file_bytes=path.stat().st_size,
        unknown_ops=sorted(counter.unknown),
        tree_nodes_visited=counter.tree_nodes,
        notes=counter.notes,
        flops_by_class={c: int(counter.by_class[c]) for c in OP_CLASSES if counter.by_class[c]},
        nodes=counter.nodes,
        nodes_by_class={c: int(counter.nodes_by_class[c]) for c in OP_CLASSES if counter.nodes_by_class[c]},
        matmul_weight_bytes=counter.matmul_weight_bytes,
    )


# ----------------------------------------------------------------------------------- measuring


def _proc_status_bytes(field: str) -> int | None:
    """A `kB` figure of /proc/self/status in bytes, or None where there is no procfs."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _rss_now() -> int:
    """Current resident set size of this process, in bytes."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return _proc_status_bytes("VmRSS") or _peak_rss()


def _peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes."""
    # Not ru_maxrss on Linux: it keeps the high-water mark of the address space replaced by
    # exec, i.e. of the (v)forking parent, so a child of a big process reports the parent's peak.
    hwm = _proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB elsewhere


def _measure_here(model: Path, feed: Path, warmup: int, runs: int) -> dict[str, Any]:
    """Child side of `measure_host`: `time_inference`, plus memory."""
    import onnxruntime  # noqa: F401 - the baseline includes the runtime, as on a device

    baseline = _rss_now()
    result = time_inference(model, feed, warmup, runs)
    result.update(baseline_rss_bytes=baseline, peak_rss_bytes=_peak_rss())
    return result


def _calibrate_here(references: list[tuple[Path, Path]], warmup: int, runs: int, rounds: int,
                    budget_s: float = 0.2) -> dict[str, Any]:
    """Child side of `calibrate_host`: the lowest p50 over rounds of each reference graph.

    Alternating rounds: a burst of load from elsewhere on a shared host then hits one round
    of each graph rather than all of one graph's runs, and the lowest round is kept, since
    load from other processes only ever adds time (on a 2-core host under another test
    suite, one round of a 20 ms model measured 31 ms, another 21 ms). A short probe
    sizes each graph's runs to about `budget_s` per round (at most `runs`, at least 10), so
    that the slow references (integer convolutions) do not stretch the calibration.
    """
    sized = []
    for reference, feed in references:
        probe = time_inference(reference, feed, min(warmup, 5), 5)["p50_ms"]
        sized.append(max(10, min(runs, int(budget_s * 1e3 / max(probe, 1e-3)))))
    times: list[list[float]] = [[] for _ in references]
    for _ in range(rounds):
        for measured, (reference, feed), n in zip(times, references, sized):
            measured.append(time_inference(reference, feed, warmup, n)["p50_ms"])
    return {"p50_ms": [float(min(t)) for t in times], "runs": sized}


def measure_host(
    path: Path, feed: dict[str, np.ndarray], warmup: int = 50, runs: int = 500, *, timeout: float = 600.0
) -> HostMeasurement:
    """Time one-row inference on one thread in a fresh process, and report that process's memory.

    `baseline_rss_bytes` is the child's resident memory after importing onnxruntime and before
    the session exists; `peak_rss_bytes` its high-water mark after the timed runs.
    """
    check_timing_args(feed, warmup, runs)
    result = measure_in_child(_MODULE, "measure", Path(path), feed, warmup, runs, timeout,
                              f"measuring {Path(path).name}", ProfileError)
    return HostMeasurement(
        latency_p50_ms=result["p50_ms"], latency_p95_ms=result["p95_ms"],
        peak_rss_bytes=result["peak_rss_bytes"], baseline_rss_bytes=result["baseline_rss_bytes"], threads=1,
    )


def _save_graph(path: Path, nodes: list[Any], x_shape: list[int], y: str, y_shape: list[int],
                initializers: list[Any]) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, path.stem, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, y_shape)], initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _scaled(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int, name: str) -> Any:
    """Weights scaled so activations stay near 1: no overflow, no denormals slowing the float units."""
    from onnx import numpy_helper

    return numpy_helper.from_array((rng.standard_normal(shape) / math.sqrt(fan_in)).astype(np.float32), name)


def _reference_graphs(folder: Path) -> list[tuple[str, Path, tuple[int, ...]]]:
    """The calibration graphs: (what it measures, file, input shape), all batch 1.

    * `overhead`: one Add on one float; `nodes`: 32 Adds on 16 floats (per-node cost).
    * `matmul@<MiB>`: chains of two dense width x width MatMuls, 0.5, 2 and 8 MiB of weights.
    * `elementwise`: Add, Mul, Relu and a residual Add on a 64 x 56 x 56 activation (784 KiB).
    * `conv`: one 3x3 convolution, 64 -> 64 channels at 28 x 28; `pointwise`: 1x1
      convolutions 64 -> 256 -> 64 at 28 x 28; `depthwise`: one 3x3 depthwise convolution of
      256 channels at 28 x 28. Shapes from the middle of what edge CNNs use (ResNet and
      MobileNet stages), fixed: never fitted to any model that is later predicted.
    * `conv_nodes`: 8 small 3x3 convolutions (8 channels at 8 x 8): a convolution's own
      fixed cost, which a small CNN pays per layer.
    * `int8_matmul`, `int8_conv`, `int8_conv_nodes`: the 8 MiB MatMul chain, a 3x3 32 -> 32
      convolution at 28 x 28 and the `conv_nodes` chain, quantized as the release quantizes
      (`quantize_dynamic`, int8 weights).
    """
    from onnx import helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(0)
    graphs: list[tuple[str, Path, tuple[int, ...]]] = []
    one = numpy_helper.from_array(np.ones((1, 1), np.float32), "one")
    graphs.append(("overhead", _save_graph(folder / "tiny.onnx", [helper.make_node("Add", ["x", "one"], ["y"])],
                                           [1, 1], "y", [1, 1], [one]), (1, 1)))
    chain = [helper.make_node("Add", ["x" if i == 0 else f"h{i}", f"c{i}"], [f"h{i + 1}"]) for i in range(32)]
    consts = [numpy_helper.from_array(np.full((1, 16), 1e-3 * (i + 1), np.float32), f"c{i}") for i in range(32)]
    graphs.append(("nodes", _save_graph(folder / "nodes.onnx", chain, [1, 16], "h32", [1, 16], consts), (1, 16)))
    for width, depth in CALIBRATION_REFERENCES:
        weights = [_scaled(rng, (width, width), width, f"w{i}") for i in range(depth)]
        nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", f"w{i}"], [f"h{i + 1}"]) for i in range(depth)]
        mib = width * width * depth * 4 / (1 << 20)
        path = _save_graph(folder / f"matmul-{width}.onnx", nodes, [1, width], f"h{depth}", [1, width], weights)
        graphs.append((f"matmul@{round(mib, 2)}", path, (1, width)))
    scale = numpy_helper.from_array(np.full((64, 1, 1), 0.5, np.float32), "scale")
    shift = numpy_helper.from_array(np.full((64, 1, 1), 0.1, np.float32), "shift")
    graphs.append(("elementwise", _save_graph(
        folder / "elementwise.onnx",
        [helper.make_node("Add", ["x", "shift"], ["a"]), helper.make_node("Mul", ["a", "scale"], ["m"]),
         helper.make_node("Relu", ["m"], ["r"]), helper.make_node("Add", ["r", "x"], ["y"])],
        [1, 64, 56, 56], "y", [1, 64, 56, 56], [scale, shift]), (1, 64, 56, 56)))

    def conv(name: str, layers: list[tuple[int, int, int, int]], hw: int) -> Path:
        """Chain of (in, out, kernel, groups) convolutions with bias, stride 1, same padding."""
        nodes, inits = [], []
        for i, (cin, cout, k, groups) in enumerate(layers):
            inits += [_scaled(rng, (cout, cin // groups, k, k), cin // groups * k * k, f"w{i}"),
                      numpy_helper.from_array(np.zeros(cout, np.float32), f"b{i}")]
            nodes.append(helper.make_node("Conv", ["x" if i == 0 else f"h{i}", f"w{i}", f"b{i}"], [f"h{i + 1}"],
                                          kernel_shape=[k, k], pads=[k // 2] * 4, group=groups))
        return _save_graph(folder / f"{name}.onnx", nodes, [1, layers[0][0], hw, hw], f"h{len(layers)}",
                           [1, layers[-1][1], hw, hw], inits)

    graphs.append(("conv", conv("conv", [(64, 64, 3, 1)], 28), (1, 64, 28, 28)))
    graphs.append(("pointwise", conv("pointwise", [(64, 256, 1, 1), (256, 64, 1, 1)], 28), (1, 64, 28, 28)))
    graphs.append(("depthwise", conv("depthwise", [(256, 256, 3, 256)], 28), (1, 256, 28, 28)))
    graphs.append(("conv_nodes", conv("conv_nodes", [(8, 8, 3, 1)] * 8, 8), (1, 8, 8, 8)))
    small_conv = conv("conv32", [(32, 32, 3, 1)], 28)
    for label, source, shape in (("int8_matmul", folder / "matmul-1024.onnx", (1, 1024)),
                                 ("int8_conv", small_conv, (1, 32, 28, 28)),
                                 ("int8_conv_nodes", folder / "conv_nodes.onnx", (1, 8, 8, 8))):
        quantized = folder / f"{label}.onnx"
        logger = logging.getLogger()
        level = logger.level
        logger.setLevel(logging.ERROR)  # quantize_dynamic advises pre-processing on every call
        try:
            quantize_dynamic(str(source), str(quantized), weight_type=QuantType.QInt8)
        finally:
            logger.setLevel(level)
        graphs.append((label, quantized, shape))
    return graphs


# Reference MatMul chains (width, depth) and their weights: 0.5, 2 and 8 MiB.
CALIBRATION_REFERENCES = ((256, 2), (512, 2), (1024, 2))


def calibrate_host(runs: int = 200, warmup: int = 20, rounds: int = 3, *, timeout: float = 600.0) -> HostCalibration:
    """Measure this host's single-thread rate per operator class, its cost per node and per
    run, on small reference graphs (`_reference_graphs`) timed in one fresh process.

    The per-run cost is a one-Add graph's time; the per-node cost comes from a chain of 32
    Adds on 16 floats. Each class's rate is its reference's FLOPs of that class over the
    reference's time net of those costs and of its other classes' time (an integer graph
    also quantizes its input, which is elementwise work).

    Batch-1 MatMul reads every weight once per two FLOPs, so its rate is the rate at which
    the weights arrive: from the core's cache while they fit, from memory (3 to 5x slower)
    when they do not. Three footprints (0.5, 2 and 8 MiB) are kept in `gflops_by_weights_mib`
    and the highest is `gflops`. One 8 MiB reference alone measured 40 GFLOPS on one host and
    12 on another whose 2 MiB per-core cache it overflows. `HostCalibration.matmul_gflops`
    picks the rate of a model's own footprint.

    A batch-1 MatMul is not the compute peak, though: a 3x3 or 1x1 convolution reuses its
    weights at every pixel and ran 4x faster (225 against 57 GFLOPS on one host). The
    fastest dense class is `peak_gflops`, the quantity HPL measures on a device, which a
    fleet projection scales by; with the MatMul rate instead, the lower bound of a
    projection (every FLOP at the device's rate) exceeded a published MobileNetV2 latency
    twofold (docs/estimator.md).
    """
    import time

    if runs < 1 or warmup < 0 or rounds < 1:
        raise ValueError("runs and rounds must be >= 1 and warmup >= 0")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="finops-calibrate.") as tmp:
        folder = Path(tmp)
        graphs = _reference_graphs(folder)
        rng = np.random.default_rng(1)
        args: list[str] = []
        for label, path, shape in graphs:
            feed = folder / f"{label}.npz"
            save_feed(feed, {"x": rng.standard_normal(shape).astype(np.float32)})
            args += [str(path), str(feed)]
        profiles = {label: profile_graph(path) for label, path, _ in graphs}
        result_path = folder / "result.json"
        run_module_checked(_MODULE, ["calibrate", str(result_path), *args, "--warmup", str(warmup),
                                     "--runs", str(runs), "--rounds", str(rounds)],
                           folder, timeout, "calibration", ProfileError, result_path)
        measured = dict(zip((label for label, _, _ in graphs), json.loads(result_path.read_text())["p50_ms"]))
    overhead = measured["overhead"]
    extra_nodes = profiles["nodes"].nodes - profiles["overhead"].nodes
    node_ms = max(measured["nodes"] - overhead, 0.0) / max(extra_nodes, 1)
    rates: dict[str, float] = {}
    node_costs: dict[str, float] = {}

    def rest_ms(label: str, unknown: str, node_unknown: bool = False) -> float:
        """A reference's time less everything but the work (or the node cost) of `unknown`."""
        profile = profiles[label]
        rest = measured[label] - overhead
        for op_class, n in profile.nodes_by_class.items():
            if not (node_unknown and op_class == unknown):
                rest -= n * node_costs.get(op_class, node_ms)
        for op_class, flops in profile.flops_by_class.items():
            if op_class != "fused" and not (op_class == unknown and not node_unknown):
                rest -= flops / (rates[op_class] * 1e9) * 1e3
        return rest

    def solve(label: str, op_class: str) -> float:
        flops = profiles[label].flops_by_class.get(op_class, 0)
        return flops / (max(rest_ms(label, op_class), 1e-6) * 1e-3) / 1e9

    rates["elementwise"] = solve("elementwise", "elementwise")
    # A convolution's rate (large reference) and its fixed cost (chain of small ones) each
    # depend on the other: two passes settle them.
    for rate_of, nodes_of, classes in (("conv", "conv_nodes", ("conv", "pointwise", "depthwise")),
                                       ("int8_conv", "int8_conv_nodes", ("int8_conv",))):
        for _ in range(2):
            rates[rate_of] = solve(rate_of, rate_of)
            if rate_of == "conv":
                rates["pointwise"] = solve("pointwise", "pointwise")
                rates["depthwise"] = solve("depthwise", "depthwise")
            count = profiles[nodes_of].nodes_by_class.get(rate_of, 0)
            cost = max(rest_ms(nodes_of, rate_of, node_unknown=True), 0.0) / max(count, 1)
            node_costs.update(dict.fromkeys(classes, max(cost, node_ms)))
    rates["int8_matmul"] = solve("int8_matmul", "int8_matmul")
    by_mib = {label.partition("@")[2]: solve(label, "matmul") for label in measured if label.startswith("matmul@")}
    matmul_peak = max(by_mib.values())
    return HostCalibration(
        gflops=matmul_peak, overhead_ms=overhead, node_ms=node_ms,
        node_ms_by_class={c: round(v, 6) for c, v in node_costs.items()},
        peak_gflops=round(max(matmul_peak, rates["conv"], rates["pointwise"]), 2),
        gflops_by_weights_mib={mib: round(rate, 2) for mib, rate in by_mib.items()},
        gflops_by_class={"matmul": round(matmul_peak, 2), **{c: round(r, 3) for c, r in rates.items()}},
        seconds=round(time.perf_counter() - started, 2),
    )


# -------------------------------------------------------------------------------------- child


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {_MODULE}")
    sub = parser.add_subparsers(dest="command", required=True)
    measure = sub.add_parser("measure", help="time one model and report memory (internal: measure_host)")
    measure.add_argument("model", type=Path)
    measure.add_argument("feed", type=Path)
    measure.add_argument("result", type=Path)
    calibrate = sub.add_parser("calibrate", help="time the reference graphs (internal: calibrate_host)")
    calibrate.add_argument("result", type=Path)
    calibrate.add_argument("references", type=Path, nargs="+", help="reference graph and feed, pairwise")
    calibrate.add_argument("--rounds", type=int, default=3)
    for p in (measure, calibrate):
        p.add_argument("--warmup", type=int, default=50)
        p.add_argument("--runs", type=int, default=500)
    args = parser.parse_args(argv)
    if args.command == "measure":
        result = _measure_here(args.model, args.feed, args.warmup, args.runs)
    else:
        pairs = list(zip(args.references[::2], args.references[1::2]))
        result = _calibrate_here(pairs, args.warmup, args.runs, args.rounds)
    args.result.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
