"""Cost arithmetic against hand-computed figures; gates that fail with the numbers; the diff."""

import pytest
import yaml
from conftest import TINY_SPEC

from pipelines.finops import cost
from pipelines.finops.catalog import CATALOG_PATH, load_catalog, load_fleet
from pipelines.specs import SpecError, parse_spec

SPEC = {
    **TINY_SPEC,
    "targets": [{"name": "pis", "selector": {"matchLabels": {"kind": "pi"}}, "latencySloMs": 10}],
    "resources": {"limits": {"memory": "16Mi"}},
}
FLEET = {
    "prices": {"egressUsdPerGb": {"value": 0.1, "source": "test price"},
               "electricityUsdPerKwh": {"value": 0.2, "source": "test price"},
               "trainingUsdPerHour": {"value": 3.6, "source": "test price"}},
    "groups": [{"name": "pi-fleet", "labels": {"kind": "pi", "site": "a"}, "deviceClass": "raspberry-pi-4",
                "devices": 1000, "inferencesPerDevicePerDay": 1000, "otaUpdatesPerMonth": 2,
                "telemetryBytesPerDevicePerDay": 1_000_000}],
}


@pytest.fixture
def setup(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(FLEET))
    catalog = load_catalog()
    figures = cost.VariantFigures(flops=1_000_000, memory_bytes=8 * 2**20, artifact_bytes=50_000_000)
    host = cost.HostFigures(gflops=23.8, overhead_ms=0.005, fp32_latency_p50_ms=1.0, fp32_latency_p95_ms=2.0,
                            train_seconds=360, variants={"fp32": figures, "dynamic": figures.model_copy(
                                update={"artifact_bytes": 12_500_000, "memory_bytes": 4 * 2**20})})
    return catalog, load_fleet(path, catalog), host


def test_every_catalog_figure_has_a_source_and_phone_power_is_marked_assumed():
    catalog = load_catalog()
    assert {"raspberry-pi-4", "raspberry-pi-5", "coral-edge-tpu", "jetson-orin-nano", "rk3588"} <= set(catalog.classes)
    assert catalog.classes["raspberry-pi-4"].gflops_fp32.value == 11.9
    assert not catalog.classes["raspberry-pi-4"].gflops_fp32.assumption
    assert catalog.classes["android-phone"].power_active_w.assumption


def test_projection_matches_hand_computed_figures(setup):
    catalog, fleet, host = setup
    estimate = cost.estimate(parse_spec(SPEC), catalog, fleet, host, "fp32")
    [group] = estimate.groups
    # latency: 1.0 ms x 23.8 / 11.9 = 2.0 ms (above the floor 1e6 / 11.9e9 s = 0.084 ms)
    assert group.latency_p50_ms == pytest.approx(2.0)
    assert group.latency_p95_ms == pytest.approx(4.0)
    # energy: 7.2 W x 2 ms = 0.0144 J; 1000 x 1000 x 30 = 3e7 inferences; 3e7 x 0.0144 / 3.6e6 = 0.12 kWh
    assert group.energy_j_per_inference == pytest.approx(0.0144)
    assert group.energy_kwh_per_month == pytest.approx(0.12)
    assert group.energy_usd == pytest.approx(0.024)
    # OTA: 50 MB x 1000 devices x 2 = 100 GB -> $10; telemetry: 1 MB x 1000 x 30 = 30 GB -> $3
    assert group.ota_gb_per_month == pytest.approx(100.0) and group.ota_usd == pytest.approx(10.0)
    assert group.telemetry_gb_per_month == pytest.approx(30.0) and group.telemetry_usd == pytest.approx(3.0)
    # training: 0.1 h x $3.6 x 1 release (no schedule)
    assert estimate.training_usd_per_month == pytest.approx(0.36)
    assert estimate.total_usd_per_month == pytest.approx(0.024 + 10 + 3 + 0.36)
    # int8 on a Pi 4 (speedup 1.0) costs the same time; the host's int8 timing is never used
    assert cost.estimate(parse_spec(SPEC), catalog, fleet, host, "dynamic").groups[0].latency_p50_ms == \
        pytest.approx(2.0)
    assert "raspberry-pi-4.int8_speedup" in group.assumptions
    assert "host_int8_ms x device_model_ms / host_model_ms" in group.inputs["fleet_groups"]["pi-fleet"]["formula"]


def test_each_group_ships_the_cheapest_variant_within_its_slo(setup):
    catalog, fleet, host = setup
    spec = parse_spec(SPEC)
    estimate = cost.estimate(spec, catalog, fleet, host, "fp32", ["fp32", "dynamic"])
    [group] = estimate.groups
    # On a Pi 4 int8 runs no faster (speedup 1.0) but the file is 4x smaller: OTA 25 GB instead of 100 GB.
    assert group.variant == "dynamic" and group.ota_usd == pytest.approx(2.5)
    assert group.inputs["variant_choice"].startswith("cheapest within the SLO ($5.52/month; fp32 $13.02")
    assert estimate.group_variants() == {"pis": "dynamic"}
    slow = parse_spec({**SPEC, "targets": [{**SPEC["targets"][0], "latencySloMs": 1}]})
    [fastest] = cost.estimate(slow, catalog, fleet, host, "fp32", ["fp32", "dynamic"]).groups
    assert fastest.inputs["variant_choice"].startswith("no variant meets the 1 ms SLO")


