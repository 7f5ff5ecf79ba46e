"""Edge Releases: an Airflow UI view of every edge model's releases, for data scientists.

The api-server mounts the FastAPI app of `edge_ui/` at `/edge`; the external view puts it in
Airflow's navigation (shown inside the UI at `/plugin/edge-releases`). Pages and JSON need an
authenticated Airflow user (the UI's session cookie or a bearer token).
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin
from edge_ui.app import app

URL_PREFIX = "/edge"


class EdgeReleasesPlugin(AirflowPlugin):
    name = "edge_releases"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "Edge Releases"}]
    external_views = [{
        "name": "Edge Releases",
        "href": f"{URL_PREFIX}/",
        "url_route": "edge-releases",
        "destination": "nav",
    }]
