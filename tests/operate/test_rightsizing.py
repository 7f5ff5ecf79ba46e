"""Right-sizing from what devices measured: a real release served by simulated phones and
tablets through the real agent; the recommendation follows from the devices' measurements, is
kept as evidence, and `--propose` pushes it to a review branch of a real bare specs repository
(main untouched, the spec's comments kept, the same change never pushed twice)."""

import json
import math
import subprocess
from datetime import datetime, timedelta, timezone

import pytest
import yaml
from conftest import tabular_frame, write_spec

from pipelines import release
from pipelines.__main__ import main
from pipelines.storage import ObjectStore

FLEET = """
prices:
  egressUsdPerGb: {value: 0.09, source: test}
  electricityUsdPerKwh: {value: 0.17, source: test}
  trainingUsdPerHour: {value: 0.17, source: test}
groups:
  - name: phones
    labels: {apexlogic.dev/device-class: android-phone}
    deviceClass: android-phone
    devices: 100
    inferencesPerDevicePerDay: 100
    otaUpdatesPerMonth: 4
    telemetryBytesPerDevicePerDay: 1000
  - name: tablets
    labels: {apexlogic.dev/device-class: android-tablet}
    deviceClass: android-tablet
    devices: 15
    inferencesPerDevicePerDay: 100
    otaUpdatesPerMonth: 4
    telemetryBytesPerDevicePerDay: 1000
"""
TARGETS = [{"name": "phones", "selector": {"matchLabels": {"apexlogic.dev/device-class": "android-phone"}}},
           {"name": "tablets", "selector": {"matchLabels": {"apexlogic.dev/device-class": "android-tablet"}}}]
RESOURCES = {"requests": {"cpu": "100m", "memory": "32Mi"}, "limits": {"cpu": "500m", "memory": "512Mi"}}


