import numpy as np
import pandas as pd
import pytest
from conftest import tabular_frame

from pipelines.data import (
    MISSING_CATEGORY,
    DataError,
    fingerprint,
    prepare_features,
    read_source,
    resolve_features,
    split,
)
from pipelines.data.builtin import load_mnist_5k, load_uci_adult, load_uci_adult_test
from pipelines.data.validation import validate_frame
from pipelines.specs import DataSpec


def _spec(**extra) -> DataSpec:
    base = {"source": "data.csv", "target": "label", "features": ["x1", "x2", "colour"],
            "sensitiveFeatures": ["group"],
            "validation": {"maxNullShare": 0.05, "minRows": 50, "ranges": {"x1": [-10, 10]}}}
    base.update(extra)
    return DataSpec.model_validate(base)


def test_builtin_datasets_are_real_and_offline():
    adult = load_uci_adult()
    assert adult.shape == (32561, 15)
    assert len(load_uci_adult_test()) == 16281
    assert set(adult["income_over_50k"].unique()) == {0, 1}
    assert set(adult["sex"].unique()) == {"Male", "Female"}
    digits = load_mnist_5k()
    assert digits.shape == (5000, 785)
    assert digits["label"].value_counts().tolist() == [500] * 10
    assert digits.filter(like="pixel_").to_numpy().max() == 255


def test_features_resolve_globs_in_data_order():
    columns = ["pixel_1", "pixel_0", "label", "age"]
    assert resolve_features(["pixel_*", "age"], columns) == ["pixel_1", "pixel_0", "age"]
    assert resolve_features(["missing"], columns) == ["missing"]
    with pytest.raises(DataError, match="pattern 'img_\\*' matches no column"):
        resolve_features(["img_*"], columns)


def test_good_data_passes():
    passed, failures, report = validate_frame(tabular_frame(), _spec(), ["x1", "x2", "colour"])
    assert passed and failures == []
    assert report["statistics"]["evaluated_expectations"] >= 10


def test_missing_column_is_reported_once():
    frame = tabular_frame().drop(columns=["x2"])
    passed, failures, _ = validate_frame(frame, _spec(), ["x1", "x2", "colour"])
    assert not passed
    assert any("column 'x2': expect_column_to_exist" in f for f in failures)
    assert sum("'x2'" in f for f in failures) == 1


def test_nulls_beyond_the_allowed_share_fail_with_the_share():
    frame = tabular_frame()
    frame.loc[: len(frame) // 5, "colour"] = None
    passed, failures, _ = validate_frame(frame, _spec(), ["x1", "x2", "colour"])
    assert not passed
    [line] = failures
    assert "column 'colour': expect_column_values_to_not_be_null(mostly=0.95)" in line
    assert "20.25% of rows unexpected" in line


def test_range_type_and_single_class_failures():
    frame = tabular_frame()
    frame.loc[3, "x1"] = 99.0
    frame["label"] = 1
    passed, failures, _ = validate_frame(frame, _spec(), ["x1", "x2", "colour"])
    assert not passed
    text = "\n".join(failures)
    assert "column 'x1': expect_column_values_to_be_between" in text
    assert "column 'label': expect_column_unique_value_count_to_be_between" in text


def test_wide_glob_groups_are_checked_as_a_whole():
    digits = load_mnist_5k().sample(300, random_state=0)
    spec = DataSpec.model_validate({"source": "builtin:mnist-5k", "target": "label", "features": ["pixel_*"],
                                    "validation": {"minRows": 100, "ranges": {"pixel_*": [0, 255]}}})
    features = resolve_features(spec.features, list(digits.columns))
    assert validate_frame(digits, spec, features)[0]
    digits.iloc[0, 10] = 300
    passed, failures, _ = validate_frame(digits, spec, features)
    assert not passed and "max(pixel_*)" in failures[0]


def test_csv_reading_errors(tmp_path):
    spec = _spec()
    with pytest.raises(DataError, match="data.csv: data file not found"):
        read_source(spec, tmp_path)
    (tmp_path / "data.csv").write_text("")
    with pytest.raises(DataError, match="data.csv: cannot be read as csv"):
        read_source(spec, tmp_path)
    tabular_frame().to_csv(tmp_path / "data.csv", index=False)
    assert len(read_source(spec, tmp_path)) == 400


def test_fingerprint_tracks_content_and_prepare_marks_missing():
    frame = tabular_frame()
    assert fingerprint(frame) == fingerprint(frame.copy())
    changed = frame.copy()
    changed.loc[0, "x1"] += 1e-9
    assert fingerprint(changed) != fingerprint(frame)
    frame.loc[0, "colour"] = None
    prepared = prepare_features(frame, ["x1", "colour"])
    assert prepared["x1"].dtype == np.float32
    assert prepared.loc[0, "colour"] == MISSING_CATEGORY


def test_split_is_deterministic_and_stratified():
    frame = tabular_frame()
    a_train, a_test = split(frame, "label", 0.25, 3)
    b_train, b_test = split(frame, "label", 0.25, 3)
    pd.testing.assert_frame_equal(a_test, b_test)
    assert abs(a_test["label"].mean() - frame["label"].mean()) < 0.02
