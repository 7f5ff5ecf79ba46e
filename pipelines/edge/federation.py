"""The embedded federation's clients: simulated devices of a spec's target groups, each holding
its own rows in its own folder.

On a real fleet the rows never leave the devices; in the embedded set-up they start central,
so the train stage deals the training rows out once, before Flower starts, and only the
devices' processes (the SuperNodes) read them. Devices are picked as the fleet simulator picks
them (`assign_groups` over the fleet groups the spec's targets select, ids `dev-00001`...,
folders under `<state>/fleet/<device id>/`); the rows are split non-IID by device group: each
class is shared among the groups in Dirichlet(`skew`) proportions, then dealt evenly to a
group's devices. With a single group, each device is its own unit of skew.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines.edge.simulator import assign_groups
from pipelines.settings import Settings
from pipelines.specs import ModelSpec

# A client with fewer rows cannot hold out rows for its own evaluation and still train.
MIN_ROWS = 10


@dataclass
class Partitions:
    """Client id -> its folder (`features.npy`, `labels.npy`), its group, its rows per class."""

    folders: dict[str, Path]
    groups: dict[str, str]
    class_counts: dict[str, list[int]] = field(default_factory=dict)

    def summary(self) -> dict:
        """What the evidence keeps: per client, its group and rows per class (no rows)."""
        return {client: {"group": self.groups[client], "rows": int(sum(self.class_counts[client])),
                         "rows_per_class": self.class_counts[client]} for client in self.folders}


def target_groups(spec: ModelSpec, settings: Settings) -> list:
    """The fleet groups any of the spec's targets select."""
    from pipelines.finops.catalog import load_catalog, load_fleet

    fleet = load_fleet(settings.fleet_path, load_catalog(settings.device_catalog))
    chosen = [g for g in fleet.groups
              if any(g.selected_by(t.selector.match_labels) for t in spec.targets) and g.devices > 0]
    if not chosen:
        raise ValueError(f"no group of the fleet file {settings.fleet_path} is selected by the spec's targets")
    return chosen


def _shares(rng: np.random.Generator, units: int, classes: int, skew: float) -> np.ndarray:
    """[classes, units]: each class's share per unit, Dirichlet(skew)."""
    return rng.dirichlet(np.full(units, skew), size=classes)


def deal(spec: ModelSpec, settings: Settings, features: np.ndarray, labels: np.ndarray, clients: int,
         skew: float, seed: int) -> Partitions:
    """Write each client's rows to `<state>/fleet/<device id>/federated/<model>/`; a previous
    deal of this model's rows is removed first."""
    if len(features) != len(labels):
        raise ValueError(f"{len(features)} feature rows and {len(labels)} labels")
    if len(labels) < clients * MIN_ROWS:
        raise ValueError(f"training.federated.clients: {clients} clients need at least {clients * MIN_ROWS} "
                         f"training rows ({MIN_ROWS} each), the split has {len(labels)}")
    picks = assign_groups(target_groups(spec, settings), clients, seed)
    devices = [f"dev-{index:05d}" for index in range(1, clients + 1)]
    group_of = {device: group.name for device, group in zip(devices, picks)}
    names = sorted(set(group_of.values()))
    by_device = len(names) == 1
    units = devices if by_device else names
    members = {unit: [d for d in devices if (d == unit if by_device else group_of[d] == unit)] for unit in units}

    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    shares = _shares(rng, len(units), len(classes), skew)
    rows: dict[str, list[int]] = {device: [] for device in devices}
    for class_index, value in enumerate(classes):
        positions = rng.permutation(np.flatnonzero(labels == value))
        cuts = (np.cumsum(shares[class_index])[:-1] * len(positions)).round().astype(int)
        for unit, part in zip(units, np.split(positions, cuts)):
            owners = members[unit]
            for offset, position in enumerate(part):
                rows[owners[offset % len(owners)]].append(int(position))
    # Every client keeps MIN_ROWS: a starved one takes rows from the largest.
    for device in devices:
        while len(rows[device]) < MIN_ROWS:
            donor = max(devices, key=lambda d: len(rows[d]))
            rows[device].append(rows[donor].pop())

    root = settings.state / "fleet"
    partitions = Partitions(folders={}, groups=group_of)
    for device in devices:
        folder = root / device / "federated" / spec.name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        own = np.asarray(sorted(rows[device]), dtype=np.int64)
        np.save(folder / "features.npy", np.asarray(features[own], dtype=np.float32), allow_pickle=False)
        np.save(folder / "labels.npy", np.asarray(labels[own], dtype=np.int64), allow_pickle=False)
        partitions.folders[device] = folder
        partitions.class_counts[device] = [int((labels[own] == value).sum()) for value in classes]
    return partitions
