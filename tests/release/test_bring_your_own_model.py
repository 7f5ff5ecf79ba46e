"""Bring your own model: a spec's own training code, an imported ONNX file or MLflow model,
XGBoost and LightGBM, and regression, each released end to end through the CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from conftest import ROOT, tabular_frame, write_spec

from pipelines.__main__ import main
from pipelines.gitops import manifest
from pipelines.settings import Settings
from pipelines.storage import sha256_file

TRAIN_PY = '''
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder


def fit(features, target, params, seed):
    categorical = [c for c in features.columns if features[c].dtype == object]
    numeric = [c for c in features.columns if c not in categorical]
    prepare = ColumnTransformer([("n", "passthrough", numeric),
                                 ("c", OneHotEncoder(handle_unknown="ignore", sparse_output=False), categorical)])
    model = GradientBoostingClassifier(n_estimators=int(params["rounds"]), random_state=seed)
    return Pipeline([("prepare", prepare), ("model", model)]).fit(features, target)
'''


def _release_json(spec, capsys) -> dict:
    assert main(["release", str(spec), "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _deployed(model: str) -> dict:
    text = subprocess.run(["git", "--git-dir", str(Settings().remote), "show",
                           f"main:apps/{model}/base/mobileaimodeldeployment.yaml"],
                          capture_output=True, text=True, check=True).stdout
    return manifest.read_manifest(text)


def _own_code_spec(folder, name="own-code"):
    tabular_frame().to_csv(folder / "data.csv", index=False)
    (folder / "trainer.py").write_text(TRAIN_PY)
    return write_spec(folder, name, "data.csv", training={"entrypoint": "trainer:fit", "params": {"rounds": 30},
                                                          "seed": 3},
                      export={"opset": 17, "quantization": [], "accuracyBudget": 0.02})


def test_own_training_code_is_released_and_its_files_are_the_release(tmp_path, state, capsys):
    spec = _own_code_spec(tmp_path)
    first = _release_json(spec, capsys)
    assert first["status"] == "released" and first["task"] == "binary (inferred from the target)"
    assert first["metrics"]["accuracy"] > 0.8
    assert _deployed("own-code")["spec"]["modelRef"]["checksum"] == f"sha256:{first['artifact_sha256']}"

    # The same spec and data with the training code edited: a new release, not the stored one.
    (tmp_path / "trainer.py").write_text(TRAIN_PY.replace('int(params["rounds"])', 'int(params["rounds"]) + 20'))
    second = _release_json(spec, capsys)
    assert second["release_key"] != first["release_key"]
    assert second["artifact_sha256"] != first["artifact_sha256"]
    # The code as it was: the first release again, nothing trained.
    (tmp_path / "trainer.py").write_text(TRAIN_PY)
    third = _release_json(spec, capsys)
    assert third["release_key"] == first["release_key"] and third["model_version"] == first["model_version"]


def test_an_error_in_own_code_is_one_line_naming_the_file_and_line(tmp_path, state, capsys):
    spec = _own_code_spec(tmp_path, "broken-code")
    (tmp_path / "trainer.py").write_text(TRAIN_PY.replace("    categorical =", "    1 / 0\n    categorical ="))
    assert main(["release", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    line = next(i for i, text in enumerate((tmp_path / "trainer.py").read_text().splitlines(), 1) if "1 / 0" in text)
    assert f"trainer.py:{line}:" in err and "ZeroDivisionError" in err and "Traceback" not in err

    (tmp_path / "trainer.py").write_text("def fit(features, target, params, seed):\n    return 'a model'\n")
    assert main(["release", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert "returned str, not a fitted scikit-learn-compatible estimator" in err and len(err.splitlines()) == 1

    spec.write_text(spec.read_text().replace("trainer:fit", "trainer:nowhere"))
    assert main(["release", str(spec)]) == 2
    assert "no function 'nowhere'" in capsys.readouterr().err


def _onnx_classifier(path, frame):
    """A model trained elsewhere: scikit-learn on two numeric columns, converted by skl2onnx."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression().fit(frame[["x1", "x2"]].to_numpy(np.float32), frame["label"])
    onx = convert_sklearn(model, initial_types=[("features", FloatTensorType([None, 2]))],
                          options={id(model): {"zipmap": False}}, target_opset={"": 17, "ai.onnx.ml": 3})
    path.write_bytes(onx.SerializeToString())
    return model


