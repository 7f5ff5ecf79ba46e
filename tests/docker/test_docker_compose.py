"""The production stack definition (docker/docker-compose.yaml): the invariants that matter.

Parsed with PyYAML (merge keys resolve the x-airflow-common anchor); `docker compose config`
runs too when the Compose plugin is installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DOCKER = Path(__file__).resolve().parents[2] / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"

AIRFLOW = ["airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer", "airflow-worker"]
ONE_SHOT = ["airflow-init", "minio-init"]
LONG_RUNNING = ["postgres", "redis", "minio", "mlflow", *AIRFLOW]
SHARED_AIRFLOW_SETTINGS = [
    "AIRFLOW__CORE__EXECUTOR", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__BROKER_URL",
    "AIRFLOW__CELERY__RESULT_BACKEND", "AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET",
    "AIRFLOW__API__SECRET_KEY", "AIRFLOW__CORE__EXECUTION_API_SERVER_URL", "EDGE_MLFLOW_TRACKING_URI",
    "EDGE_ARTIFACT_STORE", "EDGE_TELEMETRY_STORE", "EDGE_S3_ENDPOINT_URL", "EDGE_GITOPS_REMOTE",
    "EDGE_SIGNING_KEY", "EDGE_SIGNING_PUBLIC_KEY",
]
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|FERNET|ACCESS_KEY|_AUTH$|(^|_)KEY$")
# `$$` is Compose's escape for a literal `$` (expanded in the container, not by Compose).
VARIABLE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)[^}]*\}")
URL_PASSWORD = re.compile(r"://[^:/@\s]*:([^@\s]+)@")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "environment is written as a mapping"
    return {key: str(value) for key, value in env.items()}


def _host_ip(port) -> str | None:
    if isinstance(port, dict):
        return port.get("host_ip")
    parts = str(port).split(":")
    return parts[0] if len(parts) == 3 else None


def test_every_service_of_the_stack_is_defined(services):
    assert sorted(services) == sorted(LONG_RUNNING + ONE_SHOT)


def test_long_running_services_have_health_checks(services):
    for name in LONG_RUNNING:
        check = services[name].get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name} has no health check"
        assert services[name].get("restart") == "unless-stopped", name
    for name in ONE_SHOT:
        assert services[name].get("restart") == "no", name


def test_dependencies_wait_for_health_or_completion(services):
    for name, service in services.items():
        for dependency, rule in (service.get("depends_on") or {}).items():
            wanted = "service_completed_successfully" if dependency in ONE_SHOT else "service_healthy"
            assert rule["condition"] == wanted, f"{name} -> {dependency}"
    for name in AIRFLOW:
        assert "airflow-init" in services[name]["depends_on"], name
    assert "minio-init" in services["mlflow"]["depends_on"]
    assert services["airflow-worker"]["depends_on"]["mlflow"]["condition"] == "service_healthy"


def test_published_ports_bind_loopback_only(services):
    published = {name: service["ports"] for name, service in services.items() if service.get("ports")}
    assert set(published) == {"airflow-apiserver", "mlflow", "minio"}
    for name, ports in published.items():
        for port in ports:
            assert _host_ip(port) == "127.0.0.1", f"{name} publishes {port} beyond loopback"


def test_airflow_components_share_one_configuration(services):
    first = _env(services[AIRFLOW[0]])
    assert first["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert first["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
    assert "@postgres:5432/airflow" in first["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert first["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://") and "@redis:6379/" in first[
        "AIRFLOW__CELERY__BROKER_URL"]
    assert first["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql+psycopg2://")
    assert first["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
    for name in [*AIRFLOW, "airflow-init"]:
        env = _env(services[name])
        for key in SHARED_AIRFLOW_SETTINGS:
            assert env.get(key) == first[key], f"{name}: {key} differs"
        assert services[name]["image"] == services[AIRFLOW[0]]["image"], name
    assert services["mlflow"]["image"] == services[AIRFLOW[0]]["image"]


def test_commands_of_the_airflow_components(services):
    commands = {name: services[name]["command"] for name in AIRFLOW}
    assert commands == {"airflow-apiserver": "api-server", "airflow-scheduler": "scheduler",
                        "airflow-dag-processor": "dag-processor", "airflow-triggerer": "triggerer",
                        "airflow-worker": "celery worker"}
    assert "airflow db migrate" in "\n".join(services["airflow-init"]["command"])


def test_edge_settings_point_at_production_services(services):
    env = _env(services["airflow-worker"])
    assert env["EDGE_MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["EDGE_ARTIFACT_STORE"].startswith("s3://")
    assert env["EDGE_TELEMETRY_STORE"].startswith("s3://")
    assert env["EDGE_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env["EDGE_GITOPS_REMOTE"] == "${EDGE_GITOPS_REMOTE}"
    # Never the default, a folder on one worker's disk that the api-server cannot read.
    assert env["EDGE_MLFLOW_ARTIFACT_ROOT"].startswith(("mlflow-artifacts:", "s3://"))
    for key in ("EDGE_SIGNING_KEY", "EDGE_SIGNING_PUBLIC_KEY"):
        secret = env[key].removeprefix("/run/secrets/")
        assert secret != env[key] and secret in services["airflow-worker"]["secrets"], key


def test_mlflow_server_keeps_runs_in_postgres_and_artifacts_in_s3(services):
    mlflow = services["mlflow"]
    command = " ".join(mlflow["command"])
    env = _env(mlflow)
    assert "--artifacts-destination=s3://" in command or "--default-artifact-root=s3://" in command
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://") and "@postgres:5432/mlflow" in env[
        "MLFLOW_BACKEND_STORE_URI"]
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    bucket = re.search(r"s3://([a-z0-9.-]+)", command).group(1)
    assert bucket in "\n".join(services["minio-init"]["command"])


def test_buckets_of_the_edge_stores_are_created(services):
    init = "\n".join(services["minio-init"]["command"])
    env = _env(services["airflow-worker"])
    for key in ("EDGE_ARTIFACT_STORE", "EDGE_TELEMETRY_STORE"):
        bucket = env[key].removeprefix("s3://").split("/")[0]
        assert f"local/{bucket}" in init, key


def test_no_literal_secrets(services, compose):
    for name, service in services.items():
        for key, value in _env(service).items():
            if SECRET_NAME.search(key):
                assert VARIABLE.fullmatch(value) or value.startswith("/run/secrets/"), f"{name}: {key} is literal"
            for password in URL_PASSWORD.findall(value):
                assert VARIABLE.fullmatch(password), f"{name}: {key} carries a literal password"
    for name, secret in compose["secrets"].items():
        assert VARIABLE.fullmatch(secret["file"]), f"secret {name} reads a fixed path"


def test_every_variable_is_defined_in_the_example_env(env_example):
    used = set(VARIABLE.findall(COMPOSE_FILE.read_text()))
    assert used, "the compose file reads its settings from .env"
    assert not used - set(env_example), f"missing from .env.example: {sorted(used - set(env_example))}"
    assert not set(env_example) - used, f"unused in the compose file: {sorted(set(env_example) - used)}"


def test_example_secrets_are_obvious_placeholders(env_example):
    for key, value in env_example.items():
        if SECRET_NAME.search(key) and not key.endswith("_FILE"):
            assert "CHANGE-ME" in value, f"{key} in .env.example looks like a real secret"


def _compose_plugin() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _compose_plugin(), reason="the docker compose plugin is not installed")
def test_docker_compose_accepts_the_file(tmp_path, env_example):
    # Relative secret paths resolve against the project directory: give them empty stand-ins.
    for key, value in env_example.items():
        if key.endswith("_FILE"):
            (tmp_path / value).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / value).touch()
    result = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE_FILE), "--env-file", str(ENV_EXAMPLE),
         "--project-directory", str(tmp_path), "config", "-q"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_the_native_production_profile_sets_what_the_compose_stack_sets(services):
    """`make test-prod` stands for this stack: every setting it gives the workers, the compose
    workers get too (the state and specs folders come from the image's ENV)."""
    from stack.prod_stack import ProductionStack

    native = ProductionStack("stack", "specs").edge_env
    image = {line.split("=")[0].strip() for line in (DOCKER / "Dockerfile").read_text().split("ENV ", 1)[1]
             .replace("\\\n", "\n").splitlines() if "=" in line}
    for component in AIRFLOW:
        missing = set(native) - set(_env(services[component])) - image
        assert not missing, (component, sorted(missing))
