"""The Edge Releases read models on real releases in a private state folder."""

import pytest
import yaml
from conftest import tabular_frame, write_spec
from edge_ui import views

from pipelines import release
from pipelines.gates.drift import drift_verdict
from pipelines.gates.fairness import fairness_verdict
from pipelines.gates.parity import parity_verdict
from pipelines.gates.quality import quality_verdict
from pipelines.operate.monitor import DriftCheck
from pipelines.operate.rollback import rollback_release
from pipelines.records import GateVerdict
from pipelines.settings import Settings
from pipelines.specs import FairnessSpec, MetricThreshold
from pipelines.storage import ObjectStore

PHONES = {"name": "phones", "selector": {"matchLabels": {"apexlogic.dev/device-class": "android-phone"}},
          "latencySloMs": 50}
KIOSKS = {"name": "kiosks", "selector": {"matchLabels": {"apexlogic.dev/device-class": "raspberry-pi-4"}}}
CANARY = {"type": "Canary", "canary": {"steps": [{"share": 20}, {"share": 50}, {"share": 100}]}}


def _settings(specs) -> Settings:
    return Settings(specs_dir=specs)


def _drift_check(store: ObjectStore, model: str, stamp: str, status: str, share: float) -> None:
    check = DriftCheck(model=model, status=status, reason=f"{share:.0%} of the columns drifted",
                       checked_at=f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]}T00:00:00Z", window_start="-",
                       window_end="-", drift_share_threshold=0.3, min_rows=200, deployed_version="2",
                       drifted=status == "drift", drifted_share=share, drifted_columns=1, columns=4,
                       drifted_column_names=["x1"], report_uri=store.uri(f"monitoring/{model}/{stamp}/drift.html"))
    store.put_bytes(check.model_dump_json().encode(), f"monitoring/{model}/{stamp}/drift.json")


