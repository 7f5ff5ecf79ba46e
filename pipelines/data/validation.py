"""Great Expectations suite derived from a model spec, and its verdict."""

from __future__ import annotations

import fnmatch
import logging

import numpy as np
import pandas as pd

from pipelines.specs import DataSpec

NUMERIC_TYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                 "float16", "float32", "float64", "int", "float"]


FLOAT32_MAX = 3.4028234663852886e38


def _is_pattern(name: str) -> bool:
    return any(ch in name for ch in "*?[")


def _inputs(data: DataSpec, features: list[str]) -> list[str]:
    """The input columns the suite checks one by one: features outside glob groups, then the
    sensitive features."""
    grouped = {c for p in data.features if _is_pattern(p) for c in features if fnmatch.fnmatchcase(c, p)}
    return list(dict.fromkeys([*(f for f in features if f not in grouped), *data.sensitive_features]))


def suite_columns(data: DataSpec, features: list[str]) -> set[str]:
    """The data columns an expectation of `build_suite` names (glob groups apart)."""
    return {*_inputs(data, features), data.target, *(c for c in data.validation.ranges if not _is_pattern(c))}


def validation_view(frame: pd.DataFrame, data: DataSpec, columns: set[str] | None = None) -> pd.DataFrame:
    """The frame as the suite sees it: a glob group of columns (`pixel_*`) becomes row-wise
    aggregates, so wide data costs a handful of expectations instead of one per column
    (784 pixel columns: ~60 s per-column vs under a second aggregated). With `columns` (the
    suite's, `suite_columns`), the other plain columns are left out: Great Expectations
    hashes the whole batch and copies it for every column-map expectation, so columns that
    no expectation reads only cost time."""
    view = {}
    for pattern in dict.fromkeys([*data.features, *data.validation.ranges]):
        if not _is_pattern(pattern):
            continue
        group = frame[[c for c in frame.columns if fnmatch.fnmatchcase(c, pattern)]]
        if group.shape[1] == 0:
            continue
        view[f"null_share({pattern})"] = group.isna().mean(axis=1)
        if all(pd.api.types.is_numeric_dtype(t) for t in group.dtypes):
            view[f"min({pattern})"] = group.min(axis=1)
            view[f"max({pattern})"] = group.max(axis=1)
        else:
            view[f"min({pattern})"] = pd.Series("non-numeric", index=frame.index)
    plain = [c for c in frame.columns if (columns is None or c in columns) and not any(
        _is_pattern(p) and fnmatch.fnmatchcase(c, p) for p in data.features)]
    if not view:
        return frame if len(plain) == frame.shape[1] else frame[plain]
    return pd.concat([frame[plain], pd.DataFrame(view, index=frame.index)], axis=1)


