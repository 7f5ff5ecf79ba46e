"""Labels from a business system through Edge Releases (`POST /edge/api/models/<model>/feedback`)
on a real api-server: taken from users who may run the model's release, checked whole, stored
as one object; refused with a one-line reason otherwise."""

import json
from datetime import datetime, timedelta, timezone

import pytest
import requests
from conftest import user_token

MODEL = "diabetes-progression"  # a spec of the api-server's specs folder: a regression, labels are numbers


@pytest.mark.integration
def test_labels_are_taken_from_people_who_may_run_the_release(api_server):
    from pipelines.operate.feedback import read_labels
    from pipelines.settings import get_settings
    from pipelines.storage import ObjectStore

    base, admin = api_server
    viewer = user_token(base, "viewer")
    url = f"{base}/edge/api/models/{MODEL}/feedback"

    def post(token, body, model_url=url, **headers):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.post(model_url, data=data, timeout=60,
                             headers={**auth, "Content-Type": "application/json", **headers})

    labels = [{"inference_id": f"visit-{i}", "label": 100 + i} for i in range(3)]
    before = datetime.now(timezone.utc) - timedelta(seconds=1)
    answer = post(admin, {"labels": labels})
    assert answer.status_code == 201, answer.text
    receipt = answer.json()
    assert receipt["model"] == MODEL and receipt["labels"] == 3 and receipt["key"].startswith(f"feedback/{MODEL}/")
    settings = get_settings()
    stored = read_labels(ObjectStore(settings.telemetry_url), MODEL, before, datetime.now(timezone.utc)
                         + timedelta(seconds=1))
    mine = stored[stored["inference_id"].str.startswith("visit-")]
    assert sorted(mine["label"].tolist()) == [100, 101, 102] and set(mine["by"]) == {"admin"}

    assert post(None, {"labels": labels}).status_code == 401
    denied = post(viewer, {"labels": labels})
    assert denied.status_code == 403
    assert denied.json() == {"detail": f"Labels are taken from users who may run edge_release__{MODEL}"}
    refused = {
        "not a number": ({"labels": [{"inference_id": "visit-9", "label": "high"}]},
                         "labels: row 1: label 'high' is not a number (the model is a regression)"),
        "an attribute": ({"labels": [{"inference_id": "visit-9", "label": 1, "sex": "Female"}]},
                         "labels: row 1: unknown field 'sex'"),
        "twice": ({"labels": [{"inference_id": "v", "label": 1}, {"inference_id": "v", "label": 2}]},
                  "labels: row 2: inference_id 'v' again (first in row 1); send one label per inference"),
        "a path": ({"labels": [{"inference_id": "../../x", "label": 1}]}, "labels: row 1: inference_id '../../x'"),
        "another shape": ({"rows": []}, 'the body must be {"labels": '),
    }
    for case, (body, reason) in refused.items():
        answer = post(admin, body)
        assert answer.status_code == 400 and answer.json()["detail"].startswith(reason), (case, answer.text)
        assert "\n" not in answer.json()["detail"]
    assert post(admin, b"{").json()["detail"].startswith("the body is not JSON")
    too_big = post(admin, b" " * (16 * 1024 * 1024 + 1))
    assert too_big.status_code == 400 and "larger than 16,777,216 bytes" in too_big.json()["detail"]
    unknown = post(admin, {"labels": labels}, model_url=f"{base}/edge/api/models/no-such-model/feedback")
    assert unknown.status_code == 404
