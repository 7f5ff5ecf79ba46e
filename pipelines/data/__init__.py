"""Data sources, feature preparation and validation."""

from __future__ import annotations

import fnmatch
import hashlib
from pathlib import Path

import pandas as pd

from pipelines.specs import DataSpec

MISSING_CATEGORY = "__missing__"


class DataError(ValueError):
    """Data that cannot be used; the message names the source and the column or row."""


def read_source(data: DataSpec, base_dir: Path, s3_endpoint_url: str | None = None) -> pd.DataFrame:
    """Read the spec's data source as a data frame (built-in dataset, CSV, Parquet, s3://)."""
    source = data.source
    if source.startswith("builtin:"):
        from pipelines.data.builtin import LOADERS

        return LOADERS[source.removeprefix("builtin:")]()
    if source.startswith("s3://"):
        import tempfile

        from pipelines.storage import ObjectStore

        bucket_url, _, key = source.removeprefix("s3://").partition("/")
        with tempfile.TemporaryDirectory() as tmp:
            local = ObjectStore(f"s3://{bucket_url}", s3_endpoint_url).get_file(
                key, Path(tmp) / Path(key).name
            )
            return _read_file(local, source)
    path = Path(source.removeprefix("file://"))
    return _read_file(path if path.is_absolute() else base_dir / path, source)


def _read_file(path: Path, label: str) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{label}: data file not found")
    try:
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError, OSError) as error:
        raise DataError(f"{label}: cannot be read as {path.suffix[1:]}: {error}") from None
    if frame.empty:
        raise DataError(f"{label}: no rows")
    if frame.shape[1] == 1:
        header = str(frame.columns[0])
        other = next((sep for sep in (";", "\t", "|") if sep in header), None)
        if other:
            raise DataError(f"{label}: header {header[:60]!r} is one column: the file is separated by "
                            f"{other!r}, not by commas")
    return frame


def resolve_features(patterns: list[str], columns: list[str]) -> list[str]:
    """Expand glob patterns against the data's columns, in the data's column order.

    A plain name that is absent stays in the list, so validation reports it as missing.
    """
    resolved: list[str] = []
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            matches = [c for c in columns if fnmatch.fnmatchcase(c, pattern)]
            if not matches:
                raise DataError(f"data.features: pattern {pattern!r} matches no column")
            resolved.extend(m for m in matches if m not in resolved)
        elif pattern not in resolved:
            resolved.append(pattern)
    return resolved


def fingerprint(frame: pd.DataFrame) -> str:
    """Content hash of a data frame (values, column names and dtypes)."""
    digest = hashlib.sha256()
    digest.update(repr([(c, str(t)) for c, t in frame.dtypes.items()]).encode())
    digest.update(pd.util.hash_pandas_object(frame, index=False).values.tobytes())
    return digest.hexdigest()


def is_categorical(series: pd.Series) -> bool:
    return not pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series)


def prepare_features(frame: pd.DataFrame, features: list[str]) -> pd.DataFrame:
    """The model's input columns: numbers as float32, categories as str (missing marked).

    Devices apply the same rule before inference, so it is part of the model contract.
    """
    out = {}
    for column in features:
        series = frame[column]
        if is_categorical(series):
            out[column] = series.astype(object).where(series.notna(), MISSING_CATEGORY).astype(str)
        else:
            out[column] = series.astype("float32")
    return pd.DataFrame(out, index=frame.index)


def split(frame: pd.DataFrame, target: str, test_size: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Deterministic stratified split into train and test rows."""
    from sklearn.model_selection import train_test_split

    counts = frame[target].value_counts()
    stratify = frame[target] if counts.min() >= 2 else None
    train, test = train_test_split(frame, test_size=test_size, random_state=seed, stratify=stratify)
    return train, test
