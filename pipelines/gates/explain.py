"""Explainability: permutation importance of the shipped ONNX variant (model-agnostic)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


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


def plot_importances(importances: dict[str, float], path: Path, title: str, task: str = "binary",
                     top: int = 15) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = list(importances.items())[:top][::-1]
    fig, ax = plt.subplots(figsize=(6.5, 0.35 * len(items) + 1.2))
    ax.barh([k for k, _ in items], [v for _, v in items], color="#3b6ea5")
    ax.set_xlabel("mean absolute error increase when shuffled" if task == "regression"
                  else "mean accuracy drop when shuffled")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