def test_canary_releases_then_a_rollback_as_the_view_shows_them(tmp_path, state):
    tabular_frame().to_csv(tmp_path / "data.csv", index=False)
    spec = write_spec(tmp_path, "view-model", "data.csv", targets=[PHONES, KIOSKS], deploymentStrategy=CANARY)
    first = release.run_release(spec)
    doc = yaml.safe_load(spec.read_text())
    doc["description"] = "the same model, released again under a new spec"
    doc["training"]["params"] = {"C": 5.0}  # and trained otherwise: a new version
    spec.write_text(yaml.safe_dump(doc))
    second = release.run_release(spec)
    assert (first.status, second.status) == ("released", "released")
    settings = _settings(tmp_path)
    store = ObjectStore(settings.store_url)
    _drift_check(store, "view-model", "20260101T000000Z", "ok", 0.0)
    _drift_check(store, "view-model", "20260102T000000Z", "drift", 0.5)

    [row] = views.list_models(settings)
    assert (row.model, row.owner, row.has_spec, row.deployed_version) == (
        "view-model", "tests@example.com", True, second.model_version)
    assert row.description == "the same model, released again under a new spec"
    assert [d.group for d in row.deployments] == ["kiosks", "phones"]
    for group in row.deployments:  # the second release is a canary at the first step in every group
        assert (group.version, group.share, group.canary, group.previous_version) == (
            second.model_version, 20.0, True, first.model_version)
        assert (group.canary_step, group.canary_steps) == (1, 3)
        assert group.usd_per_month == pytest.approx(
            next(g["total_usd"] for g in second.cost["groups"] if g["group"] == group.group), abs=0.01)
    assert row.deployments[1].latency_slo_ms == 50 and row.deployments[0].latency_slo_ms is None
    assert (row.last_release.version, row.last_release.status, row.last_release.trigger) == (
        second.model_version, "released", "cli")
    assert row.last_release.when and row.last_release.gitops_commit == second.gitops_commit
    assert row.cost.budget_usd_per_month == 10 and not row.cost.over_budget
    assert row.cost.deployed_usd_per_month == pytest.approx(second.cost["total_usd_per_month"], abs=0.01)
    assert row.cost.latest_usd_per_month == pytest.approx(second.cost["total_usd_per_month"])
    assert (row.drift.status, row.drift.checked_at, row.drift.drifted_share) == ("drift", "2026-01-02T00:00:00Z", 0.5)

    page = views.model_page("view-model", settings)
    assert page.spec.deployment_strategy == "Canary" and page.spec.canary_steps == [20, 50, 100]
    assert [t.name for t in page.spec.targets] == ["phones", "kiosks"]
    assert [v.version for v in page.versions] == [second.model_version, first.model_version]
    newest = page.versions[0]
    assert (newest.status, newest.trigger, newest.gitops_commit, newest.release_key) == (
        "released", "cli", second.gitops_commit, second.release_key)
    assert newest.aliases == ["candidate", "champion"] and newest.created and newest.explanation == []
    summary = newest.summary
    assert summary.metrics == second.metrics and summary.model_card_uri == second.model_card_uri
    assert [v.gate for v in summary.verdicts] == ["quality", "fairness", "quantization_parity", "drift",
                                                  "edge_memory", "edge_latency", "budget"]
    assert all(v.passed for v in summary.verdicts)
    fairness = next(v for v in summary.verdicts if v.gate == "fairness")
    assert "fairness_by_group.png" in fairness.evidence
    assert summary.quantization_choice == second.quantization.chosen and summary.quantization_reason
    assert {g.group for g in summary.cost.groups} == {"phones", "kiosks"}
    assert summary.cost.baseline == f"v{first.model_version}" and summary.cost.diff_lines[0].startswith("Cost vs v1")
    assert all(g.change == "changed" for g in summary.cost.groups)
    assert page.versions[1].summary.cost.baseline == "new"
    assert [(c.kind, c.sha) for c in page.history] == [("release", second.gitops_commit),
                                                       ("release", first.gitops_commit)]
    assert page.drift.status == "drift"

    done = rollback_release("view-model", None, "the canary answers too slowly", "ana", settings)
    [row] = views.list_models(settings)
    assert {(d.version, d.share, d.canary, d.rollback_from) for d in row.deployments} == {
        (first.model_version, 100.0, False, second.model_version)}
    page = views.model_page("view-model", settings)
    assert [c.kind for c in page.history] == ["rollback", "release", "release"]
    assert page.history[0].sha == done.commit and "Rolled back by: ana" in page.history[0].body
    rolled = page.versions[0]
    assert (rolled.status, rolled.rolled_back_by, rolled.rollback_reason) == (
        "rolled_back", "ana", "the canary answers too slowly")
    assert rolled.explanation == []  # every gate passed: nothing to explain, the rollback says why
    version = views.version_page("view-model", second.model_version, settings)
    assert [c.kind for c in version.commits] == ["rollback", "release"] and version.deployed_to == []
    assert [d.group for d in views.version_page("view-model", first.model_version, settings).deployed_to] == [
        "kiosks", "phones"]


