"""Explainability of the shipped ONNX variant, model-agnostic: every method calls the same
onnxruntime session the devices run.

- `permutation_importances`: global only, the drop in accuracy (or rise in mean absolute error)
  when one feature's values are shuffled.
- `local_explanations`: why the model answered what it did for each of a few inputs, with
  LIME (a weighted linear model fitted on perturbed copies of the input) or SHAP (Shapley
  values of the features against a background sample of training rows).
- `global_summary`: the mean absolute LIME or SHAP weight of each feature over a bounded
  sample of held-out rows, for the model card.

Categorical columns are strings for the model; the explainers perturb numbers, so each is
label-encoded for them (codes taken from the background and the explained rows) and decoded
back to its strings before the session is called.
"""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field

from pipelines.records import Record

LOCAL_METHODS = ("lime", "shap")
LIME_SAMPLES = 1000  # perturbed copies of the input the local linear model is fitted on
SHAP_BACKGROUND = 50  # background rows SHAP replaces masked features with (each costs model calls)
SHAP_EXACT_FEATURES = 10  # up to this many features, every coalition (exact Shapley values, 2^features)
SHAP_SAMPLED_COALITIONS = 2048  # beyond it, 2 coalitions per feature and this many more, sampled (seeded)
SUMMARY_ROWS = 50  # held-out rows the model card's global summary explains


class ExplanationError(ValueError):
    """Inputs that cannot be explained; the message names the feature or the method."""


class LocalExplanation(Record):
    """Why the model answered what it did for one input."""

    method: str = Field(description="lime or shap.")
    prediction: int | float = Field(description="The predicted class index, or a regression's value.")
    predicted_label: str | None = Field(None, description="The predicted class's label (a classifier).")
    probability: float | None = Field(None, description="The predicted class's probability (a classifier).")
    weights: dict[str, float] = Field(
        description="Feature -> contribution toward the predicted class's probability (or the value), largest "
                    "magnitude first.")
    base_value: float | None = Field(
        None, description="SHAP: the background's mean answer the contributions add to; LIME: the intercept of "
                          "the local linear model.")
    seconds: float = Field(description="Time to explain this input.")


def local_method(method: str) -> str:
    """The method that explains single inputs for a spec's `explainability.method`:
    permutation importance explains globally only, so single inputs then get LIME."""
    if method in LOCAL_METHODS:
        return method
    if method == "permutation_importance":
        return "lime"
    raise ExplanationError(f"explainability method {method!r} explains no single input (use lime or shap)")


# -- the model as the explainers see it ---------------------------------------------------------
@dataclass
class _Encoding:
    """Feature columns as numbers: categorical columns by their index in `categories`; a
    missing number as the background's median (the explainers measure distances and quantiles,
    which a NaN breaks)."""

    features: list[str]
    categories: dict[str, list[str]]
    fill: dict[str, float]

    @classmethod
    def of(cls, reference: pd.DataFrame, inputs: pd.DataFrame, model: ModelInputs) -> _Encoding:
        categories, fill = {}, {}
        for column in model.features:
            if column in model.text:
                values = pd.concat([reference[column], inputs[column]])
                categories[column] = sorted(values.unique().tolist())
            else:
                median = reference[column].median()
                fill[column] = float(median) if pd.notna(median) else 0.0
        return cls(model.features, categories, fill)

    def encode(self, frame: pd.DataFrame) -> np.ndarray:
        columns = []
        for column in self.features:
            if column in self.categories:
                index = {value: i for i, value in enumerate(self.categories[column])}
                columns.append(frame[column].astype(str).map(index).to_numpy(np.float64))
            else:
                columns.append(frame[column].astype("float64").fillna(self.fill[column]).to_numpy())
        return np.column_stack(columns)

    def decode(self, matrix: np.ndarray) -> pd.DataFrame:
        out = {}
        for i, column in enumerate(self.features):
            if column in self.categories:
                names = np.asarray(self.categories[column], dtype=object)
                codes = np.clip(np.rint(matrix[:, i]), 0, len(names) - 1).astype(int)
                out[column] = names[codes]
            else:
                out[column] = matrix[:, i].astype(np.float32)
        return pd.DataFrame(out)


