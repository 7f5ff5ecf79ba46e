import json
from datetime import date

import pytest
from conftest import tabular_frame, write_spec

from pipelines import release
from pipelines.__main__ import main
from pipelines.storage import ObjectStore


def test_cli_finops_report_after_a_release(tmp_path, state, capsys):
    tabular_frame().to_csv(tmp_path / "data.csv", index=False)
    spec = write_spec(tmp_path, "small-model", "data.csv")
    summary = release.run_release(spec)
    assert summary.status == "released" and summary.cost["groups"][0]["group"] == "phones"
    assert summary.cost_diff["baseline"] == "new"
    assert main(["finops-report", "small-model", "--as-of", "2026-11-27", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["as_of"] == "2026-11-27" and report["simulated"]
    assert set(report["evidence"]) == {"forecast.json", "forecast.png", "report.txt"}
    png = report["evidence"]["forecast.png"].removeprefix("file://")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert main(["finops-report", "small-model", "--as-of", "27/11/2026"]) == 2
    assert "--as-of: '27/11/2026' is not an ISO date" in capsys.readouterr().err


def test_report_needs_a_release(state):
    from pipelines.operate.finops_report import finops_report

    with pytest.raises(ValueError, match="never-released: no released cost estimate yet"):
        finops_report("never-released", date(2026, 11, 27))


def test_a_forecast_breach_becomes_a_commit_that_lowers_telemetry_sampling(tmp_path, state, monkeypatch, capsys):
    """finops.onBreach on a real release: the fleet's spend history runs far beyond the budget, so
    the forecast breaches; the policy halves the devices' sample rate by a signed commit (a
    device reads the new rate from the signed desired state), again the next day, then stops at
    the floor; finops-restore commits the spec's rate back. A canary to pause there is not: the
    step says so."""
    from conftest import phones_fleet

    from pipelines.edge.simulator import Fleet
    from pipelines.finops.forecast import simulate_history
    from pipelines.gitops import repo
    from pipelines.operate.budget import act_on_breach
    from pipelines.operate.finops_report import finops_report, history_path
    from pipelines.settings import Settings

    specs = tmp_path / "specs"
    specs.mkdir()
    tabular_frame().to_csv(specs / "data.csv", index=False)
    spec = write_spec(specs, "thrifty", "data.csv", telemetry={"sampleRate": 0.2, "maxSamples": 50},
                      finops={"costCenter": "cc-1", "project": "tests", "monthlyBudgetUsd": 10,
                              "onBreach": ["pause_rollout", "lower_sampling", "notify"], "minSampleRate": 0.05})
    monkeypatch.setenv("EDGE_SPECS_DIR", str(specs))
    (tmp_path / "fleet.yaml").write_text(phones_fleet(10))
    settings = Settings(specs_dir=specs)
    assert release.run_release(spec, settings=settings).status == "released"
    fleet = Fleet(3, settings, seed=1, fleet_path=tmp_path / "fleet.yaml")
    fleet.poll_round()
    device = fleet.agents[0]
    assert device._reporting["thrifty"]["sampleRate"] == 0.2

    groups = {"phones": {"devices": 5000, "inferences_per_device_per_day": 1000, "bytes_per_device_per_day": 5e7,
                         "cost_per_inference_usd": 1e-5, "cost_per_gb_usd": 0.09}}
    path = history_path(settings, "thrifty")
    path.parent.mkdir(parents=True, exist_ok=True)
    simulate_history(groups, 60, date(2026, 1, 1), seed=3, trend_per_day=0.01).to_csv(path, index=False)
    report = finops_report("thrifty", date(2026, 3, 2), settings)
    assert report.breach and not report.simulated, report.reason
    sent = []
    actions = act_on_breach(spec, report, settings, notify=lambda r: sent.append(r) or ["edge_alerts_webhook"])
    assert [(a.action, a.status) for a in actions] == [
        ("pause_rollout", "skipped"), ("lower_sampling", "done"), ("notify", "done")], actions
    assert "no canary in progress" in actions[0].detail and sent == [report]
    assert actions[1].detail == "telemetry.sampleRate 0.2 -> 0.1 (floor 0.05)"
    log = repo.log(settings.remote, "main", settings.work_dir / "gitops")
    assert log[0]["sha"] == actions[1].commit and log[0]["subject"] == "finops(thrifty): lower telemetry sampling"
    assert "breaches the $10.00 monthly budget" in log[0]["body"] and "By edge_finops_report" in log[0]["body"]
    fleet.poll_round()
    assert device._reporting["thrifty"]["sampleRate"] == 0.1, "the device reads the lowered rate, signed"
    store = ObjectStore(settings.store_url)
    recorded = json.loads(store.read_bytes("finops/thrifty/2026-03-02/actions.json"))
    assert [a["status"] for a in recorded] == ["skipped", "done", "done"]

    # The breach lasts: halved down to the floor, then no more commits.
    second = act_on_breach(spec, finops_report("thrifty", date(2026, 3, 3), settings), settings)
    assert second[1].detail == "telemetry.sampleRate 0.1 -> 0.05 (floor 0.05)" and second[2].status == "skipped"
    third = act_on_breach(spec, finops_report("thrifty", date(2026, 3, 4), settings), settings)
    assert third[1].status == "skipped" and "at the floor" in third[1].detail and third[1].commit is None

    assert main(["finops-restore", "thrifty", "--by", "finops-lead"]) == 0
    assert "telemetry sampling restored, commit" in capsys.readouterr().out
    assert repo.log(settings.remote, "main", settings.work_dir / "gitops")[0]["subject"] == \
        "finops(thrifty): restore telemetry sampling to the spec's 0.2"
    fleet.poll_round()
    assert device._reporting["thrifty"]["sampleRate"] == 0.2
    assert main(["finops-restore", "thrifty"]) == 0
    out = capsys.readouterr().out
    assert "already the spec's" in out and "every device group runs the release's variant" in out

    # finops.review: the day's actions become commits on a review branch; the fleet does not move.
    import yaml
    from conftest import model_page_html

    reviewed = yaml.safe_load(spec.read_text())
    reviewed["finops"].update(review=True, onBreach=["lower_sampling", "pause_rollout"])
    spec.write_text(yaml.safe_dump(reviewed, sort_keys=False))
    tip = repo.log(settings.remote, "main", settings.work_dir / "gitops")[0]["sha"]
    day = finops_report("thrifty", date(2026, 3, 5), settings)
    first = act_on_breach(spec, day, settings)
    again = act_on_breach(spec, day, settings)  # a second run of the day builds on the branch
    branch = "finops/thrifty/2026-03-05"
    assert [(a.action, a.status, a.branch) for a in first] == [("lower_sampling", "done", branch),
                                                                ("pause_rollout", "skipped", None)], first
    assert again[0].detail == "telemetry.sampleRate 0.1 -> 0.05 (floor 0.05)" and again[0].branch == branch
    assert repo.log(settings.remote, "main", settings.work_dir / "gitops")[0]["sha"] == tip, "main did not move"
    proposed = repo.log(settings.remote, branch, settings.work_dir / "gitops")
    assert [c["sha"] for c in proposed[:2]] == [again[0].commit, first[0].commit] and proposed[2]["sha"] == tip
    manifest = yaml.safe_load(repo.read_file(settings.remote, branch, "apps/thrifty/base/mobileaimodeldeployment.yaml",
                                             settings.work_dir / "gitops"))
    assert manifest["spec"]["telemetry"]["sampleRate"] == 0.05
    fleet.poll_round()
    assert device._reporting["thrifty"]["sampleRate"] == 0.2, "nothing reaches a device before the merge"
    page = model_page_html("thrifty", specs)
    assert "Budget actions" in page and f"on review branch <code>{branch}</code>" in page
    assert "telemetry.sampleRate 0.2 -&gt; 0.1 (floor 0.05)" in page, "the first day's commit on the GitOps branch"


def test_actual_cost_from_what_devices_measured_next_to_the_estimate(tmp_path, state, monkeypatch, capsys):
    """A released model served by 6 phones: the energy of an inference is the CPU time the
    devices measured at the phone class's power from the catalog; telemetry bytes are the records
    as sent; every figure sits beside the release's estimate with the estimate's error."""
    from datetime import datetime, timedelta, timezone

    from conftest import model_page_html, phones_fleet

    from pipelines.edge.simulator import Fleet
    from pipelines.finops.catalog import load_catalog
    from pipelines.operate.actual_cost import actual_cost
    from pipelines.settings import Settings

    specs = tmp_path / "specs"
    specs.mkdir()
    tabular_frame().to_csv(specs / "data.csv", index=False)
    write_spec(specs, "metered", "data.csv", telemetry={"sampleRate": 0.1, "maxSamples": 5})
    monkeypatch.setenv("EDGE_SPECS_DIR", str(specs))
    (tmp_path / "fleet.yaml").write_text(phones_fleet(10))
    monkeypatch.setenv("EDGE_FLEET_FILE", str(tmp_path / "fleet.yaml"))
    settings = Settings(specs_dir=specs)
    began = datetime.now(timezone.utc) - timedelta(minutes=1)
    assert release.run_release(specs / "metered.yaml", settings=settings).status == "released"
    fleet = Fleet(6, settings, seed=2, fleet_path=tmp_path / "fleet.yaml")
    fleet.poll_round()
    fleet.serve_round(50)
    fleet.poll_round()
    result = actual_cost("metered", began, datetime.now(timezone.utc) + timedelta(seconds=1), settings)

    [phones] = result.classes
    assert (phones.version, phones.group, phones.device_class, phones.devices) == ("1", "phones", "android-phone", 6)
    assert phones.inferences == 300 and phones.cpu_ms_per_inference > 0
    power = load_catalog().classes["android-phone"].power_active_w.value
    assert phones.energy_j_per_inference == pytest.approx(phones.cpu_ms_per_inference / 1000 * power, rel=1e-6)
    assert phones.estimated_energy_j_per_inference > 0 and phones.estimated_p95_ms > 0 and phones.p95_ms > 0
    assert set(phones.errors) == {"energy_j_per_inference", "p95_ms", "usd_per_device_day"}
    # The error is computed before p95_ms is rounded to 4 decimals: within what that rounding allows.
    bounds = [(phones.estimated_p95_ms - p95) / p95 for p95 in (phones.p95_ms + 5e-5, phones.p95_ms - 5e-5)]
    assert bounds[0] - 1e-3 <= phones.errors["p95_ms"] <= bounds[1] + 1e-3, (bounds, phones.errors)
    services = {r["ServiceName"]: r for r in result.rows}
    assert set(services) == {"Edge inference energy", "Device telemetry", "OTA model delivery"}
    assert all(r["ChargeCategory"] == "Usage" and r["x_Estimate"] is False and r["x_DeviceGroup"] == "phones"
               for r in result.rows)
    tags = json.loads(services["Device telemetry"]["Tags"])
    assert tags["app.kubernetes.io/version"] == "1" and tags["finops.apexlogic.dev/cost-center"] == "cc-1"
    assert services["Device telemetry"]["ConsumedQuantity"] > 0 and services["OTA model delivery"]["ConsumedQuantity"] > 0
    assert result.total_usd == pytest.approx(sum(r["BilledCost"] for r in result.rows), abs=1e-8)

    # The daily report measures the day before its date, keeps it as evidence and on MLflow.
    from pipelines import registry
    from pipelines.operate.finops_report import finops_report

    report = finops_report("metered", (datetime.now(timezone.utc) + timedelta(days=1)).date(), settings)
    assert report.actual_usd_per_month > 0 and not report.actual_breach
    assert "measured on the devices the day before" in report.reason
    assert {"actual.json", "actual_focus.csv"} <= set(report.evidence)
    focus = ObjectStore(settings.store_url).read_bytes(
        ObjectStore(settings.store_url).key_of(report.evidence["actual_focus.csv"])).decode()
    assert focus.startswith("BillingCurrency,ChargeCategory") and ",Usage," in focus
    champion = registry.client(settings.tracking_uri).get_model_version_by_alias("metered", "champion")
    logged = registry.client(settings.tracking_uri).get_run(champion.run_id).data.metrics
    assert logged["cost.actual.usd_per_month"] == report.actual_usd_per_month
    assert "cost.estimate_error.phones.android-phone.p95_ms" in logged

    page = model_page_html("metered", specs)
    assert "Cost measured on the devices" in page and "android-phone" in page and "FOCUS usage rows" in page

    assert main(["finops-actual", "metered", "--hours", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Actual cost of metered from ") and "android-phone" in out
    assert main(["finops-actual", "metered", "--hours", "0"]) == 2
    assert main(["finops-actual", "never-released"]) == 2
    assert "never-released: no released cost estimate yet" in capsys.readouterr().err

    # The catalog, corrected from what the phones measured: proposed for review, never applied.
    from pipelines.finops import cost
    from pipelines.finops.catalog import load_fleet
    from pipelines.release import latest_summary
    from pipelines.specs import load_spec

    proposed = tmp_path / "reviewed-devices.yaml"
    assert main(["finops-calibrate", "--hours", "1", "--min-devices", "3", "--output", str(proposed)]) == 0
    out = capsys.readouterr().out
    assert "android-phone      gflops_fp32" in out and "devices.yaml: " in out
    corrected = load_catalog(proposed).classes["android-phone"]
    shipped = load_catalog().classes["android-phone"]
    assert corrected.gflops_fp32.source.startswith("measured: median CPU time per inference on 6 devices (metered v1")
    assert not corrected.gflops_fp32.assumption and corrected.power_active_w == shipped.power_active_w
    # Under the corrected catalog the release's projection for the class is what the phones measured.
    summary = latest_summary("metered", settings)
    estimate = cost.CostEstimate.model_validate(summary.cost)
    again = cost.estimate(load_spec(specs / "metered.yaml"), load_catalog(proposed),
                          load_fleet(tmp_path / "fleet.yaml", load_catalog(proposed)), estimate.host,
                          estimate.variant, [estimate.groups[0].variant])
    projected = again.groups[0].inputs["fleet_groups"]["phones"]["latency_p50_ms"]
    assert projected == pytest.approx(phones.cpu_ms_per_inference, rel=0.02)
    assert main(["finops-calibrate", "--min-devices", "7"]) == 0
    assert "android-phone gflops_fp32: 6 devices measured, fewer than 7" in capsys.readouterr().out
    assert main(["finops-calibrate", "never-released"]) == 2


def test_a_budget_breach_switches_a_device_group_to_a_cheaper_signed_variant(tmp_path, state, monkeypatch, capsys):
    """finops.onBreach cheaper_variant on a real release: boards whose int8 kernels are slow
    (int8Speedup 0.01 in the operator's catalog) get fp32 within their latency SLO, though the
    int8 variant is a quarter of the bytes over the air; on a budget breach the policy switches
    them to it by a signed commit, the boards install it (verified as any other), and
    finops-restore puts the release's choice back, byte for byte."""
    import yaml
    from conftest import model_page_html

    from pipelines.edge.simulator import Fleet
    from pipelines.finops.catalog import CATALOG_PATH
    from pipelines.finops.forecast import simulate_history
    from pipelines.gitops import repo
    from pipelines.gitops.manifest import overlay_path
    from pipelines.operate.budget import act_on_breach
    from pipelines.operate.finops_report import finops_report, history_path
    from pipelines.settings import Settings

    catalog = yaml.safe_load(CATALOG_PATH.read_text())
    catalog["classes"]["slow-int8-board"] = {
        **catalog["classes"]["raspberry-pi-4"], "description": "a board that emulates int8 in software",
        "int8_speedup": {"value": 0.01, "source": "operator's measurement of emulated int8 kernels"}}
    (tmp_path / "devices.yaml").write_text(yaml.safe_dump(catalog, sort_keys=False))
    monkeypatch.setenv("EDGE_DEVICE_CATALOG", str(tmp_path / "devices.yaml"))
    (tmp_path / "fleet.yaml").write_text("""
prices:
  egressUsdPerGb: {value: 0.09, source: test}
  electricityUsdPerKwh: {value: 0.17, source: test}
  trainingUsdPerHour: {value: 0.17, source: test}
groups:
  - name: boards
    labels: {apexlogic.dev/device-class: slow-int8-board}
    deviceClass: slow-int8-board
    devices: 1000
    inferencesPerDevicePerDay: 0
    otaUpdatesPerMonth: 30
    telemetryBytesPerDevicePerDay: 1000
""")
    monkeypatch.setenv("EDGE_FLEET_FILE", str(tmp_path / "fleet.yaml"))
    specs = tmp_path / "specs"
    specs.mkdir()
    monkeypatch.setenv("EDGE_SPECS_DIR", str(specs))
    tabular_frame().to_csv(specs / "data.csv", index=False)
    boards = {"name": "boards", "selector": {"matchLabels": {"apexlogic.dev/device-class": "slow-int8-board"}}}
    training = {"framework": "sklearn", "estimator": "mlp", "seed": 1,
                "params": {"hidden_layer_sizes": [1024, 1024], "max_iter": 20}}
    finops = {"costCenter": "cc-1", "project": "tests", "monthlyBudgetUsd": 20, "onBreach": ["cheaper_variant"]}
    spec = write_spec(specs, "boards", "data.csv", training=training, targets=[boards], finops=finops)
    settings = Settings(specs_dir=specs)
    first = release.run_release(spec, settings=settings)
    options = first.cost["groups"][0]["inputs"]["variants"]
    assert options["dynamic"]["latency_p95_ms"] > 3 * options["fp32"]["latency_p95_ms"], options
    assert options["dynamic"]["usd_per_month"] < options["fp32"]["usd_per_month"], options
    # An SLO only fp32 meets: the release ships fp32 to the boards, though it costs more.
    slo = round((options["dynamic"]["latency_p95_ms"] * options["fp32"]["latency_p95_ms"]) ** 0.5, 6)
    spec = write_spec(specs, "boards", "data.csv", training=training, targets=[{**boards, "latencySloMs": slo}],
                      finops=finops)
    released = release.run_release(spec, settings=settings)
    assert released.status == "released" and released.cost["groups"][0]["variant"] == "fp32"
    work = settings.work_dir / "gitops"
    overlay = repo.read_file(settings.remote, "main", overlay_path("boards", "boards"), work)
    fleet = Fleet(2, settings, seed=4, fleet_path=tmp_path / "fleet.yaml")
    fleet.poll_round()
    sha = {c.variant: c.sha256 for c in released.quantization.candidates}
    assert {a.state["models"]["boards"]["sha256"] for a in fleet.agents} == {sha["fp32"]}

    groups = {"boards": {"devices": 1000, "inferences_per_device_per_day": 1000, "bytes_per_device_per_day": 5e7,
                         "cost_per_inference_usd": 1e-5, "cost_per_gb_usd": 0.09}}
    history_path(settings, "boards").parent.mkdir(parents=True, exist_ok=True)
    simulate_history(groups, 60, date(2026, 1, 1), seed=3).to_csv(history_path(settings, "boards"), index=False)
    report = finops_report("boards", date(2026, 3, 2), settings)
    assert report.breach, report.reason
    [action] = act_on_breach(spec, report, settings)
    assert (action.action, action.status) == ("cheaper_variant", "done"), action
    assert action.detail.startswith("boards: fp32 -> dynamic (") and "over its latency SLO" in action.detail
    commit = repo.log(settings.remote, "main", work)[0]
    assert commit["sha"] == action.commit and commit["subject"] == "finops(boards): cheaper variants for device groups"
    fleet.poll_round()
    assert {a.state["models"]["boards"]["sha256"] for a in fleet.agents} == {sha["dynamic"]}, \
        "the boards verified and installed the signed int8 variant"
    again = act_on_breach(spec, finops_report("boards", date(2026, 3, 3), settings), settings)
    assert again[0].status == "skipped" and again[0].commit is None
    assert "boards: fp32 -&gt; dynamic" in model_page_html("boards", specs)

    assert main(["finops-restore", "boards", "--by", "finops-lead"]) == 0
    assert "the release's variants restored, commit" in capsys.readouterr().out
    assert repo.read_file(settings.remote, "main", overlay_path("boards", "boards"), work) == overlay
    fleet.poll_round()
    assert {a.state["models"]["boards"]["sha256"] for a in fleet.agents} == {sha["fp32"]}
