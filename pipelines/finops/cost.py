"""What a model will cost on the fleet, per device group, before it ships.

Inputs: the model's graph profile (FLOPs per operator class, weights, activations), its
latency measured on the build host (each variant in its own process) and the host's
calibration (a rate per operator class, a cost per node and per run), the device catalog,
and the fleet file. An fp32 latency is the measured host latency scaled by the device's
throughput ratio; an int8 latency starts from the *measured* host int8 latency and swaps
the host's calibrated int8 rates for the device's (its fp32 rate times its int8 speedup),
class by class (`device_latency_ms`, docs/estimator.md). Every figure records its inputs.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from pydantic import Field

from pipelines.finops.catalog import Catalog, DeviceClass, Fleet, FleetGroup
from pipelines.gates import Breach, Check, failed, number
from pipelines.records import GateVerdict, Record, money, usd
from pipelines.specs import ModelSpec, parse_quantity

if TYPE_CHECKING:
    from pipelines.finops.profile import HostCalibration

DAYS_PER_MONTH = 30
INT8_VARIANTS = ("dynamic", "static")


class VariantFigures(Record):
    """One candidate variant as the projection needs it."""

    flops: int
    memory_bytes: int = Field(description="max(graph weights + peak activations, measured RSS growth)")
    artifact_bytes: int


class HostVariant(Record):
    """One variant as measured and profiled on the build host (for the per-class projection)."""

    latency_p50_ms: float
    latency_p95_ms: float
    flops_by_class: dict[str, int] = {}
    nodes: int = 0
    nodes_by_class: dict[str, int] = {}
    matmul_weight_bytes: int = 0


class HostFigures(Record):
    """What was measured on the build host, the basis of every projection.

    `gflops` is the host's single-thread compute peak (the fastest dense class, what HPL
    measures on a device), the figure a device's `gflops_fp32` is compared with. The per-class calibration (`gflops_by_class`, `gflops_by_weights_mib`,
    `node_ms`) and the per-variant measurements (`measured`) are empty in figures recorded
    before they existed; int8 variants are then projected from the fp32 latency as before.
    """

    gflops: float
    overhead_ms: float
    fp32_latency_p50_ms: float
    fp32_latency_p95_ms: float
    train_seconds: float
    variants: dict[str, VariantFigures]
    gflops_by_class: dict[str, float] = {}
    gflops_by_weights_mib: dict[str, float] = {}
    node_ms: float = 0.0
    node_ms_by_class: dict[str, float] = {}
    measured: dict[str, HostVariant] = {}

    def calibration(self) -> HostCalibration:
        """The host calibration these figures carry (`pipelines.finops.profile.HostCalibration`)."""
        from pipelines.finops.profile import HostCalibration

        return HostCalibration(gflops=self.gflops, overhead_ms=self.overhead_ms, node_ms=self.node_ms,
                               node_ms_by_class=self.node_ms_by_class, gflops_by_class=self.gflops_by_class,
                               gflops_by_weights_mib=self.gflops_by_weights_mib, peak_gflops=self.gflops)


class GroupCost(Record):
    group: str
    fleet_groups: list[str]
    device_classes: list[str]
    devices: int
    variant: str
    latency_p50_ms: float
    latency_p95_ms: float
    memory_bytes: int
    energy_j_per_inference: float
    inferences_per_month: float
    energy_kwh_per_month: float
    energy_usd: float
    ota_gb_per_month: float
    ota_usd: float
    telemetry_gb_per_month: float
    telemetry_usd: float
    total_usd: float
    assumptions: list[str] = Field(default_factory=list)
    inputs: dict = Field(default_factory=dict)


class CostEstimate(Record):
    model: str
    variant: str = Field(description="The base variant; groups may ship another (GroupCost.variant).")
    cost_center: str
    project: str
    host: HostFigures
    groups: list[GroupCost]
    releases_per_month: float
    training_usd_per_month: float
    total_usd_per_month: float
    monthly_budget_usd: float
    prices: dict

    def group_variants(self) -> dict[str, str]:
        return {g.group: g.variant for g in self.groups}

    def brief(self) -> dict:
        """What the manifest carries, and what the next release diffs against."""
        return {
            "totalUsdPerMonth": money(self.total_usd_per_month),
            "budgetUsdPerMonth": self.monthly_budget_usd,
            "groups": {g.group: {"variant": g.variant, "usdPerMonth": money(g.total_usd),
                                 "energyWhPerDay": round(g.energy_kwh_per_month * 1000 / DAYS_PER_MONTH, 3),
                                 "egressGbPerMonth": round(g.ota_gb_per_month + g.telemetry_gb_per_month, 4),
                                 "latencyP95Ms": round(g.latency_p95_ms, 4)} for g in self.groups},
        }


def releases_per_month(schedule: str | None) -> float:
    """How often the spec's schedule fires in 30 days (a manual-only spec: once)."""
    if not schedule or schedule == "@once":
        return 1.0
    from croniter import croniter

    start = datetime(2026, 1, 5, tzinfo=timezone.utc)  # a fixed Monday: the count must not depend on today
    end = start + timedelta(days=DAYS_PER_MONTH)
    runs, it = 0, croniter(schedule, start)
    while it.get_next(datetime) <= end:
        runs += 1
    return float(runs)


