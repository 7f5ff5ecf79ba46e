"""MLflow: one experiment per model, one registered version per release key.

A version is created with all its tags in one call (`register_model(..., tags=)`), so a retry
that finds a version tagged with the same release key knows the release is registered, and
never creates a second one. That is what makes `with_retries` safe: while the tracking
server cannot be reached, the whole registration is tried again (`REGISTER_ATTEMPTS` times in
all, `REGISTER_BACKOFF_S` apart and doubling).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from pipelines.errors import one_line
from pipelines.records import RegisteredVersion

log = logging.getLogger(__name__)

CANDIDATE_ALIAS = "candidate"
REGISTER_ATTEMPTS = 3  # the first registration and up to 2 retries, while MLflow is unreachable
REGISTER_BACKOFF_S = 2.0  # doubles after each failed attempt
# How an unreachable server shows through MLflow's client (it wraps requests' and urllib3's errors).
_UNREACHABLE = ("Failed to establish a new connection", "Connection refused", "Connection aborted",
                "Max retries exceeded", "RemoteDisconnected", "Read timed out")


class RegistryError(RuntimeError):
    """The tracking server or registry failed."""


def unreachable(error: Exception) -> bool:
    """Whether an MLflow call failed for want of a connection (worth retrying)."""
    import requests

    if isinstance(error, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError)):
        return True
    return any(marker in str(error) for marker in _UNREACHABLE)


def with_retries(call, where: str):
    """`call()` (an idempotent registration), retried with backoff while the tracking server
    is unreachable; any failure becomes one RegistryError line naming `where`."""
    delay = REGISTER_BACKOFF_S
    for attempt in range(1, REGISTER_ATTEMPTS + 1):
        try:
            return call()
        except Exception as error:  # MLflow raises its own exception types
            detail = one_line(error)
            if attempt < REGISTER_ATTEMPTS and unreachable(error):
                log.warning("MLflow at %s unreachable (attempt %d of %d, next in %.1f s): %s", where, attempt,
                            REGISTER_ATTEMPTS, delay, detail)
                time.sleep(delay)
                delay *= 2
                continue
            tries = f" ({attempt} attempts)" if attempt > 1 else ""
            raise RegistryError(f"MLflow at {where}: {detail}{tries}") from error


def client(tracking_uri: str):
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    return mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def experiment_id(mlflow_client, model: str, artifact_root: str) -> str:
    """The model's experiment, created with its artifact location (never `./mlruns`)."""
    name = f"edge-release/{model}"
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return mlflow_client.create_experiment(name, artifact_location=f"{artifact_root.rstrip('/')}/{model}")


def find_version(mlflow_client, model: str, release_key: str, artifact_sha256: str | None = None):
    """The model version registered for a release key, or (`artifact_sha256`) the first version
    whose shipped ONNX file has exactly these bytes; None when there is none."""
    for tag, value in (("release_key", release_key), ("artifact_sha256", artifact_sha256)):
        if value is None:
            continue
        try:
            versions = mlflow_client.search_model_versions(f"name = '{model}' and tags.{tag} = '{value}'")
        except Exception as error:  # the registry raises its own RestException on a missing model
            if "RESOURCE_DOES_NOT_EXIST" in str(error):
                return None
            raise
        if versions:
            return min(versions, key=lambda v: int(v.version))
    return None


def model_file_sha256(tracking_uri: str, model: str, version: str) -> str:
    """sha256 of the ONNX file that a registered version holds, as downloaded from MLflow."""
    import mlflow

    client(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model}/{version}", dst_path=tmp)
        return hashlib.sha256((Path(local) / "model.onnx").read_bytes()).hexdigest()


