"""Settings from Airflow connections: where an Airflow deployment keeps its endpoints and
credentials (the metadata database, a secrets backend such as Vault or AWS Secrets Manager,
or `AIRFLOW_CONN_*` variables), rather than in environment variables on every worker.

A task calls `apply_connections()` first; each connection that exists sets the environment
variables `pipelines.settings` and the libraries read, in this task's process only:

| connection | fields | sets |
|---|---|---|
| `edge_mlflow` | host (a URL, or host + port + schema), login/password or password alone, extra `artifact_root` | `EDGE_MLFLOW_TRACKING_URI`, `MLFLOW_TRACKING_USERNAME`/`_PASSWORD` or `MLFLOW_TRACKING_TOKEN`, `EDGE_MLFLOW_ARTIFACT_ROOT` |
| `edge_s3` (type aws) | login = access key id, password = secret key, extra `endpoint_url`, `region_name`, `artifact_store`, `telemetry_store` | `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `EDGE_S3_ENDPOINT_URL`, `AWS_DEFAULT_REGION`, `EDGE_ARTIFACT_STORE`, `EDGE_TELEMETRY_STORE` |
| `edge_gitops` | host = the remote URL, extra `branch`, login/password for HTTPS | `EDGE_GITOPS_REMOTE`, `EDGE_GITOPS_BRANCH`, an HTTP Authorization header for that URL through `GIT_CONFIG_*` (never in the URL, so never in a clone's config or a message) |
| `edge_flower` | host and port = a running federation's SuperLink (its Control API), extra `root_certificates` (a CA file on the workers) or `insecure: true` (test federations) | `EDGE_FLOWER_SUPERLINK`, `EDGE_FLOWER_ROOT_CERTIFICATES`, `EDGE_FLOWER_INSECURE` |

The keys have their own connection, `edge_signing` (`signing_settings()`): the release key's
private PEM as its password, the public PEM as extra `public_key`, and the TUF repository's
online keys as extras `tuf_snapshot_key` and `tuf_timestamp_key` (PEM). They are written to
private temporary files only while a task that signs (publish, commit, rollout, rollback,
the desired-state publisher) runs, and removed after it. A connection's values win over the
worker's environment; a missing connection changes nothing.
"""

from __future__ import annotations

import base64
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

MLFLOW, S3, GITOPS, SIGNING, FLOWER = "edge_mlflow", "edge_s3", "edge_gitops", "edge_signing", "edge_flower"


def _airflow_connection(conn_id: str):
    from airflow.exceptions import AirflowNotFoundException
    from airflow.sdk import Connection

    try:
        return Connection.get(conn_id)
    except AirflowNotFoundException:
        return None


def _extra(connection) -> dict[str, Any]:
    return connection.extra_dejson or {}


def mlflow_variables(connection) -> dict[str, str]:
    host = connection.host or ""
    if "://" in host:
        uri = host.rstrip("/")
    else:
        uri = f"{connection.schema or 'http'}://{host}" + (f":{connection.port}" if connection.port else "")
    values = {"EDGE_MLFLOW_TRACKING_URI": uri}
    if connection.login and connection.password:
        values.update(MLFLOW_TRACKING_USERNAME=connection.login, MLFLOW_TRACKING_PASSWORD=connection.password)
    elif connection.password:
        values["MLFLOW_TRACKING_TOKEN"] = connection.password
    if _extra(connection).get("artifact_root"):
        values["EDGE_MLFLOW_ARTIFACT_ROOT"] = str(_extra(connection)["artifact_root"])
    return values


def s3_variables(connection) -> dict[str, str]:
    extra = _extra(connection)
    values = {}
    if connection.login:
        values["AWS_ACCESS_KEY_ID"] = connection.login
    if connection.password:
        values["AWS_SECRET_ACCESS_KEY"] = connection.password
    for key, variable in (("endpoint_url", "EDGE_S3_ENDPOINT_URL"), ("region_name", "AWS_DEFAULT_REGION"),
                          ("artifact_store", "EDGE_ARTIFACT_STORE"), ("telemetry_store", "EDGE_TELEMETRY_STORE")):
        if extra.get(key):
            values[variable] = str(extra[key])
    return values


