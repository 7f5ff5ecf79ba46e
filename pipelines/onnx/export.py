"""Export a native model to one ONNX file and check it against the native model.

The ONNX file is the contract with devices: scikit-learn pipelines take one input per
feature column (`[N, 1]`, float or string), torch networks one float input `input` of shape
`[N, features]`; both output class probabilities. Contract details (features, classes, the
missing-category marker) are written into the file's metadata.
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


def _export_sklearn(model, sample: pd.DataFrame, path: Path, opset: int) -> None:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType

    inputs = [
        (column, StringTensorType([None, 1]) if sample[column].dtype == object else FloatTensorType([None, 1]))
        for column in sample.columns
    ]
    classifier = model.steps[-1][1]
    onx = convert_sklearn(
        model, initial_types=inputs, target_opset={"": opset, "ai.onnx.ml": 3},
        options={id(classifier): {"zipmap": False}},
    )
    path.write_bytes(onx.SerializeToString())


def _export_torch(model, sample: pd.DataFrame, path: Path, opset: int) -> None:
    import torch

    example = torch.tensor(sample.to_numpy(np.float32)[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(path), input_names=["input"], output_names=["probabilities"],
            opset_version=opset, dynamo=True, external_data=False,
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}}, verbose=False,
        )


def export_onnx(framework: str, model, sample: pd.DataFrame, path: Path, opset: int,
                metadata: dict[str, str]) -> Path:
    """Write `path` as one self-contained ONNX file with the contract in its metadata."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    (_export_sklearn if framework == "sklearn" else _export_torch)(model, sample, path, opset)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    del proto.metadata_props[:]
    contract = {"edge.features": json.dumps(list(sample.columns)),
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
    """Inputs for a session from prepared features (see `pipelines.data.prepare_features`)."""
    names = [i.name for i in sess.get_inputs()]
    if names == ["input"]:
        return {"input": features.to_numpy(np.float32)}
    out = {}
    for item in sess.get_inputs():
        column = features[item.name]
        if item.type == "tensor(string)":
            out[item.name] = column.to_numpy(dtype=object).reshape(-1, 1)
        else:
            out[item.name] = column.to_numpy(np.float32).reshape(-1, 1)
    return out


def predict_proba(path: Path, features: pd.DataFrame, sess=None) -> np.ndarray:
    """Class probabilities from an ONNX file, shape [rows, classes]."""
    sess = sess or session(path)
    outputs = sess.run(None, feeds(sess, features))
    names = [o.name for o in sess.get_outputs()]
    proba = outputs[names.index("probabilities")]
    return np.asarray(proba, dtype=np.float64)


def parity(native_proba: np.ndarray, onnx_proba: np.ndarray) -> Parity:
    return Parity(
        max_abs_diff=float(np.max(np.abs(native_proba - onnx_proba))),
        label_agreement=float(np.mean(native_proba.argmax(axis=1) == onnx_proba.argmax(axis=1))),
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
