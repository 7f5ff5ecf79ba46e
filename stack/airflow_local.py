"""An embedded Airflow on this machine: api-server, dag-processor and scheduler (and, when
asked, the triggerer and other services such as the MLflow UI) as separate processes on one
SQLite database, started and stopped as a unit.

    with EmbeddedAirflow(home, env={"EDGE_STATE_DIR": ..., "EDGE_SPECS_DIR": ...}) as airflow:
        airflow.wait_dag("edge_drift_monitor")
        run = airflow.trigger("edge_drift_monitor")
        airflow.wait_run("edge_drift_monitor", run["dag_run_id"])

The DAGs are this checkout's `dags/` and `plugins/`; LocalExecutor on SQLite unless `database`
(any SQLAlchemy URL Airflow supports, PostgreSQL for instance) and `executor` say otherwise;
with the CeleryExecutor, the `celery-worker` component runs the tasks (the broker comes from
`env`, AIRFLOW__CELERY__BROKER_URL). New DAGs start unpaused
(unless `env` says otherwise); the api-server listens on 127.0.0.1 only (a free port unless
one is given; a given port that is taken fails before anything starts), the scheduler and
the triggerer serve no logs, so no component listens on another interface. Each component
logs to `<log_dir>/<component>.log`. The REST API is used with the admin user
SimpleAuthManager generates (its password is in AIRFLOW_HOME).

This module does not import Airflow: it runs the `airflow` command of the interpreter's
environment, so it drives any Airflow 3 installation the same way.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from pipelines.settings import PROJECT_ROOT

FINISHED = ("success", "failed")
DB_RETRIES = 4  # 1 + 2 + 4 + 8 s of waiting for a busy SQLite database
# How long an Airflow component waits for SQLite's write lock (the driver's default is 5 s,
# which a busy two-core machine exceeds while the scheduler writes). Airflow imports these
# through AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS(_ASYNC).
SQLITE_CONNECT_ARGS = {"timeout": 30}
SQLITE_CONNECT_ARGS_ASYNC = {"timeout": 30}
SQLITE_ENV = {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS": f"{__name__}.SQLITE_CONNECT_ARGS",
              "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS_ASYNC": f"{__name__}.SQLITE_CONNECT_ARGS_ASYNC"}
COMPONENTS = ("api-server", "dag-processor", "scheduler", "triggerer", "celery-worker")
DEFAULT_COMPONENTS = ("api-server", "dag-processor", "scheduler")
# Everything the LocalExecutor set-up runs (the triggerer serves deferred tasks: approvals).
LOCAL_COMPONENTS = ("api-server", "dag-processor", "scheduler", "triggerer")


class AirflowError(RuntimeError):
    """A component did not come up, a request failed, or a wait timed out (the message says
    where the logs are)."""


class PortTaken(AirflowError):
    """A port that was asked for is in use; nothing was started."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on host:port now (a listener on any interface blocks it;
    connections of an earlier server waiting out TIME_WAIT do not, as servers reuse the address)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True


@dataclass
class Service:
    """Another process started, logged and stopped with the components (the MLflow UI, for
    instance). `port` is checked free before anything starts; `health` is a URL that answers
    200 once the service is up (without one, a listening `port` is enough); `env` is added to
    the components' environment for this process only."""

    command: list[str]
    port: int | None = None
    health: str | None = None
    env: dict[str, str] | None = None


