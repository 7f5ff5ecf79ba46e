"""
### Edge desired state: publish the GitOps tip to devices, signed

Renders the tip of the GitOps branch into one desired-state document per device group and
publishes them, with the artifacts and signature bundles they name, as targets of the TUF
repository in the artifact store (`<store>/tuf`), which devices poll over HTTP(S) or a CDN.
A model is published only when its manifests equal what the release key attested and its
sequence is not older than the published one; a refused model keeps its last good state and
the task log says why. Runs after every commit to the GitOps branch (the Asset
`edge-desired-state://gitops`, raised by release, rollout and rollback) and hourly, which
also signs the timestamp again before it expires. Nothing changed means nothing written.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Asset, AssetOrTimeSchedule, dag, task
from airflow.sdk.definitions.timetables.trigger import CronTriggerTimetable

from pipelines import connections
from pipelines.edge import DESIRED_STATE_ASSET_URI


@dag(dag_id="edge_publish_desired_state",
     schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("17 * * * *", timezone="UTC"),
                                  assets=[Asset(DESIRED_STATE_ASSET_URI)]),
     start_date=datetime(2026, 1, 1), catchup=False, max_active_runs=1, is_paused_upon_creation=False,
     tags=["edge-release", "desired-state"], doc_md=__doc__,
     default_args={"pre_execute": connections.pre_execute})
def edge_publish_desired_state():
    @task(retries=3, retry_delay=timedelta(seconds=10), retry_exponential_backoff=True)
    def publish():
        from pipelines.edge.publish import publish_desired_state

        with connections.signing_settings() as settings:
            result = publish_desired_state(settings)
        print("\n".join(result.lines()))
        return result.to_xcom()

    publish()


edge_publish_desired_state()
