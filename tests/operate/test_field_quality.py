"""Ground truth from the field and the quality and fairness monitor: labels of sampled
inferences, joined on the server with the operator's attributes table, judged with bootstrap
intervals, and the spec's onBreach actions as real GitOps commits."""

from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import model_page_html, phones_fleet, tabular_frame, write_spec

from pipelines.gates import field
from pipelines.gates.fairness import group_report
from pipelines.operate.feedback import FeedbackError, check_rows, read_file, read_labels, store_labels
from pipelines.storage import ObjectStore

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


# -- figures and intervals -----------------------------------------------------------------------------
@pytest.mark.parametrize("classes", [2, 3])
def test_field_figures_equal_fairlearns_and_their_intervals_cover_them(classes):
    rng = np.random.default_rng(0)
    n = 20_000
    groups = rng.choice(["a", "b", "c"], n, p=[0.5, 0.3, 0.2])
    truth = rng.integers(0, classes, n)
    predicted = np.where(rng.random(n) < 0.8, truth, rng.integers(0, classes, n))
    predicted[(groups == "c") & (rng.random(n) < 0.3)] = 0
    fairlearn = group_report(truth, predicted, pd.DataFrame({"s": groups}), 30, classes)["s"]
    names, counts = field.confusion(truth, predicted, groups, classes)
    ours = field.classification_figures(counts)
    assert names == ["a", "b", "c"]
    for metric in ("demographic_parity_difference", "equalized_odds_difference", "min_group_accuracy",
                   "accuracy_difference"):
        assert round(float(ours[metric]), 6) == fairlearn[metric], metric
    assert float(ours["accuracy"]) == pytest.approx(float(np.mean(truth == predicted)))
    boot = field.classification_figures(field.resample_confusion(counts, 1000, rng))
    for metric in ("accuracy", "demographic_parity_difference", "min_group_accuracy"):
        low, high = field.interval(boot[metric], 0.95)
        assert low < float(ours[metric]) < high and high - low < 0.1, (metric, low, high)


def test_a_small_window_is_reported_not_judged_and_a_breach_needs_the_whole_interval_past_the_limit():
    rng = np.random.default_rng(1)
    small = field.judge("accuracy", "version", None, 40, 0.70, (0.55, 0.84), 0.8, "min", "gates.quality", False)
    assert not small.judged and small.passed and not small.breached
    wide = field.judge("accuracy", "version", None, 400, 0.78, (0.74, 0.82), 0.8, "min", "gates.quality", True)
    assert wide.judged and wide.passed, "an interval that reaches the floor is not a breach"
    clear = field.judge("accuracy", "version", None, 4000, 0.70, (0.69, 0.71), 0.8, "min", "gates.quality", True)
    assert clear.breached and "BREACH" in clear.line()
    # 30 rows of a coin: the interval is wide, the gap's estimate alone would have alarmed.
    names, counts = field.confusion(rng.integers(0, 2, 30), rng.integers(0, 2, 30), rng.choice(["a", "b"], 30), 2)
    boot = field.classification_figures(field.resample_confusion(counts, 1000, rng))
    low, high = field.interval(boot["demographic_parity_difference"], 0.95)
    assert high - low > 0.2


def test_mean_absolute_error_intervals_from_binned_errors():
    rng = np.random.default_rng(2)
    errors = np.concatenate([rng.normal(0, 1, 50_000), rng.normal(0, 3, 50_000)])
    groups = np.array(["a"] * 50_000 + ["b"] * 50_000)
    names, bins = field.error_bins(errors, groups)
    boot = field.resample_mae(bins, 500, rng)
    for g, name in enumerate(names):
        exact = float(np.mean(np.abs(errors[groups == name])))
        low, high = field.interval(boot[:, g], 0.95)
        assert low < exact < high and high - low < 0.1 * exact


