"""Export a native model to one ONNX file and check it against the native model.

The ONNX file is the contract with devices: scikit-learn pipelines take one input per
feature column (`[N, 1]`, float or string), torch networks one float input `input` of shape
`[N, features]`; classifiers output class probabilities `probabilities` `[N, classes]`, a
regression its predictions `prediction` `[N, 1]`. Contract details (task, features, classes,
the missing-category marker, the prediction bins devices count a regression's answers in)
are written into the file's metadata.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.data import MISSING_CATEGORY


class ParityError(ValueError):
    """The ONNX model does not reproduce the native model within the spec's tolerance."""


@dataclass
class Parity:
    max_abs_diff: float
    label_agreement: float


CLASSIFIER_OUTPUT = "probabilities"
REGRESSION_OUTPUT = "prediction"


def output_name(task: str) -> str:
    return REGRESSION_OUTPUT if task == "regression" else CLASSIFIER_OUTPUT


_REGISTERED = False


def register_converters() -> None:
    """XGBoost's and LightGBM's ONNX converters (onnxmltools) registered with skl2onnx, so a
    Pipeline ending in one converts like any scikit-learn pipeline."""
    global _REGISTERED
    if _REGISTERED:
        return
    from lightgbm import LGBMClassifier, LGBMRegressor
    from onnxmltools.convert.lightgbm.operator_converters.LightGbm import convert_lightgbm
    from onnxmltools.convert.xgboost.operator_converters.XGBoost import convert_xgboost
    from skl2onnx import update_registered_converter
    from skl2onnx.common.shape_calculator import (
        calculate_linear_classifier_output_shapes,
        calculate_linear_regressor_output_shapes,
    )
    from xgboost import XGBClassifier, XGBRegressor

    classifier_options = {"nocl": [True, False], "zipmap": [True, False, "columns"]}
    update_registered_converter(XGBClassifier, "XGBoostXGBClassifier", calculate_linear_classifier_output_shapes,
                                convert_xgboost, options=classifier_options)
    update_registered_converter(XGBRegressor, "XGBoostXGBRegressor", calculate_linear_regressor_output_shapes,
                                convert_xgboost)
    update_registered_converter(LGBMClassifier, "LightGbmLGBMClassifier", calculate_linear_classifier_output_shapes,
                                convert_lightgbm, options=classifier_options)
    update_registered_converter(LGBMRegressor, "LightGbmLGBMRegressor", calculate_linear_regressor_output_shapes,
                                convert_lightgbm, options={"split": None})
    _REGISTERED = True


def rename_output(proto, old: str, new: str) -> None:
    """Give a graph output the contract's name (every node that writes or reads it follows)."""
    if old == new:
        return
    for node in proto.graph.node:
        node.output[:] = [new if name == old else name for name in node.output]
        node.input[:] = [new if name == old else name for name in node.input]
    for output in proto.graph.output:
        if output.name == old:
            output.name = new


def _float32_thresholds(estimator):
    """A copy of a LightGBM model whose split thresholds are the largest float32 not above its own
    (double) ones. For float32 inputs, which is what the exported model receives, `x <= t` and
    `x <= floor32(t)` decide alike, so the copy answers exactly as the model does; and ONNX's
    float32 thresholds then hold it without rounding (rounded to nearest, a threshold can land
    on a data value and send it the other way: a LightGBM regressor's export differed by 16.5
    on one row of 111)."""
    import copy

    import lightgbm

    lines = estimator.booster_.model_to_string().split("\n")
    found: dict[str, int] = {}
    for number, line in enumerate(lines):
        if line.startswith("Tree="):
            found = {}
        for key in ("threshold=", "decision_type="):
            if line.startswith(key):
                found[key] = number
        if len(found) < 2:
            continue
        where, kinds = found.pop("threshold="), found.pop("decision_type=")
        types = [int(v) for v in lines[kinds].split("=", 1)[1].split()]
        values = []
        for value, kind in zip(lines[where].split("=", 1)[1].split(), types):
            if kind & 1:  # a categorical split lists categories, not a threshold
                values.append(value)
                continue
            threshold = np.float32(float(value))
            if float(threshold) > float(value):
                threshold = np.nextafter(threshold, np.float32(-np.inf))
            values.append(repr(float(threshold)))
        lines[where] = "threshold=" + " ".join(values)
    snapped = copy.deepcopy(estimator)
    # The tree sizes in the header count characters of the old text: without them LightGBM reads tree by tree.
    snapped._Booster = lightgbm.Booster(model_str="\n".join(x for x in lines if not x.startswith("tree_sizes=")))
    return snapped


