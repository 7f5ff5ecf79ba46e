"""The Edge Releases plugin: every route needs an Airflow user; a real api-server mounts it at
/edge, lists its external view, and serves a release made in this test to a logged-in user."""

import sys
from urllib.parse import quote

import pytest
import requests
from conftest import ROOT, tabular_frame, write_spec

# Airflow puts its plugins folder on sys.path; the plugin imports its app the same way.
sys.path.insert(0, str(ROOT / "plugins"))

# One example request per route of the app: a new route must be listed here to pass.
ROUTES = {
    "/": "/",
    "/models/{model}": "/models/some-model",
    "/models/{model}/versions/{version}": "/models/some-model/versions/1",
    "/models/{model}/compare": "/models/some-model/compare?a=1&b=2",
    "/models/{model}/commits/{sha}": "/models/some-model/commits/0123abcd",
    "/evidence": "/evidence?uri=file%3A%2F%2F%2Fetc%2Fpasswd",
    "/api/models": "/api/models",
    "/api/models/{model}": "/api/models/some-model",
    "/api/models/{model}/compare": "/api/models/some-model/compare?a=1&b=2",
    "/api/models/{model}/versions/{version}": "/api/models/some-model/versions/1",
}
# The routes that take a body (POST).
POST_ROUTES = {
    "/api/models/{model}/explain": "/api/models/some-model/explain",
    "/api/models/{model}/feedback": "/api/models/some-model/feedback",
}
HTML = {"accept": "text/html,application/xhtml+xml"}


def test_every_route_needs_an_airflow_user():
    from edge_ui.app import app
    from fastapi.testclient import TestClient

    assert {route.path for route in app.routes} == set(ROUTES) | set(POST_ROUTES) | {"/static"}
    client = TestClient(app)
    # The stylesheets are public, so the page asking for a login is styled; nothing else is.
    assert client.get("/static/edge.css").status_code == 200
    assert client.get("/static/../app.py").status_code == 404
    for example in ROUTES.values():
        answer = client.get(example)
        assert answer.status_code == 401 and answer.json() == {"detail": "Not authenticated"}, example
        page = client.get(example, headers=HTML)
        assert page.status_code == 401, example
        if not example.startswith("/api/"):  # a browser gets a short page pointing to the Airflow login
            assert "Log in to see Edge Releases" in page.text, example
    for example in POST_ROUTES.values():
        answer = client.post(example, json={"labels": []})
        assert answer.status_code == 401 and answer.json() == {"detail": "Not authenticated"}, example


def _uri(value: str) -> str:
    return quote(value, safe="")


