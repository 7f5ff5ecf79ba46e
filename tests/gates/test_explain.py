"""LIME and SHAP over a real ONNX file: the feature that decides is found, text columns are
explained as text, the seed decides the weights, and a release explains its model in the card."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import tabular_frame, write_spec

from pipelines.data import prepare_features
from pipelines.gates.explain import (
    ExplanationError,
    global_summary,
    local_explanations,
    local_method,
)
from pipelines.onnx.export import export_onnx, predict
from pipelines.specs import TrainingSpec

FEATURES = ["x1", "x2", "noise", "colour"]


def _frame(rows: int = 600, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"x1": rng.normal(size=rows), "x2": rng.normal(size=rows),
                         "noise": rng.uniform(-1, 1, size=rows),
                         "colour": rng.choice(["red", "green", "blue"], size=rows)})


def _onnx(path, frame: pd.DataFrame, target: np.ndarray, task: str):
    """A scikit-learn pipeline (scaled numbers, one-hot text) trained on `frame` and exported
    as releases export it: one input per column, the contract in the file's metadata."""
    from pipelines.training import build_sklearn

    estimator = "linear_regression" if task == "regression" else "logistic_regression"
    features = prepare_features(frame, FEATURES)
    model = build_sklearn(TrainingSpec(framework="sklearn", estimator=estimator, seed=1), features, task)
    model.fit(features, target)
    metadata = {"edge.model": "m"} if task == "regression" else {"edge.classes": json.dumps(["no", "yes"])}
    return export_onnx("sklearn", model, features, path, 17, metadata, task)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A classifier and a regressor that only x1 drives, a classifier that only the colour drives."""
    folder = tmp_path_factory.mktemp("models")
    frame = _frame()
    rng = np.random.default_rng(1)
    return frame, {
        "binary": _onnx(folder / "binary.onnx", frame, (frame["x1"] > 0).astype(int).to_numpy(), "binary"),
        "regression": _onnx(folder / "regression.onnx", frame,
                            3 * frame["x1"].to_numpy() + rng.normal(scale=0.01, size=len(frame)), "regression"),
        "colour": _onnx(folder / "colour.onnx", frame, (frame["colour"] == "red").astype(int).to_numpy(), "binary"),
    }


@pytest.mark.parametrize("method", ["lime", "shap"])
@pytest.mark.parametrize("task", ["binary", "regression"])
def test_the_one_feature_that_matters_comes_first(models, method, task):
    frame, paths = models
    rows, background = _frame(8, seed=5), frame.iloc[:200]
    found = local_explanations(paths[task], rows, background, method, task, seed=3, top=None)
    answers = predict(paths[task], prepare_features(rows, FEATURES))
    assert len(found) == len(rows)
    for item, answer in zip(found, answers):
        assert item.method == method and set(item.weights) == set(FEATURES)
        assert next(iter(item.weights)) == "x1", item.weights
        magnitudes = [abs(w) for w in item.weights.values()]
        assert magnitudes == sorted(magnitudes, reverse=True)
        assert 0 < item.seconds < 30
        if task == "regression":
            assert item.prediction == pytest.approx(float(answer), abs=1e-5)
            assert item.predicted_label is None and item.probability is None
        else:
            assert item.prediction == int(np.argmax(answer))
            assert item.predicted_label == ["no", "yes"][item.prediction]
            assert item.probability == pytest.approx(float(answer.max()), abs=1e-5)
        if method == "shap":  # Shapley values add up to the answer, from the background's mean answer
            value = item.prediction if task == "regression" else item.probability
            assert item.base_value + sum(item.weights.values()) == pytest.approx(value, abs=1e-4)


@pytest.mark.parametrize("method", ["lime", "shap"])
def test_a_text_column_is_explained_as_text(models, method):
    frame, paths = models
    rows = pd.DataFrame({"x1": [0.3, -1.2], "x2": [1.0, 0.0], "noise": [0.1, None],
                         "colour": ["red", "purple"]})  # a colour the model never saw; a missing number
    found = local_explanations(paths["colour"], rows, frame.iloc[:200], method, "binary", seed=3, top=2)
    assert [next(iter(f.weights)) for f in found] == ["colour", "colour"]
    assert all(len(f.weights) == 2 for f in found)
    assert found[0].predicted_label == "yes" and found[1].predicted_label == "no"


def test_the_seed_decides_and_each_input_stands_alone(models):
    frame, paths = models
    rows, background = _frame(4, seed=9), frame.iloc[:200]
    for method in ("lime", "shap"):
        first = local_explanations(paths["binary"], rows, background, method, "binary", seed=7)
        again = local_explanations(paths["binary"], rows, background, method, "binary", seed=7)
        alone = local_explanations(paths["binary"], rows.iloc[[2]], background, method, "binary", seed=7)
        assert [f.weights for f in first] == [a.weights for a in again]
        assert alone[0].weights == first[2].weights
    other = local_explanations(paths["binary"], rows, background, "lime", "binary", seed=8)
    assert [f.weights for f in other] != [f.weights for f in first]


def test_the_global_summary_ranks_every_feature(models):
    frame, paths = models
    for method in ("lime", "shap"):
        summary = global_summary(paths["regression"], frame, frame.iloc[:200], method, "regression", seed=1,
                                 sample=20)
        assert list(summary)[0] == "x1" and set(summary) == set(FEATURES)
        assert all(v >= 0 for v in summary.values())


def test_inputs_that_cannot_be_explained_are_named(models):
    frame, paths = models
    with pytest.raises(ExplanationError, match=r"the input lacks feature columns \['noise'\]"):
        local_explanations(paths["binary"], frame[["x1", "x2", "colour"]].head(1), frame, "lime", "binary", 0)
    bad = frame.head(1).assign(x2="tall")
    with pytest.raises(ExplanationError, match="the input: feature 'x2' takes a number, not 'tall'"):
        local_explanations(paths["binary"], bad, frame, "shap", "binary", 0)
    with pytest.raises(ExplanationError, match="the background has no rows"):
        local_explanations(paths["binary"], frame.head(1), frame.head(0), "lime", "binary", 0)
    with pytest.raises(ExplanationError, match="explains no single input"):
        local_method("none")
    assert local_method("permutation_importance") == "lime"
    [found] = local_explanations(paths["binary"], frame.head(1), frame, "permutation_importance", "binary", 0)
    assert found.method == "lime"


def test_a_release_explained_with_lime_shows_the_summary_in_its_card(tmp_path, state):
    """The explain stage under `explainability: lime`: the mean |weight| of every feature over
    held-out rows in the card (JSON and HTML), the local explanations as evidence."""
    from pipelines import release

    tabular_frame().to_csv(tmp_path / "data.csv", index=False)
    spec = write_spec(tmp_path, "lime-model", "data.csv",
                      responsibleAI={"explainability": {"method": "lime", "backgroundRows": 100},
                                     "fairness": {"biasScore": 0.2, "equalizedOdds": 0.25}})
    summary = release.run_release(spec)
    assert summary.status == "released"
    page = open(summary.model_card_uri.removeprefix("file://")).read()
    card = json.loads(open(summary.model_card_uri.removeprefix("file://").replace(".html", ".json")).read())
    explained = card["explainability"]
    assert explained["method"] == "lime" and set(explained["importances"]) == {"x1", "x2", "colour"}
    assert list(explained["importances"])[0] == "x1"  # the label is x1 + 0.5 x2 + (colour == red)
    assert "over 50 held-out rows explained against 100 training rows" in explained["note"]
    assert set(explained["evidence"]) == {"lime_importance.json", "lime_importance.png", "local_explanations.json"}
    local = json.loads(open(explained["evidence"]["local_explanations.json"].removeprefix("file://")).read())
    assert len(local) == 50 and all(set(e["weights"]) == {"x1", "x2", "colour"} for e in local)
    assert "Method: <b>LIME</b>" in page and "<th>mean |LIME weight|</th>" in page
    assert 'alt="LIME by feature"' in page
