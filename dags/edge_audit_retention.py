"""
### Edge audit retention

Daily: the audit trail of every model in the artifact store (each release's folder of evidence,
verdicts, model card and summaries; each attempt with its approval) judged at the run's own time.
A version the GitOps branch deploys keeps everything; a retired version keeps it for the spec's
`responsibleAI.auditRetentionDays` after its last write or its retirement, whichever is later;
what is past that is removed, and the run's record (what was removed, by rule) is written to
`audit/retention/<time>.json`. See the documentation's Audit page.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import dag, task
from edge_airflow import connections
from edge_airflow.retention import apply_audit_retention


@dag(dag_id="edge_audit_retention", schedule="@daily", start_date=datetime(2026, 1, 1), catchup=False,
     max_active_runs=1, tags=["edge-release", "audit"], doc_md=__doc__,
     default_args={"pre_execute": connections.pre_execute})
def edge_audit_retention():
    @task(task_id="apply_retention")
    def apply_retention():
        return apply_audit_retention()

    apply_retention()


edge_audit_retention()