@pytest.mark.integration
def test_the_api_server_serves_the_edge_releases_to_logged_in_users(api_server, tmp_path):
    from pipelines import release

    base, token = api_server
    # The api-server reads the session's state folder: the releases go there (unique model names).
    tabular_frame().to_csv(tmp_path / "data.csv", index=False)
    shipped = release.run_release(write_spec(tmp_path, "edge-view-shipped", "data.csv"))
    rejected = release.run_release(write_spec(tmp_path, "edge-view-rejected", "data.csv",
                                              gates={"quality": {"accuracy": {"minValue": 0.99}}}))
    assert (shipped.status, rejected.status) == ("released", "rejected")
    bearer = {"Authorization": f"Bearer {token}"}
    browser = {"_token": token}  # the cookie the Airflow UI sets after login

    plugins = requests.get(f"{base}/api/v2/plugins", headers=bearer, timeout=30).json()["plugins"]
    [plugin] = [p for p in plugins if p["name"] == "edge_releases"]
    assert [(a["url_prefix"], a["name"]) for a in plugin["fastapi_apps"]] == [("/edge", "Edge Releases")]
    [view] = plugin["external_views"]
    assert (view["name"], view["href"], view["url_route"], view["destination"]) == (
        "Edge Releases", "/edge/", "edge-releases", "nav")

    for example in ROUTES.values():
        assert requests.get(f"{base}/edge{example}", timeout=30).status_code == 401, example
        bad = requests.get(f"{base}/edge{example}", headers={"Authorization": "Bearer not-a-jwt"}, timeout=30)
        assert bad.status_code == 403, example  # Airflow: "Invalid JWT token"
    login = requests.get(f"{base}/edge/", headers=HTML, timeout=30)
    assert login.status_code == 401 and 'href="/auth/login?next=' in login.text

    rows = {r["model"]: r for r in requests.get(f"{base}/edge/api/models", headers=bearer, timeout=60).json()}
    row = rows["edge-view-shipped"]
    assert row["deployed_version"] == shipped.model_version and row["has_spec"] is False
    assert [(d["group"], d["version"], d["share"], d["canary"]) for d in row["deployments"]] == [
        ("phones", shipped.model_version, 100.0, False)]
    assert (row["last_release"]["status"], row["last_release"]["gitops_commit"]) == (
        "released", shipped.gitops_commit)
    assert row["cost"]["deployed_usd_per_month"] == pytest.approx(shipped.cost["total_usd_per_month"], abs=0.01)
    assert rows["edge-view-rejected"]["last_release"]["status"] == "rejected"
    assert rows["edge-view-rejected"]["deployments"] == []

    page = requests.get(f"{base}/edge/api/models/edge-view-shipped", headers=bearer, timeout=60).json()
    [version] = page["versions"]
    assert (version["version"], version["status"], version["gitops_commit"]) == (
        shipped.model_version, "released", shipped.gitops_commit)
    assert [v["gate"] for v in version["summary"]["verdicts"]] == [v.gate for v in shipped.verdicts]
    assert [c["kind"] for c in page["history"]] == ["release"]
    assert requests.get(f"{base}/edge/api/models/no-such-model", headers=bearer, timeout=30).status_code == 404

    index = requests.get(f"{base}/edge/", headers=HTML, cookies=browser, timeout=30)
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert 'href="./models/edge-view-shipped"' in index.text and 'href="./static/edge.css"' in index.text
    model = requests.get(f"{base}/edge/models/edge-view-shipped", headers=HTML, cookies=browser, timeout=60)
    assert model.status_code == 200 and f"v{shipped.model_version}" in model.text
    assert f'href="../evidence?uri={_uri(shipped.model_card_uri)}"' in model.text
    assert shipped.gitops_commit[:8] in model.text and "GitOps history of apps/edge-view-shipped" in model.text
    why = requests.get(f"{base}/edge/models/edge-view-rejected/versions/{rejected.model_version}", headers=HTML,
                       cookies=browser, timeout=60)
    assert why.status_code == 200 and "Why this version did not ship" in why.text
    assert "below the 0.99 required by gates.quality.accuracy.minValue" in why.text
    assert 'href="../../../models/edge-view-rejected"' in why.text
    css = requests.get(f"{base}/edge/static/edge.css", cookies=browser, timeout=30)
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")

    card = requests.get(f"{base}/edge/evidence?uri={_uri(shipped.model_card_uri)}", cookies=browser, timeout=30)
    assert card.status_code == 200 and card.headers["content-type"] == "text/html; charset=utf-8"
    assert card.headers["content-security-policy"].startswith("sandbox")
    assert "Model card: edge-view-shipped" in card.text and 'href="evidence?uri=' in card.text
    outside = requests.get(f"{base}/edge/evidence?uri={_uri('file:///etc/passwd')}", cookies=browser, timeout=30)
    assert outside.status_code == 400
    # CSV evidence reads as a table in the page, and downloads as the file itself on request.
    fairness = next(v for v in shipped.verdicts if v.gate == "fairness")
    csv_uri = fairness.evidence["fairness_by_group.csv"]
    table = requests.get(f"{base}/edge/evidence?uri={_uri(csv_uri)}", headers=HTML, cookies=browser, timeout=30)
    assert table.status_code == 200 and table.headers["content-type"].startswith("text/html")
    assert "<th>feature</th><th>group</th>" in table.text and "<td>group</td><td>a</td>" in table.text
    assert "Download the CSV file" in table.text
    raw = requests.get(f"{base}/edge/evidence?uri={_uri(csv_uri)}&raw=1", cookies=browser, timeout=30)
    assert raw.status_code == 200 and raw.headers["content-disposition"].startswith("attachment")
    assert raw.text.startswith("feature,group,")