# -- labels ------------------------------------------------------------------------------------------------
def test_a_batch_of_labels_is_checked_whole_and_every_bad_row_is_named(tmp_path):
    good = check_rows([{"inference_id": "loan-1", "label": 1}, {"inference_id": "loan-2", "label": "0"}], "binary")
    assert good == [{"inference_id": "loan-1", "label": 1}, {"inference_id": "loan-2", "label": 0}]
    cases = [
        ([], "no labels"),
        ([{"inference_id": "a", "label": 1, "sex": "Female"}], "row 1: unknown field 'sex'"),
        ([{"inference_id": "../etc", "label": 1}], "row 1: inference_id '../etc' must be"),
        ([{"inference_id": "a", "label": 1}, {"inference_id": "a", "label": 0}], "row 2: inference_id 'a' again"),
        ([{"inference_id": "a"}], "row 1: label is missing"),
        ([{"inference_id": "a", "label": [1]}], "row 1: label '[1]' is not a class"),
    ]
    for rows, message in cases:
        with pytest.raises(FeedbackError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
            check_rows(rows, "binary", "labels.csv")
    with pytest.raises(FeedbackError, match="not a number"):
        check_rows([{"inference_id": "a", "label": "high"}], "regression")
    with pytest.raises(FeedbackError, match="at most 100,000"):
        check_rows([{"inference_id": f"i{i}", "label": 0} for i in range(100_001)], "binary")
    (tmp_path / "labels.csv").write_text("inference_id,label\nloan-1,1\nloan-2,0,extra\n")
    with pytest.raises(FeedbackError, match="line 3: more values than the header"):
        read_file(tmp_path / "labels.csv")
    (tmp_path / "wrong.csv").write_text("id,outcome\nloan-1,1\n")
    with pytest.raises(FeedbackError, match="header inference_id,label"):
        read_file(tmp_path / "wrong.csv")


def test_labels_are_stored_once_per_batch_and_read_back_by_arrival(tmp_path):
    store = ObjectStore((tmp_path / "telemetry").as_uri())
    rows = check_rows([{"inference_id": f"loan-{i}", "label": i % 2} for i in range(5)], "binary")
    first = store_labels(store, "m", rows, T0)
    again = store_labels(store, "m", rows, T0)
    assert first.key == again.key and first.key.startswith("feedback/m/2026-12-01/120000-")
    store_labels(store, "m", check_rows([{"inference_id": "loan-1", "label": 0}], "binary"), T0 + timedelta(hours=1))
    labels = read_labels(store, "m", T0 - timedelta(days=1), T0 + timedelta(days=1))
    assert len(labels) == 6 and labels.iloc[-1]["inference_id"] == "loan-1" and labels.iloc[-1]["label"] == 0
    assert len(read_labels(store, "m", T0 + timedelta(minutes=30), T0 + timedelta(days=1))) == 1


# -- the monitor on a real release and a simulated fleet --------------------------------------------------
def _world(tmp_path, on_breach, canary=False):
    """A released small model, a fleet of 40 phones sampling every inference, and its spec."""
    from pipelines.__main__ import main
    from pipelines.settings import Settings

    specs = tmp_path / "specs"
    specs.mkdir()
    tabular_frame(4000).to_csv(specs / "data.csv", index=False)
    strategy = {"type": "Canary", "canary": {"steps": [{"share": 50}, {"share": 100}],
                                             "analysis": {"minRequests": 100}}} if canary else {"type": "RollingUpdate"}
    spec = write_spec(specs, "loans", "data.csv", telemetry={"sampleRate": 1.0, "maxSamples": 10_000},
                      deploymentStrategy=strategy,
                      monitoring={"field": {"window": "1d", "minLabels": 200, "resamples": 400,
                                            "attributes": "attributes.csv"}},
                      responsibleAI={"fairness": {"biasScore": 0.2, "equalizedOdds": 0.25, "minGroupAccuracy": 0.75,
                                                  "minGroupSize": 50},
                                     "explainability": {"method": "lime", "samples": 3, "backgroundRows": 50},
                                     "onBreach": on_breach})
    (tmp_path / "fleet.yaml").write_text(phones_fleet())
    settings = Settings(specs_dir=specs)
    assert main(["release", str(spec)]) == 0
    return spec, settings


def _serve_and_label(fleet, settings, specs, shift=None, requests=60):
    fleet.serve_round(requests)
    return _label(fleet, settings, specs, shift)


def _label(fleet, settings, specs, shift=None):
    """The business system's labels of everything served, and the operator's attributes table."""
    from pipelines.operate.feedback import check_rows as clean

    outcomes = fleet.outcomes("loans", shift, seed=len(fleet.rounds))
    telemetry = ObjectStore(settings.telemetry_url)
    rows = clean(outcomes[["inference_id", "label"]].to_dict("records"), "binary")
    store_labels(telemetry, "loans", rows, datetime.now(timezone.utc))
    table = specs / "attributes.csv"
    old = pd.read_csv(table) if table.exists() else None
    new = outcomes[["inference_id", "group"]]
    pd.concat([old, new]).to_csv(table, index=False) if old is not None else new.to_csv(table, index=False)
    return outcomes


def test_field_quality_ok_then_one_groups_outcomes_change_and_the_breach_rolls_back(state, tmp_path):
    from pipelines.edge.simulator import Fleet, OutcomeShift
    from pipelines.gitops import repo
    from pipelines.operate.quality import check_field_quality

    spec, settings = _world(tmp_path, ["notify", "hold", "rollback", "retrain"])
    specs = spec.parent
    fleet = Fleet(40, settings, seed=5, fleet_path=tmp_path / "fleet.yaml")
    fleet.poll_round()
    rows = tabular_frame(2)[["x1", "x2", "colour"]]
    for ids, message in ((["a"], "1 inference ids for 2 requests"), (["ok-1", "../x"], "inference id '../x'")):
        with pytest.raises(ValueError, match=message.replace(".", r"\.")):
            fleet.agents[0].serve("loans", rows, ids=ids)
    _serve_and_label(fleet, settings, specs)
    sent = []
    check = check_field_quality(spec, settings, notify=lambda c: sent.append(c) or ["webhook"])
    assert check.status == "ok", check.lines()
    assert check.labelled == 2400 and check.unmatched == 0 and check.late == 0 and check.without_attributes == 0
    ours = check.versions[0]
    assert ours.role == "deployed" and ours.figures["accuracy"]["low"] < ours.figures["accuracy"]["value"]
    assert set(ours.fairness["group"]["by_group"]) == {"a", "b"} and ours.device_groups["phones"]["rows"] == 2400
    assert len(check.explanations) == 3 and all(e["weights"] for e in check.explanations)
    store = ObjectStore(settings.store_url)
    keys = store.list_keys("monitoring/loans/")
    assert {k.rsplit("/", 1)[1] for k in keys} >= {"quality.html", "quality.json", "explanations.json"}
    assert not sent and not check.actions

    # The world changes for group b: most of its negative outcomes turn positive. v1 does not know.
    _serve_and_label(fleet, settings, specs, OutcomeShift("group", "b", 1, 0.9))
    check = check_field_quality(spec, settings, notify=lambda c: sent.append(c) or ["webhook"])
    assert check.status == "breach" and check.new_breach, check.lines()
    breaches = "\n".join(check.versions[0].breaches)
    assert "by group" in breaches and "BREACH" in breaches
    actions = {a.action: a for a in check.actions}
    assert [a.action for a in check.actions] == ["notify", "hold", "rollback", "retrain"]
    assert actions["notify"].status == "done" and sent and sent[0].breached_version == "1"
    assert actions["hold"].status == "skipped" and "no canary" in actions["hold"].detail
    assert actions["rollback"].status == "skipped" and "1" in actions["rollback"].detail, actions["rollback"]
    assert actions["retrain"].status == "skipped" and "Airflow" in actions["retrain"].detail
    assert repo.log(settings.remote, "main", settings.work_dir / "gitops")[0]["subject"].startswith("release(loans)")
    # Edge Releases shows the check on the model's page.
    page = model_page_html("loans", specs)
    assert "Quality and fairness in the field" in page and "field check(s)" in page
    assert "quality.json" in page and "Evidently report" in page and "<strong>notify</strong> done" in page
    # The next hour: the same breach is not announced again.
    again = check_field_quality(spec, settings, now=datetime.now(timezone.utc) + timedelta(minutes=1),
                                notify=lambda c: sent.append(c) or ["webhook"])
    assert again.status == "breach" and not again.new_breach and len(sent) == 1
    assert {a.action: a.status for a in again.actions}["notify"] == "skipped"


def test_a_canary_breaching_in_the_field_is_held_then_rolled_back_by_commits(state, tmp_path):
    from pipelines.__main__ import main
    from pipelines.edge.simulator import Fault, Fleet
    from pipelines.gitops import repo
    from pipelines.operate.quality import check_field_quality
    from pipelines.operate.rollout import step_rollout

    spec, settings = _world(tmp_path, ["hold", "rollback"], canary=True)
    fleet = Fleet(40, settings, seed=5, fleet_path=tmp_path / "fleet.yaml")
    fleet.poll_round()
    doc = yaml.safe_load(spec.read_text())
    doc["training"]["params"] = {"C": 0.05}
    spec.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert main(["release", str(spec)]) == 0
    fleet.poll_round()
    assert set(fleet.rounds[-1]["models"]["loans"]["versions"]) == {"1", "2"}
    # A broken feature pipeline in the app that ships with v2: its devices feed x1 upside down.
    fleet.serve_round(80, [Fault(version="2", shift={"x1": -4.0})])
    _label(fleet, settings, spec.parent)
    check = check_field_quality(spec, settings)
    assert check.canary and check.deployed_version == "2" and check.versions[0].role == "canary"
    assert check.status == "breach", check.lines()
    assert check.version("1").role == "control" and check.version("1").status == "ok", check.lines()
    actions = {a.action: a for a in check.actions}
    assert actions["hold"].status == "done" and actions["hold"].commit
    assert actions["rollback"].status == "done" and actions["rollback"].detail == "v2 -> v1"
    log = repo.log(settings.remote, "main", settings.work_dir / "gitops")
    assert log[0]["subject"] == "rollback(loans): version 2 -> 1"
    assert log[1]["subject"] == "rollout(loans): hold the canary where it is"
    assert "edge_quality_monitor" in log[1]["body"] and "Field quality check:" in log[1]["body"]
    assert "Rolled back by: edge_quality_monitor" in log[0]["body"]
    fleet.poll_round()
    assert fleet.rounds[-1]["models"]["loans"]["versions"] == {"1": 40}
    assert step_rollout(spec, settings).decision == "complete"


def test_the_command_line_stores_a_labels_file_or_names_the_bad_row(state, tmp_path, monkeypatch, capsys):
    from pipelines.__main__ import main
    from pipelines.settings import get_settings

    specs = tmp_path / "specs"
    specs.mkdir()
    write_spec(specs, "loans", "data.csv")
    monkeypatch.setenv("EDGE_SPECS_DIR", str(specs))
    (tmp_path / "good.csv").write_text("inference_id,label\nloan-1,1\nloan-2,0\n")
    (tmp_path / "bad.jsonl").write_text('{"inference_id": "loan-1", "label": 1}\n{"inference_id": "loan 2", "label": 0}\n')
    assert main(["feedback", "loans", str(tmp_path / "good.csv")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("loans: 2 labels stored (feedback/loans/") and out.count("\n") == 1
    assert main(["feedback", "loans", str(tmp_path / "bad.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'bad.jsonl'}: row 2: inference_id 'loan 2' must be 1-128 letters, digits, " \
                  "'.', '_', ':' or '-'\n"
    assert main(["feedback", "no-such-model", str(tmp_path / "good.csv")]) == 2
    assert "no spec for 'no-such-model'" in capsys.readouterr().err
    stored = read_labels(ObjectStore(get_settings().telemetry_url), "loans", T0 - timedelta(days=3650),
                         datetime.now(timezone.utc) + timedelta(seconds=1))
    assert stored["inference_id"].tolist() == ["loan-1", "loan-2"], "the bad batch left nothing behind"
    assert main(["quality", "loans"]) == 0
    assert capsys.readouterr().out.startswith("Field quality of loans: no release\n")