class _Answers:
    """The ONNX session's answers to encoded rows: class probabilities, or a regression's values."""

    def __init__(self, path: Path, encoding: _Encoding, sess):
        self.path, self.encoding, self.session = path, encoding, sess

    def __call__(self, matrix: np.ndarray) -> np.ndarray:
        from pipelines.onnx.export import predict

        return predict(self.path, self.encoding.decode(np.atleast_2d(matrix)), self.session)


@dataclass(frozen=True)
class ModelInputs:
    """The feature columns an ONNX file takes (its contract), those it takes as text, and its classes."""

    features: list[str]
    text: frozenset[str]
    classes: list[str]

    @classmethod
    def of(cls, model_path: Path, sess=None) -> ModelInputs:
        import json

        from pipelines.onnx.export import session

        sess = sess or session(model_path)
        meta = sess.get_modelmeta().custom_metadata_map
        inputs = {i.name: i.type for i in sess.get_inputs()}
        features = json.loads(meta.get("edge.features") or "null") or list(inputs)
        try:
            classes = [str(c) for c in json.loads(meta.get("edge.classes") or "[]")]
        except ValueError:
            classes = []
        return cls(features, frozenset(n for n, kind in inputs.items() if kind == "tensor(string)"), classes)

    def prepared(self, frame: pd.DataFrame, what: str) -> pd.DataFrame:
        """`frame`'s feature columns as the model takes them (as `pipelines.data.prepare_features`
        makes them): text with missing values marked, numbers as float32 (missing: NaN).
        ExplanationError names a missing column or a value that is not a number."""
        from pipelines.data import MISSING_CATEGORY

        missing = [c for c in self.features if c not in frame.columns]
        if missing:
            raise ExplanationError(f"{what} lacks feature columns {missing}")
        out = {}
        for column in self.features:
            series = frame[column]
            if column in self.text:
                out[column] = series.astype(object).where(series.notna(), MISSING_CATEGORY).astype(str)
                continue
            numbers = pd.to_numeric(series, errors="coerce")
            bad = series[numbers.isna() & series.notna()]
            if len(bad) or pd.api.types.is_bool_dtype(series):
                value = bad.iloc[0] if len(bad) else series.iloc[0]
                raise ExplanationError(f"{what}: feature {column!r} takes a number, not {value!r}")
            out[column] = numbers.astype("float32")
        return pd.DataFrame(out).reset_index(drop=True)


def _top(weights: dict[str, float], top: int | None) -> dict[str, float]:
    ranked = sorted(weights.items(), key=lambda item: (-abs(item[1]), item[0]))
    return {name: round(float(value), 6) for name, value in ranked[:top]}


