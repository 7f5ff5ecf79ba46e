"""A regression file's bin edges are bounded before a device sizes its telemetry by them."""

import json

import onnx
import pytest
from onnx import TensorProto, helper

from pipelines.onnx.export import MAX_BINS, answer_contract, session


def _regression_file(path, bins_text: str):
    node = helper.make_node("Identity", ["input"], ["prediction"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 1])],
                              [helper.make_tensor_value_info("prediction", TensorProto.FLOAT, [None, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model.metadata_props.add(key="edge.prediction_bins", value=bins_text)
    onnx.save(model, str(path))
    return session(path)


@pytest.mark.parametrize("text", [json.dumps(list(range(MAX_BINS + 1))), '[1, "NaN"]', "[3, 1]", '{"a": 1}',
                                  "[" + "1," * 5000 + "1]", "not json"])
def test_bins_a_device_would_not_count_in_are_refused(tmp_path, text):
    with pytest.raises(ValueError, match="edge.prediction_bins is not a list"):
        answer_contract(_regression_file(tmp_path / "m.onnx", text))


def test_ordered_bins_are_read(tmp_path):
    assert answer_contract(_regression_file(tmp_path / "m.onnx", "[1.5, 2.5]")) == ("prediction", [1.5, 2.5])
