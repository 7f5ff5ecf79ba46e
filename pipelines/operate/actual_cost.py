"""Actual cost from what devices report, next to the release's estimate.

Over a window of telemetry, per model version, device group and device class:

- **energy**: the inferences devices served (their inference records' request counts) times
  the energy of one inference, the CPU time per inference the devices measured
  (`measurements.cpu_ms`, their smoke test's median) at the device class's active power from
  the catalog (`power_active_w`, with its source);
- **egress**: the bytes the devices' telemetry records took (each record as sent) and the bytes
  their installs downloaded (`measurements.downloaded_bytes`), at the fleet file's egress price;

as FOCUS rows (`ChargeCategory` Usage, `x_Estimate` false, the window as `x_Period`, the model,
version, device group, cost center and project as tags), and, per device class, the figures
the release estimated beside the measured ones (p95 latency from the served histograms, energy
per inference, and the cost per device and day) with the error of each estimate.

Counts carry the telemetry's Laplace noise where the spec asks for privacy; sums over devices
stay unbiased and negative sums are read as zero.
"""

from __future__ import annotations

import json
from datetime import datetime

from pydantic import Field

from pipelines.records import Record
from pipelines.settings import Settings, get_settings

J_PER_KWH = 3.6e6


class ClassFigures(Record):
    """One version on one device class of one group: measured, estimated, and the error."""

    version: str
    group: str
    device_class: str
    devices: int
    inferences: float
    cpu_ms_per_inference: float | None = None
    energy_j_per_inference: float | None = None
    estimated_energy_j_per_inference: float | None = None
    p95_ms: float | None = None
    estimated_p95_ms: float | None = None
    usd_per_device_day: float | None = None
    estimated_usd_per_device_day: float | None = None
    errors: dict[str, float] = Field(default_factory=dict, description="(estimate - measured) / measured per figure.")


class ActualCost(Record):
    model: str
    since: str
    until: str
    days: float
    rows: list[dict] = Field(description="FOCUS-shaped usage rows of the window.")
    classes: list[ClassFigures]
    total_usd: float
    estimated_total_usd: float | None = Field(None, description="The release's estimate over the same days.")

    def lines(self) -> list[str]:
        """The estimate-vs-actual table for people."""
        out = [f"Actual cost of {self.model} from {self.since} to {self.until} ({self.days:.2f} days): "
               f"${self.total_usd:,.4f}" + (f" (estimated ${self.estimated_total_usd:,.4f} for the whole fleet)"
                                           if self.estimated_total_usd is not None else ""),
               "", "  version  group               device class      devices  inferences  "
                   "J/inf meas  J/inf est  err     p95 ms meas  est     err"]
        for c in self.classes:
            out.append(f"  v{c.version:<7} {c.group:<19} {c.device_class:<17} {c.devices:>7,} {c.inferences:>11,.0f}  "
                       f"{_g(c.energy_j_per_inference):>10} {_g(c.estimated_energy_j_per_inference):>10} "
                       f"{_pct(c.errors.get('energy_j_per_inference')):>6}  {_g(c.p95_ms):>11} "
                       f"{_g(c.estimated_p95_ms):>7} {_pct(c.errors.get('p95_ms')):>6}")
        return out


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.0%}"


def _error(estimate: float | None, measured: float | None) -> float | None:
    if estimate is None or not measured:
        return None
    return round((estimate - measured) / measured, 4)


