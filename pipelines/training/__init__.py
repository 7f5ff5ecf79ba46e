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


def _estimator_class(name: str, task: str):
    """The scikit-learn (or scikit-learn-compatible) class of a built-in estimator for a task."""
    regression = task == "regression"
    if name in ("xgboost", "lightgbm"):
        if name == "xgboost":
            from xgboost import XGBClassifier as classifier
            from xgboost import XGBRegressor as regressor
        else:
            from lightgbm import LGBMClassifier as classifier
            from lightgbm import LGBMRegressor as regressor
        return regressor if regression else classifier
    from sklearn import ensemble, linear_model, neural_network

    classes = {
        "logistic_regression": (linear_model.LogisticRegression, None),
        "linear_regression": (None, linear_model.LinearRegression),
        "mlp": (neural_network.MLPClassifier, neural_network.MLPRegressor),
        "random_forest": (ensemble.RandomForestClassifier, ensemble.RandomForestRegressor),
        "gradient_boosting": (ensemble.GradientBoostingClassifier, ensemble.GradientBoostingRegressor),
    }[name]
    chosen = classes[1 if regression else 0]
    if chosen is None:
        raise ValueError(f"training.estimator: {name} is not for task {task}")
    return chosen


def _sklearn_estimator(training: TrainingSpec, task: str = "binary"):
    import inspect

    cls = _estimator_class(training.estimator, task)
    params = dict(training.params)
    if "hidden_layer_sizes" in params:
        params["hidden_layer_sizes"] = tuple(params["hidden_layer_sizes"])
    if training.estimator == "lightgbm":
        params = {"verbose": -1, **params}
    if "random_state" in inspect.signature(cls).parameters:
        params = {"random_state": training.seed, **params}
    try:
        return cls(**params)
    except TypeError as error:
        raise ValueError(f"training.params: {error}") from None


# Tree ensembles: scale-invariant, and they split on float32 values, as ONNX's TreeEnsemble does.
TREE_ESTIMATORS = frozenset({"random_forest", "gradient_boosting", "xgboost", "lightgbm"})


def build_sklearn(training: TrainingSpec, features: pd.DataFrame, task: str = "binary"):
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
        # Dense for trees: XGBoost takes an absent entry of a sparse matrix as a missing value, where
        # the exported model sees 0 (a difference of up to 0.98 in probability).
        transformers.append(("cat", OneHotEncoder(handle_unknown="ignore", sparse_output=not tree), categorical))
    steps = [("prepare", ColumnTransformer(transformers))]
    if tree:
        from skl2onnx.sklapi import CastTransformer

        steps.append(("float32", CastTransformer(dtype=np.float32)))
    return Pipeline([*steps, ("classifier", _sklearn_estimator(training, task))])


def torch_module(training: TrainingSpec, n_features: int, n_classes: int):
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
        model = torch_module(training, features.shape[1], n_classes)
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


def fit(training: TrainingSpec, features: pd.DataFrame, y: np.ndarray, n_classes: int,
        task: str = "binary", folder: Path | None = None) -> Fitted:
    """Train the spec's model on prepared features and the target (class indices 0..n_classes-1,
    or values for a regression): a built-in estimator or network, or the spec's entrypoint
    (`pipelines.training.entrypoint`, looked up in `folder`)."""
    import warnings

    start = time.perf_counter()
    if training.entrypoint is not None:
        from pipelines.training import entrypoint

        model, framework = entrypoint.run(training.entrypoint, Path(folder or "."), features, y,
                                          training.params, training.seed, task)
        if framework == "torch" and training.input_shape:
            from pipelines.training.nets import Shaped

            model = Shaped(model, training.input_shape, features.shape[1])
        return Fitted(model, framework, time.perf_counter() - start)
    if training.framework == "sklearn":
        from sklearn.exceptions import ConvergenceWarning

        model = build_sklearn(training, features, task)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            warnings.filterwarnings("ignore", message="X does not have valid feature names")
            model.fit(features, y)
    else:
        model = _fit_torch(training, features, y, n_classes)
    return Fitted(model, training.framework, time.perf_counter() - start)


def predict(model: object, features: pd.DataFrame, task: str = "binary") -> np.ndarray:
    """A native model's outputs: class probabilities [rows, classes], or predictions [rows] for a
    regression."""
    import warnings

    if task != "regression" and hasattr(model, "predict_proba"):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="X does not have valid feature names")
            return np.asarray(model.predict_proba(features), dtype=np.float64)
    if hasattr(model, "predict"):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="X does not have valid feature names")
            return np.asarray(model.predict(features), dtype=np.float64).reshape(len(features))
    import torch

    with torch.no_grad():
        out = model(torch.tensor(features.to_numpy(np.float32))).numpy().astype(np.float64)
    return out.reshape(len(features)) if task == "regression" else out


def predict_proba(model: object, features: pd.DataFrame) -> np.ndarray:
    """Class probabilities of a native model, shape [rows, classes]."""
    return predict(model, features, "binary")


def save(fitted: Fitted, path: Path) -> Path:
    """Write the native model: joblib for scikit-learn; for torch, the built-in network's config
    and weights, or a whole module (pickled) returned by a spec's own training code."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fitted.framework == "sklearn":
        import joblib

        joblib.dump(fitted.model, path)
    else:
        import torch

        config = getattr(fitted.model, "config", None)
        if isinstance(config, dict) and type(fitted.model).__name__ == "EdgeNet":
            torch.save({"config": config, "state_dict": fitted.model.state_dict()}, path)
        else:
            torch.save({"module": fitted.model}, path)
    return path


def load(framework: str, path: Path, training: TrainingSpec | None = None, folder: Path | None = None) -> object:
    """Read a native model `save` wrote. A model from a spec's own training code needs its module
    (imported from `folder`, the spec's), as unpickling it does."""
    if training is not None and training.entrypoint is not None:
        from pipelines.training import entrypoint

        entrypoint.load_module(training.entrypoint, Path(folder or "."))
    if framework == "sklearn":
        import joblib

        return joblib.load(path)
    import torch

    from pipelines.training.nets import EdgeNet

    # A whole module from own training code is a pickle, as a scikit-learn model is (the artifact
    # store is the build side's own); the built-in networks load as weights only.
    own_code = training is not None and training.entrypoint is not None
    saved = torch.load(path, weights_only=not own_code)
    if "module" in saved:
        return saved["module"].eval()
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


def regression_metrics(predicted: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Mean absolute error, root mean squared error and R2."""
    from sklearn.metrics import mean_absolute_error, r2_score, root_mean_squared_error

    predicted = np.asarray(predicted, dtype=np.float64).reshape(len(y))
    return {"mae": float(mean_absolute_error(y, predicted)), "rmse": float(root_mean_squared_error(y, predicted)),
            "r2": float(r2_score(y, predicted))}


def task_metrics(task: str, outputs: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """The task's metrics from a model's outputs (probabilities, or predictions)."""
    return regression_metrics(outputs, y) if task == "regression" else classification_metrics(outputs, y)


def score_name(task: str) -> str:
    """The one score variants are compared on: accuracy, or R2 for a regression (higher is better)."""
    return "r2" if task == "regression" else "accuracy"


def score(task: str, outputs: np.ndarray, y: np.ndarray) -> float:
    if task == "regression":
        return regression_metrics(outputs, y)["r2"]
    return float(np.mean(np.asarray(outputs).argmax(axis=1) == y))
