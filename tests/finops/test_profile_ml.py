"""Graph profiles of ai.onnx.ml models: scikit-learn pipelines and tree ensembles converted by
skl2onnx, profiled with and without a one-row feed, against counts taken from the sklearn models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipelines.finops.profile import profile_graph
from pipelines.onnx import export

TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}  # as pipelines.onnx.export converts
N_FEATURES = 4
N_TREES = 10


def _predict(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)


# --------------------------------------------------------------------- scaler, one-hot and MLP


def _frame(rows: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "amount": rng.normal(size=rows).astype(np.float32),
        "age": rng.integers(18, 90, size=rows).astype(np.float32),
        "city": rng.choice(["oslo", "lima", "pune", "kyiv"], size=rows).astype(object),
        "plan": rng.choice(["basic", "pro", "team"], size=rows).astype(object),
    })


def _mlp_pipeline(tmp_path: Path, classes: int):
    """Pipeline(ColumnTransformer(StandardScaler, OneHotEncoder), MLPClassifier((32,))) in ONNX."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType
    from sklearn.compose import ColumnTransformer
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    frame = _frame(300)
    y = ((frame["amount"] > 0).astype(int) + (frame["city"] == "oslo")) % classes
    clf = MLPClassifier(hidden_layer_sizes=(32,), max_iter=50, random_state=0)
    pipe = Pipeline([
        ("prepare", ColumnTransformer([("num", StandardScaler(), ["amount", "age"]),
                                       ("cat", OneHotEncoder(handle_unknown="ignore"), ["city", "plan"])])),
        ("classifier", clf),
    ]).fit(frame, y)
    onx = convert_sklearn(
        pipe, initial_types=[("amount", FloatTensorType([None, 1])), ("age", FloatTensorType([None, 1])),
                             ("city", StringTensorType([None, 1])), ("plan", StringTensorType([None, 1]))],
        options={id(clf): {"zipmap": False}}, target_opset=TARGET_OPSET,
    )
    path = tmp_path / f"mlp{classes}.onnx"
    path.write_bytes(onx.SerializeToString())
    return pipe, path, frame


@pytest.mark.parametrize("classes", [2, 3])
def test_mlp_behind_scaler_and_one_hot_counts_exactly_with_a_feed(tmp_path: Path, classes: int) -> None:
    pipe, path, frame = _mlp_pipeline(tmp_path, classes)
    mlp, encoder = pipe.named_steps["classifier"], pipe.named_steps["prepare"].named_transformers_["cat"]
    one_hot = sum(len(c) for c in encoder.categories_)
    # Inputs after one-hot x 32, then 32 x (1 for two classes, else one per class).
    assert [w.shape for w in mlp.coefs_] == [(2 + one_hot, 32), (32, 1 if classes == 2 else classes)]
    expected_macs = sum(w.shape[0] * w.shape[1] for w in mlp.coefs_)

    feed = export.feeds(export.session(path), frame.iloc[:1])
    p = profile_graph(path, feed)
    assert p.macs == expected_macs
    assert p.unknown_ops == []
    outputs = sum(b.size for b in mlp.intercepts_)
    # 2 per MAC, a bias add per layer output, Relu on the hidden layer, Scaler (2 per number),
    # one per one-hot output; the output activation and the label come on top.
    assert p.flops >= 2 * expected_macs + outputs + 32 + 2 * 2 + one_hot
    assert p.parameters >= sum(w.size for w in mlp.coefs_) + outputs
    assert p.peak_activation_bytes >= (2 + one_hot + 32) * 4
    assert p.notes == [] and p.tree_nodes_visited == 0

    # Without a feed, inference stops at the Scaler: the MatMuls behind it go uncounted.
    bound = profile_graph(path)
    assert bound.macs < p.macs and bound.flops < p.flops
    assert "MatMul" in bound.unknown_ops
    assert bound.parameters == p.parameters and bound.weight_bytes == p.weight_bytes


def test_feed_must_be_one_row(tmp_path: Path) -> None:
    _, path, frame = _mlp_pipeline(tmp_path, 2)
    with pytest.raises(ValueError, match="one row"):
        profile_graph(path, export.feeds(export.session(path), frame.iloc[:3]))


# ------------------------------------------------------------------------------ tree ensembles


