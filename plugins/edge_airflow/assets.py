"""The Assets that connect the product's DAGs: a commit to the GitOps branch raises the desired
state (`edge-desired-state://gitops`, the desired-state publisher runs on it), a model's drift
raises `edge-drift://<model>` and a breach of its field quality or fairness whose spec asks to
retrain raises `edge-quality://<model>` (its release runs on either), a forecast budget breach
raises `edge-finops://<model>` (for alerting)."""

from __future__ import annotations

from airflow.sdk import Asset, get_current_context

# Raised by every commit to the GitOps branch; the desired-state publisher DAG runs on it.
DESIRED_STATE_ASSET_URI = "edge-desired-state://gitops"
DESIRED_STATE = Asset(DESIRED_STATE_ASSET_URI)


def drift_asset(model: str) -> Asset:
    """Raised by drift monitoring (or any alerting system, through the REST API) to retrain."""
    return Asset(f"edge-drift://{model}")


def quality_asset(model: str) -> Asset:
    """Raised by the field quality monitor when the spec's onBreach says retrain."""
    return Asset(f"edge-quality://{model}")


def finops_breach_asset(model: str) -> Asset:
    """Raised when a model's 30-day spend forecast breaches its monthly budget."""
    return Asset(f"edge-finops://{model}")


def raise_event(asset: Asset, extra: dict) -> None:
    """Give the running task's event on `asset` (one of its outlets) these figures."""
    get_current_context()["outlet_events"][asset].extra = extra


def desired_state_changed(committed: dict) -> dict:
    """After a GitOps commit task: a new commit's event names it; returns the commit record."""
    if committed.get("created"):
        raise_event(DESIRED_STATE, {"commit": committed.get("commit")})
    return committed
