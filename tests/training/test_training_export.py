import numpy as np
import pytest
from conftest import tabular_frame

from pipelines import training
from pipelines.data import prepare_features
from pipelines.data.builtin import load_mnist_5k
from pipelines.onnx import export as onnx_export
from pipelines.specs import TrainingSpec
from pipelines.storage import sha256_file


@pytest.mark.parametrize("estimator", ["logistic_regression", "mlp", "random_forest"])
def test_sklearn_train_export_parity(tmp_path, estimator):
    frame = tabular_frame()
    features = prepare_features(frame, ["x1", "x2", "colour"])
    spec = TrainingSpec(framework="sklearn", estimator=estimator, seed=3,
                        params={"max_iter": 300} if estimator != "random_forest" else {"n_estimators": 10})
    fitted = training.fit(spec, features, frame["label"].to_numpy(), 2)
    native = training.predict_proba(fitted.model, features)
    assert training.classification_metrics(native, frame["label"].to_numpy())["accuracy"] > 0.8
    path = onnx_export.export_onnx("sklearn", fitted.model, features, tmp_path / "m.onnx", 17, {"edge.model": "t"})
    result = onnx_export.parity(native, onnx_export.predict_proba(path, features))
    np.testing.assert_allclose(result.max_abs_diff, 0, atol=1e-5)
    assert result.label_agreement == 1.0
    import onnx

    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["edge.model"] == "t" and '"colour"' in meta["edge.features"]
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def test_torch_cnn_is_reproducible_and_exports_faithfully(tmp_path):
    digits = load_mnist_5k().sample(600, random_state=0)
    columns = [c for c in digits.columns if c.startswith("pixel_")]
    features = prepare_features(digits, columns)
    y = digits["label"].to_numpy()
    spec = TrainingSpec(framework="torch", architecture="cnn", seed=5,
                        params={"conv_channels": [4, 8], "hidden": 16, "epochs": 2, "image_shape": [1, 28, 28]})
    first = training.fit(spec, features, y, 10)
    second = training.fit(spec, features, y, 10)
    np.testing.assert_array_equal(training.predict_proba(first.model, features),
                                  training.predict_proba(second.model, features))
    path = onnx_export.export_onnx("torch", first.model, features, tmp_path / "cnn.onnx", 18, {})
    again = onnx_export.export_onnx("torch", second.model, features, tmp_path / "cnn2.onnx", 18, {})
    assert sha256_file(path) == sha256_file(again)
    result = onnx_export.parity(training.predict_proba(first.model, features),
                                onnx_export.predict_proba(path, features))
    assert result.max_abs_diff < 1e-4 and result.label_agreement == 1.0
    saved = training.save(first, tmp_path / "model.pt")
    reloaded = training.load("torch", saved)
    np.testing.assert_array_equal(training.predict_proba(reloaded, features),
                                  training.predict_proba(first.model, features))


def test_image_shape_must_match_the_features():
    frame = tabular_frame()
    spec = TrainingSpec(framework="torch", architecture="cnn", params={"image_shape": [1, 28, 28]})
    with pytest.raises(ValueError, match="image_shape: \\[1, 28, 28\\] holds 784 values, the data has 2"):
        training.fit(spec, prepare_features(frame, ["x1", "x2"]), frame["label"].to_numpy(), 2)


def test_parity_check_fails_loudly():
    result = onnx_export.Parity(max_abs_diff=0.2, label_agreement=0.9)
    with pytest.raises(onnx_export.ParityError, match="max abs diff 0.2 > export.parity.maxAbsDiff 0.0001"):
        onnx_export.check_parity(result, 1e-4, 0.999)