class EmbeddedAirflow:
    """Airflow's components for one AIRFLOW_HOME, with a small REST client for them.

    `env` is added to this process's environment last, so it may override any setting here
    (`AIRFLOW__CORE__DAGS_FOLDER`, for instance)."""

    def __init__(self, home: str | Path, env: dict[str, str] | None = None, log_dir: str | Path | None = None,
                 port: int | None = None, parallelism: int = 2, airflow: str | Path | None = None,
                 components: Sequence[str] = DEFAULT_COMPONENTS, services: dict[str, Service] | None = None,
                 database: str | None = None, executor: str = "LocalExecutor"):
        unknown = set(components) - set(COMPONENTS)
        if unknown or "api-server" not in components:
            raise ValueError(f"components must include api-server and be among {COMPONENTS}; got {list(components)}")
        if ("celery-worker" in components) != (executor == "CeleryExecutor"):
            raise ValueError("the celery-worker component runs with the CeleryExecutor, and only with it")
        self.home = Path(home).resolve()
        self.log_dir = Path(log_dir).resolve() if log_dir else self.home / "logs" / "components"
        self.fixed_port = port is not None
        self.port = port or free_port()
        self.components = tuple(components)
        self.services = dict(services or {})
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.airflow = str(airflow or Path(sys.executable).parent / "airflow")
        self.parallelism = parallelism
        database = database or f"sqlite:///{self.home / 'airflow.db'}"
        sqlite = database.startswith("sqlite")
        self.env = {
            # SQLite's connect arguments, set by a caller for its own database, would fail another.
            **{k: v for k, v in os.environ.items() if sqlite or k not in SQLITE_ENV},
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": database,
            **(SQLITE_ENV if sqlite else {}),
            "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_ROOT / "plugins"),
            "AIRFLOW__CORE__EXECUTOR": executor,
            "AIRFLOW__CORE__PARALLELISM": str(parallelism),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
            # One api-server worker on SQLite answers task workers slowly while the machine is
            # busy; the default 5 s timeout failed tasks before they started.
            "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "30",
            "PYTHONWARNINGS": "ignore",
            **(env or {}),
        }
        self.processes: dict[str, subprocess.Popen] = {}
        self._logs: list = []
        self._token: str | None = None

    # -- processes ------------------------------------------------------------------------------
    def __enter__(self) -> EmbeddedAirflow:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 180) -> EmbeddedAirflow:
        """Check the given ports, migrate the database, start the components and services,
        wait until the api-server (and each service's health URL) answers."""
        ports = {"the Airflow api-server": self.port} if self.fixed_port else {}
        ports.update({name: service.port for name, service in self.services.items() if service.port})
        for name, port in ports.items():
            if not port_is_free(port):
                raise PortTaken(f"port {port} on 127.0.0.1 is taken: {name} cannot listen there")
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        migrate = subprocess.run([self.airflow, "db", "migrate"], env=self.env, capture_output=True, text=True)
        (self.log_dir / "db-migrate.log").write_text(migrate.stdout + migrate.stderr)
        if migrate.returncode != 0:
            raise AirflowError(f"airflow db migrate failed; see {self.log_dir / 'db-migrate.log'}")
        commands = {
            "api-server": [self.airflow, "api-server", "-H", "127.0.0.1", "-p", str(self.port), "--workers", "1"],
            "dag-processor": [self.airflow, "dag-processor"],
            "scheduler": [self.airflow, "scheduler", "--skip-serve-logs"],
            "triggerer": [self.airflow, "triggerer", "--skip-serve-logs"],
            # Takes tasks from the default queue (AIRFLOW__OPERATORS__DEFAULT_QUEUE), as many at
            # once as the parallelism allows.
            "celery-worker": [self.airflow, "celery", "worker", "--concurrency", str(self.parallelism),
                              "--queues", self.env.get("AIRFLOW__OPERATORS__DEFAULT_QUEUE", "default"),
                              "--skip-serve-logs", "--without-gossip", "--without-mingle"],
        }
        commands = {name: commands[name] for name in COMPONENTS if name in self.components}
        commands.update({name: service.command for name, service in self.services.items()})
        envs = {name: {**self.env, **service.env} for name, service in self.services.items() if service.env}
        try:
            for name, command in commands.items():
                log = open(self.log_dir / f"{name}.log", "ab")
                self._logs.append(log)
                # A session of its own: stop() signals the component and its workers as a group.
                self.processes[name] = subprocess.Popen(command, env=envs.get(name, self.env), stdout=log,
                                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                        start_new_session=True)
            self.wait_healthy(timeout)
            for name, service in self.services.items():
                if service.health:
                    self.wait_for(name, lambda url=service.health: _answers(url), timeout, interval=0.5)
                elif service.port:
                    self.wait_for(name, lambda port=service.port: _listens(port), timeout, interval=0.5)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, grace: float = 30) -> None:
        """SIGTERM each component's process group, SIGKILL what is left after `grace` seconds.

        The scheduler and dag-processor go first, the api-server last: running task workers
        report to the api-server while they stop, and without it they retry for minutes."""
        first = [p for name, p in self.processes.items() if name != "api-server"]
        last = [p for name, p in self.processes.items() if name == "api-server"]
        for group in (first, last):
            for process in group:
                if process.poll() is None:
                    _signal_group(process.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            for process in group:
                try:
                    process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
                # Workers of a component may outlive it: the group goes in any case.
                _signal_group(process.pid, signal.SIGKILL)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        self.processes.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()

    @property
    def pids(self) -> dict[str, int]:
        """Each started process's pid (the leader of its process group)."""
        return {name: process.pid for name, process in self.processes.items()}

    def check_running(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise AirflowError(f"{name} exited with code {process.returncode}; see {self.log_dir / name}.log")

    def wait_for(self, what: str, check: Callable[[], Any], timeout: float, interval: float = 1.0) -> Any:
        """Call `check` until it returns something truthy (connection errors count as not yet)."""
        import requests

        deadline = time.monotonic() + timeout
        while True:
            self.check_running()
            try:
                value = check()
            except (requests.RequestException, OSError):
                value = None  # starting: refused, or accepted but not answering yet
            if value:
                return value
            if time.monotonic() > deadline:
                raise AirflowError(f"timed out after {timeout:.0f} s waiting for {what}; logs in {self.log_dir}")
            time.sleep(interval)

    # -- REST API -------------------------------------------------------------------------------
    def wait_healthy(self, timeout: float = 180) -> dict:
        import requests

        def healthy():
            reply = requests.get(f"{self.base_url}/api/v2/monitor/health", timeout=5)
            return reply.json() if reply.ok else None

        return self.wait_for("the api-server", healthy, timeout, interval=0.5)

    @property
    def admin_password(self) -> str:
        passwords = self.home / "simple_auth_manager_passwords.json.generated"
        return json.loads(passwords.read_text())["admin"]

    def token(self) -> str:
        """A bearer token of the generated admin user (fetched once)."""
        import requests

        if self._token is None:
            reply = requests.post(f"{self.base_url}/auth/token", timeout=10,
                                  json={"username": "admin", "password": self.admin_password})
            if not reply.ok:
                raise AirflowError(f"POST /auth/token: {reply.status_code} {reply.text[:300]}")
            self._token = reply.json()["access_token"]
        return self._token

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token()}"}

    def request(self, method: str, path: str, **kwargs) -> Any:
        """A REST call under /api/v2 (`dags/x` or `/api/v2/dags/x`); the decoded JSON,
        AirflowError on an error status."""
        import requests

        path = path.lstrip("/").removeprefix("api/v2/")
        timeout = kwargs.pop("timeout", 30)
        for attempt in range(DB_RETRIES + 1):
            reply = requests.request(method, f"{self.base_url}/api/v2/{path}", headers=self.headers,
                                     timeout=timeout, **kwargs)
            # SQLite takes one writer at a time: when the scheduler holds the database past the
            # driver's timeout, the api-server answers 500 "Database error" and rolls the
            # request's transaction back, so trying again cannot apply it twice.
            if reply.status_code == 500 and "Database error" in reply.text and attempt < DB_RETRIES:
                time.sleep(2 ** attempt)
                continue
            break
        if not reply.ok:
            raise AirflowError(f"{method} {path}: {reply.status_code} {reply.text[:500]}")
        return reply.json() if reply.content else None

    def wait_dag(self, dag_id: str, timeout: float = 180) -> dict:
        """The DAG once the dag-processor has registered it."""
        import requests

        def registered():
            reply = requests.get(f"{self.base_url}/api/v2/dags/{dag_id}", headers=self.headers, timeout=10)
            return reply.json() if reply.ok else None

        return self.wait_for(f"DAG {dag_id} to be registered", registered, timeout)

    def trigger(self, dag_id: str, conf: dict | None = None) -> dict:
        """Start a run now (as a person would from the UI); the run as the API returns it."""
        return self.request("POST", f"dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf or {}})

    def runs(self, dag_id: str) -> list[dict]:
        """The DAG's runs, newest first."""
        return self.request("GET", f"dags/{dag_id}/dagRuns", params={"order_by": "-id", "limit": 100})["dag_runs"]

    def run(self, dag_id: str, run_id: str) -> dict:
        return self.request("GET", f"dags/{dag_id}/dagRuns/{run_id}")

    def wait_run(self, dag_id: str, run_id: str | None = None, timeout: float = 600) -> dict:
        """The run (default: the newest, once there is one) when it has succeeded or failed."""
        def finished():
            if run_id is None:
                found = self.runs(dag_id)
                current = found[0] if found else None
            else:
                current = self.run(dag_id, run_id)
            return current if current and current["state"] in FINISHED else None

        return self.wait_for(f"run {run_id or '(newest)'} of {dag_id} to finish", finished, timeout)

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        return self.request("GET", f"dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]

    def asset(self, uri: str) -> dict | None:
        """The registered asset with this URI (Airflow adds a trailing slash to `scheme://name`)."""
        found = self.request("GET", "assets", params={"uri_pattern": uri.rstrip("/"), "limit": 100})["assets"]
        exact = [a for a in found if a["uri"].rstrip("/") == uri.rstrip("/")]
        return exact[0] if exact else None

    def wait_asset(self, uri: str, timeout: float = 180) -> dict:
        return self.wait_for(f"asset {uri} to be registered", lambda: self.asset(uri), timeout)

    def post_asset_event(self, uri: str, extra: dict | None = None) -> dict:
        """Raise an event on an asset, as an external system does through the REST API."""
        asset = self.asset(uri)
        if asset is None:
            raise AirflowError(f"no asset {uri} is registered (is the DAG that uses it parsed?)")
        return self.request("POST", "assets/events", json={"asset_id": asset["id"], "extra": extra or {}})

    def asset_events(self, uri: str, timeout: float = 120) -> list[dict]:
        """The asset's events, oldest first ([] when the asset is not registered).

        Airflow 3.3 answers this listing with 500 while a DAG run an event created has not
        started yet (its response model requires the run's start date); the run starts within
        seconds, so the listing is asked again until `timeout`."""
        asset = self.asset(uri)
        if asset is None:
            return []
        params = {"asset_id": asset["id"], "order_by": "timestamp", "limit": 100}
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.request("GET", "assets/events", params=params)["asset_events"]
            except AirflowError as error:
                if ": 500 " not in str(error) or time.monotonic() > deadline:
                    raise
            self.check_running()
            time.sleep(2)


def _answers(url: str) -> bool:
    import requests

    return requests.get(url, timeout=5).ok


def _listens(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as probe:
        probe.settimeout(2)
        return probe.connect_ex((host, port)) == 0


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def ui_links(settings, mlflow_url: str) -> dict[str, str]:
    """The environment that makes Edge Releases link runs and versions to the MLflow UI people
    open: the configured one, else the tracking server when it is a web address."""
    url = settings.mlflow_ui_url or (mlflow_url if mlflow_url.startswith(("http://", "https://")) else None)
    return {"EDGE_MLFLOW_UI_URL": url} if url else {}


def run_ui(port: int = 8080, mlflow_port: int = 5000, parallelism: int = 4, out=None) -> int:
    """`make ui`: the Airflow UI (api-server, dag-processor, scheduler, triggerer for the
    approval task) and the MLflow UI on the embedded state, all on 127.0.0.1, until SIGINT or
    SIGTERM; then every process is stopped by the pid it was started with.

    AIRFLOW_HOME is `<state>/airflow` unless set. New DAGs start paused (the trigger form
    unpauses the DAG it starts), so no schedule fires while someone only looks around.
    Returns the exit code: 2 when a port is taken, 1 when a component fails.
    """
    from pipelines.settings import get_settings

    out = out or sys.stdout
    settings = get_settings()
    state = settings.state
    home = Path(os.environ.get("AIRFLOW_HOME") or state / "airflow")
    services, mlflow_url = {}, settings.tracking_uri
    if settings.tracking_uri.startswith("sqlite:///"):
        Path(settings.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        mlflow_url = f"http://127.0.0.1:{mlflow_port}/"
        services["mlflow"] = Service(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
             "--workers", "1", "--backend-store-uri", settings.tracking_uri,
             "--default-artifact-root", settings.mlflow_artifacts],
            port=mlflow_port, health=f"http://127.0.0.1:{mlflow_port}/health")
    airflow = EmbeddedAirflow(home, port=port, parallelism=parallelism, components=LOCAL_COMPONENTS, services=services,
                              env={"EDGE_STATE_DIR": str(state), "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
                                   **ui_links(settings, mlflow_url)})

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        print(f"Starting Airflow and MLflow on 127.0.0.1 (state: {state}); the first start takes a minute",
              file=out, flush=True)
        airflow.start()
        base = airflow.base_url
        print(f"  Airflow UI      {base}/   login: admin / {airflow.admin_password}\n"
              f"  Edge Releases   {base}/edge/\n"
              f"  MLflow          {mlflow_url}\n"
              f"  processes       " + ", ".join(f"{name} {pid}" for name, pid in airflow.pids.items()) + "\n"
              f"  logs            {airflow.log_dir}\n"
              "New DAGs start paused: the trigger form unpauses the DAG it starts. Ctrl-C stops everything.",
              file=out, flush=True)
        while True:
            airflow.check_running()
            time.sleep(1)
    except KeyboardInterrupt:
        print("Stopping ...", file=out, flush=True)
    except PortTaken as error:
        print(f"error: {error} (choose another with UI_PORT / MLFLOW_PORT)", file=sys.stderr, flush=True)
        code = 2
    except AirflowError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        code = 1
    finally:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the stop short
        started = airflow.pids
        airflow.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if started:
            print("Stopped " + ", ".join(f"{name} {pid}" for name, pid in started.items()), file=out, flush=True)
    return code
