"""The embedded federation's clients: the training rows dealt to simulated devices of the spec's
target groups, non-IID by device group, each in its own folder."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_spec

from pipelines.edge.federation import MIN_ROWS, deal
from pipelines.settings import Settings
from pipelines.specs import load_spec


def labelled(rows: int, classes: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=rows)
    features = np.column_stack([np.arange(rows), labels]).astype(np.float32)  # column 0: the row's position
    return features, labels


def phone_spec(tmp_path):
    path = write_spec(tmp_path, "fed-phones", "data.csv", targets=[
        {"name": "android", "selector": {"matchLabels": {"apexlogic.dev/device-class": "android-phone"}}},
        {"name": "ios", "selector": {"matchLabels": {"apexlogic.dev/device-class": "ios-phone"}}}])
    return load_spec(path)


def test_rows_are_dealt_once_to_devices_of_the_target_groups_skewed_by_group(tmp_path, state):
    spec = phone_spec(tmp_path)
    features, labels = labelled(2000)
    partitions = deal(spec, Settings(), features, labels, clients=8, skew=0.3, seed=5)

    assert sorted(partitions.folders) == [f"dev-{i:05d}" for i in range(1, 9)]
    assert set(partitions.groups.values()) == {"meter-phones-android", "meter-phones-ios"}
    seen = []
    per_group: dict[str, np.ndarray] = {}
    for client, folder in partitions.folders.items():
        assert folder == state / "fleet" / client / "federated" / "fed-phones"
        x, y = np.load(folder / "features.npy"), np.load(folder / "labels.npy")
        assert len(x) == len(y) >= MIN_ROWS
        assert (x[:, 1] == y).all()  # every row keeps its own label
        seen.extend(x[:, 0].astype(int).tolist())
        counts = np.bincount(y, minlength=4)
        assert counts.tolist() == partitions.class_counts[client]
        group = partitions.groups[client]
        per_group[group] = per_group.get(group, np.zeros(4, int)) + counts
    assert sorted(seen) == list(range(2000))  # every row dealt, none twice
    shares = {g: c / c.sum() for g, c in per_group.items()}
    android, ios = shares["meter-phones-android"], shares["meter-phones-ios"]
    assert np.abs(android - ios).max() > 0.2, (android, ios)  # the groups see different classes
    # The evidence keeps counts, never rows.
    summary = partitions.summary()
    assert set(summary["dev-00001"]) == {"group", "rows", "rows_per_class"}

    again = deal(spec, Settings(), features, labels, clients=8, skew=0.3, seed=5)
    assert again.class_counts == partitions.class_counts  # seeded: the same deal


def test_too_few_rows_for_the_clients_is_one_clear_error(tmp_path, state):
    spec = phone_spec(tmp_path)
    features, labels = labelled(50)
    with pytest.raises(ValueError, match=r"training.federated.clients: 8 clients need at least 80 training rows"):
        deal(spec, Settings(), features, labels, clients=8, skew=0.5, seed=0)


def test_a_federated_spec_the_runtime_cannot_train_is_refused_in_one_line(tmp_path, state, capsys):
    """Before any Flower process starts: a categorical feature, a regression target."""
    from conftest import tabular_frame

    from pipelines.__main__ import main

    tabular_frame().to_csv(tmp_path / "data.csv", index=False)
    federated = {"mode": "federated", "framework": "torch", "architecture": "mlp", "seed": 1,
                 "federated": {"rounds": 1, "clients": 3}}
    spec = write_spec(tmp_path, "fed-colour", "data.csv", training=federated)
    assert main(["release", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "training.mode federated: clients hold numeric rows; data.features " \
        "colour is categorical" in err, err
    spec = write_spec(tmp_path, "fed-diabetes", "builtin:sklearn-diabetes", training=federated,
                      data={"source": "builtin:sklearn-diabetes", "target": "progression", "features": ["bmi", "bp"]},
                      gates={"waive": {"fairness": "no attribute of a person is used by this model here"}})
    assert main(["release", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert "training.architecture: the built-in mlp networks are classifiers (task regression" in err, err
    assert not list((state / "fleet").glob("*/federated/*")), "rows were dealt"