@pytest.mark.integration
def test_roles_decide_who_downloads_data_and_model_files(api_server, tmp_path):
    """Airflow's auth manager decides: a viewer reads the pages, verdicts and reports; only a user
    who may run the model's release DAG downloads its training snapshot and its model file."""
    from conftest import user_token

    from pipelines import release
    from pipelines.settings import get_settings
    from pipelines.storage import ObjectStore

    base, admin = api_server
    viewer = user_token(base, "viewer")
    tabular_frame().to_csv(tmp_path / "data.csv", index=False)
    first = release.run_release(write_spec(tmp_path, "edge-view-roles", "data.csv"))
    second = release.run_release(write_spec(tmp_path, "edge-view-roles", "data.csv",
                                            training={"framework": "sklearn", "estimator": "random_forest",
                                                      "seed": 1, "params": {"n_estimators": 20}}))
    assert (first.status, second.status) == ("released", "rejected")  # the forest falls behind the champion
    settings = get_settings()
    store = ObjectStore(settings.store_url, settings.s3_endpoint_url)
    snapshot = store.uri(f"runs/edge-view-roles/{second.release_key}/data.parquet")
    assert store.exists(store.key_of(snapshot))
    card = second.model_card_uri

    def get(path, token, **kwargs):
        return requests.get(f"{base}/edge{path}", cookies={"_token": token}, headers=HTML, timeout=60, **kwargs)

    for token in (viewer, admin):
        assert get("/", token).status_code == 200
        page = get(f"/models/edge-view-roles/versions/{second.model_version}", token)
        assert page.status_code == 200 and "<h2>Gates</h2>" in page.text
        assert get(f"/evidence?uri={_uri(card)}", token).status_code == 200  # evidence for everyone
    for uri in (snapshot, first.artifact_uri):
        denied = get(f"/evidence?uri={_uri(uri)}", viewer)
        assert denied.status_code == 403 and "may run edge_release__edge-view-roles" in denied.text
        assert get(f"/evidence?uri={_uri(uri)}&raw=1", viewer).status_code == 403
        allowed = get(f"/evidence?uri={_uri(uri)}", admin)
        assert allowed.status_code == 200 and allowed.content == store.read_bytes(store.key_of(uri))
    # The version page offers the model file to the admin only.
    assert "download the signed ONNX file" in get(
        f"/models/edge-view-roles/versions/{first.model_version}", admin).text
    assert "download the signed ONNX file" not in get(
        f"/models/edge-view-roles/versions/{first.model_version}", viewer).text

    # Two versions side by side, and the GitOps commit of the first in the plugin's own view.
    compared = get(f"/models/edge-view-roles/compare?a={first.model_version}&b={second.model_version}", viewer)
    assert compared.status_code == 200 and "Training parameters" in compared.text
    assert "n_estimators" in compared.text and "same data" in compared.text
    api = requests.get(f"{base}/edge/api/models/edge-view-roles/compare",
                       params={"a": first.model_version, "b": second.model_version},
                       headers={"Authorization": f"Bearer {viewer}"}, timeout=60).json()
    assert [g[0] for g in api["gates"]] == [v.gate for v in first.verdicts]
    assert api["a"]["data_sha256"] == api["b"]["data_sha256"]
    commit = get(f"/models/edge-view-roles/commits/{first.gitops_commit}", viewer)
    assert commit.status_code == 200 and f"version {first.model_version}" in commit.text
    assert "apps/edge-view-roles/" in commit.text and "+++ b/apps/edge-view-roles/" in commit.text
    assert get("/models/edge-view-roles/commits/0000000000000000000000000000000000000000", viewer).status_code == 404
    assert get(f"/models/edge-view-roles/commits/{first.gitops_commit}..HEAD", viewer).status_code == 404
    assert get(f"/models/edge-view-roles/compare?a={first.model_version}&b=99", viewer).status_code == 404