def build_suite(data: DataSpec, features: list[str]):
    """The expectations a spec implies: rows, columns present, nulls, types, ranges, classes."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    max_null = data.validation.max_null_share
    suite = gx.ExpectationSuite(name="edge-release-data")
    suite.add_expectation(gxe.ExpectTableRowCountToBeBetween(min_value=data.validation.min_rows))
    inputs = _inputs(data, features)
    for column in [*inputs, data.target]:
        suite.add_expectation(gxe.ExpectColumnToExist(column=column))
    for column in inputs:
        suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column=column, mostly=1.0 - max_null))
    for pattern in (p for p in data.features if _is_pattern(p)):
        suite.add_expectation(gxe.ExpectColumnMeanToBeBetween(column=f"null_share({pattern})", max_value=max_null))
    suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column=data.target))
    suite.add_expectation(gxe.ExpectColumnUniqueValueCountToBeBetween(column=data.target, min_value=2))
    for column, (low, high) in data.validation.ranges.items():
        if _is_pattern(column):
            suite.add_expectation(gxe.ExpectColumnValuesToBeInTypeList(column=f"min({column})", type_list=NUMERIC_TYPES))
            suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column=f"min({column})", min_value=low))
            suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column=f"max({column})", max_value=high))
            continue
        suite.add_expectation(gxe.ExpectColumnValuesToBeInTypeList(column=column, type_list=NUMERIC_TYPES))
        suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column=column, min_value=low, max_value=high))
    return suite


def _describe(result: dict) -> str:
    config = result["expectation_config"]
    kwargs = {k: v for k, v in config["kwargs"].items() if k not in ("batch_id",)}
    column = kwargs.pop("column", None)
    observed = result.get("result", {})
    detail = ""
    if "unexpected_percent" in observed and observed.get("unexpected_percent") is not None:
        detail = f"; {observed['unexpected_percent']:.2f}% of rows unexpected"
        if observed.get("partial_unexpected_list"):
            detail += f" (e.g. {observed['partial_unexpected_list'][:3]})"
    elif "observed_value" in observed:
        detail = f"; observed {observed['observed_value']}"
    if config["type"] == "expect_column_to_exist":
        detail = "; the column is missing"
    name = config["type"]
    target = f"column {column!r}" if column else "table"
    args = ", ".join(f"{k}={v}" for k, v in kwargs.items() if v is not None)
    return f"{target}: {name}({args}){detail}"


def value_problems(frame: pd.DataFrame, features: list[str]) -> list[str]:
    """What the expectations do not see, one line per column naming the first bad row: a
    number a float32 input cannot hold (inf, 1e300), and text in a column whose other values
    are numbers (it would silently turn a numeric feature into a category)."""
    problems = []
    for column in (c for c in features if c in frame.columns):
        series = frame[column]
        if pd.api.types.is_bool_dtype(series):
            continue
        if pd.api.types.is_numeric_dtype(series):
            bad = series[series.notna() & ~(series.abs() <= FLOAT32_MAX)]
            if len(bad):
                problems.append(f"column {column!r}: row {bad.index[0]}: {float(bad.iloc[0])} does not fit "
                                f"a float32 (the model's input type)")
            continue
        found = _text_among_numbers(series)
        if found is not None:
            row, value = found
            problems.append(f"column {column!r}: row {row}: {value!r} is not a number "
                            f"(the column's other values are)")
    return problems


def _text_among_numbers(series: pd.Series) -> tuple[object, object] | None:
    """The first present value that is not a number (its row label and the value itself) when
    more than half of the present values are numbers; else None.

    Whether a value is a number is decided once per distinct value (an object column holds
    few distinct values among many rows), and the counts of the distinct values give the
    share: the same answer as converting every row, without converting every row."""
    if series.dtype == object:
        try:
            codes, uniques = pd.factorize(series, use_na_sentinel=True)
        except TypeError:  # unhashable values (lists, dicts): convert every row
            codes = None
        present = series.notna().to_numpy()
        if codes is not None and not (present & (codes < 0)).any():
            numeric = pd.to_numeric(pd.Series(uniques, dtype=object), errors="coerce").notna().to_numpy()
            counts = np.bincount(codes[present], minlength=len(uniques))
            rows = int(present.sum())
            if rows == 0 or numeric.all() or counts[numeric].sum() / rows <= 0.5:
                return None
            first = int(np.argmax(present & ~numeric[np.where(codes < 0, 0, codes)]))
            return series.index[first], series.iloc[first]
    present = series.dropna()
    numbers = pd.to_numeric(present, errors="coerce")
    text = present[numbers.isna()]
    if len(text) and numbers.notna().mean() > 0.5:
        return text.index[0], text.iloc[0]
    return None


def validate_frame(frame: pd.DataFrame, data: DataSpec, features: list[str]) -> tuple[bool, list[str], dict]:
    """Run the suite and the value checks on a frame. Returns (passed, failure lines, the full
    result as JSON)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        context.data_sources.add_pandas("edge")
        .add_dataframe_asset("release-data")
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": validation_view(frame, data, suite_columns(data, features))})
    )
    result = batch.validate(build_suite(data, features), result_format="SUMMARY").to_json_dict()
    failed = [r for r in result["results"] if not r["success"]]
    # A missing column fails its own expectation and every other one on it: report it once.
    missing = {r["expectation_config"]["kwargs"].get("column") for r in failed
               if r["expectation_config"]["type"] == "expect_column_to_exist"}
    failures = [_describe(r) for r in failed
                if r["expectation_config"]["type"] == "expect_column_to_exist"
                or r["expectation_config"]["kwargs"].get("column") not in missing]
    problems = value_problems(frame, features)
    result["value_problems"] = problems
    return bool(result["success"]) and not problems, failures + problems, result
