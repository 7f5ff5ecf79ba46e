"""Device catalog (package data) and fleet file (user configuration), validated strictly.

Every figure is a `Sourced` value: the number, where it comes from, and whether it is an
assumption. Reports carry the flag, so nobody mistakes a guess for a measurement.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from pipelines.specs import SpecError, format_validation_error

CATALOG_PATH = Path(__file__).with_name("devices.yaml")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, alias_generator=to_camel, validate_by_alias=True,
                              validate_by_name=False, serialize_by_alias=True)


class Sourced(_Strict):
    value: float = Field(ge=0)
    source: str = Field(min_length=3)
    assumption: bool = False


class DeviceClass(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str
    gflops_fp32: Sourced
    int8_speedup: Sourced
    memory_bytes: Sourced
    power_active_w: Sourced
    power_idle_w: Sourced


class Reference(BaseModel):
    """A published latency of a standard architecture on one device class, with its source.

    The estimator's projections are compared with these (bench/estimator_accuracy.py). A
    device class with no primary source for its throughput may be anchored on ONE of its
    references (`anchor: true`); the others are then held out, and only they measure how
    far projections are from published figures.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, description="architecture as bench/reference_models.py names it")
    device_class: str
    latency_ms: float = Field(gt=0)
    threads: int = Field(ge=1)
    runtime: str = Field(min_length=2)
    source: str = Field(min_length=3, description="publication, table or file the figure is taken from")
    anchor: bool = False
    note: str = ""


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    classes: dict[str, DeviceClass]
    references: list[Reference] = []

    @model_validator(mode="after")
    def _references_name_known_classes(self) -> Catalog:
        anchors: dict[str, int] = {}
        for index, ref in enumerate(self.references):
            if ref.device_class not in self.classes:
                raise ValueError(f"references[{index}]: unknown device class {ref.device_class!r}")
            anchors[ref.device_class] = anchors.get(ref.device_class, 0) + ref.anchor
        for name, count in anchors.items():
            if count > 1:
                raise ValueError(f"references: {name} is anchored on {count} figures; at most one "
                                 "(the others are held out to measure the projection)")
        return self


class Prices(_Strict):
    egress_usd_per_gb: Sourced
    electricity_usd_per_kwh: Sourced
    training_usd_per_hour: Sourced


class FleetGroup(_Strict):
    name: str
    labels: dict[str, str] = Field(min_length=1)
    device_class: str
    devices: int = Field(ge=0)
    inferences_per_device_per_day: float = Field(ge=0)
    ota_updates_per_month: float = Field(ge=0)
    telemetry_bytes_per_device_per_day: float = Field(ge=0)

    def selected_by(self, match_labels: dict[str, str]) -> bool:
        return all(self.labels.get(k) == v for k, v in match_labels.items())


class Fleet(_Strict):
    prices: Prices
    groups: list[FleetGroup] = Field(min_length=1)


def _load(path: Path, kind):
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise SpecError(f"{path}: cannot read: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML: {error}") from None
    try:
        return kind.model_validate(data)
    except ValidationError as error:
        raise SpecError(format_validation_error(str(path), error)) from None


def load_catalog(path: Path | None = None) -> Catalog:
    """The device catalog at `path` (EDGE_DEVICE_CATALOG, a reviewed correction); default: the shipped one."""
    return _load(path or CATALOG_PATH, Catalog)


def load_fleet(path: Path, catalog: Catalog) -> Fleet:
    """The fleet file; every group's device class must be in the catalog."""
    path = Path(path)
    fleet = _load(path, Fleet)
    for index, group in enumerate(fleet.groups):
        if group.device_class not in catalog.classes:
            raise SpecError(f"{path}: groups[{index}].deviceClass: unknown device class {group.device_class!r}; "
                            f"known: {', '.join(sorted(catalog.classes))}")
    return fleet