def test_gates_pass_then_fail_with_the_numbers(setup):
    catalog, fleet, host = setup
    spec = parse_spec(SPEC)
    estimate = cost.estimate(spec, catalog, fleet, host, "fp32")
    assert cost.budget_verdict(estimate).passed
    assert cost.latency_verdict(spec, estimate).passed
    assert cost.memory_verdict(spec, estimate, catalog).passed

    tight = parse_spec({**SPEC, "finops": {**SPEC["finops"], "monthlyBudgetUsd": 5},
                        "targets": [{**SPEC["targets"][0], "latencySloMs": 3}],
                        "resources": {"limits": {"memory": "4Mi"}}})
    estimate = cost.estimate(tight, catalog, fleet, host, "fp32")
    budget = cost.budget_verdict(estimate)
    assert not budget.passed and budget.observed["total_usd_per_month"] == pytest.approx(13.38, abs=0.01)
    assert budget.reason.startswith("$13.38/month exceeds the $5.00 budget of cc-1/p")
    latency = cost.latency_verdict(tight, estimate)
    assert not latency.passed and latency.reason == "pis: p95 4.000 ms > SLO 3 ms on raspberry-pi-4"
    memory = cost.memory_verdict(tight, estimate, catalog)
    assert not memory.passed and memory.reason == "pis: 8.0 MiB > limits.memory 4Mi"


def test_diff_against_the_deployed_brief(setup):
    catalog, fleet, host = setup
    spec = parse_spec(SPEC)
    before = cost.estimate(spec, catalog, fleet, host, "fp32").brief()
    first = cost.cost_diff(before, None, None)
    assert first["baseline"] == "new" and first["groups"]["pis"]["status"] == "new"
    smaller = host.model_copy(update={"variants": {"fp32": host.variants["fp32"].model_copy(
        update={"artifact_bytes": 25_000_000})}})
    after = cost.estimate(spec, catalog, fleet, smaller, "fp32").brief()
    diff = cost.cost_diff(after, before, "4")
    assert diff["baseline"] == "v4"
    assert diff["deltaUsdPerMonth"] == pytest.approx(-5.0)
    assert diff["groups"]["pis"]["deltaEgressGbPerMonth"] == pytest.approx(-50.0)
    assert cost.diff_lines(diff)[0] == "Cost vs v4: -$5.00/month"


def test_focus_rows_carry_the_columns_and_tags(setup):
    catalog, fleet, host = setup
    estimate = cost.estimate(parse_spec(SPEC), catalog, fleet, host, "fp32")
    rows = cost.focus_rows(estimate, "7")
    assert [r["ServiceName"] for r in rows] == ["Edge inference energy", "OTA model delivery", "Device telemetry",
                                                 "Model training"]
    assert all(set(r) == set(cost.FOCUS_COLUMNS) for r in rows)
    assert sum(r["BilledCost"] for r in rows) == pytest.approx(estimate.total_usd_per_month, abs=1e-5)
    assert '"finops.apexlogic.dev/cost-center": "cc-1"' in rows[0]["Tags"]
    assert rows[1]["x_ModelVersion"] == "7" and rows[1]["ConsumedUnit"] == "GB"


def test_unpriced_targets_and_bad_fleet_files_fail_clearly(setup, tmp_path):
    catalog, fleet, host = setup
    orphan = parse_spec({**SPEC, "targets": [{"name": "tvs", "selector": {"matchLabels": {"kind": "tv"}}}]})
    with pytest.raises(ValueError, match=r"targets\[tvs\]: no fleet group has the labels \{'kind': 'tv'\}"):
        cost.estimate(orphan, catalog, fleet, host, "fp32")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**FLEET, "groups": [{**FLEET["groups"][0], "deviceClass": "toaster"}]}))
    with pytest.raises(SpecError, match=r"bad.yaml: groups\[0\].deviceClass: unknown device class 'toaster'"):
        load_fleet(bad, catalog)
    bad.write_text(yaml.safe_dump({**FLEET, "groups": [{**FLEET["groups"][0], "devices": -1}]}))
    with pytest.raises(SpecError, match=r"bad.yaml: groups\[0\].devices: Input should be greater than or equal"):
        load_fleet(bad, catalog)


def test_release_cadence_from_the_schedule():
    assert cost.releases_per_month(None) == 1
    assert cost.releases_per_month("@daily") == 30
    assert cost.releases_per_month("0 3 * * 1") == 5