_INT8_CLASSES = {"int8_matmul": "matmul", "int8_conv": "conv"}


def _int8_ms(host: HostFigures, measured: HostVariant, device: DeviceClass) -> tuple[float, float]:
    """(host model ms, device model ms) of an int8 variant's profile, class by class.

    On the host every class runs at its calibrated rate. On the device every class runs at
    the host rate times k = device gflops_fp32 / host compute peak (the device is assumed to
    keep the host's ratios between classes; the per-node and per-run costs scale by 1/k
    too), except the integer classes: those run at the device's rate of their float
    counterpart (batch-1 MatMul, dense convolution) times the device class's int8 speedup, in
    place of the host's own int8 rate.
    """
    calibration = host.calibration()
    k = device.gflops_fp32.value / host.gflops
    host_ms = device_ms = 0.0
    for op_class, flops in measured.flops_by_class.items():
        if op_class == "fused" or not flops:
            continue
        if op_class in _INT8_CLASSES:
            host_rate = calibration.class_gflops(op_class)
            device_rate = k * calibration.class_gflops(_INT8_CLASSES[op_class]) * device.int8_speedup.value
        else:
            host_rate = calibration.class_gflops(op_class, measured.matmul_weight_bytes)
            device_rate = k * host_rate
        host_ms += flops / (host_rate * 1e9) * 1e3
        device_ms += flops / (device_rate * 1e9) * 1e3
    by_class = measured.nodes_by_class or {"elementwise": measured.nodes}
    fixed = host.overhead_ms + sum(n * calibration.node_cost_ms(c) for c, n in by_class.items())
    return host_ms + fixed, device_ms + fixed / k


def device_latency_ms(host_ms: float, host: HostFigures, device: DeviceClass, variant: str) -> tuple[float, float]:
    """(latency, lower bound) on a device class, from a host latency at one percentile.

    `host_ms` is the host's fp32 latency at the percentile wanted (p50 or p95). fp32: scaled
    by the throughput ratio, host compute peak / device gflops_fp32. With the per-class
    model every class's rate scales by that same ratio (the device is assumed to keep the
    host's ratios between classes), so the projection is that one ratio.

    int8, when the host measured the variant and calibrated its int8 classes: the measured
    host int8 latency at the same percentile, times device model / host model of the
    variant's own profile (`_int8_ms`): the host's int8 speed, good or bad, is replaced by
    the device's fp32 rate times its int8 speedup, class by class, and the rest of the
    measurement is kept. Without those figures (older records), the fp32 latency scaled by
    the throughput ratio and divided by the device's int8 speedup, as before.

    The lower bound is every FLOP at the device's peak (times the int8 speedup for int8).
    """
    int8 = variant in INT8_VARIANTS
    speedup = device.int8_speedup.value if int8 else 1.0
    device_gflops = device.gflops_fp32.value * speedup
    measured = host.measured.get(variant)
    if int8 and measured is not None and measured.flops_by_class and any(
            c in host.gflops_by_class for c in _INT8_CLASSES):
        # The variant's latency at the percentile of the fp32 one given.
        p95 = host_ms == host.fp32_latency_p95_ms and host_ms != host.fp32_latency_p50_ms
        base = measured.latency_p95_ms if p95 else measured.latency_p50_ms
        host_model, device_model = _int8_ms(host, measured, device)
        scaled = base * device_model / host_model
    else:
        scaled = host_ms * host.gflops / device.gflops_fp32.value / speedup
    floor = host.variants[variant].flops / (device_gflops * 1e9) * 1e3
    return max(scaled, floor), floor