# -- LIME ---------------------------------------------------------------------------------------
def _lime(answers: _Answers, background: np.ndarray, rows: np.ndarray, task: str, seed: int):
    """Per row: (the target output's index, the weight of each feature index, the intercept)."""
    from lime.lime_tabular import LimeTabularExplainer
    from sklearn.utils import check_random_state

    encoding = answers.encoding
    categorical = [i for i, c in enumerate(encoding.features) if c in encoding.categories]
    explainer = LimeTabularExplainer(
        background, mode="regression" if task == "regression" else "classification",
        feature_names=encoding.features, categorical_features=categorical,
        categorical_names={i: encoding.categories[encoding.features[i]] for i in categorical},
        discretize_continuous=True, random_state=seed)
    for row in rows:
        _reseed(explainer, check_random_state(seed))
        # LIME keeps a regression's weights under label 1 (and their negation under 0).
        target = 1 if task == "regression" else int(np.argmax(answers(row)[0]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized probabilities sum to 1 only within float32
            found = explainer.explain_instance(row, answers, labels=(target,), num_features=len(encoding.features),
                                               num_samples=LIME_SAMPLES)
        yield target, dict(found.as_map()[target]), float(found.intercept[target])


def _reseed(explainer, generator) -> None:
    """Each input explained as if alone, so the same input gets the same weights in any batch:
    the explainer, its sampler and its discretizer share one generator, as LIME makes them."""
    explainer.random_state = explainer.base.random_state = generator
    if explainer.discretizer is not None:
        explainer.discretizer.random_state = generator


# -- SHAP ---------------------------------------------------------------------------------------
# NOTE: Kernel SHAP (shap.KernelExplainer) rather than shap.Explainer's exact and permutation
# algorithms: those compile numba code on their first call in a process (6 s on an idle build
# host, 30 s on a busy one), a cost every release and every api-server worker would pay. Kernel
# SHAP fits the same Shapley values by weighted regression over feature coalitions; with every
# coalition enumerated it is exact, and it samples only beyond SHAP_EXACT_FEATURES features.
_RANDOM = threading.Lock()  # Kernel SHAP samples coalitions with numpy's global generator


def _shap(answers: _Answers, background: np.ndarray, rows: np.ndarray, task: str, seed: int):
    """Per row: (the target output's index, the Shapley value of each feature index, the base value)."""
    import shap

    width = background.shape[1]
    explainer = shap.KernelExplainer(answers, background, link="identity")
    coalitions = 2 ** width - 2 if width <= SHAP_EXACT_FEATURES else 2 * width + SHAP_SAMPLED_COALITIONS
    for row in rows:
        target = 0 if task == "regression" else int(np.argmax(answers(row)[0]))
        with _RANDOM:
            # Each input is explained as if alone: the same input gets the same values in any batch.
            np.random.seed(seed)
            values = np.asarray(explainer.shap_values(row[None, :], nsamples=coalitions, l1_reg=False,
                                                      silent=True))[0]
        base = np.ravel(explainer.expected_value)
        if values.ndim == 2:
            values, base = values[:, target], base[target:]
        yield target, dict(enumerate(values.tolist())), float(base[0])


def _background(frame: pd.DataFrame, rows: int, seed: int) -> pd.DataFrame:
    return frame.sample(n=rows, random_state=seed) if len(frame) > rows else frame


# -- public face ---------------------------------------------------------------------------------
def local_explanations(model_path: Path, rows: pd.DataFrame, background: pd.DataFrame, method: str, task: str,
                       seed: int, top: int | None = 10) -> list[LocalExplanation]:
    """Explain the ONNX model's answer to each row of `rows`.

    Args:
        model_path: the ONNX file (the variant a device group runs).
        rows: raw feature columns, as devices send them and as the training data holds them.
        background: training rows of the same columns: LIME draws its perturbations from their
            distribution; SHAP replaces a masked feature with their values (at most
            SHAP_BACKGROUND of them, seeded).
        method: lime or shap; permutation_importance explains globally only, so it gets lime.
        task: binary, multiclass or regression.
        seed: the same seed gives the same weights.
        top: features kept per input, largest magnitude first (None: all).

    Returns:
        One LocalExplanation per row, in order.
    """
    from pipelines.onnx.export import session

    method = local_method(method)
    sess = session(model_path)
    model = ModelInputs.of(model_path, sess)
    inputs, reference = model.prepared(rows, "the input"), model.prepared(background, "the background")
    if reference.empty:
        raise ExplanationError("the background has no rows")
    if method == "shap":
        reference = _background(reference, SHAP_BACKGROUND, seed)
    encoding = _Encoding.of(reference, inputs, model)
    answers = _Answers(model_path, encoding, sess)
    explain = _lime if method == "lime" else _shap
    classes = model.classes
    out = []
    started = time.perf_counter()
    for target, weights, base in explain(answers, encoding.encode(reference), encoding.encode(inputs), task, seed):
        row = len(out)
        answer = answers(encoding.encode(inputs.iloc[[row]]))[0]
        named = {model.features[i]: value for i, value in weights.items()}
        classifier = task != "regression"
        out.append(LocalExplanation(
            method=method, prediction=target if classifier else round(float(answer), 6),
            predicted_label=(classes[target] if target < len(classes) else str(target)) if classifier else None,
            probability=round(float(answer[target]), 6) if classifier else None,
            weights=_top(named, top), base_value=round(base, 6),
            seconds=round(time.perf_counter() - started, 4)))
        started = time.perf_counter()
    return out


def mean_abs_weights(explanations: list[LocalExplanation]) -> dict[str, float]:
    """Each feature's mean absolute weight over `explanations`, largest first (a feature an
    explanation leaves out counts as 0)."""
    totals: dict[str, float] = {}
    for item in explanations:
        for name, value in item.weights.items():
            totals[name] = totals.get(name, 0.0) + abs(value)
    return _top({name: value / max(len(explanations), 1) for name, value in totals.items()}, None)


def global_summary(model_path: Path, rows: pd.DataFrame, background: pd.DataFrame, method: str, task: str,
                   seed: int, sample: int = SUMMARY_ROWS) -> dict[str, float]:
    """Mean absolute LIME or SHAP weight of each feature over `sample` rows of `rows` (seeded),
    largest first: which features move the model's answers, over many inputs."""
    chosen = _background(rows, sample, seed)
    return mean_abs_weights(local_explanations(model_path, chosen, background, method, task, seed, top=None))


# -- permutation importance -------------------------------------------------------------------------
class _OnnxModel:
    """The scikit-learn estimator face that `permutation_importance` needs, over onnxruntime:
    predicted labels, or a regression's values."""

    def __init__(self, path: Path, task: str):
        from pipelines.onnx.export import session

        self.path = path
        self.task = task
        self.session = session(path)

    def fit(self, *_):
        return self

    def predict(self, features: pd.DataFrame) -> np.ndarray:
        from pipelines.onnx.export import predict

        outputs = predict(self.path, features, self.session)
        return outputs if self.task == "regression" else outputs.argmax(axis=1)


def _score(task: str):
    """Accuracy, or minus the mean absolute error: higher is better, as permutation importance wants."""
    if task == "regression":
        return lambda est, x, t: -float(np.mean(np.abs(est.predict(x) - t)))
    return lambda est, x, t: float(np.mean(est.predict(x) == t))


def permutation_importances(onnx_path: Path, features: pd.DataFrame, y: np.ndarray, seed: int,
                            task: str = "binary", rows: int = 2000, repeats: int = 5) -> dict[str, float]:
    """Mean drop in accuracy (increase in mean absolute error, for a regression) when each
    feature's values are shuffled, largest first."""
    from sklearn.inspection import permutation_importance

    sample = features.sample(n=min(rows, len(features)), random_state=seed)
    target = y[features.index.get_indexer(sample.index)]
    model = _OnnxModel(onnx_path, task)
    result = permutation_importance(model, sample, target, scoring=_score(task), n_repeats=repeats,
                                    random_state=seed, n_jobs=1)
    pairs = sorted(zip(sample.columns, result.importances_mean), key=lambda p: -p[1])
    return {name: round(float(value), 6) for name, value in pairs}


AXIS_LABELS = {
    "permutation_importance": {"regression": "mean absolute error increase when shuffled",
                               "classification": "mean accuracy drop when shuffled"},
    "lime": {"regression": "mean |LIME weight| on the predicted value",
             "classification": "mean |LIME weight| on the predicted class's probability"},
    "shap": {"regression": "mean |SHAP value| on the predicted value",
             "classification": "mean |SHAP value| on the predicted class's probability"},
}


def plot_importances(importances: dict[str, float], path: Path, title: str, task: str = "binary",
                     top: int = 15, method: str = "permutation_importance") -> Path:
    """A horizontal bar chart of the largest importances (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = list(importances.items())[:top][::-1]
    fig, ax = plt.subplots(figsize=(6.5, 0.35 * len(items) + 1.2))
    ax.barh([k for k, _ in items], [v for _, v in items], color="#3b6ea5")
    ax.set_xlabel(AXIS_LABELS[method]["regression" if task == "regression" else "classification"])
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
