"""Put a model's previous release back, as a GitOps commit that says who and why."""

from __future__ import annotations

from pipelines.settings import Settings, get_settings


def rollback_release(model: str, target: str | None, reason: str, by: str, settings: Settings | None = None,
                     details: str = "", expect_tree: str | None = None, publish: bool = True):
    """Put a model's previous release back: a GitOps commit saying who and why, MLflow's
    `champion` alias on the restored version, the rolled-back version tagged so it is not
    committed again by a re-run of its release. `publish`: publish the desired state at once
    (the CLI); Airflow's tasks leave it to the desired-state publisher DAG, which runs one at a
    time."""
    from pipelines import registry
    from pipelines.edge.desired_state import attest_commit
    from pipelines.edge.publish import publish_after_commit
    from pipelines.gitops.rollback import rollback

    settings = settings or get_settings()
    result = rollback(settings.remote, settings.gitops_branch, model, target, reason, by,
                      (settings.git_author_name, settings.git_author_email), settings.work_dir / "gitops",
                      details=details, expect_tree=expect_tree,
                      attest=lambda files: attest_commit(settings, model, files))
    if publish:
        publish_after_commit(settings)
    registry.mark_version(settings.tracking_uri, model, result.from_version,
                          {"release_status": "rolled_back", "rolled_back_by": by, "rollback_reason": reason,
                           "rollback_commit": result.commit})
    registry.mark_version(settings.tracking_uri, model, result.to_version, {"release_status": "released"},
                          alias=registry.CHAMPION_ALIAS)
    return result