def _group_cost(target, fleet_groups: list[FleetGroup], catalog: Catalog, fleet: Fleet, host: HostFigures,
                variant: str) -> GroupCost:
    artifact_bytes = host.variants[variant].artifact_bytes
    prices = fleet.prices
    p50 = p95 = energy_j = 0.0
    memory = 0
    inferences = telemetry_gb = ota_gb = energy_kwh = 0.0
    assumptions: set[str] = set()
    per_fleet = {}
    for group in fleet_groups:
        device = catalog.classes[group.device_class]
        for name, figure in device:
            if getattr(figure, "assumption", False):
                assumptions.add(f"{group.device_class}.{name}")
        g_p50, floor = device_latency_ms(host.fp32_latency_p50_ms, host, device, variant)
        g_p95, _ = device_latency_ms(host.fp32_latency_p95_ms, host, device, variant)
        g_energy = device.power_active_w.value * g_p50 / 1e3
        g_inferences = group.devices * group.inferences_per_device_per_day * DAYS_PER_MONTH
        g_kwh = g_inferences * g_energy / 3.6e6
        g_ota = artifact_bytes * group.devices * group.ota_updates_per_month / 1e9
        g_tel = group.telemetry_bytes_per_device_per_day * group.devices * DAYS_PER_MONTH / 1e9
        p50, p95 = max(p50, g_p50), max(p95, g_p95)
        energy_j = max(energy_j, g_energy)
        memory = max(memory, host.variants[variant].memory_bytes)
        inferences += g_inferences
        energy_kwh += g_kwh
        ota_gb += g_ota
        telemetry_gb += g_tel
        per_fleet[group.name] = {
            "device_class": group.device_class, "devices": group.devices,
            "latency_p50_ms": round(g_p50, 6), "latency_floor_ms": round(floor, 6),
            "energy_j_per_inference": g_energy, "inferences_per_month": g_inferences,
            "formula": "fp32: latency = host_fp32_ms x host_peak_gflops / device_gflops_fp32; "
                       "int8 (host int8 measured and calibrated): latency = host_int8_ms x device_model_ms / "
                       "host_model_ms, per-class model of the variant's profile, device int8 rate = "
                       "device fp32 class rate x int8_speedup, other classes, nodes and per-run cost "
                       "scaled by device_gflops_fp32 / host_peak_gflops; otherwise host_fp32_ms x "
                       "host_peak_gflops / device_gflops_fp32 / int8_speedup; "
                       "at least flops / (device_gflops_fp32 x int8_speedup); energy = power_active_w x latency",
        }
    for name, price in prices:
        if price.assumption:
            assumptions.add(f"prices.{name}")
    energy_usd = energy_kwh * prices.electricity_usd_per_kwh.value
    ota_usd = ota_gb * prices.egress_usd_per_gb.value
    telemetry_usd = telemetry_gb * prices.egress_usd_per_gb.value
    return GroupCost(
        group=target.name, fleet_groups=[g.name for g in fleet_groups],
        device_classes=sorted({g.device_class for g in fleet_groups}),
        devices=sum(g.devices for g in fleet_groups), variant=variant,
        latency_p50_ms=p50, latency_p95_ms=p95, memory_bytes=memory, energy_j_per_inference=energy_j,
        inferences_per_month=inferences, energy_kwh_per_month=energy_kwh, energy_usd=energy_usd,
        ota_gb_per_month=ota_gb, ota_usd=ota_usd, telemetry_gb_per_month=telemetry_gb, telemetry_usd=telemetry_usd,
        total_usd=energy_usd + ota_usd + telemetry_usd, assumptions=sorted(assumptions),
        inputs={"fleet_groups": per_fleet, "artifact_bytes": artifact_bytes,
                "electricity_usd_per_kwh": prices.electricity_usd_per_kwh.value,
                "egress_usd_per_gb": prices.egress_usd_per_gb.value},
    )


