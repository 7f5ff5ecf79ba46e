"""`POST /edge/api/models/<model>/explain`: one input explained with the deployed variant, the
body checked field by field, and only for people who may read the model's data."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest
import requests
from conftest import ROOT, tabular_frame, write_spec

sys.path.insert(0, str(ROOT / "plugins"))

INPUT = {"x1": 1.5, "x2": -0.2, "colour": "red"}
SHAP_SPEC = {"explainability": {"method": "shap", "backgroundRows": 80},
             "fairness": {"biasScore": 0.2, "equalizedOdds": 0.25}}


def _read(body: bytes, length: str | None = "auto") -> dict:
    from edge_ui.explain import read_body

    async def chunks():
        for start in range(0, len(body), 1000):
            yield body[start:start + 1000]

    return asyncio.run(read_body(chunks(), str(len(body)) if length == "auto" else length))


def test_the_body_is_json_of_bounded_size():
    from edge_ui.explain import MAX_BODY_BYTES, ExplainRefused

    assert _read(json.dumps({"inputs": INPUT}).encode()) == {"inputs": INPUT}
    big = json.dumps({"inputs": {"x1": "a" * MAX_BODY_BYTES}}).encode()
    for length in ("auto", None):  # a declared length, or none and the stream cut off
        with pytest.raises(ExplainRefused, match="the body is larger than 65536 bytes"):
            _read(big, length)
    for body, reason in ((b"{not json", "the body is not JSON: Expecting property name"),
                         (b'{"inputs": {"x1": NaN}}', "the body is not JSON: NaN is not a number JSON allows"),
                         (b"[1, 2]", "the body must be a JSON object"), (b"\xff\xfe", "the body is not JSON")):
        with pytest.raises(ExplainRefused, match=reason):
            _read(body)


@pytest.fixture
def released(tmp_path, state):
    """A model released into a private state folder (explained with SHAP, per its spec)."""
    from pipelines import release

    tabular_frame().to_csv(tmp_path / "data.csv", index=False)
    summary = release.run_release(write_spec(tmp_path, "explained", "data.csv", responsibleAI=SHAP_SPEC))
    assert summary.status == "released"
    return summary


def test_one_input_is_explained_with_the_deployed_variant(released, monkeypatch, tmp_path):
    from edge_ui.explain import ExplainRefused, explain_input
    from edge_ui.views import UnknownModel

    from pipelines.settings import Settings

    monkeypatch.setenv("EDGE_SPECS_DIR", str(tmp_path))  # the spec names shap, its background and seed
    settings = Settings()
    answer = explain_input("explained", {"inputs": INPUT}, settings)
    assert (answer.model, answer.version, answer.variant, answer.group) == (
        "explained", released.model_version, released.quantization.chosen, None)
    assert answer.task == "binary" and answer.background_rows == 80
    found = answer.explanation
    assert found.method == "shap" and set(found.weights) == {"x1", "x2", "colour"}
    assert found.predicted_label == "1" and found.probability > 0.5  # x1 + 0.5 x2 + red is far above 0.3
    assert found.base_value + sum(found.weights.values()) == pytest.approx(found.probability, abs=2e-3)
    assert 0 < answer.latency_ms <= answer.request_ms

    again = explain_input("explained", {"inputs": INPUT, "group": "phones", "method": "lime", "top": 1}, settings)
    assert (again.group, again.variant, again.explanation.method) == ("phones", answer.variant, "lime")
    assert list(again.explanation.weights) == ["x1"]
    assert explain_input("explained", {"inputs": {**INPUT, "colour": None}}, settings).explanation.weights

    refused = {
        "unknown field 'input' in the body": {"input": INPUT},
        '"inputs" must be an object': {"inputs": [1.5, -0.2, "red"]},
        "inputs lack feature 'colour'": {"inputs": {"x1": 1.0, "x2": 0.0}},
        "unknown feature 'x3'": {"inputs": {**INPUT, "x3": 1}},
        "feature 'x1' takes a number, not \"1.5\"": {"inputs": {**INPUT, "x1": "1.5"}},
        "feature 'x2' takes a number, not true": {"inputs": {**INPUT, "x2": True}},
        "feature 'colour' takes text, not 3": {"inputs": {**INPUT, "colour": 3}},
        "no device group 'tablets' runs explained (groups: phones)": {"inputs": INPUT, "group": "tablets"},
        '"method" must be one of lime, shap': {"inputs": INPUT, "method": "permutation_importance"},
        '"top" must be a whole number from 1 to 100': {"inputs": INPUT, "top": 0},
    }
    for reason, body in refused.items():
        with pytest.raises(ExplainRefused) as error:
            explain_input("explained", body, settings)
        assert str(error.value).startswith(reason) and "\n" not in str(error.value), (reason, error.value)
    for model in ("not-released", "Not_A_Name"):
        with pytest.raises(UnknownModel):
            explain_input(model, {"inputs": INPUT}, settings)


@pytest.mark.integration
def test_the_api_server_explains_for_people_who_may_read_the_data(api_server, tmp_path):
    from conftest import user_token

    from pipelines import release

    base, admin = api_server
    viewer = user_token(base, "viewer")
    tabular_frame().to_csv(tmp_path / "data.csv", index=False)
    # The api-server reads the session's state folder and its specs folder holds no such spec:
    # the route then explains with LIME, the default of a spec's permutation importance.
    summary = release.run_release(write_spec(tmp_path, "edge-explained", "data.csv"))
    assert summary.status == "released"
    url = f"{base}/edge/api/models/edge-explained/explain"

    def post(token: str | None, body, **kwargs):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return requests.post(url if "url" not in kwargs else kwargs.pop("url"), data=data, timeout=120,
                             headers={**headers, "Content-Type": "application/json"}, **kwargs)

    answer = post(admin, {"inputs": INPUT, "group": "phones"})
    assert answer.status_code == 200, answer.text
    found = answer.json()
    assert (found["version"], found["variant"], found["group"]) == (
        summary.model_version, summary.quantization.chosen, "phones")
    assert found["explanation"]["method"] == "lime" and found["latency_ms"] > 0
    assert set(found["explanation"]["weights"]) == {"x1", "x2", "colour"}
    assert answer.headers["cache-control"] == "no-store"
    shap = post(admin, {"inputs": INPUT, "method": "shap"}).json()
    assert shap["explanation"]["method"] == "shap" and shap["group"] is None

    assert post(None, {"inputs": INPUT}).status_code == 401
    denied = post(viewer, {"inputs": INPUT})
    assert denied.status_code == 403
    assert denied.json() == {"detail": "Explanations are for people who may run edge_release__edge-explained"}
    bad = post(admin, {"inputs": {**INPUT, "x1": "high"}})
    assert bad.status_code == 400 and bad.json() == {"detail": "feature 'x1' takes a number, not \"high\""}
    assert post(admin, b"x" * 70_000).json() == {"detail": "the body is larger than 65536 bytes"}
    assert post(admin, b"{").status_code == 400
    missing = post(admin, {"inputs": INPUT}, url=f"{base}/edge/api/models/no-such-model/explain")
    assert missing.status_code == 404
    assert requests.get(url, headers={"Authorization": f"Bearer {admin}"}, timeout=30).status_code == 405
