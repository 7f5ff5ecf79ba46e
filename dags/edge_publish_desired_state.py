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

from airflow.sdk import dag, task
from edge_airflow import connections, operations
from edge_airflow.schedules import desired_state_schedule


@dag(dag_id="edge_publish_desired_state", schedule=desired_state_schedule(),
     start_date=datetime(2026, 1, 1), catchup=False, max_active_runs=1, is_paused_upon_creation=False,
     tags=["edge-release", "desired-state"], doc_md=__doc__,
     default_args={"pre_execute": connections.pre_execute})
def edge_publish_desired_state():
    @task(retries=3, retry_delay=timedelta(seconds=10), retry_exponential_backoff=True)
    def publish():
        return operations.publish_desired_state()

    publish()


edge_publish_desired_state()
