"""Corrections of the device catalog from what devices measured, proposed for review.

A release projects each device class's latency from the catalog's `gflopsFp32` (and, for int8
variants, its `int8Speedup`). Devices then measure the CPU time one inference of the installed
variant takes (`measurements.cpu_ms`, the agent's smoke test). For each device class the ratio
*projected / measured* says how far the catalog's throughput is off: a class whose devices take
twice the projected time computes at half the catalog's rate.

`propose_corrections` takes, over a window of telemetry and every released model, the devices'
median CPU time per (model version, device group, device class) where the version is the one the
model's latest release estimated, beside that release's projected p50 for the class:

- `gflops_fp32` from the fp32 variants: the catalog's value times the median ratio over the
  (model, group) pairs, weighted by nothing (one pair, one vote: a big fleet of one model must
  not outvote every other architecture);
- `int8_speedup` from the int8 variants, relative to the fp32 correction of the same class (so
  only where both were measured).

A figure changes only with at least `min_devices` devices behind it. The proposal is a complete
catalog file, each corrected figure's `source` saying what measured it and what it replaced,
written as evidence (`finops/catalog/<stamp>/devices.yaml`, with `corrections.json`) and,
on request, to a file; it is never applied by itself: a person reviews it and points
`EDGE_DEVICE_CATALOG` at it.
"""

from __future__ import annotations

import json
import statistics
from datetime import datetime, timezone
from pathlib import Path

import yaml
from pydantic import Field

from pipelines.records import Record
from pipelines.settings import Settings, get_settings

INT8 = ("dynamic", "static")


class Observation(Record):
    """One model version on one device class of one group: projected against measured."""

    model: str
    version: str
    group: str
    device_class: str
    variant: str
    devices: int
    projected_ms: float
    measured_cpu_ms: float

    @property
    def ratio(self) -> float:
        return self.projected_ms / self.measured_cpu_ms


class Correction(Record):
    device_class: str
    figure: str = Field(description="gflops_fp32 or int8_speedup")
    before: float
    after: float
    ratio: float = Field(description="The median of projected / measured over the observations.")
    devices: int
    observations: list[str]
    source: str


class CatalogProposal(Record):
    since: str
    until: str
    min_devices: int
    observations: list[Observation]
    corrections: list[Correction]
    left_out: list[str] = Field(default_factory=list, description="Classes not corrected, and why.")
    catalog_yaml: str = Field(description="The whole catalog with the corrections, for review.")
    evidence: dict[str, str] = Field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"Device catalog corrections from devices' measurements, {self.since} to {self.until} "
               f"(at least {self.min_devices} devices per figure):"]
        if self.corrections:
            out.append(f"  {'device class':<18} {'figure':<13} {'catalog':>9} {'measured':>9} {'change':>7} {'devices':>8}")
            for c in self.corrections:
                out.append(f"  {c.device_class:<18} {c.figure:<13} {c.before:>9.3g} {c.after:>9.3g} "
                           f"{c.after / c.before - 1:>+7.0%} {c.devices:>8}")
        else:
            out.append("  no correction")
        out += [f"  not corrected: {why}" for why in self.left_out]
        out += [f"  {name}: {uri}" for name, uri in self.evidence.items()]
        return out


def _released_models(settings: Settings) -> list[str]:
    from pipelines.storage import ObjectStore

    store = ObjectStore(settings.store_url, settings.s3_endpoint_url)
    return sorted({key.split("/")[1] for key in store.list_keys("releases/") if key.endswith("/latest.json")})


def observations(model: str, since: datetime, until: datetime, settings: Settings) -> list[Observation]:
    """The devices' median CPU time per inference beside the latest release's projection, per
    device group and device class of the estimated version."""
    from pipelines.edge.telemetry import read_records
    from pipelines.finops.cost import CostEstimate
    from pipelines.release import latest_summary
    from pipelines.storage import ObjectStore

    summary = latest_summary(model, settings)
    if summary is None or summary.cost is None:
        return []
    estimate = CostEstimate.model_validate(summary.cost)
    version = str(summary.model_version)
    latest: dict[tuple[str, str, str], float] = {}
    for record in read_records(ObjectStore(settings.telemetry_url, settings.s3_endpoint_url), model, since, until):
        measured = record.get("measurements")
        if record.get("kind", "status") != "status" or str(record.get("version")) != version \
                or not isinstance(measured, dict) or not isinstance(measured.get("cpu_ms"), (int, float)) \
                or measured["cpu_ms"] <= 0:
            continue
        latest[(str(record.get("group")), str(record.get("device_class")), record["device_id"])] = measured["cpu_ms"]
    by_cohort: dict[tuple[str, str], list[float]] = {}
    for (group, device_class, _), cpu_ms in latest.items():
        by_cohort.setdefault((group, device_class), []).append(cpu_ms)
    found = []
    groups = {g.group: g for g in estimate.groups}
    for (group, device_class), values in sorted(by_cohort.items()):
        estimated = groups.get(group)
        if estimated is None:
            continue
        projected = [f["latency_p50_ms"] for f in estimated.inputs.get("fleet_groups", {}).values()
                     if f.get("device_class") == device_class and f.get("latency_p50_ms")]
        if not projected:
            continue
        found.append(Observation(model=model, version=version, group=group, device_class=device_class,
                                 variant=estimated.variant, devices=len(values), projected_ms=float(projected[0]),
                                 measured_cpu_ms=float(statistics.median(values))))
    return found