def test_an_imported_onnx_file_goes_through_every_gate(tmp_path, state, capsys):
    frame = tabular_frame()
    frame.to_csv(tmp_path / "data.csv", index=False)
    native = _onnx_classifier(tmp_path / "bought.onnx", frame)
    digest = sha256_file(tmp_path / "bought.onnx")
    data = {"source": "data.csv", "target": "label", "features": ["x1", "x2"], "sensitiveFeatures": ["group"],
            "validation": {"minRows": 50}}
    spec = write_spec(tmp_path, "bought-model", "data.csv", data=data, training={"seed": 1},
                      model={"source": "bought.onnx", "checksum": f"sha256:{digest}"})
    spec.write_text(spec.read_text())  # the spec names no training framework: nothing is trained
    summary = _release_json(spec, capsys)
    assert summary["status"] == "released"
    assert summary["model_source"]["sha256"] == digest and summary["model_source"]["kind"] == "onnx"
    assert [v["gate"] for v in summary["verdicts"]][:4] == ["quality", "fairness", "quantization_parity", "drift"]
    # The shipped file answers as the bought model does (same probabilities), under the contract.
    from pipelines.data import prepare_features
    from pipelines.onnx import export as onnx_export

    shipped = onnx_export.predict(summary["artifact_uri"].removeprefix("file://"),
                                  prepare_features(frame, ["x1", "x2"]))
    assert np.abs(shipped - native.predict_proba(frame[["x1", "x2"]].to_numpy(np.float32))).max() < 1e-5

    # A checksum that does not match: one line naming the field, exit 2.
    spec.write_text(spec.read_text().replace(digest, "0" * 64))
    assert main(["release", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.checksum" in err and digest in err and len(err.splitlines()) == 1


def test_a_registered_mlflow_model_is_released_under_another_name(tmp_path, state, capsys):
    tabular_frame().to_csv(tmp_path / "data.csv", index=False)
    first = _release_json(write_spec(tmp_path, "origin-model", "data.csv"), capsys)
    spec = write_spec(tmp_path, "adopted-model", "data.csv", training={"seed": 1},
                      model={"source": "models:/origin-model@candidate"})
    adopted = _release_json(spec, capsys)
    assert adopted["status"] == "released"
    assert adopted["model_source"]["resolved"] == f"models:/origin-model/{first['model_version']}"
    assert adopted["model_source"]["kind"] == "mlflow-onnx"
    # The same bytes under the other name, with its own manifest and card.
    assert _deployed("adopted-model")["spec"]["modelRef"]["checksum"].startswith("sha256:")


@pytest.mark.parametrize("estimator", ["xgboost", "lightgbm"])
def test_gradient_boosted_trees_are_faithful_and_released(tmp_path, state, capsys, estimator):
    tabular_frame().to_csv(tmp_path / "data.csv", index=False)
    spec = write_spec(tmp_path, f"{estimator}-model", "data.csv",
                      training={"framework": "sklearn", "estimator": estimator,
                                "params": {"n_estimators": 40, "max_depth": 3}, "seed": 5})
    summary = _release_json(spec, capsys)
    assert summary["status"] == "released", summary["reasons"]
    assert summary["metrics"]["accuracy"] > 0.85


def test_the_regression_demo_is_released_end_to_end(state, capsys):
    summary = _release_json(ROOT / "model_specs" / "diabetes-progression.yaml", capsys)
    assert summary["status"] == "released" and summary["task"] == "regression"
    assert set(summary["metrics"]) == {"mae", "rmse", "r2"}
    assert summary["quantization"]["metric"] == "r2"
    fairness = next(v for v in summary["verdicts"] if v["gate"] == "fairness")
    assert fairness["observed"]["mae_difference"] is not None and fairness["thresholds"]["max_error_gap"] == 12
    quality = next(v for v in summary["verdicts"] if v["gate"] == "quality")
    assert quality["thresholds"]["mae.direction"] == "lower" and quality["observed"]["mae.candidate"] < 55

    # Devices count a regression's answers in the bins the file carries, as a classifier's classes.
    import onnxruntime  # noqa: F401

    from pipelines.data.builtin import load_sklearn_diabetes
    from pipelines.onnx import export as onnx_export

    path = summary["artifact_uri"].removeprefix("file://")
    session = onnx_export.session(path)
    name, bins = onnx_export.answer_contract(session)
    assert name == "prediction" and len(bins) == 9 and bins == sorted(bins)
    rows = load_sklearn_diabetes().head(50)
    from pipelines.data import prepare_features

    values = onnx_export.predict(path, prepare_features(rows, [c for c in rows.columns if c != "progression"]))
    labels = onnx_export.answer_labels(values, bins)
    assert labels.min() >= 0 and labels.max() <= len(bins) and len(set(labels)) > 3


def test_the_own_code_demo_spec_is_valid_and_found_in_its_folder():
    from pipelines.specs import discover_specs, load_spec

    found = discover_specs(ROOT / "model_specs")
    assert found["income-xgboost"] == ROOT / "model_specs" / "income-xgboost" / "income-xgboost.yaml"
    assert "fleet" not in found and "inventory" not in found
    spec = load_spec(found["income-xgboost"])
    assert spec.training.entrypoint == "train:train"


def test_a_user_module_of_the_same_name_in_two_spec_folders_is_each_its_own(tmp_path):
    from pipelines.training.entrypoint import load_module

    for name, value in (("a", 1), ("b", 2)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.py").write_text(f"VALUE = {value}\n")
    assert load_module("train:x", tmp_path / "a").VALUE == 1
    assert load_module("train:x", tmp_path / "b").VALUE == 2
    assert str(tmp_path / "a") not in sys.path and str(tmp_path / "b") not in sys.path



def test_the_own_code_demo_is_released_end_to_end(state, capsys):
    summary = _release_json(ROOT / "model_specs" / "income-xgboost" / "income-xgboost.yaml", capsys)
    assert summary["status"] == "released", summary["reasons"]
    assert summary["metrics"]["accuracy"] > 0.85 and summary["task"] == "binary"
    assert _deployed("income-xgboost")["spec"]["modelRef"]["checksum"] == f"sha256:{summary['artifact_sha256']}"


TORCH_PY = '''
import torch
from torch import nn


class Net(nn.Module):
    """Takes rows shaped [1, 2] (the spec's training.inputShape), as an image model would."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2), nn.Softmax(dim=1))

    def forward(self, x):
        assert x.dim() == 3 and x.shape[1:] == (1, 2), x.shape
        return self.body(x)


def fit(features, target, params, seed):
    torch.manual_seed(seed)
    net = Net()
    x = torch.tensor(features.to_numpy("float32")).reshape(-1, 1, 2)
    y = torch.tensor(target, dtype=torch.long)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(int(params["epochs"])):
        optimizer.zero_grad()
        loss = nn.functional.nll_loss(torch.log(net(x) + 1e-9), y)
        loss.backward()
        optimizer.step()
    return net.eval()
'''


def test_a_torch_module_from_own_code_takes_its_input_shape(tmp_path, state, capsys):
    tabular_frame().to_csv(tmp_path / "data.csv", index=False)
    (tmp_path / "net.py").write_text(TORCH_PY)
    data = {"source": "data.csv", "target": "label", "features": ["x1", "x2"], "sensitiveFeatures": ["group"],
            "validation": {"minRows": 50}}
    spec = write_spec(tmp_path, "own-torch", "data.csv", data=data,
                      training={"entrypoint": "net:fit", "inputShape": [1, 2], "params": {"epochs": 60}, "seed": 2})
    summary = _release_json(spec, capsys)
    assert summary["status"] == "released", summary["reasons"]
    assert summary["metrics"]["accuracy"] > 0.75
    # Devices send the flat features: the shipped file takes [N, 2].
    from pipelines.onnx import export as onnx_export

    session = onnx_export.session(summary["artifact_uri"].removeprefix("file://"))
    assert [i.name for i in session.get_inputs()] == ["input"] and session.get_inputs()[0].shape[1] == 2


def test_an_onnx_file_in_s3_is_imported_over_http(tmp_path, state, capsys, s3_endpoint, monkeypatch):
    import boto3

    frame = tabular_frame()
    frame.to_csv(tmp_path / "data.csv", index=False)
    _onnx_classifier(tmp_path / "bought.onnx", frame)
    for name, value in {"AWS_ACCESS_KEY_ID": "AKIATESTVENDOR", "AWS_SECRET_ACCESS_KEY": "vendor-secret",
                        "AWS_DEFAULT_REGION": "us-east-1", "EDGE_S3_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(name, value)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="vendor-models")
    s3.upload_file(str(tmp_path / "bought.onnx"), "vendor-models", "churn/v7/model.onnx")
    data = {"source": "data.csv", "target": "label", "features": ["x1", "x2"], "sensitiveFeatures": ["group"],
            "validation": {"minRows": 50}}
    spec = write_spec(tmp_path, "s3-bought", "data.csv", data=data, training={"seed": 1},
                      model={"source": "s3://vendor-models/churn/v7/model.onnx",
                             "checksum": f"sha256:{sha256_file(tmp_path / 'bought.onnx')}"})
    summary = _release_json(spec, capsys)
    assert summary["status"] == "released"
    assert summary["model_source"]["source"] == "s3://vendor-models/churn/v7/model.onnx"

    # Another object under the same key: the release's identity changes, and the checksum refuses it.
    (tmp_path / "other.onnx").write_bytes((tmp_path / "bought.onnx").read_bytes() + b"\0")
    s3.upload_file(str(tmp_path / "other.onnx"), "vendor-models", "churn/v7/model.onnx")
    assert main(["release", str(spec)]) == 2
    assert "model.checksum: s3://vendor-models/churn/v7/model.onnx has sha256:" in capsys.readouterr().err


def test_an_mlflow_scikit_learn_model_is_exported_and_checked_against_itself(tmp_path, state, capsys):
    import mlflow

    from pipelines.data import prepare_features
    from pipelines.specs import TrainingSpec
    from pipelines.training import build_sklearn

    frame = tabular_frame()
    frame.to_csv(tmp_path / "data.csv", index=False)
    features = prepare_features(frame, ["x1", "x2", "colour"])
    model = build_sklearn(TrainingSpec(framework="sklearn", estimator="logistic_regression"), features)
    model.fit(features, frame["label"])
    mlflow.set_tracking_uri(Settings().tracking_uri)
    # Another team's experiment, its artifacts in a folder of its own (not the working folder).
    experiment = mlflow.create_experiment("another-team", artifact_location=(tmp_path / "elsewhere").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.sklearn.log_model(model, name="model")
    spec = write_spec(tmp_path, "from-a-run", "data.csv", training={"seed": 1},
                      model={"source": f"runs:/{run.info.run_id}/model"})
    summary = _release_json(spec, capsys)
    assert summary["status"] == "released", summary["reasons"]
    assert summary["model_source"]["kind"] == "mlflow-sklearn"
    assert summary["model_source"]["resolved"] == f"runs:/{run.info.run_id}/model"
    # The native model was exported here and its export checked against it (parity recorded).
    from pipelines import registry

    run_data = registry.client(Settings().tracking_uri).get_run(summary["run_id"]).data
    assert run_data.metrics["onnx_max_abs_diff"] < 1e-4 and run_data.params["framework"] == "sklearn"


@pytest.mark.parametrize("estimator", ["xgboost", "lightgbm"])
def test_gradient_boosted_regressors_are_released(tmp_path, state, capsys, estimator):
    doc = yaml.safe_load((ROOT / "model_specs" / "diabetes-progression.yaml").read_text())
    doc["name"] = f"diabetes-{estimator}"
    doc["training"] = {"framework": "sklearn", "estimator": estimator,
                       "params": {"n_estimators": 60, "max_depth": 2, "learning_rate": 0.05}, "seed": 11}
    spec = tmp_path / f"diabetes-{estimator}.yaml"
    spec.write_text(yaml.safe_dump(doc, sort_keys=False))
    summary = _release_json(spec, capsys)
    assert summary["status"] == "released", summary["reasons"]
    assert summary["task"] == "regression" and summary["metrics"]["r2"] > 0.3