def _git(*args, cwd=None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def _specs_repository(tmp_path, spec_text: str) -> str:
    """A bare repository holding `model_specs/sized.yaml` on main (pushed from a throwaway clone)."""
    bare, work = tmp_path / "specs.git", tmp_path / "specs-work"
    _git("init", "-q", "--bare", "-b", "main", str(bare))
    _git("init", "-q", "-b", "main", str(work))
    (work / "model_specs").mkdir()
    (work / "model_specs" / "sized.yaml").write_text(spec_text)
    _git("add", "-A", cwd=work)
    _git("-c", "commit.gpgsign=false", "commit", "-q", "-m", "specs", cwd=work)
    _git("push", "-q", str(bare), "HEAD:refs/heads/main", cwd=work)
    return str(bare)


def _p95(values):
    ordered = sorted(values)
    return ordered[math.ceil(0.95 * len(ordered)) - 1]


@pytest.fixture
def served(tmp_path, state, monkeypatch):
    """`sized` released, served by 11 simulated devices (10 phones, 1 tablet) for two rounds."""
    from pipelines.edge.simulator import Fleet
    from pipelines.settings import Settings

    specs = tmp_path / "specs"
    specs.mkdir()
    tabular_frame().to_csv(specs / "data.csv", index=False)
    path = write_spec(specs, "sized", "data.csv", targets=TARGETS, resources=RESOURCES,
                      telemetry={"sampleRate": 0.0, "maxSamples": 0})
    monkeypatch.setenv("EDGE_SPECS_DIR", str(specs))
    (tmp_path / "fleet.yaml").write_text(FLEET)
    monkeypatch.setenv("EDGE_FLEET_FILE", str(tmp_path / "fleet.yaml"))
    settings = Settings(specs_dir=specs)
    began = datetime.now(timezone.utc) - timedelta(minutes=1)
    assert release.run_release(path, settings=settings).status == "released"
    fleet = Fleet(11, settings, seed=3, fleet_path=tmp_path / "fleet.yaml")
    fleet.poll_round()
    for _ in range(2):
        fleet.serve_round(40)
        fleet.poll_round()
    return path, settings, began


def test_recommendation_follows_from_what_devices_measured_and_is_proposed_for_review(
        tmp_path, served, monkeypatch, capsys):
    from pipelines.edge.telemetry import read_records
    from pipelines.operate import rightsizing
    from pipelines.release import latest_summary

    path, settings, began = served
    until = datetime.now(timezone.utc) + timedelta(seconds=1)
    result = rightsizing.recommend("sized", began, until, settings)
    phones, tablets = result.groups
    assert (phones.group, phones.devices, tablets.group, tablets.devices) == ("phones", 10, "tablets", 1)

    # The figures, recomputed from the raw telemetry: each device's latest measurements and the
    # inferences it served over the time it was reporting (its first record to its last).
    records = read_records(ObjectStore(settings.telemetry_url), "sized", began, until)
    measured = {r["device_id"]: r for r in records if r.get("kind") == "status" and r.get("measurements")
                and r.get("group") == "phones"}
    assert len(measured) == 10
    rss = [r["measurements"]["rss_bytes"] for r in measured.values()]
    cores, bursts = [], []
    for device, status in measured.items():
        mine = [r for r in records if r["device_id"] == device]
        seconds = (datetime.fromisoformat(mine[-1]["ts"]) - datetime.fromisoformat(mine[0]["ts"])).total_seconds()
        cpu_ms = status["measurements"]["cpu_ms"]
        assert sum(r["requests"] for r in mine if r.get("kind") == "inference") == 80 and seconds > 0
        cores.append(cpu_ms * 80 / seconds / 1000)
        bursts.append(min(cpu_ms / 100, cpu_ms / status["measurements"]["wall_ms"]))  # the CFS period's quota
    assert phones.memory_devices == phones.cpu_devices == 10
    assert phones.rss_p95_bytes == _p95(rss) and phones.rss_max_bytes == max(rss)
    assert phones.cpu_cores_p95 == pytest.approx(_p95(cores), abs=1e-6)
    assert phones.burst_cores_p95 == pytest.approx(_p95(bursts), abs=1e-6)
    gate = {g["group"]: g["memory_bytes"] for g in latest_summary("sized", settings).cost["groups"]}
    assert phones.gate_memory_bytes == gate["phones"] > 0
    step = 16 * 2**20
    requests_memory = max(1, math.ceil(_p95(rss) * 1.2 / step)) * step
    limits_memory = max(1, math.ceil(max(max(rss) * 1.5, requests_memory, gate["phones"]) / step)) * step
    requests_cpu = max(10, math.ceil(_p95(cores) * 1.2 * 100) * 10)
    limits_cpu = max(requests_cpu * 2, math.ceil(_p95(bursts) * 100) * 10)
    wanted = {"requests.memory": f"{requests_memory // 2**20}Mi", "limits.memory": f"{limits_memory // 2**20}Mi",
              "requests.cpu": f"{requests_cpu}m", "limits.cpu": f"{limits_cpu}m"}
    assert {f.resource: f.recommended for f in phones.figures} == wanted
    # The limit never goes below what the memory gate estimated the model needs.
    assert limits_memory >= gate["phones"]
    statuses = {f.resource: f.status for f in phones.figures}
    assert statuses["limits.memory"] == "over-provisioned", (statuses, wanted)  # 512Mi for a few MiB
    # One tablet: too few devices for any figure.
    assert {f.status for f in tablets.figures} == {"not enough devices measured"}
    assert all(f.recommended is None for f in tablets.figures)
    assert tablets.note == "not enough devices measured: memory from 1 device, cpu from 1 device (at least 5)"
    assert result.spec_wide.devices == 11 and result.spec_wide.group == "(spec-wide)"

    # The command line: the table, and the recommendation kept as evidence.
    assert main(["finops-rightsize", "sized", "--hours", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Right-sizing of sized v1 from ") and "phones" in out and "not enough devices" in out
    evidence = out.rsplit("evidence: ", 1)[1].strip()
    store = ObjectStore(settings.store_url)
    kept = json.loads(store.read_bytes(store.key_of(evidence)))
    assert kept["model"] == "sized" and kept["groups"][0]["figures"] and kept["proposal"] is None

    # --propose without a specs repository: printed and kept, nothing proposed, and it says so.
    assert main(["finops-rightsize", "sized", "--hours", "1", "--propose"]) == 0
    captured = capsys.readouterr()
    assert "warning: --propose: EDGE_SPECS_REMOTE" in captured.err and "proposed on" not in captured.out
    assert "evidence: " in captured.out

    # --propose against a real bare repository: the spec with comments, as people write it.
    text = path.read_text().replace("targets:\n", "# Who runs the model.\ntargets:\n", 1)
    text = text.replace("- name: tablets\n", "- name: tablets  # kiosks too, one day\n", 1)
    remote = _specs_repository(tmp_path, "# The sized model: a spec people edit.\n" + text)
    main_before = _git("rev-parse", "main", cwd=remote)
    monkeypatch.setenv("EDGE_SPECS_REMOTE", remote)
    assert main(["finops-rightsize", "sized", "--hours", "1", "--propose", "--json"]) == 0
    proposed = json.loads(capsys.readouterr().out)
    branch = f"rightsize/sized/{datetime.now(timezone.utc):%Y-%m-%d}"
    assert proposed["proposal"]["status"] == "pushed" and proposed["proposal"]["branch"] == branch
    assert _git("rev-parse", "main", cwd=remote) == main_before, "main never moves"
    after = _git("show", f"{branch}:model_specs/sized.yaml", cwd=remote)
    assert after.startswith("# The sized model: a spec people edit.\nname: sized\n")
    assert "\n# Who runs the model.\ntargets:\n" in after
    assert "- name: tablets  # kiosks too, one day\n" in after
    diff = _git("diff", "main", branch, "--", "model_specs/sized.yaml", cwd=remote)
    added = [line for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    assert not [line for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
    assert added[0] == "+  resources:"
    doc = yaml.safe_load(after)
    changed = {f.resource: f.recommended for f in phones.figures if f.status != "ok"}
    assert doc["targets"][0]["resources"] == {
        section: {name: changed[f"{section}.{name}"] for name in ("cpu", "memory") if f"{section}.{name}" in changed}
        for section in ("requests", "limits") if any(k.startswith(section) for k in changed)}
    assert "resources" not in doc["targets"][1] and doc["resources"] == RESOURCES
    message = _git("log", "-1", "--format=%B", branch, cwd=remote)
    assert message.startswith("rightsize(sized): resources of phones from measured p95")
    assert "Rule: requests = p95 over devices x 1.2" in message and "limits.memory: 512Mi -> " in message
    assert "(10 devices)" in message and "By finops-rightsize" in message

    # The same figures again: already proposed, nothing pushed.
    tip = _git("rev-parse", branch, cwd=remote)
    assert main(["finops-rightsize", "sized", "--hours", "1", "--propose"]) == 0
    out = capsys.readouterr().out
    assert f"already proposed on {branch} (commit {tip}); nothing pushed" in out
    assert _git("rev-parse", branch, cwd=remote) == tip and _git("rev-parse", "main", cwd=remote) == main_before
    assert _git("for-each-ref", "--format=%(refname)", "refs/heads", cwd=remote).split() == [
        "refs/heads/main", f"refs/heads/{branch}"]

    # A reviewer commits on the branch, and main moves on: the proposal is not forced over them.
    work = tmp_path / "reviewer"
    _git("clone", "-q", "-b", branch, remote, str(work))
    (work / "model_specs" / "sized.yaml").write_text(after + "# looked at by the reviewer\n")
    _git("-c", "commit.gpgsign=false", "commit", "-q", "-am", "review", cwd=work)
    _git("push", "-q", "origin", f"HEAD:refs/heads/{branch}", cwd=work)
    _git("checkout", "-q", "main", cwd=work)
    (work / "model_specs" / "sized.yaml").write_text(text.replace("owner: tests@example.com", "owner: ml@example.com"))
    _git("-c", "commit.gpgsign=false", "commit", "-q", "-am", "new owner", cwd=work)
    _git("push", "-q", "origin", "main", cwd=work)
    reviewed, main_now = _git("rev-parse", branch, cwd=remote), _git("rev-parse", "main", cwd=remote)
    assert main(["finops-rightsize", "sized", "--hours", "1", "--propose"]) == 1
    assert f"{branch} has commits of someone else; nothing pushed" in capsys.readouterr().err
    assert (_git("rev-parse", branch, cwd=remote), _git("rev-parse", "main", cwd=remote)) == (reviewed, main_now)

    # The proposal merged: the group's own resources are in its overlay, the memory gate checks
    # the group against its own limit, and nothing is left to propose.
    from pipelines.gitops.manifest import ManifestInputs, render_release_files
    from pipelines.specs import parse_spec

    merged = parse_spec(doc, "sized.yaml")
    files = render_release_files(merged, ManifestInputs(
        model_version="1", mlflow_run_id="r", release_key="k", source_uri="s3://b/m.onnx", sha256="0" * 64,
        size_bytes=1, variant="fp32", metrics={}))
    phones_overlay = yaml.safe_load(yaml.safe_load(files["apps/sized/overlays/phones/kustomization.yaml"])
                                    ["patches"][0]["patch"])
    [op] = [o for o in phones_overlay if o["path"] == "/spec/resources"]
    assert op["op"] == "replace" and op["value"] == merged.targets[0].resources_over(merged.resources).model_dump(
        mode="json", by_alias=True, exclude_none=True)
    assert "/spec/resources" not in files["apps/sized/overlays/tablets/kustomization.yaml"]
    from pipelines.edge.desired import apply_patch

    base = yaml.safe_load(files["apps/sized/base/mobileaimodeldeployment.yaml"])
    assert base["spec"]["resources"] == RESOURCES  # the spec-wide block stays in the base
    assert apply_patch(base, phones_overlay)["spec"]["resources"] == op["value"]  # what phones resolve to
    again = rightsizing.recommend("sized", began, until, settings, spec=merged)
    assert again.changes() == {} and {f.status for f in again.groups[0].figures} == {"ok"}

    # Released with the merged spec: the memory gate judges phones against their own limit, the
    # GitOps overlay carries it, and the phones' signed desired state has it.
    from pipelines.gitops import repo

    path.write_text(after)
    summary = release.run_release(path, settings=settings)
    assert summary.status == "released", summary.reasons
    [memory] = [v for v in summary.verdicts if v.gate == "edge_memory"]
    assert memory.passed and memory.thresholds["phones.limits.memory"] == wanted["limits.memory"]
    assert "tablets.limits.memory" not in memory.thresholds
    assert f"phones within its own limits.memory {wanted['limits.memory']}" in memory.reason
    overlay = repo.read_file(settings.remote, "main", "apps/sized/overlays/phones/kustomization.yaml",
                             settings.work_dir / "gitops")
    assert "path: /spec/resources" in overlay
    from pipelines.edge.desired import resolve

    with repo.tip(settings.remote, "main", settings.work_dir / "gitops") as checkout:
        resolved = {o["metadata"]["labels"]["apexlogic.dev/device-group"]: o["spec"]["resources"]
                    for o in resolve(checkout, [], model="sized")}
    assert resolved == {"phones": op["value"], "tablets": RESOURCES}


def test_bad_input_is_one_line_and_exit_2(tmp_path, state, monkeypatch, capsys):
    monkeypatch.setenv("EDGE_SPECS_DIR", str(tmp_path))
    for argv, expected in (
            (["finops-rightsize", "never-released"],
             "error: never-released: not released yet; release the model first"),
            (["finops-rightsize", "m", "--hours", "0"], "error: --hours: '0' is not a number in (0, 2160]"),
            (["finops-rightsize", "m", "--hours", "soon"], "error: --hours: 'soon' is not a number in (0, 2160]"),
            (["finops-rightsize", "m", "--headroom", "0.5"], "error: --headroom: '0.5' is not a number in [1, 10]"),
            (["finops-rightsize", "m", "--min-devices", "2.5"],
             "error: --min-devices: '2.5' is not a whole number in [1, 100000]")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(expected) and len(err.strip().splitlines()) == 1, err


def test_group_resources_override_the_spec_wide_ones_in_the_memory_gate(tmp_path):
    from conftest import TINY_SPEC

    from pipelines.finops import cost
    from pipelines.finops.catalog import load_catalog, load_fleet
    from pipelines.specs import SpecError, parse_spec

    (tmp_path / "fleet.yaml").write_text(FLEET)
    catalog = load_catalog()
    figures = cost.VariantFigures(flops=1_000_000, memory_bytes=40 * 2**20, artifact_bytes=1_000_000)
    host = cost.HostFigures(gflops=23.8, overhead_ms=0.005, fp32_latency_p50_ms=1.0, fp32_latency_p95_ms=2.0,
                            train_seconds=60, variants={"fp32": figures})
    targets = [{**TARGETS[0], "resources": {"limits": {"memory": "32Mi"}}}, TARGETS[1]]
    spec = parse_spec({**TINY_SPEC, "targets": targets, "resources": {"limits": {"memory": "64Mi"}}})
    verdict = cost.memory_verdict(spec, cost.estimate(spec, catalog, load_fleet(tmp_path / "fleet.yaml", catalog),
                                                      host, "fp32"), catalog)
    assert not verdict.passed and verdict.reason == "phones: 40.0 MiB > its own limits.memory 32Mi"
    [breach] = cost.memory_breaches(verdict.thresholds, verdict.observed)
    assert (breach.group, breach.field) == ("phones", "targets[phones].resources.limits.memory")
    checks = {(c.group, c.field): c.passed for c in cost.memory_checks(verdict.thresholds, verdict.observed)
              if c.device_class is None}
    assert checks == {("phones", "targets[phones].resources.limits.memory"): False,
                      ("tablets", "resources.limits.memory"): True}
    # Without a group override, the verdict's figures are what they were.
    plain = parse_spec({**TINY_SPEC, "targets": TARGETS, "resources": {"limits": {"memory": "64Mi"}}})
    verdict = cost.memory_verdict(plain, cost.estimate(plain, catalog, load_fleet(tmp_path / "fleet.yaml", catalog),
                                                       host, "fp32"), catalog)
    assert verdict.passed and "limits.memory" in verdict.thresholds and not any(
        k.endswith(".limits.memory") for k in verdict.thresholds)
    # A group's requests over the spec-wide limit is refused, naming the group.
    with pytest.raises(SpecError, match=r"targets\[phones\]\.resources over the spec-wide resources: "
                                        "requests.memory 128Mi exceeds limits.memory 64Mi"):
        parse_spec({**TINY_SPEC, "targets": [{**TARGETS[0], "resources": {"requests": {"memory": "128Mi"}}}],
                    "resources": {"limits": {"memory": "64Mi"}}})


def test_the_spec_is_edited_as_text_keeping_comments_and_key_order():
    """On a spec of the project as people write it (indented sequences, flow mappings, comments):
    a group without resources gets a block after its last line; a group's existing block is
    rewritten in place, merged with what it already set; nothing else changes."""
    from pathlib import Path

    from pipelines.operate.rightsizing import RightsizingError, edit_spec_text

    path = Path(__file__).resolve().parents[2] / "model_specs" / "adult-income.yaml"
    text = path.read_text()
    edited = edit_spec_text(text, "adult-income.yaml", {"android-tablets": {"limits": {"memory": "48Mi"}}})
    removed = [line for line in text.splitlines() if line not in edited.splitlines()]
    added = [line for line in edited.splitlines() if line not in text.splitlines()]
    assert removed == [] and added == ["    resources:", "      limits: {memory: 48Mi}"]
    assert edited.index("    resources:") > edited.index("    latencySloMs: 20") > edited.index("android-tablets")
    assert edited.index("    resources:") < edited.index("  - name: branch-kiosks")

    again = edit_spec_text(edited, "adult-income.yaml", {"android-tablets": {"requests": {"cpu": "20m"},
                                                                             "limits": {"memory": "32Mi"}}})
    assert [line for line in again.splitlines() if line not in text.splitlines()] == [
        "    resources:", "      requests: {cpu: 20m}", "      limits: {memory: 32Mi}"]
    assert len(again.splitlines()) == len(text.splitlines()) + 3
    # A change the spec cannot take is refused, naming the file and field; nothing is written.
    with pytest.raises(RightsizingError, match=r"adult-income.yaml: .*targets\[android-tablets\]\.resources .*"
                                               "requests.memory 128Mi exceeds limits.memory 64Mi"):
        edit_spec_text(text, "adult-income.yaml", {"android-tablets": {"requests": {"memory": "128Mi"}}})
    with pytest.raises(RightsizingError, match="adult-income.yaml: targets: no group named phones"):
        edit_spec_text(text, "adult-income.yaml", {"phones": {"limits": {"memory": "48Mi"}}})


def test_a_request_left_as_it_is_never_ends_above_a_lowered_limit():
    from pipelines.operate.rightsizing import DeviceFigures, Rightsizing, _scope
    from pipelines.specs import ResourcesSpec

    devices = [DeviceFigures(device_id=f"d{i}", group="phones", rss_bytes=40 * 2**20) for i in range(5)]
    current = ResourcesSpec.model_validate({"requests": {"memory": "80Mi"}, "limits": {"memory": "512Mi"}})
    scope = _scope("phones", devices, current, 10 * 2**20, 1.2, 5)
    statuses = {f.resource: (f.recommended, f.status) for f in scope.figures}
    assert statuses["requests.memory"] == ("48Mi", "ok") and statuses["limits.memory"] == ("64Mi", "over-provisioned")
    assert statuses["requests.cpu"] == (None, "not enough devices measured")  # no device served twice
    result = Rightsizing(model="m", version="1", gate_version="1", since="a", until="b", headroom=1.2, min_devices=5,
                         rule="r", groups=[scope], spec_wide=scope, devices=devices)
    assert result.changes() == {"phones": {"requests": {"memory": "48Mi"}, "limits": {"memory": "64Mi"}}}
