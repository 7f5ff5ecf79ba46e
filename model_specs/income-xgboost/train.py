"""Own training code for income-xgboost: an XGBoost model with its own feature handling.

The release calls `train(features, target, params, seed)` (spec: `training.entrypoint:
"train:train"`) and takes the fitted Pipeline it returns through export, quantization and every gate.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder
from xgboost import XGBClassifier


def train(features: pd.DataFrame, target: np.ndarray, params: dict, seed: int) -> Pipeline:
    categorical = [c for c in features.columns if features[c].dtype == object]
    numeric = [c for c in features.columns if c not in categorical]
    # Dense one-hot columns: XGBoost reads an absent entry of a sparse matrix as a missing value,
    # where the exported model would see 0.
    prepare = ColumnTransformer([("numbers", "passthrough", numeric),
                                 ("categories", OneHotEncoder(handle_unknown="ignore", sparse_output=False),
                                  categorical)])
    # Weigh the rarer positive class up, as many as there are negatives per positive.
    positives = max(int(target.sum()), 1)
    model = XGBClassifier(
        n_estimators=int(params.get("n_estimators", 200)), max_depth=int(params.get("max_depth", 4)),
        learning_rate=float(params.get("learning_rate", 0.1)),
        scale_pos_weight=(len(target) - positives) / positives if params.get("balance_classes") else 1.0,
        random_state=seed, n_jobs=1,
    )
    return Pipeline([("prepare", prepare), ("model", model)]).fit(features, target)