def _lightgbm_safe(model):
    """`model` with every LightGBM estimator in it (itself, or a Pipeline's step) given float32 thresholds."""
    try:
        from lightgbm import LGBMModel
    except ImportError:  # pragma: no cover - a dependency
        return model
    if isinstance(model, LGBMModel):
        return _float32_thresholds(model)
    steps = getattr(model, "steps", None)
    if not steps or not any(isinstance(step, LGBMModel) for _, step in steps):
        return model
    return model.__class__([(name, _float32_thresholds(step) if isinstance(step, LGBMModel) else step)
                            for name, step in steps])


def _export_sklearn(model, sample: pd.DataFrame, path: Path, opset: int, task: str) -> None:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType

    register_converters()
    model = _lightgbm_safe(model)
    inputs = [
        (column, StringTensorType([None, 1]) if sample[column].dtype == object else FloatTensorType([None, 1]))
        for column in sample.columns
    ]
    estimator = model.steps[-1][1] if hasattr(model, "steps") else model
    options = {} if task == "regression" else {id(estimator): {"zipmap": False}}
    onx = convert_sklearn(model, initial_types=inputs, target_opset={"": opset, "ai.onnx.ml": 3}, options=options)
    if task == "regression":
        rename_output(onx, onx.graph.output[0].name, REGRESSION_OUTPUT)
    path.write_bytes(onx.SerializeToString())


def _export_torch(model, sample: pd.DataFrame, path: Path, opset: int, task: str) -> None:
    import torch

    example = torch.tensor(sample.to_numpy(np.float32)[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(path), input_names=["input"], output_names=[output_name(task)],
            opset_version=opset, dynamo=True, external_data=False,
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}}, verbose=False,
        )