def _credit_frame(rows: int = 1000, seed: int = 3):
    """Wide-ranged numbers (incomes, debts): where float32 rounding meets tree thresholds."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"income": rng.lognormal(10, 1, rows), "age": rng.integers(18, 80, rows).astype(float),
                          "debt": rng.normal(5000, 3000, rows), "colour": rng.choice(["a", "b", "c"], rows)})
    frame["label"] = ((frame.income / 1e4 - frame.debt / 5e3 + rng.normal(0, 1, rows)) > 0).astype(int)
    return frame


@pytest.mark.parametrize("estimator", sorted(training.TREE_ESTIMATORS))
def test_trees_are_faithful_at_the_default_tolerance(tmp_path, estimator):
    from pipelines.specs import ParityTolerance

    frame = _credit_frame()
    features = prepare_features(frame, ["income", "age", "debt", "colour"])
    spec = TrainingSpec(framework="sklearn", estimator=estimator, seed=1)
    fitted = training.fit(spec, features, frame["label"].to_numpy(), 2)
    path = onnx_export.export_onnx("sklearn", fitted.model, features, tmp_path / "m.onnx", 17, {"edge.model": "t"})
    result = onnx_export.parity(training.predict_proba(fitted.model, features),
                                onnx_export.predict_proba(path, features))
    default = ParityTolerance()
    assert result.max_abs_diff <= default.max_abs_diff and result.label_agreement >= default.min_label_agreement


def test_a_scaled_random_forest_is_not_faithful(tmp_path):
    """Why trees are not scaled: the float64 scaler's outputs and ONNX's float32 ones fall on
    either side of some thresholds."""
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    frame = _credit_frame()
    features = prepare_features(frame, ["income", "age", "debt", "colour"])
    model = Pipeline([("prepare", ColumnTransformer([("num", StandardScaler(), ["income", "age", "debt"]),
                                                     ("cat", OneHotEncoder(handle_unknown="ignore"), ["colour"])])),
                      ("classifier", RandomForestClassifier(random_state=1))]).fit(features, frame["label"])
    path = onnx_export.export_onnx("sklearn", model, features, tmp_path / "m.onnx", 17, {"edge.model": "t"})
    result = onnx_export.parity(model.predict_proba(features), onnx_export.predict_proba(path, features))
    assert result.max_abs_diff > 1e-3


def test_lightgbm_thresholds_snapped_to_float32_decide_alike_and_export_faithfully(tmp_path):
    """LightGBM keeps double thresholds; rounded to ONNX's float32 one can land on a data value.
    The exported copy's thresholds are floored to float32: same answers, faithful export."""
    import numpy as np

    from pipelines import training
    from pipelines.data import prepare_features, split
    from pipelines.data.builtin import load_sklearn_diabetes
    from pipelines.onnx import export as onnx_export
    from pipelines.specs import TrainingSpec

    frame = load_sklearn_diabetes()
    train, test = split(frame, "progression", 0.25, 11, stratified=False)
    features = [c for c in frame.columns if c != "progression"]
    x_train, x_test = prepare_features(train, features), prepare_features(test, features)
    spec = TrainingSpec(framework="sklearn", estimator="lightgbm", seed=11,
                        params={"n_estimators": 60, "max_depth": 2, "learning_rate": 0.05})
    model = training.fit(spec, x_train, train["progression"].to_numpy(), 0, "regression").model
    native = training.predict(model, x_test, "regression")
    snapped = onnx_export._lightgbm_safe(model)
    assert snapped is not model and np.array_equal(training.predict(snapped, x_test, "regression"), native)
    path = onnx_export.export_onnx("sklearn", model, x_test, tmp_path / "model.onnx", 17, {}, "regression")
    result = onnx_export.parity(native, onnx_export.predict(path, x_test))
    assert result.max_abs_diff < 1e-6 and result.label_agreement == 1.0


def test_an_entrypoint_is_found_in_the_spec_folder_first_then_among_installed_packages(tmp_path):
    import json
    from pathlib import Path

    import pytest

    from pipelines.training.entrypoint import TrainingCodeError, code_files

    files, root = code_files("json.decoder:JSONDecoder", tmp_path)  # an installed package: all its files
    assert root == Path(json.__file__).parent.parent
    assert any(p.name == "decoder.py" for p in files) and all(p.suffix == ".py" for p in files)
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "__init__.py").write_text("def fit(*a):\n    pass\n")
    files, root = code_files("json:fit", tmp_path)  # the spec's folder wins over the installed one
    assert (files, root) == ([tmp_path / "json" / "__init__.py"], tmp_path)
    with pytest.raises(TrainingCodeError, match="module 'no_such_module_here' is neither in"):
        code_files("no_such_module_here:fit", tmp_path)