def _choose(target, options: dict[str, GroupCost], base: str, memory_cap: float | None = None) -> tuple[GroupCost, str]:
    """The variant a device group ships: the cheapest that fits the memory it may use
    (`memory_cap`: the spec's limit and its devices' memory) and meets its SLO (ties: the base,
    then the smaller file); when none does, the fastest that fits, or the fastest."""
    slo = target.latency_slo_ms
    fitting = [c for c in options.values() if memory_cap is None or c.memory_bytes <= memory_cap]
    meeting = [c for c in fitting if slo is None or c.latency_p95_ms <= slo]
    if meeting:
        best = min(meeting, key=lambda c: (round(c.total_usd, 6), c.variant != base, c.inputs["artifact_bytes"]))
        others = ", ".join(f"{c.variant} {usd(c.total_usd)}" for c in options.values() if c is not best)
        why = f"cheapest within the SLO ({usd(best.total_usd)}/month" + (f"; {others}" if others else "") + ")"
        left_out = [c.variant for c in options.values() if c not in fitting]
        if left_out:
            why += f"; {', '.join(left_out)} over the memory it may use"
    elif fitting and slo is not None:
        best = min(fitting, key=lambda c: c.latency_p95_ms)
        why = f"no variant meets the {slo:g} ms SLO; the fastest that fits in memory ({best.latency_p95_ms:.3f} ms)"
    else:
        best = min(options.values(), key=lambda c: c.latency_p95_ms)
        why = (f"no variant meets the {slo:g} ms SLO; the fastest ({best.latency_p95_ms:.3f} ms)" if fitting
               else f"no variant fits the memory it may use; the fastest ({best.latency_p95_ms:.3f} ms)")
    return best, why


def estimate(spec: ModelSpec, catalog: Catalog, fleet: Fleet, host: HostFigures, variant: str,
             eligible: list[str] | None = None) -> CostEstimate:
    """Project cost per device group of the spec, plus training, against the spec's budget.

    `variant` is the base variant; with `eligible` variants (all within the accuracy budget)
    each device group gets the one that meets its SLO at the lowest cost.
    """
    groups = []
    for target in spec.targets:
        matched = [g for g in fleet.groups if g.selected_by(target.selector.match_labels)]
        if not matched:
            raise ValueError(f"targets[{target.name}]: no fleet group has the labels "
                             f"{target.selector.match_labels}: the fleet file cannot price it")
        options = {v: _group_cost(target, matched, catalog, fleet, host, v)
                   for v in dict.fromkeys([variant, *(eligible or [])])}
        caps = [catalog.classes[g.device_class].memory_bytes.value for g in matched if g.device_class in catalog.classes]
        limit = target.resources_over(spec.resources).limits.memory
        if limit:
            caps.append(parse_quantity(limit))
        cap = min(caps) if caps else None
        chosen, why = _choose(target, options, variant, cap)
        # Every eligible variant's figures for this group: what a budget policy may switch to.
        alternatives = {v: {"usd_per_month": round(c.total_usd, 6), "latency_p95_ms": round(c.latency_p95_ms, 4),
                            "memory_bytes": c.memory_bytes, "fits_memory": cap is None or c.memory_bytes <= cap,
                            "meets_slo": target.latency_slo_ms is None or c.latency_p95_ms <= target.latency_slo_ms}
                        for v, c in options.items()}
        groups.append(chosen.model_copy(update={"inputs": {**chosen.inputs, "variant_choice": why,
                                                           "variants": alternatives}}))
    per_month = releases_per_month(spec.schedule)
    training = host.train_seconds / 3600 * fleet.prices.training_usd_per_hour.value * per_month
    return CostEstimate(
        model=spec.name, variant=variant, cost_center=spec.finops.cost_center, project=spec.finops.project,
        host=host, groups=groups, releases_per_month=per_month, training_usd_per_month=training,
        total_usd_per_month=sum(g.total_usd for g in groups) + training,
        monthly_budget_usd=spec.finops.monthly_budget_usd,
        prices={name: price.model_dump(mode="json") for name, price in fleet.prices},
    )


# -- gates ---------------------------------------------------------------------------------------
def _mib(value: float) -> str:
    return f"{value / 2**20:.1f} MiB"