def _tree_data(rows: int = 240, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, N_FEATURES)).astype(np.float32)
    return x, x[:, 0] + 0.5 * x[:, 1] * x[:, 2] - x[:, 3] ** 2


def _convert(model, tmp_path: Path, name: str) -> Path:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    options = {id(model): {"zipmap": False}} if hasattr(model, "classes_") else None
    onx = convert_sklearn(model, initial_types=[("x", FloatTensorType([None, N_FEATURES]))],
                          options=options, target_opset=TARGET_OPSET)
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(onx.SerializeToString())
    return path


def _trees(model) -> list:
    """The fitted sklearn trees of a forest or a boosted ensemble."""
    return list(np.ravel(model.estimators_))


def _path_nodes(model, row: np.ndarray) -> int:
    """Nodes on the decision paths of `row`, summed over the trees (sklearn's own walk)."""
    return int(sum(tree.decision_path(row).sum() for tree in _trees(model)))


def _mean_leaf_paths(model) -> float:
    """Sum over trees of 1 + the mean depth of their leaves."""
    total = 0.0
    for estimator in _trees(model):
        tree, depths, stack = estimator.tree_, [], [(0, 0)]
        while stack:
            node, depth = stack.pop()
            if tree.children_left[node] == -1:
                depths.append(depth)
            else:
                stack += [(tree.children_left[node], depth + 1), (tree.children_right[node], depth + 1)]
        total += 1 + float(np.mean(depths))
    return total


@pytest.fixture(scope="module")
def tree_models():
    from sklearn.ensemble import GradientBoostingClassifier, GradientBoostingRegressor, RandomForestClassifier

    x, score = _tree_data()
    label = (score > np.median(score)).astype(int)
    return x, {
        "random_forest": RandomForestClassifier(n_estimators=N_TREES, max_depth=4, random_state=0).fit(x, label),
        "gradient_boosting": GradientBoostingClassifier(n_estimators=N_TREES, max_depth=4, random_state=0).fit(x, label),
        "gradient_boosting_regressor": GradientBoostingRegressor(n_estimators=N_TREES, max_depth=4,
                                                                 random_state=0).fit(x, score),
    }


@pytest.mark.parametrize("name", ["random_forest", "gradient_boosting", "gradient_boosting_regressor"])
def test_tree_ensemble_visits_the_nodes_of_the_decision_paths(tree_models, tmp_path: Path, name: str) -> None:
    _, models = tree_models
    model = models[name]
    path = _convert(model, tmp_path, name)
    op = "TreeEnsembleRegressor" if name.endswith("regressor") else "TreeEnsembleClassifier"
    assert [n.op_type for n in onnx.load(str(path)).graph.node if n.domain == "ai.onnx.ml"] == [op]
    assert len(_trees(model)) == N_TREES

    rows, _ = _tree_data(rows=6, seed=7)  # rows the trees were not fitted on
    for row in rows:
        row = row[None, :]
        onnx_out = _predict(path, {"x": row})
        if op == "TreeEnsembleClassifier":
            assert int(onnx_out[0][0]) == int(model.predict(row)[0])  # the same model, the same path
        else:
            assert onnx_out[0][0, 0] == pytest.approx(model.predict(row)[0], abs=1e-4)
        p = profile_graph(path, {"x": row})
        visited = _path_nodes(model, row)
        assert p.tree_nodes_visited == visited
        assert p.unknown_ops == [] and p.notes == []
        comparisons = visited - N_TREES  # every visited node but the leaf is a branch
        if op == "TreeEnsembleRegressor":
            # One comparison per branch, one add per leaf weight (one target), one base value.
            assert p.flops == comparisons + N_TREES + 1
        else:
            assert p.flops >= comparisons + N_TREES


@pytest.mark.parametrize("name", ["random_forest", "gradient_boosting_regressor"])
def test_tree_ensemble_without_a_feed_takes_the_mean_leaf_depth(tree_models, tmp_path: Path, name: str) -> None:
    _, models = tree_models
    path = _convert(models[name], tmp_path, name)
    p = profile_graph(path)
    assert p.tree_nodes_visited == round(_mean_leaf_paths(models[name]))
    assert p.unknown_ops == []
    assert len(p.notes) == 1 and "mean leaf depth" in p.notes[0]


# ---------------------------------------------------------- node modes and missing-value tracks