def gitops_variables(connection, environ: dict[str, str] | None = None) -> dict[str, str]:
    environ = os.environ if environ is None else environ
    remote = connection.host or ""
    values = {"EDGE_GITOPS_REMOTE": remote} if remote else {}
    if _extra(connection).get("branch"):
        values["EDGE_GITOPS_BRANCH"] = str(_extra(connection)["branch"])
    if connection.password and remote.startswith(("https://", "http://")):
        user = connection.login or "x-access-token"
        token = base64.b64encode(f"{user}:{connection.password}".encode()).decode()
        key = f"http.{remote}.extraHeader"
        count = int(environ.get("GIT_CONFIG_COUNT", "0") or 0)
        # The same slot again when this remote already has one (a second call in one process).
        index = next((i for i in range(count) if environ.get(f"GIT_CONFIG_KEY_{i}") == key), count)
        values.update({f"GIT_CONFIG_KEY_{index}": key, f"GIT_CONFIG_VALUE_{index}": f"Authorization: Basic {token}",
                       "GIT_CONFIG_COUNT": str(max(count, index + 1))})
    return values


def flower_variables(connection) -> dict[str, str]:
    """Federated training submits to this SuperLink instead of starting an embedded federation."""
    host = (connection.host or "").split("://")[-1].rstrip("/")
    if not host:
        return {}
    values = {"EDGE_FLOWER_SUPERLINK": f"{host}:{connection.port}" if connection.port else host}
    extra = _extra(connection)
    if extra.get("root_certificates"):
        values["EDGE_FLOWER_ROOT_CERTIFICATES"] = str(extra["root_certificates"])
    if str(extra.get("insecure", "")).lower() in ("true", "1", "yes"):
        values["EDGE_FLOWER_INSECURE"] = "true"
    return values


READERS: dict[str, Callable] = {MLFLOW: mlflow_variables, S3: s3_variables, GITOPS: gitops_variables,
                                FLOWER: flower_variables}


def apply_connections(get: Callable[[str], Any] = _airflow_connection) -> list[str]:
    """Set this process's environment from the `edge_*` connections that exist; returns their
    ids. Call it at the start of a task, before anything reads the settings."""
    applied = []
    for conn_id, reader in READERS.items():
        connection = get(conn_id)
        if connection is None:
            continue
        os.environ.update(reader(connection))
        applied.append(conn_id)
    return applied


def pre_execute(context) -> None:
    """The `pre_execute` hook of every task in the product's DAGs (their `default_args`): the
    connections apply before the task reads any setting; a failure to read one fails the task."""
    apply_connections()


@contextlib.contextmanager
def signing_settings() -> Iterator[Any]:
    """Settings whose keys come from the connection `edge_signing` when it exists (see the
    module docstring), written to private temporary files removed after use; otherwise the
    environment's settings."""
    import shutil
    import tempfile

    from pipelines.settings import get_settings

    connection = _airflow_connection(SIGNING)
    if connection is None:
        yield get_settings()
        return
    folder = Path(tempfile.mkdtemp(prefix="edge-signing-"))
    folder.chmod(0o700)
    try:
        def write(name: str, text: str, mode: int = 0o600) -> Path:
            path = folder / name
            path.touch(mode=mode)
            path.write_text(text)
            return path

        extra = _extra(connection)
        update: dict[str, Any] = {"signing_key": write("signing.key", connection.password or ""),
                                  "signing_public_key": write("signing.pub", extra.get("public_key", ""), 0o644)}
        if extra.get("tuf_snapshot_key") and extra.get("tuf_timestamp_key"):
            update["tuf_snapshot_key"] = write("snapshot.key", extra["tuf_snapshot_key"])
            update["tuf_timestamp_key"] = write("timestamp.key", extra["tuf_timestamp_key"])
        yield get_settings().model_copy(update=update)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