def propose_corrections(since: datetime, until: datetime, settings: Settings | None = None,
                        models: list[str] | None = None, min_devices: int = 20,
                        catalog_path: Path | None = None) -> CatalogProposal:
    """Corrections of the catalog's throughput figures from the devices' measurements, as a
    reviewed-by-a-person proposal (nothing is applied)."""
    from pipelines.finops.catalog import CATALOG_PATH, load_catalog

    settings = settings or get_settings()
    path = Path(catalog_path or settings.device_catalog or CATALOG_PATH)
    load_catalog(path)  # the catalog must be valid before it is corrected
    raw = yaml.safe_load(path.read_text())
    seen: list[Observation] = []
    for model in models or _released_models(settings):
        seen += observations(model, since, until, settings)
    window = f"{since.date().isoformat()} to {until.date().isoformat()}"
    corrections, left_out = [], []
    for device_class in sorted({o.device_class for o in seen}):
        if device_class not in raw["classes"]:
            left_out.append(f"{device_class}: not in the catalog")
            continue
        fp32 = [o for o in seen if o.device_class == device_class and o.variant not in INT8]
        int8 = [o for o in seen if o.device_class == device_class and o.variant in INT8]
        fp32_ratio = None
        for figure, subset in (("gflops_fp32", fp32), ("int8_speedup", int8)):
            devices = sum(o.devices for o in subset)
            if not subset:
                continue
            if devices < min_devices:
                left_out.append(f"{device_class} {figure}: {devices} devices measured, fewer than {min_devices}")
                continue
            ratio = statistics.median(o.ratio for o in subset)
            if figure == "int8_speedup":
                if fp32_ratio is None:
                    left_out.append(f"{device_class} int8_speedup: no fp32 variant measured on the class to "
                                    "separate it from the throughput")
                    continue
                ratio /= fp32_ratio
            else:
                fp32_ratio = ratio
            entry = raw["classes"][device_class][figure]
            before = float(entry["value"])
            after = round(before * ratio, 4)
            names = [f"{o.model} v{o.version} ({o.variant}, group {o.group}, {o.devices} devices)" for o in subset]
            source = (f"measured: median CPU time per inference on {devices} devices ({'; '.join(names)}), "
                      f"{window}, against the release's projection; replaces {before:g} "
                      f"({entry.get('source', 'no source')})")
            entry.update(value=after, source=source[:1000], assumption=False)
            corrections.append(Correction(device_class=device_class, figure=figure, before=before, after=after,
                                          ratio=round(ratio, 4), devices=devices, observations=names, source=source))
    header = (f"# Device catalog with corrections measured on devices ({window}); proposed for review.\n"
              f"# Corrected: {', '.join(f'{c.device_class}.{c.figure}' for c in corrections) or 'nothing'}.\n")
    return CatalogProposal(since=since.isoformat(timespec="seconds"), until=until.isoformat(timespec="seconds"),
                           min_devices=min_devices, observations=seen, corrections=corrections, left_out=left_out,
                           catalog_yaml=header + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True, width=120))


def save_proposal(proposal: CatalogProposal, settings: Settings | None = None) -> CatalogProposal:
    """Write the proposal as evidence: `finops/catalog/<stamp>/devices.yaml` and `corrections.json`."""
    from pipelines.storage import ObjectStore

    settings = settings or get_settings()
    store = ObjectStore(settings.store_url, settings.s3_endpoint_url)
    folder = f"finops/catalog/{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"
    evidence = {"devices.yaml": store.put_bytes(proposal.catalog_yaml.encode(), f"{folder}/devices.yaml")}
    record = proposal.model_copy(update={"evidence": evidence})
    evidence["corrections.json"] = store.put_bytes(
        json.dumps(record.model_dump(mode="json", exclude={"catalog_yaml"}), indent=2).encode(),
        f"{folder}/corrections.json")
    return proposal.model_copy(update={"evidence": evidence})
