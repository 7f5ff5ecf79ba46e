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
            return _read_file(local, source, data.validation.max_columns, data.validation.max_cell_bytes)
    path = Path(source.removeprefix("file://"))
    return _read_file(path if path.is_absolute() else base_dir / path, source, data.validation.max_columns,
                      data.validation.max_cell_bytes)


def _check_header(path: Path, label: str, max_columns: int, max_cell_bytes: int = 65_536) -> int:
    """A CSV, before it is read: a header of at most `max_columns` columns, no name twice (a
    reader would silently rename the second `x` to `x.1`), and no line longer than its cells
    can be (`max_cell_bytes` each), read a bounded piece at a time. Returns the longest line's
    length in bytes."""
    import csv
    from collections import Counter

    with path.open("rb") as handle:
        header = handle.readline(max_columns * (max_cell_bytes + 3) + 2)
        names = next(csv.reader([header.decode("utf-8", errors="replace")]), [])
        if len(names) > max_columns:
            raise DataError(f"{label}: {len(names):,} columns, more than data.validation.maxColumns "
                            f"({max_columns:,})")
        twice = sorted(name for name, count in Counter(n.strip() for n in names).items() if count > 1)
        if twice:
            raise DataError(f"{label}: column {twice[0]!r} appears more than once in the header"
                            + (f" (and {len(twice) - 1} more)" if len(twice) > 1 else ""))
        limit = max(len(names), 1) * (max_cell_bytes + 3) + 2
        longest, number = len(header), 1
        for number, line in enumerate(iter(lambda: handle.readline(limit + 1), b""), start=2):
            if len(line) > limit:
                raise DataError(f"{label}: line {number:,} is longer than {len(names):,} cells of "
                                f"data.validation.maxCellBytes ({max_cell_bytes:,}) can be")
            longest = max(longest, len(line))
    return longest


def _read_file(path: Path, label: str, max_columns: int, max_cell_bytes: int = 65_536) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{label}: data file not found")
    longest = None
    if path.suffix != ".parquet":
        longest = _check_header(path, label, max_columns, max_cell_bytes)
    try:
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError, OSError) as error:
        raise DataError(f"{label}: cannot be read as {path.suffix[1:]}: {error}") from None
    if frame.empty:
        raise DataError(f"{label}: no rows")
    if frame.shape[1] > max_columns:
        raise DataError(f"{label}: {frame.shape[1]:,} columns, more than data.validation.maxColumns ({max_columns:,})")
    # A CSV whose lines are all shorter than a cell may be holds no cell too large.
    texts = [c for c in frame.columns if frame[c].dtype == object]
    for column in (texts if longest is None or longest > max_cell_bytes else []):
        size = max((len(str(v)) for v in frame[column].dropna().unique()), default=0)  # each distinct value once
        if size > max_cell_bytes:
            raise DataError(f"{label}: column {column!r} holds a value of {size:,} characters, more than "
                            f"data.validation.maxCellBytes ({max_cell_bytes:,})")
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


# A numeric target with more distinct values than this (or any fraction) is a quantity to
# predict, not a set of classes.
MAX_INFERRED_CLASSES = 20


def infer_task(target: pd.Series) -> str:
    """`binary`, `multiclass` or `regression`, from the target's values: text, booleans and whole
    numbers with at most MAX_INFERRED_CLASSES distinct values are classes; other numbers a quantity."""
    values = target.dropna()
    distinct = values.nunique()
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        whole = bool((values.astype("float64") % 1 == 0).all())
        if not whole or distinct > MAX_INFERRED_CLASSES:
            return "regression"
    return "binary" if distinct <= 2 else "multiclass"


def check_target(frame: pd.DataFrame, data: DataSpec, task: str | None = None) -> str:
    """The target can be learned from and evaluated, and the task it makes (the spec's `task`, or
    inferred): one kind of value (not numbers mixed with text, which would train as extra
    classes); classes no more than the test split holds; numbers for a regression."""
    import math

    if data.target not in frame.columns:
        return task or "binary"  # validation reports the missing column
    values = frame[data.target].dropna()
    if values.dtype == object:
        numeric = pd.to_numeric(values.astype(str), errors="coerce").notna()
        if numeric.any() and not numeric.all():
            examples = sorted({repr(v) for v in values[numeric].head(50)})[:2] + \
                sorted({repr(v) for v in values[~numeric].head(50)})[:2]
            raise DataError(f"{data.source}: column {data.target!r} (data.target) mixes numbers and text "
                            f"({', '.join(examples)}): make it one kind")
    explicit = task is not None
    task = task or infer_task(values)
    if task == "regression":
        if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
            raise DataError(f"{data.source}: column {data.target!r} (data.target) is not numeric: task regression "
                            "needs a number to predict")
        if values.nunique() < 2:
            raise DataError(f"{data.source}: column {data.target!r} (data.target) has one value: nothing to predict")
        return task
    classes = values.nunique()
    if explicit and task == "binary" and classes != 2:
        raise DataError(f"{data.source}: column {data.target!r} (data.target) has {classes:,} classes; task binary "
                        "needs exactly 2")
    test_rows = math.ceil(len(frame) * data.test_size)
    if classes > test_rows or classes > len(frame) - test_rows:
        raise DataError(f"{data.source}: column {data.target!r} (data.target) has {classes:,} classes, more than "
                        f"the {test_rows:,} rows of the test split (data.testSize {data.test_size}) can hold")
    return task


def split(frame: pd.DataFrame, target: str, test_size: float, seed: int,
          stratified: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Deterministic split into train and test rows, stratified by class (not for a regression)."""
    from sklearn.model_selection import train_test_split

    counts = frame[target].value_counts()
    stratify = frame[target] if stratified and counts.min() >= 2 else None
    train, test = train_test_split(frame, test_size=test_size, random_state=seed, stratify=stratify)
    return train, test