def memory_checks(thresholds: dict, observed: dict) -> list[Check]:
    """The edge memory rule: per device group, the model's memory at most its limits.memory (the
    group's own `<group>.limits.memory`, from targets[].resources, else the spec-wide
    resources.limits.memory) and at most the memory of each device class the group runs on."""
    found = []
    for key, value in observed.items():
        group, needed = key.removesuffix(".memory_bytes"), number(value)
        if group == key or needed is None:
            continue
        own = thresholds.get(f"{group}.limits.memory")
        limit = own or thresholds.get("limits.memory")
        if limit:
            allowed = parse_quantity(str(limit))
            found.append(Check("memory_bytes", needed, allowed, "max",
                               f"targets[{group}].resources.limits.memory" if own else "resources.limits.memory",
                               group=group, limit_text=str(limit), passed=not needed > allowed))
        for name, device in thresholds.items():  # "<group>.<device class>.memory_bytes"
            head, _, device_class = name.removesuffix(".memory_bytes").partition(".")
            memory = number(device) if head == group and device_class and name.endswith(".memory_bytes") else None
            if memory is not None:
                found.append(Check("memory_bytes", needed, memory, "max", f"classes.{device_class}.memory_bytes",
                                   group=group, device_class=device_class, passed=not needed > memory))
    return found


def memory_breaches(thresholds: dict, observed: dict) -> list[Breach]:
    """The edge memory checks the figures fail."""
    return failed(memory_checks(thresholds, observed))


def memory_verdict(spec: ModelSpec, estimate_: CostEstimate, catalog: Catalog) -> GateVerdict:
    limit = spec.resources.limits.memory
    thresholds, observed = {"limits.memory": limit}, {}
    targets = {t.name: t for t in spec.targets}
    own = {}  # groups with a memory limit of their own (targets[].resources.limits.memory)
    for group in estimate_.groups:
        target = targets.get(group.group)
        group_limit = target.resources.limits.memory if target is not None and target.resources else None
        if group_limit:
            thresholds[f"{group.group}.limits.memory"] = own[group.group] = group_limit
        observed[f"{group.group}.memory_bytes"] = group.memory_bytes
        for name in group.device_classes:
            thresholds[f"{group.group}.{name}.memory_bytes"] = catalog.classes[name].memory_bytes.value
    problems = [f"{b.group}: {_mib(b.observed)} > "
                + (f"{b.device_class} memory {_mib(b.limit)}" if b.device_class
                   else f"{'its own ' if b.group in own else ''}limits.memory {b.limit_text}")
                for b in memory_breaches(thresholds, observed)]
    worst = max(g.memory_bytes for g in estimate_.groups)
    reason = "; ".join(problems) if problems else (
        f"{_mib(worst)} within limits.memory {limit}" if limit else f"{_mib(worst)}; the spec sets no memory limit")
    if own and not problems:
        reason += "; " + ", ".join(f"{name} within its own limits.memory {value}" for name, value in own.items())
    return GateVerdict(gate="edge_memory", passed=not problems, thresholds=thresholds, observed=observed,
                       reason=reason)


def latency_checks(thresholds: dict, observed: dict) -> list[Check]:
    """The edge latency rule: each device group's projected p95 at most its
    targets[].latencySloMs (a group without an SLO has nothing to check)."""
    found = []
    for key, value in observed.items():
        group = key.removesuffix(".latency_p95_ms")
        p95, slo = number(value), number(thresholds.get(f"{group}.latency_slo_ms"))
        if group != key and p95 is not None and slo is not None:
            found.append(Check("latency_p95_ms", p95, slo, "max", f"targets[{group}].latencySloMs", group=group,
                               passed=not p95 > slo))
    return found


def latency_breaches(thresholds: dict, observed: dict) -> list[Breach]:
    """The edge latency checks the figures fail."""
    return failed(latency_checks(thresholds, observed))