def actual_cost(model: str, since: datetime, until: datetime, settings: Settings | None = None) -> ActualCost:
    """The model's actual cost over [since, until) from its telemetry, next to its estimate."""
    from pipelines.edge.telemetry import cohort_stats, measured_cost, read_records
    from pipelines.finops.catalog import load_catalog
    from pipelines.finops.cost import FOCUS_COLUMNS, CostEstimate
    from pipelines.release import latest_summary
    from pipelines.storage import ObjectStore

    settings = settings or get_settings()
    summary = latest_summary(model, settings)
    if summary is None or summary.cost is None:
        raise ValueError(f"{model}: no released cost estimate yet; release the model first")
    estimate = CostEstimate.model_validate(summary.cost)
    catalog = load_catalog(settings.device_catalog)
    egress = estimate.prices["egress_usd_per_gb"]["value"]
    electricity = estimate.prices["electricity_usd_per_kwh"]["value"]
    records = read_records(ObjectStore(settings.telemetry_url, settings.s3_endpoint_url), model, since, until)
    days = max((until - since).total_seconds() / 86400, 1e-9)
    measured = {(r["version"], r["device_class"]): r for r in measured_cost(records)}
    estimated = {g.group: g for g in estimate.groups}
    tags = json.dumps({"finops.apexlogic.dev/cost-center": estimate.cost_center,
                       "finops.apexlogic.dev/project": estimate.project, "app.kubernetes.io/name": model},
                      sort_keys=True)
    period = f"{since.isoformat(timespec='seconds')}/{until.isoformat(timespec='seconds')}"
    cohorts: dict[tuple, list[dict]] = {}
    for record in records:
        key = (str(record.get("version")), record.get("group") or "unknown", record.get("device_class") or "unknown")
        cohorts.setdefault(key, []).append(record)
    rows, classes, total = [], [], 0.0

    def row(version, group, device_class, service, description, quantity, unit, price, cost):
        rows.append({column: value for column, value in zip(FOCUS_COLUMNS, (
            "USD", "Usage", description, service, round(quantity, 9), unit, unit, price, round(cost, 9),
            round(cost, 9), json.dumps({**json.loads(tags), "finops.apexlogic.dev/device-group": group,
                                        "app.kubernetes.io/version": version}, sort_keys=True),
            group, device_class, version, period, False))})

    for (version, group, device_class), cohort in sorted(cohorts.items()):
        stats = cohort_stats(cohort)
        inferences = max(0.0, stats.requests)
        devices = len({r["device_id"] for r in cohort})
        telemetry_bytes = sum(len(json.dumps(r, sort_keys=True, separators=(",", ":"))) for r in cohort)
        m = measured.get((version, device_class)) or {}
        power = catalog.classes[device_class].power_active_w.value if device_class in catalog.classes else None
        cpu_ms = m.get("cpu_ms")
        joules = cpu_ms / 1000 * power if cpu_ms is not None and power is not None else None
        kwh = inferences * joules / J_PER_KWH if joules is not None else 0.0
        download_bytes = (m.get("downloaded_bytes") or 0) * m.get("devices", 0)
        energy_usd, egress_usd = kwh * electricity, (telemetry_bytes + download_bytes) / 1e9 * egress
        row(version, group, device_class, "Edge inference energy", f"{inferences:,.0f} inferences (measured CPU time)",
            kwh, "kWh", electricity, energy_usd)
        row(version, group, device_class, "Device telemetry", "telemetry upload (as sent)", telemetry_bytes / 1e9, "GB",
            egress, telemetry_bytes / 1e9 * egress)
        row(version, group, device_class, "OTA model delivery", "model downloads (as installed)", download_bytes / 1e9,
            "GB", egress, download_bytes / 1e9 * egress)
        total += energy_usd + egress_usd
        group_estimate = estimated.get(group)
        est_device_day = (group_estimate.total_usd / max(group_estimate.devices, 1) / 30
                          if group_estimate is not None else None)
        actual_device_day = (energy_usd + egress_usd) / max(devices, 1) / days if devices else None
        p95 = stats.latency_quantile(0.95)
        est_joules = group_estimate.energy_j_per_inference if group_estimate else None
        est_p95 = group_estimate.latency_p95_ms if group_estimate else None
        errors = {name: err for name, err in (
            ("energy_j_per_inference", _error(est_joules, joules)), ("p95_ms", _error(est_p95, p95)),
            ("usd_per_device_day", _error(est_device_day, actual_device_day))) if err is not None}
        classes.append(ClassFigures(
            version=version, group=group, device_class=device_class, devices=devices, inferences=round(inferences, 1),
            cpu_ms_per_inference=cpu_ms, energy_j_per_inference=None if joules is None else round(joules, 9),
            estimated_energy_j_per_inference=est_joules, p95_ms=None if p95 is None else round(p95, 4),
            estimated_p95_ms=est_p95, usd_per_device_day=None if actual_device_day is None else round(actual_device_day, 9),
            estimated_usd_per_device_day=None if est_device_day is None else round(est_device_day, 9), errors=errors))
    estimated_total = round(estimate.total_usd_per_month * days / 30, 6)
    return ActualCost(model=model, since=since.isoformat(timespec="seconds"), until=until.isoformat(timespec="seconds"),
                      days=round(days, 4), rows=rows, classes=classes, total_usd=round(total, 9),
                      estimated_total_usd=estimated_total)