def export_onnx(framework: str, model, sample: pd.DataFrame, path: Path, opset: int,
                metadata: dict[str, str], task: str = "binary") -> Path:
    """Write `path` as one self-contained ONNX file with the contract in its metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    (_export_sklearn if framework == "sklearn" else _export_torch)(model, sample, path, opset, task)
    return write_contract(path, path, sample, metadata, task)


def write_contract(source: Path, path: Path, sample: pd.DataFrame, metadata: dict[str, str],
                   task: str = "binary") -> Path:
    """`source` as one checked, self-contained ONNX file at `path`, with the contract (task,
    features, the missing-category marker, `metadata`) as its metadata and a fixed graph name."""
    import onnx

    proto = onnx.load(str(source))
    if task == "regression":
        _regression_shape(proto)
    onnx.checker.check_model(proto)
    del proto.metadata_props[:]
    contract = {"edge.features": json.dumps(list(sample.columns)), "edge.task": task,
                "edge.missing_category": MISSING_CATEGORY, **metadata}
    for key, value in sorted(contract.items()):
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "edge-release"
    # skl2onnx names graphs randomly; a fixed name keeps the file's bytes reproducible.
    proto.graph.name = metadata.get("edge.model", "model")
    onnx.save_model(canonical(proto), str(path), save_as_external_data=False)
    return path


def canonical(proto):
    """The model with its opset imports in a fixed order: converters list them from a set, so
    the same model would otherwise be written as different bytes from one process to the next."""
    imports = sorted(((o.domain, o.version) for o in proto.opset_import))
    del proto.opset_import[:]
    for domain, version in imports:
        proto.opset_import.add(domain=domain, version=version)
    return proto


def rewrite_canonical(path: Path) -> None:
    """Rewrite an ONNX file in `canonical` form (one self-contained file)."""
    import onnx

    onnx.save_model(canonical(onnx.load(str(path))), str(path), save_as_external_data=False)


def session(path: Path, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def feeds(sess, features: pd.DataFrame) -> dict[str, np.ndarray]:
    """Inputs for a session from prepared features (see `pipelines.data.prepare_features`): one
    input per column, or the whole float matrix for a model with one input (`input`, or any name
    that is not a column's)."""
    names = [i.name for i in sess.get_inputs()]
    if names == ["input"] or (len(names) == 1 and names[0] not in features.columns):
        return {names[0]: features.to_numpy(np.float32)}
    out = {}
    for item in sess.get_inputs():
        column = features[item.name]
        if item.type == "tensor(string)":
            out[item.name] = column.to_numpy(dtype=object).reshape(-1, 1)
        else:
            out[item.name] = column.to_numpy(np.float32).reshape(-1, 1)
    return out


def predict(path: Path, features: pd.DataFrame, sess=None) -> np.ndarray:
    """An ONNX file's answers under the contract: class probabilities [rows, classes], or a
    regression's predictions [rows]."""
    sess = sess or session(path)
    names = [o.name for o in sess.get_outputs()]
    if REGRESSION_OUTPUT in names:
        out = sess.run([REGRESSION_OUTPUT], feeds(sess, features))[0]
        return np.asarray(out, dtype=np.float64).reshape(len(features))
    return np.asarray(sess.run([CLASSIFIER_OUTPUT], feeds(sess, features))[0], dtype=np.float64)


def predict_proba(path: Path, features: pd.DataFrame, sess=None) -> np.ndarray:
    """Class probabilities from an ONNX file, shape [rows, classes]."""
    return predict(path, features, sess)


def _regression_shape(proto) -> None:
    """A regression's output as `[N, 1]`, whatever shape the converter declared."""
    from onnx import TensorProto, helper

    output = proto.graph.output[0]
    if len(output.type.tensor_type.shape.dim) == 1:
        reshaped = f"{output.name}_flat"
        for node in proto.graph.node:
            node.output[:] = [reshaped if n == output.name else n for n in node.output]
        shape = helper.make_tensor(f"{output.name}_shape", TensorProto.INT64, [2], [-1, 1])
        proto.graph.initializer.append(shape)
        proto.graph.node.append(helper.make_node("Reshape", [reshaped, shape.name], [output.name]))
        del output.type.tensor_type.shape.dim[:]
        output.type.tensor_type.shape.dim.add().dim_param = "N"
        output.type.tensor_type.shape.dim.add().dim_value = 1


def prediction_bins(predictions: np.ndarray, bins: int = 10) -> list[float]:
    """Edges that cut a regression's predictions on the training rows into `bins` equal shares:
    devices count their answers in these bins, so the canary and the drift monitor compare
    distributions as they do a classifier's classes."""
    edges = np.unique(np.quantile(np.asarray(predictions, dtype=np.float64), np.linspace(0, 1, bins + 1)[1:-1]))
    return [float(e) for e in edges]


def answer_contract(sess) -> tuple[str, list[float] | None]:
    """A session's answer output (`probabilities`, or `prediction`) and, for a regression, the bin
    edges its answers are counted in (from the file's metadata)."""
    names = [o.name for o in sess.get_outputs()]
    if REGRESSION_OUTPUT not in names:
        return CLASSIFIER_OUTPUT, None
    text = sess.get_modelmeta().custom_metadata_map.get("edge.prediction_bins", "[]")
    try:
        edges = [float(e) for e in json.loads(text)] if len(text) <= MAX_BIN_TEXT else None
    except (ValueError, TypeError):
        edges = None
    # A device sizes its telemetry by these: a few finite, ordered numbers, or the model is not served.
    if edges is None or len(edges) > MAX_BINS or not all(np.isfinite(edges)) or edges != sorted(edges):
        raise ValueError(f"edge.prediction_bins is not a list of at most {MAX_BINS} ordered finite numbers")
    return REGRESSION_OUTPUT, edges


MAX_BINS = 64  # bin edges a regression's file may carry (devices count one bin more)
MAX_BIN_TEXT = 4096


def answer_labels(outputs: np.ndarray, bins: list[float] | None) -> np.ndarray:
    """Each row's answer as a small integer devices count: the predicted class, or the bin of a
    regression's value (0..len(bins))."""
    outputs = np.asarray(outputs)
    if bins is None:
        return outputs.argmax(axis=1)
    return np.searchsorted(np.asarray(bins, dtype=np.float64), outputs.reshape(len(outputs)), side="right")


def parity(native: np.ndarray, onnx_out: np.ndarray) -> Parity:
    """How far the ONNX answers are from the native model's: probabilities' largest difference and
    the share of equal labels; for a regression (1-d answers) the largest difference relative to
    the largest prediction (at least 1), and the share of rows within 1e-3 of it."""
    if np.ndim(native) == 1:
        scale = max(1.0, float(np.max(np.abs(native))))
        diff = np.abs(np.asarray(native) - np.asarray(onnx_out).reshape(np.shape(native))) / scale
        return Parity(max_abs_diff=float(np.max(diff)), label_agreement=float(np.mean(diff <= 1e-3)))
    return Parity(
        max_abs_diff=float(np.max(np.abs(native - onnx_out))),
        label_agreement=float(np.mean(native.argmax(axis=1) == onnx_out.argmax(axis=1))),
    )


def check_parity(result: Parity, max_abs_diff: float, min_label_agreement: float) -> None:
    """Raise ParityError when the export drifted from the native model."""
    problems = []
    if result.max_abs_diff > max_abs_diff:
        problems.append(f"max abs diff {result.max_abs_diff:.3g} > export.parity.maxAbsDiff {max_abs_diff:g}")
    if result.label_agreement < min_label_agreement:
        problems.append(
            f"label agreement {result.label_agreement:.4f} < export.parity.minLabelAgreement {min_label_agreement:g}"
        )
    if problems:
        raise ParityError("ONNX export is not faithful: " + "; ".join(problems))