def test_a_group_ships_the_cheapest_variant_that_fits_its_memory_and_slo():
    from types import SimpleNamespace

    from pipelines.finops.cost import GroupCost, _choose

    def option(variant, usd, p95, memory):
        return GroupCost.model_construct(variant=variant, total_usd=usd, latency_p95_ms=p95, memory_bytes=memory,
                                         inputs={"artifact_bytes": memory // 4})

    options = {"fp32": option("fp32", 3.0, 4.0, 90 * 2**20), "dynamic": option("dynamic", 1.0, 3.0, 70 * 2**20),
               "static": option("static", 2.0, 3.5, 40 * 2**20)}
    target = SimpleNamespace(latency_slo_ms=5.0)
    best, why = _choose(target, options, "fp32")
    assert best.variant == "dynamic"
    best, why = _choose(target, options, "fp32", memory_cap=64 * 2**20)
    assert best.variant == "static" and "fp32, dynamic over the memory it may use" in why
    best, why = _choose(SimpleNamespace(latency_slo_ms=1.0), options, "fp32", memory_cap=64 * 2**20)
    assert best.variant == "static" and "the fastest that fits in memory" in why


# -- the per-class projection -----------------------------------------------------------------------
def _per_class_host(p50: float = 0.4, p95: float = 1.0) -> cost.HostFigures:
    figures = cost.VariantFigures(flops=100_000_000, memory_bytes=2**20, artifact_bytes=1_000_000)
    return cost.HostFigures(
        gflops=100.0, overhead_ms=0.0, fp32_latency_p50_ms=1.0, fp32_latency_p95_ms=2.0, train_seconds=0,
        variants={"fp32": figures, "dynamic": figures},
        gflops_by_class={"matmul": 50.0, "int8_matmul": 200.0, "elementwise": 5.0},
        measured={"dynamic": cost.HostVariant(latency_p50_ms=p50, latency_p95_ms=p95,
                                              flops_by_class={"int8_matmul": 100_000_000})})


def test_fp32_projection_scales_the_measurement_by_the_compute_peak():
    pi4 = load_catalog().classes["raspberry-pi-4"]
    latency, floor = cost.device_latency_ms(1.0, _per_class_host(), pi4, "fp32")
    assert latency == pytest.approx(1.0 * 100.0 / 11.9)  # host ms x host peak / device GFLOPS
    assert floor == pytest.approx(1e8 / 11.9e9 * 1e3)


def test_int8_projection_starts_from_the_measured_int8_latency():
    pi4 = load_catalog().classes["raspberry-pi-4"]
    host = _per_class_host()
    # Host model: 1e8 int8 FLOPs at 200 GFLOPS = 0.5 ms. Device: k = 11.9 / 100; the int8 class
    # runs at k x the host MatMul rate (50) x int8_speedup (1.0) = 5.95 GFLOPS: 16.807 ms.
    # Projection: measured 0.4 ms x 16.807 / 0.5 = 13.445 ms; the fp32 latency plays no part.
    latency, floor = cost.device_latency_ms(host.fp32_latency_p50_ms, host, pi4, "dynamic")
    assert latency == pytest.approx(0.4 * (1e8 / 5.95e9 * 1e3) / 0.5)
    assert floor == pytest.approx(1e8 / 11.9e9 * 1e3)
    # The p95 of the fp32 measurement asks for the p95 of the int8 one.
    p95, _ = cost.device_latency_ms(host.fp32_latency_p95_ms, host, pi4, "dynamic")
    assert p95 == pytest.approx(1.0 * (1e8 / 5.95e9 * 1e3) / 0.5)
    # A faster measured int8 run projects faster, whatever the fp32 latency.
    faster, _ = cost.device_latency_ms(1.0, _per_class_host(p50=0.3), pi4, "dynamic")
    assert faster < latency


def test_catalog_references_parse_and_need_a_source(tmp_path):
    catalog = load_catalog()
    anchors = [r for r in catalog.references if r.anchor]
    assert [r.model for r in anchors] == ["mobilenet_v2_1.0_224"]
    assert {r.device_class for r in catalog.references} == {"pixel-1-big-core"}
    assert all(len(r.source) > 20 and r.threads == 1 for r in catalog.references)
    raw = yaml.safe_load(CATALOG_PATH.read_text())
    broken = dict(raw, references=[{k: v for k, v in raw["references"][0].items() if k != "source"}])
    path = tmp_path / "devices.yaml"
    path.write_text(yaml.safe_dump(broken))
    with pytest.raises(SpecError, match="source"):
        load_catalog(path)
    unknown = dict(raw, references=[dict(raw["references"][1], device_class="nokia-3310")])
    path.write_text(yaml.safe_dump(unknown))
    with pytest.raises(SpecError, match="unknown device class"):
        load_catalog(path)
    two_anchors = dict(raw, references=[dict(r, anchor=True) for r in raw["references"][:2]])
    path.write_text(yaml.safe_dump(two_anchors))
    with pytest.raises(SpecError, match="at most one"):
        load_catalog(path)