def register_version(
    *,
    tracking_uri: str,
    artifact_root: str,
    model: str,
    release_key: str,
    onnx_path: Path,
    framework: str,
    signature_input,
    signature_output,
    params: dict[str, str],
    metrics: dict[str, float],
    tags: dict[str, str],
    artifacts: dict[str, dict | list],
    run_name: str,
    description: str,
    same_bytes_same_version: bool = True,
    series: dict[str, list[tuple[int, float]]] | None = None,
) -> RegisteredVersion:
    """Log a run with the ONNX model and evidence, register it, point `candidate` at it.

    A version already registered for this release key is returned as it is; so is, with
    `same_bytes_same_version`, a version whose ONNX file has the same bytes (a model rebuilt
    from other code or library versions that came out identical is no new version). `series`:
    metrics logged at steps (a federated training's rounds)."""
    import mlflow
    import onnx
    from mlflow.models import infer_signature

    mlflow_client = client(tracking_uri)
    existing = find_version(mlflow_client, model, release_key,
                            tags.get("artifact_sha256") if same_bytes_same_version else None)
    if existing is not None:
        mlflow_client.set_registered_model_alias(model, CANDIDATE_ALIAS, existing.version)
        return RegisteredVersion(name=model, version=str(existing.version), run_id=existing.run_id,
                                 release_key=(existing.tags or {}).get("release_key", release_key),
                                 model_uri=f"models:/{model}/{existing.version}", alias=CANDIDATE_ALIAS,
                                 created=False)

    exp = experiment_id(mlflow_client, model, artifact_root)
    _delete_unregistered_runs(mlflow_client, exp, release_key)
    with mlflow.start_run(experiment_id=exp, run_name=run_name, tags={**tags, "release_key": release_key}) as run:
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        for name, points in (series or {}).items():
            for step, value in points:
                mlflow.log_metric(name, value, step=step)
        for name, payload in artifacts.items():
            mlflow.log_dict(payload, name)
        info = mlflow.onnx.log_model(
            onnx.load(str(onnx_path)), name="model", save_as_external_data=False,
            onnx_execution_providers=["CPUExecutionProvider"],
            signature=infer_signature(signature_input, signature_output),
        )
    try:
        mlflow_client.get_registered_model(model)
    except Exception:
        mlflow_client.create_registered_model(model, description=description,
                                              tags={k: v for k, v in tags.items() if k.startswith("finops.")})
    version = mlflow.register_model(info.model_uri, model, tags={**tags, "release_key": release_key})
    mlflow_client.set_registered_model_alias(model, CANDIDATE_ALIAS, version.version)
    return RegisteredVersion(name=model, version=str(version.version), run_id=run.info.run_id,
                             release_key=release_key,
                             model_uri=f"models:/{model}/{version.version}", alias=CANDIDATE_ALIAS,
                             created=True)


def _delete_unregistered_runs(mlflow_client, experiment: str, release_key: str) -> None:
    """Runs an earlier attempt of this release left without a version (the registration was
    cut off after its run began): deleted, so the experiment holds one run per version. No
    version points at them: `find_version` found none for this release key."""
    for stale in mlflow_client.search_runs([experiment], filter_string=f"tags.release_key = '{release_key}'"):
        log.warning("deleting run %s: an earlier registration of release %s stopped before its version",
                    stale.info.run_id, release_key[:12])
        mlflow_client.delete_run(stale.info.run_id)


def json_safe(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


CHAMPION_ALIAS = "champion"
_MLFLOW_KEY = __import__("re").compile(r"[^A-Za-z0-9_\-./ ]")


def log_evidence(tracking_uri: str, run_id: str, folder: str, files: list[Path],
                 metrics: dict[str, float] | None = None, tags: dict[str, str] | None = None) -> None:
    """Attach evidence files, figures and tags to an existing run (gates run as separate tasks)."""
    mlflow_client = client(tracking_uri)
    for path in files:
        mlflow_client.log_artifact(run_id, str(path), artifact_path=folder)
    for key, value in (metrics or {}).items():
        mlflow_client.log_metric(run_id, _MLFLOW_KEY.sub("_", key), float(value))
    for key, value in (tags or {}).items():
        mlflow_client.set_tag(run_id, _MLFLOW_KEY.sub("_", key), str(value)[:5000])


def log_verdict(tracking_uri: str, run_id: str, verdict, files: list[Path]) -> None:
    """A gate verdict on its run: numeric observations as metrics, the outcome as tags."""
    numbers = {f"gate.{verdict.gate}.{k}": v for k, v in verdict.observed.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tags = {f"gate.{verdict.gate}.passed": str(verdict.passed).lower(),
            f"gate.{verdict.gate}.reason": verdict.reason}
    if verdict.waived:
        tags[f"gate.{verdict.gate}.waived"] = "true"
    log_evidence(tracking_uri, run_id, f"evidence/{verdict.gate}", files, numbers, tags)


def mark_version(tracking_uri: str, model: str, version: str, tags: dict[str, str],
                 alias: str | None = None) -> None:
    """Tag a model version with its outcome and, when it was released, move an alias to it."""
    mlflow_client = client(tracking_uri)
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(model, version, key, str(value)[:5000])
    if alias:
        mlflow_client.set_registered_model_alias(model, alias, version)
