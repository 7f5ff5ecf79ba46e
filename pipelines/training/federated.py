"""Federated training of a PyTorch EdgeNet on Flower's deployment runtime, driven as processes.

Flower runs in its own environment (`Settings.flower_venv`, built by `make venv` from
requirements-flower.txt); this module imports no flwr. `run_federated` starts a SuperLink and one
SuperNode per client (each with its own partition folder), submits the Flower App of
`flower_app/` with `flwr run`, waits for the weights and metrics the ServerApp writes, and tears
every process down, also on an error or a timeout. The server side never reads a partition.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pipelines.errors import one_line
from pipelines.records import Record

APP_DIR = Path(__file__).resolve().parent / "flower_app"
# Every process of one run (and what Flower spawns from them) carries this variable: teardown
# finds stragglers that left their process group by it.
RUN_MARKER = "EDGE_FLOWER_RUN"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CLIENT_ID = re.compile(r"[A-Za-z0-9._-]+")


class FederatedError(RuntimeError):
    """A federated run that failed: one line naming what failed, with the tail of its log."""


class FederatedConfig(BaseModel):
    """How the federation trains: the strategy and its rounds, and each client's local training."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Literal["fedavg", "fedprox"] = "fedavg"
    rounds: int = Field(3, ge=1)
    fraction_train: float = Field(1.0, gt=0, le=1, description="Share of the nodes sampled for training.")
    fraction_evaluate: float = Field(1.0, ge=0, le=1, description="Share of the nodes sampled for evaluation.")
    min_clients: int = Field(2, ge=1, description="Nodes a round waits for (available, trained, evaluated).")
    proximal_mu: float = Field(0.0, ge=0, description="FedProx: weight of mu/2 * ||w - w_global||^2.")
    local_epochs: int = Field(1, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(64, ge=1)
    eval_share: float = Field(0.2, gt=0, lt=1, description="Share of each partition held out for its evaluation.")
    seed: int = 0
    round_timeout: float = Field(600.0, gt=0, description="Seconds the server waits for the replies of a round.")


class FederatedClientRound(Record):
    """What one client reported in one phase of a round."""

    round: int
    phase: Literal["train", "evaluate"]
    client: str
    num_examples: int = 0
    loss: float | None = None
    accuracy: float | None = None
    bytes_received: int = 0
    bytes_sent: int = 0
    seconds: float = 0.0
    error: str = ""


class FederatedRound(Record):
    """A round's metrics aggregated over its clients (weighted by their rows) and its duration."""

    round: int
    train: dict[str, float]
    evaluate: dict[str, float]
    seconds: float


class FederatedRun(Record):
    """The outcome of `run_federated`."""

    strategy: str
    state_dict_path: str = Field(description="The final global weights (a torch state dict).")
    rounds: list[FederatedRound]
    clients: list[FederatedClientRound]
    round_seconds: list[float]
    client_bytes: dict[str, list[int]] = Field(description="Per client, the bytes of weights it received and "
                                                           "sent in each round (train and evaluate).")
    startup_seconds: float = Field(description="Starting the SuperLink and the SuperNodes until all joined.")
    seconds: float = Field(description="Wall time of the whole run, start-up and teardown included.")


def flower_bin(venv: Path) -> Path:
    """The Flower environment's bin folder; a FederatedError when it is not built."""
    folder = Path(venv) / "bin"
    for tool in ("flower-superlink", "flower-supernode", "flwr"):
        if not (folder / tool).exists():
            raise FederatedError(f"federated training: the Flower environment {venv} has no {tool} "
                                 "(`make venv` builds it from requirements-flower.txt)")
    return folder


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1 (all held open while they are picked)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def log_tail(path: Path, lines: int = 6, limit: int = 600) -> str:
    """The last lines of a log as one line (HTTP access lines left out)."""
    try:
        text = _ANSI.sub("", path.read_text(errors="replace"))
    except OSError:
        return "no log"
    kept = [line.strip() for line in text.splitlines() if line.strip() and "uvicorn.access" not in line][-lines:]
    return one_line(" | ".join(kept) or "empty log", limit)


def marked_processes(token: str) -> list[int]:
    """Processes of the run `token` (by the marker in their environment)."""
    needle = f"{RUN_MARKER}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


class _Federation:
    """The processes of one run: started in their own process groups, logs in the work folder."""

    def __init__(self, bin_dir: Path, work: Path):
        self.bin = bin_dir
        self.work = work
        self.token = uuid.uuid4().hex
        self.procs: dict[str, tuple[subprocess.Popen, Path]] = {}

    def env(self, name: str) -> dict[str, str]:
        home = self.work / "flwr-home" / name
        home.mkdir(parents=True, exist_ok=True)
        return {**os.environ, "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
                "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1",
                RUN_MARKER: self.token}

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = self.work / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([str(self.bin / args[0]), *args[1:]], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=self.work, env=self.env(name),
                                    start_new_session=True)
        self.procs[name] = (proc, log)
        return proc

    def check_alive(self) -> None:
        for name, (proc, log) in self.procs.items():
            if name != "flwr-run" and proc.poll() is not None:
                raise FederatedError(f"federated training: {name} exited with code {proc.returncode}: "
                                     f"{log_tail(log)}")

    def stop(self, grace: float = 5.0) -> None:
        """Every process group, then any straggler of the run: SIGTERM, then SIGKILL."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc, _ in reversed(list(self.procs.values())):
                try:
                    os.killpg(proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            for pid in marked_processes(self.token):
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                if all(proc.poll() is not None for proc, _ in self.procs.values()) and \
                        not marked_processes(self.token):
                    return
                time.sleep(0.1)


def _wait(condition, timeout: float, federation: _Federation, what: str, *logs: Path) -> None:
    """Until `condition()`, while every process lives; the timeout's error shows the first log
    with lines."""
    deadline = time.monotonic() + timeout
    while not condition():
        federation.check_alive()
        if time.monotonic() > deadline:
            tail = next((t for t in map(log_tail, logs) if t not in ("empty log", "no log")), "empty log")
            raise FederatedError(f"federated training: {what} timed out after {timeout:.0f} s: {tail}")
        time.sleep(0.2)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def _node_clients(work: Path, clients) -> dict[int, str]:
    """Node id -> client id, from the SuperNodes' logs."""
    found = {}
    for client in clients:
        match = re.search(r"SuperNode ID: (\d+)", _ANSI.sub("", (work / f"supernode-{client}.log").read_text(
            errors="replace")))
        if match:
            found[int(match.group(1))] = client
    return found


def _read_result(metrics_path: Path, state_path: Path, nodes: dict[int, str], startup: float,
                 started: float) -> FederatedRun:
    data = json.loads(metrics_path.read_text())
    if data.get("failure"):
        failure = re.sub(r"node (\d+)", lambda m: f"client {nodes.get(int(m.group(1)), m.group(0))}",
                         data["failure"])
        raise FederatedError(f"federated training: {one_line(failure, 600)}")
    rounds, clients, client_bytes = [], [], {}
    for entry in data["rounds"]:
        rounds.append(FederatedRound(round=entry["round"], train=entry["train"], evaluate=entry["evaluate"],
                                     seconds=entry["seconds"]))
        for item in entry["clients"]:
            client = FederatedClientRound(
                round=entry["round"], phase=item["phase"],
                client=item["client"] or nodes.get(int(item.get("node", 0)), str(item.get("node", ""))),
                num_examples=int(item.get("num-examples", 0)), loss=item.get("loss"), accuracy=item.get("accuracy"),
                bytes_received=int(item.get("bytes-received", 0)), bytes_sent=int(item.get("bytes-sent", 0)),
                seconds=float(item.get("seconds", 0.0)), error=item.get("error", ""))
            clients.append(client)
            if client.client:
                per_round = client_bytes.setdefault(client.client, [0] * len(data["rounds"]))
                per_round[len(rounds) - 1] += client.bytes_received + client.bytes_sent
    return FederatedRun(strategy=data["strategy"], state_dict_path=str(state_path), rounds=rounds, clients=clients,
                        round_seconds=[r.seconds for r in rounds], client_bytes=client_bytes,
                        startup_seconds=startup, seconds=time.perf_counter() - started)


def run_federated(net_config: Mapping, partitions: Mapping[str, Path], config: FederatedConfig, work: Path, *,
                  flower_venv: Path | None = None, initial_state: Mapping | None = None, timeout: float = 600.0,
                  startup_timeout: float = 90.0, app_dir: Path = APP_DIR) -> FederatedRun:
    """Train EdgeNet(**net_config) over `partitions` (client id -> a folder with its
    `features.npy` and `labels.npy`) on a local Flower federation; files and logs go to `work`.
    `initial_state` (a state dict) defaults to the seeded network's. Raises FederatedError."""
    import torch

    from pipelines.training.nets import EdgeNet

    started = time.perf_counter()
    if flower_venv is None:
        from pipelines.settings import Settings

        flower_venv = Settings().flower_venv
    bin_dir = flower_bin(Path(flower_venv))
    if not partitions:
        raise FederatedError("federated training: no client partitions")
    for client, folder in partitions.items():
        if not _CLIENT_ID.fullmatch(client):
            raise FederatedError(f"federated training: client id {client!r}: letters, digits, '.', '_' and '-' only")
        if not Path(folder).is_dir():
            raise FederatedError(f"federated training: the partition folder of client {client} ({folder}) "
                                 "does not exist")
        missing = [name for name in ("features.npy", "labels.npy") if not (Path(folder) / name).is_file()]
        if missing:
            raise FederatedError(f"federated training: the partition of client {client} ({folder}) has no "
                                 f"{' and no '.join(missing)}")
        if "'" in str(Path(folder).resolve()):
            raise FederatedError(f"federated training: the partition folder of client {client} has a quote "
                                 "in its path")
    if len(partitions) < config.min_clients:
        raise FederatedError(f"federated training: {len(partitions)} client partitions, the strategy waits for "
                             f"at least {config.min_clients}")

    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    app = work / "app"
    shutil.rmtree(app, ignore_errors=True)
    shutil.copytree(app_dir, app, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.fab"))
    initial_path, state_path, metrics_path = work / "initial.pt", work / "global.pt", work / "metrics.json"
    for stale in (state_path, metrics_path):
        stale.unlink(missing_ok=True)
    torch.manual_seed(config.seed)
    net = EdgeNet(**net_config)
    if initial_state is not None:
        net.load_state_dict(dict(initial_state))
    torch.save(net.state_dict(), initial_path)

    run_config = {"strategy": config.strategy, "num-server-rounds": config.rounds,
                  "fraction-train": config.fraction_train, "fraction-evaluate": config.fraction_evaluate,
                  "min-clients": config.min_clients, "proximal-mu": config.proximal_mu,
                  "local-epochs": config.local_epochs, "learning-rate": config.learning_rate,
                  "batch-size": config.batch_size, "eval-share": config.eval_share, "seed": config.seed,
                  "round-timeout": config.round_timeout, "net-config": json.dumps(net.config),
                  "initial-path": str(initial_path), "output-path": str(state_path),
                  "metrics-path": str(metrics_path)}
    run_config_path = work / "run-config.toml"
    run_config_path.write_text("".join(f"{key} = {_toml(value)}\n" for key, value in run_config.items()))

    federation = _Federation(bin_dir, work)
    try:
        port, *node_ports = free_ports(1 + len(partitions))
        federation.start("superlink", ["flower-superlink", "--insecure", "--database", str(work / "superlink.db"),
                                       "--port", str(port), "--disable-runtime-dependency-installation"])
        link_log = work / "superlink.log"
        _wait(lambda: _port_open(port), startup_timeout, federation, "starting the SuperLink", link_log)
        for (client, folder), node_port in zip(partitions.items(), node_ports):
            federation.start(f"supernode-{client}", [
                "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}", "--port", str(node_port),
                "--node-config", f"data-path='{Path(folder).resolve()}' client-id='{client}'"])

        def joined() -> bool:
            return _ANSI.sub("", link_log.read_text(errors="replace")).count("Activated node_id") >= len(partitions)

        _wait(joined, startup_timeout, federation, f"{len(partitions)} SuperNodes joining the SuperLink", link_log)
        startup = time.perf_counter() - started

        cli_home = work / "flwr-home" / "flwr-run"
        cli_home.mkdir(parents=True, exist_ok=True)
        (cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "edge"\n\n[superlink.edge]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
        run = federation.start("flwr-run", ["flwr", "run", str(app), "edge", "--stream",
                                            "--run-config", str(run_config_path)])
        run_log = work / "flwr-run.log"

        def done() -> bool:  # the ServerApp writes the weights, then the metrics marked complete
            try:
                data = json.loads(metrics_path.read_text())
            except (OSError, ValueError):
                return False
            return bool(data.get("complete")) and (bool(data.get("failure")) or state_path.exists())

        def finished() -> bool:
            if done():
                return True
            if run.poll() is not None:
                time.sleep(1.0)  # the last file may still be landing
                if done():
                    return True
                raise FederatedError(f"federated training: the Flower run ended (code {run.returncode}) "
                                     f"without a final model: {log_tail(run_log)}")
            return False

        _wait(finished, timeout, federation, "the Flower run", run_log, link_log)
        result = _read_result(metrics_path, state_path, _node_clients(work, partitions), startup, started)
        if not result.rounds or any(not r.train for r in result.rounds):
            failed = next((c.error for c in result.clients if c.error), "no client replied")
            raise FederatedError(f"federated training: a round had no training replies: {one_line(failed, 300)}")
    finally:
        federation.stop()
    return result.model_copy(update={"seconds": time.perf_counter() - started})