def latency_verdict(spec: ModelSpec, estimate_: CostEstimate) -> GateVerdict:
    observed, thresholds = {}, {}
    slos = {t.name: t.latency_slo_ms for t in spec.targets}
    for group in estimate_.groups:
        observed[f"{group.group}.latency_p95_ms"] = round(group.latency_p95_ms, 4)
        thresholds[f"{group.group}.latency_slo_ms"] = slos[group.group]
    found = latency_breaches(thresholds, observed)
    devices = {g.group: g.device_classes for g in estimate_.groups}
    problems = [f"{b.group}: p95 {b.observed:.3f} ms > SLO {b.limit:g} ms on {', '.join(devices[b.group])}"
                for b in found]
    late = {b.group for b in found}
    within = [f"{g.group} {g.latency_p95_ms:.3f}/{slos[g.group]:g} ms" for g in estimate_.groups
              if slos[g.group] is not None and g.group not in late]
    reason = "; ".join(problems) if problems else (
        "p95 within SLO: " + ", ".join(within) if within else "no latency SLO set")
    return GateVerdict(gate="edge_latency", passed=not found, thresholds=thresholds, observed=observed,
                       reason=reason)


def budget_checks(thresholds: dict, observed: dict) -> list[Check]:
    """The budget rule: the projected monthly total at most finops.monthlyBudgetUsd."""
    total, budget = number(observed.get("total_usd_per_month")), number(thresholds.get("monthly_budget_usd"))
    if total is None or budget is None:
        return []
    return [Check("total_usd_per_month", total, budget, "max", "finops.monthlyBudgetUsd", passed=total <= budget)]


def budget_breaches(thresholds: dict, observed: dict) -> list[Breach]:
    """The budget check the figures fail, if any."""
    return failed(budget_checks(thresholds, observed))


def budget_verdict(estimate_: CostEstimate) -> GateVerdict:
    """The projected total vs finops.monthlyBudgetUsd; figures recorded and written at the
    precision every page shows money (`pipelines.records.money`, `usd`)."""
    total, budget = estimate_.total_usd_per_month, estimate_.monthly_budget_usd
    observed = {"total_usd_per_month": money(total), "training_usd_per_month": money(estimate_.training_usd_per_month),
                **{f"{g.group}.usd_per_month": money(g.total_usd) for g in estimate_.groups}}
    thresholds = {"monthly_budget_usd": budget}
    passed = not budget_breaches(thresholds, observed)
    biggest = max(estimate_.groups, key=lambda g: g.total_usd)
    reason = (f"{usd(total)}/month {'within' if passed else 'exceeds'} the {usd(budget)} budget "
              f"of {estimate_.cost_center}/{estimate_.project} (largest: {biggest.group} {usd(biggest.total_usd)})")
    return GateVerdict(gate="budget", passed=passed, thresholds=thresholds, observed=observed, reason=reason)


# -- diff and export --------------------------------------------------------------------------------
def cost_diff(candidate: dict, deployed: dict | None, deployed_version: str | None) -> dict:
    """Infracost-style difference of two cost briefs (`CostEstimate.brief()`); "new" without a baseline."""
    if not deployed:
        return {"baseline": "new", "groups": {name: {"status": "new", **values}
                                              for name, values in candidate["groups"].items()},
                "deltaUsdPerMonth": candidate["totalUsdPerMonth"]}
    groups = {}
    for name, values in candidate["groups"].items():
        before = deployed.get("groups", {}).get(name)
        if before is None:
            groups[name] = {"status": "new", **values}
            continue
        groups[name] = {"status": "changed", "variant": values["variant"], "previousVariant": before.get("variant"),
                        **{f"delta{k[0].upper()}{k[1:]}": round(values[k] - before.get(k, 0), 4)
                           for k in values if k != "variant"}}
    for name in deployed.get("groups", {}):
        if name not in candidate["groups"]:
            groups[name] = {"status": "removed"}
    return {"baseline": f"v{deployed_version}", "groups": groups,
            "deltaUsdPerMonth": money(candidate["totalUsdPerMonth"] - deployed.get("totalUsdPerMonth", 0))}


def signed_usd(value: float) -> str:
    return ("+" if money(value) >= 0 else "-") + usd(abs(value))