def test_a_rejected_release_is_explained_in_plain_words(tmp_path, state):
    tabular_frame().to_csv(tmp_path / "data.csv", index=False)
    spec = write_spec(tmp_path, "weak-model", "data.csv",
                      gates={"quality": {"accuracy": {"minValue": 0.99}}},
                      targets=[{**PHONES, "latencySloMs": 0.0001}],
                      finops={"costCenter": "cc-1", "project": "tests", "monthlyBudgetUsd": 0.01},
                      resources={"limits": {"memory": "1Mi"}},
                      responsibleAI={"fairness": {"biasScore": 0.01, "equalizedOdds": 0.25}})
    summary = release.run_release(spec)
    assert summary.status == "rejected"
    failed = {v.gate: v for v in summary.verdicts if not v.passed}
    assert set(failed) == {"quality", "fairness", "edge_memory", "edge_latency", "budget"}

    lines = views.explain_rejection(summary)
    assert len(lines) == 5
    quality, fairness, memory, latency, budget = lines
    accuracy = failed["quality"].observed["accuracy.candidate"]
    assert quality.startswith(f"The quality gate failed: accuracy on the held-out test rows is {accuracy:.4f}, "
                              "below the 0.99 required by gates.quality.accuracy.minValue.")
    parity = failed["fairness"].observed["demographic_parity_difference"]
    assert fairness.startswith("The fairness gate failed")  # naming the variants when several ship
    assert (f"the demographic parity difference across group is {parity:.3f}, above the 0.01 allowed by "
            "responsibleAI.fairness.biasScore.") in fairness
    assert "per-group chart" in fairness
    assert memory.startswith("The edge memory gate failed: on the phones devices the model needs about ")
    assert "above the 1Mi allowed by resources.limits.memory" in memory
    p95 = failed["edge_latency"].observed["phones.latency_p95_ms"]
    assert latency.startswith(f"The edge latency gate failed: on the phones devices the projected p95 latency is "
                              f"{p95:.3f} ms, above the 0.0001 ms objective set by targets[phones].latencySloMs.")
    total = failed["budget"].observed["total_usd_per_month"]
    assert budget.startswith(f"The budget gate failed: the projected cost is ${total:,.2f} per month, above the "
                             "$0.01 set by finops.monthlyBudgetUsd; the largest share is the phones group")

    settings = _settings(tmp_path)
    [row] = views.list_models(settings)
    assert row.deployments == [] and row.deployed_version is None
    assert (row.last_release.status, row.last_release.version) == ("rejected", summary.model_version)
    assert row.cost.over_budget and row.cost.deployed_usd_per_month is None and row.drift is None
    page = views.model_page("weak-model", settings)
    [version] = page.versions
    assert version.status == "rejected" and version.gitops_commit is None and page.history == []
    assert version.explanation == lines
    assert any("< min 0.99" in reason for reason in version.reasons)
    assert views.version_page("weak-model", summary.model_version, settings).version.explanation == lines
    for missing in (("weak-model", "7"), ("weak-model", "../1"), ("no-such-model", "1")):
        with pytest.raises(views.UnknownModel):
            views.version_page(*missing, settings)
    with pytest.raises(views.UnknownModel):
        views.model_page("Not A Model'--", settings)


