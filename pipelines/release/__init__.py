"""The release: one public face for the DAGs, the command line and the tests.

Each stage takes the spec's path and the small records of earlier stages and returns a
record; its outputs live in the artifact store under the release key (`context`), so a stage
that finds its output there returns it instead of working again. `run_release` runs them all
in one process; the Airflow DAG runs the same calls, one task each.
"""

from pipelines.release.context import Context, DataValidationError, ReleaseError, context
from pipelines.release.gates import (
    CostReport,
    approval_body,
    drift_gate,
    edge_cost,
    explain,
    fairness_gate,
    model_card,
    parity_gate,
    quality_gate,
)
from pipelines.release.stages import (
    STAGES,
    all_verdicts,
    commit,
    decide,
    export,
    latest_summary,
    next_step,
    publish,
    quantize,
    register,
    release_options,
    run_release,
    summarize,
    train,
    validate_data,
)

__all__ = [
    "STAGES", "Context", "all_verdicts", "CostReport", "DataValidationError", "ReleaseError", "approval_body", "commit", "context",
    "decide", "drift_gate", "edge_cost", "explain", "export", "fairness_gate", "latest_summary", "model_card", "next_step",
    "parity_gate", "publish", "quality_gate", "quantize", "register", "release_options", "run_release", "summarize",
    "train", "validate_data",
]