def diff_lines(diff: dict) -> list[str]:
    """The diff as readable lines (commit message, summary)."""
    lines = [f"Cost vs {diff['baseline']}: {signed_usd(diff['deltaUsdPerMonth'])}/month"]
    for name, values in diff["groups"].items():
        if values["status"] == "new":
            lines.append(f"  + {name}: new, {values['variant']}, {usd(values['usdPerMonth'])}/month, "
                         f"{values['energyWhPerDay']:.3f} Wh/day, {values['egressGbPerMonth']:.2f} GB/month egress, "
                         f"p95 {values['latencyP95Ms']:.3f} ms")
        elif values["status"] == "removed":
            lines.append(f"  - {name}: no longer targeted")
        else:
            variant = (f", {values['previousVariant']} -> {values['variant']}"
                       if values.get("previousVariant") not in (None, values["variant"]) else "")
            lines.append(f"  ~ {name}: {signed_usd(values['deltaUsdPerMonth'])}/month, "
                         f"{values['deltaEnergyWhPerDay']:+.3f} Wh/day, {values['deltaEgressGbPerMonth']:+.3f} GB/month, "
                         f"p95 {values['deltaLatencyP95Ms']:+.4f} ms{variant}")
    return lines


FOCUS_COLUMNS = ["BillingCurrency", "ChargeCategory", "ChargeDescription", "ServiceName", "ConsumedQuantity",
                 "ConsumedUnit", "PricingUnit", "ListUnitPrice", "BilledCost", "EffectiveCost", "Tags",
                 "x_DeviceGroup", "x_DeviceClass", "x_ModelVersion", "x_Period", "x_Estimate"]


def focus_rows(estimate_: CostEstimate, model_version: str) -> list[dict]:
    """The estimate as FOCUS-shaped rows (costs are estimates for a 30-day month)."""
    tags = json.dumps({"finops.apexlogic.dev/cost-center": estimate_.cost_center,
                       "finops.apexlogic.dev/project": estimate_.project,
                       "app.kubernetes.io/name": estimate_.model}, sort_keys=True)
    prices = estimate_.prices
    rows = []

    def row(group: str, device_class: str, service: str, description: str, quantity: float, unit: str,
            price: float, cost: float):
        rows.append({"BillingCurrency": "USD", "ChargeCategory": "Usage", "ChargeDescription": description,
                     "ServiceName": service, "ConsumedQuantity": round(quantity, 6), "ConsumedUnit": unit,
                     "PricingUnit": unit, "ListUnitPrice": price, "BilledCost": round(cost, 6),
                     "EffectiveCost": round(cost, 6), "Tags": tags, "x_DeviceGroup": group,
                     "x_DeviceClass": device_class, "x_ModelVersion": model_version, "x_Period": "P30D",
                     "x_Estimate": True})

    for g in estimate_.groups:
        classes = ",".join(g.device_classes)
        row(g.group, classes, "Edge inference energy", f"{g.inferences_per_month:,.0f} inferences",
            g.energy_kwh_per_month, "kWh", prices["electricity_usd_per_kwh"]["value"], g.energy_usd)
        row(g.group, classes, "OTA model delivery", "model downloads", g.ota_gb_per_month, "GB",
            prices["egress_usd_per_gb"]["value"], g.ota_usd)
        row(g.group, classes, "Device telemetry", "telemetry upload", g.telemetry_gb_per_month, "GB",
            prices["egress_usd_per_gb"]["value"], g.telemetry_usd)
    row("-", "-", "Model training", f"{estimate_.releases_per_month:g} releases", estimate_.host.train_seconds / 3600
        * estimate_.releases_per_month, "Hour", prices["training_usd_per_hour"]["value"], estimate_.training_usd_per_month)
    return rows


def cost_table(estimate_: CostEstimate) -> list[str]:
    """Per-group figures as table lines (the release summary)."""
    lines = ["  device group        devices  variant   p95 ms   energy J/inf     $/month  (energy / OTA / telemetry)"]
    for g in estimate_.groups:
        lines.append(f"  {g.group:<18} {g.devices:>8,}  {g.variant:<8} {g.latency_p95_ms:>7.3f}   {g.energy_j_per_inference:>12.3g}"
                     f"   {usd(g.total_usd):>9}  ({usd(g.energy_usd)} / {usd(g.ota_usd)} / {usd(g.telemetry_usd)})")
    lines.append(f"  {'training':<18} {'':>8}  {'':<8} {'':>7}   {'':>12}   {usd(estimate_.training_usd_per_month):>9}"
                 f"  ({estimate_.releases_per_month:g} releases/month)")
    lines.append(f"  {'total':<18} {'':>8}  {'':<8} {'':>7}   {'':>12}   {usd(estimate_.total_usd_per_month):>9}"
                 f"  budget {usd(estimate_.monthly_budget_usd)}")
    return lines
