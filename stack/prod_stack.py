"""The production profile, natively on one machine: the stack `docker/docker-compose.yaml`
describes, made of the same programs, each bound to 127.0.0.1 and started as a process of its
own:

- Airflow with its metadata database on PostgreSQL and the CeleryExecutor with Redis as the
  broker (api-server, scheduler, dag-processor, a Celery worker);
- an MLflow tracking server on PostgreSQL that keeps its artifacts in S3;
- S3 itself: moto's server, over real HTTP, standing in for MinIO or AWS;
- the GitOps remote, served by `git daemon` over the git:// protocol.

The release code runs unchanged: only the `EDGE_*` settings (pipelines/settings.py) and
Airflow's own configuration differ from the embedded set-up.

    with ProductionStack(root, specs_dir) as stack:
        run = stack.airflow.trigger("edge_release__adult-income")
        stack.airflow.wait_run("edge_release__adult-income", run["dag_run_id"])

PostgreSQL and Redis are servers that already run (`postgres_url`, an admin connection that
may create databases, and `redis_url`); every stack creates databases of its own there and
drops them when it stops, and its tasks travel on a Celery queue of its own, so stacks and
other users of those servers do not meet. Each process is stopped by the pid it was started
with (its process group).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from contextlib import closing
from pathlib import Path
from urllib.parse import urlparse, urlunparse

from pipelines.settings import PROJECT_ROOT
from stack.airflow_local import EmbeddedAirflow, Service, free_port

POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"
BUCKETS = {"models": "edge-models", "telemetry": "edge-telemetry", "mlflow": "edge-mlflow-artifacts"}
AIRFLOW_COMPONENTS = ("api-server", "dag-processor", "scheduler", "celery-worker")


DEMO_MODELS = ("adult-income", "digit-recognizer")


def demo_spec_copies(folder: str | Path, names: list[str] | tuple[str, ...]) -> dict[str, Path]:
    """Specs named `names` in `folder`, each a copy of the demo spec its name starts with
    (`adult-income-p1` is adult-income's), without the cron schedule: their releases start
    from the REST API only, so a schedule never races the runs a test or benchmark starts."""
    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in names:
        source = next((model for model in DEMO_MODELS if name.startswith(model)), None)
        if source is None:
            raise ValueError(f"{name!r} does not start with a demo model's name ({', '.join(DEMO_MODELS)})")
        doc = yaml.safe_load((PROJECT_ROOT / "model_specs" / f"{source}.yaml").read_text())
        doc.pop("schedule", None)
        doc["name"] = name
        paths[name] = folder / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(doc, sort_keys=False))
    return paths


class StackError(RuntimeError):
    """A server the stack needs is not reachable, or a service did not start."""


def _database_url(admin_url: str, database: str) -> str:
    """A SQLAlchemy URL of `database` on the admin URL's server, naming the psycopg2 driver
    (SQLAlchemy 2.1 takes psycopg 3 for a bare `postgresql://`)."""
    parsed = urlparse(admin_url)
    return urlunparse(parsed._replace(scheme="postgresql+psycopg2", path=f"/{database}"))


class ProductionStack:
    """The native production profile under `root` (logs, the Git daemon's repositories, keys,
    worker scratch space), with the DAGs of `specs_dir`."""

    def __init__(self, root: str | Path, specs_dir: str | Path, *, postgres_url: str = POSTGRES_URL,
                 redis_url: str = REDIS_URL, concurrency: int = 4, branch: str = "main"):
        self.root = Path(root).resolve()
        self.specs_dir = Path(specs_dir).resolve()
        self.postgres_url = postgres_url
        self.redis_url = redis_url
        self.concurrency = concurrency
        self.branch = branch
        self.token = secrets.token_hex(4)
        self.databases = {"airflow": f"edge_{self.token}_airflow", "mlflow": f"edge_{self.token}_mlflow"}
        self.ports = {name: free_port() for name in ("s3", "git", "mlflow")}
        self.s3_url = f"http://127.0.0.1:{self.ports['s3']}"
        self.mlflow_url = f"http://127.0.0.1:{self.ports['mlflow']}"
        self.gitops_remote = f"git://127.0.0.1:{self.ports['git']}/gitops.git"
        # moto accepts any credentials; they are still handled as secrets (never logged).
        self.credentials = {"AWS_ACCESS_KEY_ID": f"edge-{self.token}",
                            "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(24),
                            "AWS_DEFAULT_REGION": "us-east-1"}
        self.queue = f"edge-{self.token}"  # a Celery queue of this stack's own on a shared Redis
        # Workers present tokens the api-server signed: one secret for every component.
        self._jwt_secret = secrets.token_urlsafe(32)
        self._fernet_key = _fernet_key()
        self.airflow: EmbeddedAirflow | None = None
        self._created: list[str] = []

    # -- configuration ------------------------------------------------------------------------
    @property
    def edge_env(self) -> dict[str, str]:
        """The product's settings for this stack: what a deployment sets on its workers."""
        keys = self.root / "secrets"
        return {
            "EDGE_STATE_DIR": str(self.root / "worker-state"),
            "EDGE_SPECS_DIR": str(self.specs_dir),
            "EDGE_MLFLOW_TRACKING_URI": self.mlflow_url,
            "EDGE_ARTIFACT_STORE": f"s3://{BUCKETS['models']}/releases",
            "EDGE_TELEMETRY_STORE": f"s3://{BUCKETS['telemetry']}/fleet",
            "EDGE_S3_ENDPOINT_URL": self.s3_url,
            "EDGE_GITOPS_REMOTE": self.gitops_remote,
            "EDGE_GITOPS_BRANCH": self.branch,
            "EDGE_SIGNING_KEY": str(keys / "signing.key"),
            "EDGE_SIGNING_PUBLIC_KEY": str(keys / "signing.pub"),
            # The TUF repository: online keys as mounted files; devices read the repository's
            # prefix over plain HTTP (public-read, as a CDN in front of the bucket would serve it).
            "EDGE_TUF_SNAPSHOT_KEY": str(keys / "tuf-snapshot.key"),
            "EDGE_TUF_TIMESTAMP_KEY": str(keys / "tuf-timestamp.key"),
            "EDGE_TUF_URL": f"tuf+{self.s3_url}/{BUCKETS['models']}/releases/tuf",
            **self.credentials,
        }

    @property
    def airflow_env(self) -> dict[str, str]:
        database = _database_url(self.postgres_url, self.databases["airflow"])
        return {
            "AIRFLOW__CELERY__BROKER_URL": self.redis_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + database,
            "AIRFLOW__OPERATORS__DEFAULT_QUEUE": self.queue,
            "AIRFLOW__API_AUTH__JWT_SECRET": self._jwt_secret,
            "AIRFLOW__CORE__FERNET_KEY": self._fernet_key,
            # DAGs run as soon as they are parsed; the stack's specs (`demo_spec_copies`) carry
            # no cron, so only runs started through the REST API release anything.
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        }

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> ProductionStack:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 300) -> ProductionStack:
        try:
            self._check_servers()
            self._create_databases()
            self._prepare_files()
            bin_dir = Path(sys.executable).parent
            services = {
                "s3": Service([str(bin_dir / "moto_server"), "-H", "127.0.0.1", "-p", str(self.ports["s3"])],
                              port=self.ports["s3"], health=f"{self.s3_url}/moto-api/"),
                "git-daemon": Service(
                    ["git", "daemon", "--reuseaddr", "--listen=127.0.0.1", f"--port={self.ports['git']}",
                     f"--base-path={self.root / 'git'}", "--export-all", "--enable=receive-pack",
                     "--informative-errors", str(self.root / "git")],
                    port=self.ports["git"]),
                "mlflow": Service(
                    [str(bin_dir / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.ports["mlflow"]),
                     "--workers", "2",
                     "--backend-store-uri", _database_url(self.postgres_url, self.databases["mlflow"]),
                     "--artifacts-destination", f"s3://{BUCKETS['mlflow']}/"],
                    port=self.ports["mlflow"], health=f"{self.mlflow_url}/health",
                    # Without the GenAI job runner (seven more processes this pipeline never uses).
                    env={"MLFLOW_S3_ENDPOINT_URL": self.s3_url, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}),
            }
            self.airflow = EmbeddedAirflow(
                self.root / "airflow", env={**self.edge_env, **self.airflow_env},
                database=_database_url(self.postgres_url, self.databases["airflow"]),
                executor="CeleryExecutor", components=AIRFLOW_COMPONENTS, services=services,
                parallelism=self.concurrency, log_dir=self.root / "logs")
            self.airflow.start(timeout)
            self._create_buckets()
            self._create_tuf_repository()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Every process by its pid (process group), then the stack's databases."""
        if self.airflow is not None:
            self.airflow.stop()
        self._drop_databases()

    @property
    def pids(self) -> dict[str, int]:
        return self.airflow.pids if self.airflow else {}

    # -- parts --------------------------------------------------------------------------------
    def _check_servers(self) -> None:
        import psycopg2
        import redis

        try:
            psycopg2.connect(self.postgres_url, connect_timeout=5).close()
        except psycopg2.Error as error:
            raise StackError(f"PostgreSQL at {_safe(self.postgres_url)} is not reachable: "
                             f"{str(error).strip().splitlines()[0]}") from None
        try:
            redis.Redis.from_url(self.redis_url, socket_timeout=5).ping()
        except redis.RedisError as error:
            raise StackError(f"Redis at {_safe(self.redis_url)} is not reachable: {error}") from None

    def _admin(self):
        """An autocommit connection (CREATE and DROP DATABASE run outside transactions; psycopg2's
        `with connection` would open one, hence `closing`)."""
        import psycopg2

        connection = psycopg2.connect(self.postgres_url, connect_timeout=5)
        connection.autocommit = True
        return connection

    def _create_databases(self) -> None:
        with closing(self._admin()) as connection, connection.cursor() as cursor:
            for database in self.databases.values():
                cursor.execute(f'CREATE DATABASE "{database}"')
                self._created.append(database)

    def _drop_databases(self) -> None:
        if not self._created:
            return
        with closing(self._admin()) as connection, connection.cursor() as cursor:
            for database in self._created:
                cursor.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        self._created.clear()

    def _prepare_files(self) -> None:
        from pipelines.gitops.signing import generate_key_pair

        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "init", "-q", "--bare", "-b", self.branch, str(self.root / "git" / "gitops.git")],
                       check=True, capture_output=True)
        keys = self.root / "secrets"
        keys.mkdir(parents=True, exist_ok=True)
        os.chmod(keys, 0o700)
        generate_key_pair(keys / "signing.key", keys / "signing.pub")
        for role in ("root", "snapshot", "timestamp"):
            generate_key_pair(keys / f"tuf-{role}.key", keys / f"tuf-{role}.pub")

    def _create_tuf_repository(self) -> None:
        """The offline step of a deployment: the TUF repository created with the root key,
        which no worker holds."""
        keys = self.root / "secrets"
        env = {**os.environ, **self.edge_env, "PYTHONWARNINGS": "ignore"}
        done = subprocess.run([sys.executable, "-m", "pipelines", "tuf-init", "--root-key", str(keys / "tuf-root.key")],
                              env=env, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"tuf-init failed: {done.stderr.strip()[-500:]}")

    def _create_buckets(self) -> None:
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.s3_url, aws_access_key_id=self.credentials["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=self.credentials["AWS_SECRET_ACCESS_KEY"],
                          region_name=self.credentials["AWS_DEFAULT_REGION"])
        for bucket in BUCKETS.values():
            s3.create_bucket(Bucket=bucket)
        # Only the TUF repository is readable without credentials: devices fetch nothing else.
        s3.put_bucket_policy(Bucket=BUCKETS["models"], Policy=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject",
                           "Resource": f"arn:aws:s3:::{BUCKETS['models']}/releases/tuf/*"}]}))


def _fernet_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def _safe(url: str) -> str:
    """A server URL without its password."""
    parsed = urlparse(url)
    if parsed.password:
        parsed = parsed._replace(netloc=parsed.netloc.replace(f":{parsed.password}@", ":***@"))
    return urlunparse(parsed)
