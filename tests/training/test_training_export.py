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
