"""The XCom codec (plugins/edge_airflow/xcom.py) and the approval answer, without Airflow's
metadata database: records go out as XCom and come back as the types the stage functions'
annotations name."""

from __future__ import annotations

from pathlib import Path

import pytest
from edge_airflow import xcom
from edge_airflow.approval import approval_of

from pipelines import release
from pipelines.records import (
    Approval,
    DataCheck,
    Decision,
    GateVerdict,
    ModelCard,
    QuantCandidate,
    QuantizationPlan,
    ReleaseOptions,
    TrainedModel,
)

DATA = DataCheck(passed=True, source="data.csv", sha256="a" * 64, rows=3, schema={"x": "float64"}, features=["x"],
                 snapshot_uri="file:///s", report_uri="file:///r", release_key="k" * 64)
TRAINED = TrainedModel(framework="sklearn", model_uri="file:///m", metrics={"accuracy": 0.9}, classes=["0", "1"],
                       train_seconds=1.5)
VERDICTS = [GateVerdict(gate="quality", passed=True, reason="ok"),
            GateVerdict(gate="budget", passed=True, reason="within", evidence={"cost.json": "file:///c"})]


def stage(spec_path: str | Path, data: DataCheck, trained: TrainedModel | None, verdicts: list[GateVerdict] = (),
          cost: dict | None = None, salt: str = "") -> dict:
    return {"spec_path": spec_path, "data": data, "trained": trained, "verdicts": verdicts, "cost": cost, "salt": salt}


def test_records_round_trip_into_the_annotated_types():
    got = xcom.call(stage, "spec.yaml", DATA.to_xcom(), TRAINED.to_xcom(), [v.to_xcom() for v in VERDICTS],
                    cost={"verdicts": []}, salt="run-1")
    assert got["data"] == DATA and isinstance(got["data"], DataCheck)
    assert got["trained"] == TRAINED and isinstance(got["trained"], TrainedModel)
    assert got["verdicts"] == VERDICTS and all(isinstance(v, GateVerdict) for v in got["verdicts"])
    # What is not a record stays as it is: a path, a plain dict, a string, None.
    assert got["spec_path"] == "spec.yaml" and got["cost"] == {"verdicts": []} and got["salt"] == "run-1"
    assert xcom.call(stage, "spec.yaml", DATA, None)["trained"] is None


def test_decode_follows_lists_optionals_and_dicts_of_records():
    assert xcom.decode(DATA.to_xcom(), DataCheck | None) == DATA
    assert xcom.decode(None, DataCheck | None) is None
    assert xcom.decode({"a": DATA.to_xcom()}, dict[str, DataCheck]) == {"a": DATA}
    assert xcom.decode({"seconds": 1.0}, dict[str, float]) == {"seconds": 1.0}
    assert xcom.decode("spec.yaml", str | Path) == "spec.yaml"


def test_the_release_library_stages_take_their_records_from_xcom():
    decision, options = Decision(outcome="await_approval", reasons=["manual"]), ReleaseOptions()
    no = Approval(approved=False, by="ana", at="2026-01-01")
    assert xcom.call(release.next_step, decision.to_xcom(), options.to_xcom()) == "ask"
    assert xcom.call(release.next_step, decision.to_xcom(), options.to_xcom(), no.to_xcom()) == "stop"
    plan = QuantizationPlan(chosen="fp32", reason="smallest eligible", candidates=[QuantCandidate(
        variant="fp32", uri="file:///m.onnx", sha256="b" * 64, size_bytes=2048, accuracy=0.9, accuracy_change=0.0,
        latency_p50_ms=1.0, latency_p95_ms=2.0, eligible=True)])
    card = ModelCard(json_uri="file:///card.json", html_uri="file:///card.html", sha256="c" * 64)
    body = xcom.call(release.approval_body, "m", "3", [v.to_xcom() for v in VERDICTS], card.to_xcom(),
                     plan.to_xcom(), why="manual")
    assert "**m** version **3**" in body and "| budget | passed | within |" in body


def test_run_stage_returns_xcom_keeps_seconds_and_fails_fast_on_bad_input(monkeypatch):
    pushed = {}

    class TaskInstance:
        def xcom_push(self, key, value):
            pushed[key] = value

    def train(spec_path: str | Path, data: DataCheck) -> TrainedModel:
        assert isinstance(data, DataCheck)
        return TRAINED

    monkeypatch.setattr(xcom, "get_current_context", lambda: {"ti": TaskInstance()})
    monkeypatch.setattr(release, "train", train)
    assert xcom.run_stage("train", "spec.yaml", DATA.to_xcom()) == TRAINED.to_xcom()
    assert isinstance(pushed["seconds"], float)

    from airflow.exceptions import AirflowFailException

    def bad(spec_path, data):
        raise release.ReleaseError("data.csv: column x is missing;\n  column y has nulls")

    monkeypatch.setattr(release, "train", bad)
    with pytest.raises(AirflowFailException) as failed:
        xcom.run_stage("train", "spec.yaml", DATA.to_xcom())
    assert str(failed.value) == "data.csv: column x is missing; column y has nulls"
    with pytest.raises(KeyError), xcom.failing_fast():  # anything else is left to the task's retries
        raise KeyError("store")


def test_a_persons_answer_becomes_the_recorded_approval():
    answer = {"chosen_options": ["Approve"], "params_input": {"comment": "fine"},
              "responded_by_user": {"id": "7", "name": "admin"}, "responded_at": "2026-01-01 10:00:00+00:00"}
    assert approval_of(answer) == Approval(approved=True, by="admin", at="2026-01-01 10:00:00+00:00", comment="fine")
    assert approval_of({**answer, "chosen_options": ["Reject"], "responded_by_user": {"id": "7"}}).by == "7"
    assert not approval_of({**answer, "chosen_options": ["Reject"]}).approved
    assert approval_of(None) is None


def test_the_summary_line():
    from pipelines.records import ReleaseSummary

    released = ReleaseSummary.model_construct(status="released", model="m", model_version="2", gitops_commit="abc",
                                              reasons=[])
    assert released.headline() == "RELEASED m v2: commit abc"
    rejected = ReleaseSummary.model_construct(status="rejected", model="m", model_version="2", gitops_commit=None,
                                              reasons=["fairness: too wide", "budget: over"])
    assert rejected.headline() == "REJECTED m v2: fairness: too wide; budget: over"