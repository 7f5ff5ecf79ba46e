"""Trainers: scikit-learn pipelines and small PyTorch networks, seeded and reproducible.

Both take the prepared feature frame (`pipelines.data.prepare_features`) and class indices,
and give a native model with `predict_proba`. Torch models carry their preprocessing (pixel
scaling, reshaping to the image) inside the network, so the exported ONNX takes raw features.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.data import is_categorical
from pipelines.specs import TrainingSpec


@dataclass
class Fitted:
    model: object
    framework: str
    seconds: float


def _sklearn_estimator(training: TrainingSpec):
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    params = dict(training.params)
    if "hidden_layer_sizes" in params:
        params["hidden_layer_sizes"] = tuple(params["hidden_layer_sizes"])
    classes = {
        "logistic_regression": LogisticRegression,
        "mlp": MLPClassifier,
        "random_forest": RandomForestClassifier,
        "gradient_boosting": GradientBoostingClassifier,
    }
    try:
        return classes[training.estimator](random_state=training.seed, **params)
    except TypeError as error:
        raise ValueError(f"training.params: {error}") from None


# Tree ensembles: scale-invariant, and they split on float32 values, as ONNX's TreeEnsemble does.
TREE_ESTIMATORS = frozenset({"random_forest", "gradient_boosting"})


def build_sklearn(training: TrainingSpec, features: pd.DataFrame):
    """Scale numbers, one-hot encode categories, then the spec's estimator.

    Trees get the numbers unscaled and cast to float32 (skl2onnx's `CastTransformer`): they are
    trained on exactly the values the exported model receives, so a split threshold never falls
    between a float64 value and its float32 rounding (with a float64 scaler in front, a random
    forest's ONNX export differed by up to 0.03 in probability; unscaled and cast, by 7e-7)."""
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    tree = training.estimator in TREE_ESTIMATORS
    categorical = [c for c in features.columns if is_categorical(features[c])]
    numeric = [c for c in features.columns if c not in categorical]
    transformers = []
    if numeric:
        transformers.append(("num", "passthrough" if tree else StandardScaler(), numeric))
    if categorical:
        transformers.append(("cat", OneHotEncoder(handle_unknown="ignore"), categorical))
    steps = [("prepare", ColumnTransformer(transformers))]
    if tree:
        from skl2onnx.sklapi import CastTransformer

        steps.append(("float32", CastTransformer(dtype=np.float32)))
    return Pipeline([*steps, ("classifier", _sklearn_estimator(training))])


def _torch_module(training: TrainingSpec, n_features: int, n_classes: int):
    import numpy as np

    from pipelines.training.nets import EdgeNet

    params = training.params
    if training.architecture == "cnn":
        shape = list(params.get("image_shape") or [1, 28, 28])
        if len(shape) != 3 or int(np.prod(shape)) != n_features:
            raise ValueError(
                f"training.params.image_shape: {shape} holds {int(np.prod(shape))} values, "
                f"the data has {n_features} features"
            )
        return EdgeNet(n_features, n_classes, image_shape=shape,
                       conv_channels=list(params.get("conv_channels") or [8, 16]),
                       hidden=int(params.get("hidden", 64)), input_scale=float(params.get("input_scale", 255.0)))
    return EdgeNet(n_features, n_classes, hidden_layers=list(params.get("hidden_layers") or [128]),
                   input_scale=float(params.get("input_scale", 1.0)))


def _fit_torch(training: TrainingSpec, features: pd.DataFrame, y: np.ndarray, n_classes: int):
    import torch

    params = training.params
    torch.manual_seed(training.seed)
    generator = torch.Generator().manual_seed(training.seed)
    threads = torch.get_num_threads()
    # One thread: floating-point sums then happen in one order, so a retrain gives the same bits.
    torch.set_num_threads(1)
    try:
        model = _torch_module(training, features.shape[1], n_classes)
        x = torch.tensor(features.to_numpy(np.float32))
        target = torch.tensor(y, dtype=torch.long)
        optimizer = torch.optim.Adam(model.parameters(), lr=float(params.get("learning_rate", 1e-3)))
        batch = int(params.get("batch_size", 64))
        model.train()
        for _ in range(int(params.get("epochs", 5))):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), batch):
                idx = order[start:start + batch]
                optimizer.zero_grad()
                probs = model(x[idx])
                loss = torch.nn.functional.nll_loss(torch.log(probs + 1e-9), target[idx])
                loss.backward()
                optimizer.step()
        model.eval()
    finally:
        torch.set_num_threads(threads)
    return model


def fit(training: TrainingSpec, features: pd.DataFrame, y: np.ndarray, n_classes: int) -> Fitted:
    """Train the spec's model on prepared features and class indices 0..n_classes-1."""
    import warnings

    start = time.perf_counter()
    if training.framework == "sklearn":
        from sklearn.exceptions import ConvergenceWarning

        model = build_sklearn(training, features)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(features, y)
    else:
        model = _fit_torch(training, features, y, n_classes)
    return Fitted(model, training.framework, time.perf_counter() - start)


def predict_proba(model: object, features: pd.DataFrame) -> np.ndarray:
    """Class probabilities of a native model, shape [rows, classes]."""
    if hasattr(model, "predict_proba"):
        return np.asarray(model.predict_proba(features), dtype=np.float64)
    import torch

    with torch.no_grad():
        return model(torch.tensor(features.to_numpy(np.float32))).numpy().astype(np.float64)


def save(fitted: Fitted, path: Path) -> Path:
    """Write the native model (joblib for scikit-learn, a whole-module file for torch)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fitted.framework == "sklearn":
        import joblib

        joblib.dump(fitted.model, path)
    else:
        import torch

        torch.save({"config": fitted.model.config, "state_dict": fitted.model.state_dict()}, path)
    return path


def load(framework: str, path: Path) -> object:
    if framework == "sklearn":
        import joblib

        return joblib.load(path)
    import torch

    from pipelines.training.nets import EdgeNet

    saved = torch.load(path, weights_only=True)
    model = EdgeNet(**saved["config"])
    model.load_state_dict(saved["state_dict"])
    return model.eval()


def classification_metrics(proba: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Accuracy and macro F1; ROC AUC for two classes, one-vs-rest otherwise."""
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    predicted = proba.argmax(axis=1)
    metrics = {
        "accuracy": float(accuracy_score(y, predicted)),
        "f1_macro": float(f1_score(y, predicted, average="macro")),
    }
    if proba.shape[1] == 2:
        metrics["roc_auc"] = float(roc_auc_score(y, proba[:, 1]))
    elif len(np.unique(y)) == proba.shape[1]:
        metrics["roc_auc"] = float(roc_auc_score(y, proba, multi_class="ovr"))
    return metrics