def test_explanations_of_regressions_parity_drift_and_unknown_gates():
    regression = quality_verdict({"accuracy": MetricThreshold(minValue=0.5, maxRegression=0.01)},
                                 {"accuracy": 0.83}, {"accuracy": 0.86}, "3")
    [line] = views.explain_rejection({"status": "rejected", "release_key": "k", "verdicts": [regression.to_xcom()]})
    assert line.startswith("The quality gate failed: accuracy is 0.8300, 0.0300 lower than the deployed champion v3 "
                           "(0.8600) on the same rows; gates.quality.accuracy.maxRegression allows 0.01.")

    report = {"race": {"demographic_parity_difference": 0.181, "equalized_odds_difference": 0.05,
                       "accuracy_difference": 0.02, "min_group_accuracy": 0.8, "by_group": {},
                       "excluded_small_groups": {}},
              "sex": {"demographic_parity_difference": 0.12, "equalized_odds_difference": 0.04,
                      "accuracy_difference": 0.01, "min_group_accuracy": 0.82, "by_group": {},
                      "excluded_small_groups": {}}}
    fairness = fairness_verdict(report, FairnessSpec(biasScore=0.1, equalizedOdds=0.12), {}, "fp32")
    assert views.explain_verdict(fairness).startswith(
        "The fairness gate failed: the demographic parity difference across race is 0.181, above the 0.1 allowed "
        "by responsibleAI.fairness.biasScore. Look at the per-group chart")

    fp32 = {"race": {"demographic_parity_difference": 0.10, "equalized_odds_difference": 0.1,
                     "accuracy_difference": 0.01}}
    int8 = {"race": {"demographic_parity_difference": 0.16, "equalized_odds_difference": 0.1,
                     "accuracy_difference": 0.01}}
    parity = parity_verdict("dynamic", 0.85, 0.82, fp32, int8, 0.01, 0.02)
    drop, widening = views.explain_verdict(parity).split(". ")[:2]
    assert drop == ("The quantization parity gate failed: the dynamic int8 variant's accuracy is 0.8200 against "
                    "fp32's 0.8500, a drop of 3.00 points where export.accuracyBudget allows 1.00")
    assert widening == ("The quantization parity gate failed: the dynamic variant widens the demographic parity "
                        "difference across race by 0.060 compared with fp32, more than the 0.02 allowed by "
                        "gates.quantizationFairnessChange")

    errors = {"sex": {"mae_difference": 14.5, "max_group_mae": 52.0, "by_group": {}, "excluded_small_groups": {}}}
    unfair = fairness_verdict(errors, FairnessSpec(maxErrorGap=12), {}, "fp32")
    assert views.explain_verdict(unfair).startswith(
        "The fairness gate failed: the difference in mean absolute error between groups across sex is 14.500, above "
        "the 12 allowed by responsibleAI.fairness.maxErrorGap.")
    r2 = parity_verdict("static", 0.51, 0.46, {}, {}, 0.02, 0.05, metric="r2")
    assert views.explain_verdict(r2).startswith(
        "The quantization parity gate failed: the static int8 variant's r2 is 0.4600 against fp32's 0.5100")

    drift = drift_verdict({"drifted_share": 0.75, "drifted_columns": 3, "columns": {"a": 0, "b": 0, "c": 0, "d": 0},
                           "drifted_column_names": ["a", "b", "c"]}, 0.5, 100, 100, {})
    assert views.explain_verdict(drift).startswith(
        "The drift gate failed: 3 columns (a, b, c) of the recent production data differ from the training data, "
        "a share of 75%, at or above the 50% allowed by gates.driftShare.")

    unknown = GateVerdict(gate="license_check", passed=False,
                          reason="the licence of a training set forbids redistribution")
    assert views.explain_verdict(unknown) == (
        "The license check gate failed: the licence of a training set forbids redistribution.")
    waived = GateVerdict(gate="fairness", passed=True, waived=True, reason="waived: no person in the data")
    approval = {"status": "rejected", "release_key": "k", "verdicts": [waived.to_xcom()],
                "reasons": ["approval: rejected by ana at 2026-01-01T00:00:00Z: too slow on kiosks"]}
    assert views.explain_rejection(approval) == [
        "A person decided: rejected by ana at 2026-01-01T00:00:00Z: too slow on kiosks."]


def test_open_evidence_serves_only_files_inside_the_artifact_store(tmp_path, state):
    settings = Settings()
    store = ObjectStore(settings.store_url)
    uri = store.put_bytes(b'{"share": 0.5}', "runs/m/key/evidence/drift/drift.json")
    html = store.put_bytes(b"<html></html>", "runs/m/key/model_card.html")
    assert views.open_evidence(uri, settings) == (b'{"share": 0.5}', "application/json; charset=utf-8")
    assert views.open_evidence(html, settings)[1] == "text/html; charset=utf-8"
    with pytest.raises(FileNotFoundError):
        views.open_evidence(store.uri("runs/m/key/missing.json"), settings)

    secret = tmp_path / "secret.txt"
    secret.write_text("not evidence")
    root = store.uri("").rstrip("/")
    (settings.state / "artifacts" / "runs" / "link").symlink_to(tmp_path)
    for refused in (secret.as_uri(), "file:///etc/passwd", f"{root}/../secret.txt", f"{root}/runs/../../secret.txt",
                    f"{root}/runs/%2e%2e/%2e%2e/secret.txt", f"{root}/runs/m//key/model_card.html",
                    f"{root}/runs/link/secret.txt", f"{root}-other/x.json", "s3://bucket/runs/x.json",
                    "https://example.com/model_card.html", "/etc/passwd", ""):
        with pytest.raises(views.EvidenceError):
            views.open_evidence(refused, settings)
