"""The audit retention task: the plan at the run's own time, applied, and told in the task log."""

from __future__ import annotations

from airflow.sdk import get_current_context


def apply_audit_retention() -> dict:
    """Remove the audit records past their retention at the run's time (`run_after`, never the
    clock), print the plan and what was removed, and return the counts; a key the store refused
    fails the task after the others went."""
    from airflow.exceptions import AirflowFailException

    from pipelines.operate.retention import apply_retention
    from pipelines.settings import get_settings

    result = apply_retention(get_settings(), get_current_context()["dag_run"].run_after)
    print("\n".join(result.lines()))
    for key in result.deleted:
        print(f"removed {key}")
    if result.refused:
        raise AirflowFailException(f"the store refused to remove {len(result.refused)} keys: "
                                   + "; ".join(result.refused.values()))
    return {"deleted": len(result.deleted), "kept": len(result.plan.items) - len(result.plan.by_rule("expired")),
            "record_uri": result.record_uri}