def _tree_model(path: Path, node: onnx.NodeProto, ml_opset: int) -> Path:
    graph = helper.make_graph([node], path.stem, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("ai.onnx.ml", ml_opset)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_tree_node_modes_and_missing_values(tmp_path: Path) -> None:
    """Tree 0: x0 <= 0.5 ? (x1 != 2 ? leaf 20 : leaf 10) : leaf 30, a NaN in x0 going false and
    one in x1 true. Tree 1 is a single leaf of weight 1. Each row: its prediction (which shows
    the leaves the runtime reached) and the nodes on its paths."""
    node = helper.make_node(
        "TreeEnsembleRegressor", ["x"], ["y"], domain="ai.onnx.ml", n_targets=1, aggregate_function="SUM",
        nodes_treeids=[0, 0, 0, 0, 0, 1], nodes_nodeids=[0, 1, 2, 3, 4, 0],
        nodes_featureids=[0, 1, 0, 0, 0, 0], nodes_values=[0.5, 2.0, 0.0, 0.0, 0.0, 0.0],
        nodes_modes=["BRANCH_LEQ", "BRANCH_NEQ", "LEAF", "LEAF", "LEAF", "LEAF"],
        nodes_truenodeids=[1, 2, 0, 0, 0, 0], nodes_falsenodeids=[4, 3, 0, 0, 0, 0],
        nodes_missing_value_tracks_true=[0, 1, 0, 0, 0, 0],
        target_treeids=[0, 0, 0, 1], target_nodeids=[2, 3, 4, 0], target_ids=[0, 0, 0, 0],
        target_weights=[20.0, 10.0, 30.0, 1.0],
    )
    path = _tree_model(tmp_path / "modes.onnx", node, 3)
    rows = [([0.0, 5.0], 21.0, 4), ([0.0, 2.0], 11.0, 4), ([np.nan, 2.0], 31.0, 3), ([0.0, np.nan], 21.0, 4)]
    for row, prediction, visited in rows:
        feed = {"x": np.array([row], np.float32)}
        assert _predict(path, feed)[0][0, 0] == prediction
        p = profile_graph(path, feed)
        assert p.tree_nodes_visited == visited
        assert p.flops == (visited - 2) + 2  # comparisons, then one add per tree's leaf weight


def test_opset5_tree_ensemble_with_set_membership(tmp_path: Path) -> None:
    """Tree 0: x0 <= 0.5 (NaN goes true) ? (x1 in {1, 2} ? leaf 10 : leaf 20) : leaf 30.
    Tree 1 is a single leaf of weight 1 (a root whose both branches are the same leaf)."""
    node = helper.make_node(
        "TreeEnsemble", ["x"], ["y"], domain="ai.onnx.ml", n_targets=1, aggregate_function=1, post_transform=0,
        nodes_splits=numpy_helper.from_array(np.array([0.5, 0.0, 0.0], np.float32)),
        nodes_featureids=[0, 1, 0], nodes_modes=numpy_helper.from_array(np.array([0, 6, 0], np.uint8)),
        nodes_truenodeids=[1, 0, 3], nodes_trueleafs=[0, 1, 1],
        nodes_falsenodeids=[2, 1, 3], nodes_falseleafs=[1, 1, 1],
        nodes_missing_value_tracks_true=[1, 0, 0],
        membership_values=numpy_helper.from_array(np.array([1.0, 2.0, np.nan], np.float32)),
        leaf_targetids=[0, 0, 0, 0], leaf_weights=numpy_helper.from_array(np.array([10, 20, 30, 1], np.float32)),
        tree_roots=[0, 2],
    )
    path = _tree_model(tmp_path / "opset5.onnx", node, 5)
    rows = [([0.0, 2.0], 11.0, 4), ([0.0, 5.0], 21.0, 4), ([1.0, 1.0], 31.0, 3), ([np.nan, 1.0], 11.0, 4)]
    for row, prediction, visited in rows:
        feed = {"x": np.array([row], np.float32)}
        assert _predict(path, feed)[0][0, 0] == prediction
        p = profile_graph(path, feed)
        assert p.tree_nodes_visited == visited
        assert p.flops == (visited - 2) + 2
        assert p.unknown_ops == []
    # Leaves of tree 0 at depths 2, 2 and 1, tree 1 a lone leaf: 1 + 5/3 + 1 nodes on average.
    assert profile_graph(path).tree_nodes_visited == round(1 + 5 / 3 + 1)
