"""Federated training of a PyTorch network on Flower's deployment runtime, driven as processes.

Flower runs in its own environment (`Settings.flower_venv`, built by `make venv` from
requirements-flower.txt); this module imports no flwr. `run_federated` starts a SuperLink and one
SuperNode per client (each with its own partition folder), or connects to a running federation
(`Federation`), submits the Flower App of `flower_app/` with `flwr run`, waits for the weights
and metrics the ServerApp writes, and tears every process it started down, also on an error or
a timeout. The server side never reads a partition.
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
    dp_noise_multiplier: float = Field(0.0, ge=0, description="DP-SGD on each client when above 0.")
    dp_max_grad_norm: float = Field(1.0, gt=0)
    dp_delta: float = Field(1e-5, gt=0, lt=1)
    dp_max_epsilon: float = Field(0.0, ge=0, description="A client declines a round past this epsilon (0: no cap).")


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
    epsilon: float | None = Field(None, description="DP-SGD: the epsilon this client's rows have spent so far.")
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
    epsilon: float | None = Field(None, description="DP-SGD: the largest epsilon any client's rows spent "
                                                    "(None without differential privacy).")

    def worst_client(self) -> FederatedClientRound | None:
        """The client whose own held-out rows the final global model serves worst."""
        last = max((c.round for c in self.clients if c.phase == "evaluate" and c.accuracy is not None), default=None)
        scored = [c for c in self.clients if c.phase == "evaluate" and c.round == last and c.accuracy is not None]
        return min(scored, key=lambda c: (c.accuracy, c.client)) if scored else None


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


class FlowerProcesses:
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


def _wait(condition, timeout: float, federation: FlowerProcesses, what: str, *logs: Path) -> None:
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


class Federation(BaseModel):
    """A running federation the train stage submits to, rather than starting one: its
    SuperLink's address (`flwr run` connects there), and where its server writes the result (a
    folder of the artifact store both sides reach)."""

    model_config = ConfigDict(frozen=True)

    superlink: str = Field(pattern=r"^[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}$", description="host:port")
    outputs: str = Field(description="file:// or s3:// folder: initial weights, final weights, metrics.")
    store_endpoint: str = ""
    insecure: bool = False
    root_certificates: Path | None = None


def _read_result(data: dict, state_path: str, nodes: dict[int, str], startup: float,
                 started: float) -> FederatedRun:
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
                seconds=float(item.get("seconds", 0.0)), epsilon=item.get("epsilon"), error=item.get("error", ""))
            clients.append(client)
            if client.client:
                per_round = client_bytes.setdefault(client.client, [0] * len(data["rounds"]))
                per_round[len(rounds) - 1] += client.bytes_received + client.bytes_sent
    spent = [c.epsilon for c in clients if c.epsilon is not None]
    return FederatedRun(strategy=data["strategy"], state_dict_path=str(state_path), rounds=rounds, clients=clients,
                        round_seconds=[r.seconds for r in rounds], client_bytes=client_bytes,
                        startup_seconds=startup, seconds=time.perf_counter() - started,
                        epsilon=max(spent) if spent else None)


def _check_partitions(partitions: Mapping[str, Path], config: FederatedConfig) -> None:
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


class _Outputs:
    """Where the ServerApp writes: the work folder (embedded), or the artifact store folder of a
    running federation."""

    def __init__(self, work: Path, federation: Federation | None):
        self.federation = federation
        if federation is None:
            self.initial, self.state, self.metrics = (str(work / n) for n in ("initial.pt", "global.pt",
                                                                              "metrics.json"))
            self.store = None
        else:
            from pipelines.storage import ObjectStore

            self.store = ObjectStore(federation.outputs, federation.store_endpoint or None)
            self.initial, self.state, self.metrics = (self.store.uri(n) for n in ("initial.pt", "global.pt",
                                                                                  "metrics.json"))

    def write(self, location: str, data: bytes) -> None:
        if self.store is None:
            Path(location).write_bytes(data)
        else:
            self.store.put_bytes(data, self.store.key_of(location))

    def read(self, location: str) -> bytes | None:
        try:
            if self.store is None:
                return Path(location).read_bytes()
            key = self.store.key_of(location)
            return self.store.read_bytes(key) if self.store.exists(key) else None
        except OSError:
            return None

    def clear(self) -> None:
        for location in (self.state, self.metrics):
            if self.store is None:
                Path(location).unlink(missing_ok=True)
            else:
                self.store.delete(self.store.key_of(location))

    def local_state(self, work: Path) -> Path:
        """The final weights as a local file."""
        if self.store is None:
            return Path(self.state)
        path = work / "global.pt"
        path.write_bytes(self.read(self.state) or b"")
        return path


def _connection(federation: Federation | None, port: int | None) -> str:
    """`flwr run`'s connection to the SuperLink (its config.toml section)."""
    if federation is None:
        return f'[superlink]\ndefault = "edge"\n\n[superlink.edge]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    lines = ['[superlink]', 'default = "edge"', '', '[superlink.edge]', f'address = "{federation.superlink}"']
    if federation.insecure:
        lines.append("insecure = true")
    elif federation.root_certificates is not None:
        lines.append(f"root-certificates = {json.dumps(str(Path(federation.root_certificates).resolve()))}")
    return "\n".join(lines) + "\n"


def run_federated(net: Mapping, partitions: Mapping[str, Path], config: FederatedConfig, work: Path, *,
                  flower_venv: Path | None = None, initial_state: Mapping | None = None, timeout: float = 600.0,
                  startup_timeout: float = 90.0, app_dir: Path = APP_DIR,
                  code: tuple[list[Path], Path] | None = None, federation: Federation | None = None) -> FederatedRun:
    """Train the network `net` describes (`nets.build_module`: {"config": EdgeNet's arguments}
    or a spec's own builder; plain EdgeNet arguments are taken too) with Flower; files and logs
    go to `work`. Embedded (no `federation`): a SuperLink and one SuperNode per partition
    (client id -> a folder with its `features.npy` and `labels.npy`) are started here and torn
    down after. With `federation`, the app is submitted to that running SuperLink, whose
    SuperNodes hold their own data (`partitions` is not used). `code` (files, the folder they are
    named against) is a spec's training code, shipped in the app. `initial_state` (a state
    dict) defaults to the seeded network's. Raises FederatedError."""
    import io

    import torch

    from pipelines.training.nets import build_module

    started = time.perf_counter()
    if flower_venv is None:
        from pipelines.settings import Settings

        flower_venv = Settings().flower_venv
    bin_dir = flower_bin(Path(flower_venv))
    if federation is None:
        _check_partitions(partitions, config)

    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    app = work / "app"
    shutil.rmtree(app, ignore_errors=True)
    shutil.copytree(app_dir, app, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.fab"))
    for path in (code[0] if code else []):  # the spec's own module travels with the app
        target = app / Path(path).resolve().relative_to(Path(code[1]).resolve())
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    net = dict(net) if "config" in net or "entrypoint" in net else {"config": dict(net)}
    torch.manual_seed(config.seed)
    module = build_module(net, code[1] if code else None)
    if initial_state is not None:
        module.load_state_dict(dict(initial_state))
    outputs = _Outputs(work, federation)
    outputs.clear()
    weights = io.BytesIO()
    torch.save(module.state_dict(), weights)
    outputs.write(outputs.initial, weights.getvalue())

    run_config = {"strategy": config.strategy, "num-server-rounds": config.rounds,
                  "fraction-train": config.fraction_train, "fraction-evaluate": config.fraction_evaluate,
                  "min-clients": config.min_clients, "proximal-mu": config.proximal_mu,
                  "local-epochs": config.local_epochs, "learning-rate": config.learning_rate,
                  "batch-size": config.batch_size, "eval-share": config.eval_share, "seed": config.seed,
                  "round-timeout": config.round_timeout, "net-config": json.dumps(net),
                  "dp-noise-multiplier": config.dp_noise_multiplier, "dp-max-grad-norm": config.dp_max_grad_norm,
                  "dp-delta": config.dp_delta, "dp-max-epsilon": config.dp_max_epsilon,
                  "initial-path": outputs.initial, "output-path": outputs.state, "metrics-path": outputs.metrics,
                  "store-endpoint": federation.store_endpoint if federation else ""}
    run_config_path = work / "run-config.toml"
    run_config_path.write_text("".join(f"{key} = {_toml(value)}\n" for key, value in run_config.items()))

    processes = FlowerProcesses(bin_dir, work)
    startup, nodes = 0.0, {}
    try:
        logs = []
        port = None
        if federation is None:
            port, *node_ports = free_ports(1 + len(partitions))
            processes.start("superlink", ["flower-superlink", "--insecure", "--database", str(work / "superlink.db"),
                                          "--port", str(port), "--disable-runtime-dependency-installation"])
            link_log = work / "superlink.log"
            logs.append(link_log)
            _wait(lambda: _port_open(port), startup_timeout, processes, "starting the SuperLink", link_log)
            for (client, folder), node_port in zip(partitions.items(), node_ports):
                processes.start(f"supernode-{client}", [
                    "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}", "--port", str(node_port),
                    "--node-config", f"data-path='{Path(folder).resolve()}' client-id='{client}'"])

            def joined() -> bool:
                return _ANSI.sub("", link_log.read_text(errors="replace")).count("Activated node_id") >= \
                    len(partitions)

            _wait(joined, startup_timeout, processes, f"{len(partitions)} SuperNodes joining the SuperLink", link_log)
            startup = time.perf_counter() - started

        cli_home = work / "flwr-home" / "flwr-run"
        cli_home.mkdir(parents=True, exist_ok=True)
        (cli_home / "config.toml").write_text(_connection(federation, port))
        run = processes.start("flwr-run", ["flwr", "run", str(app), "edge", "--stream",
                                           "--run-config", str(run_config_path)])
        run_log = work / "flwr-run.log"
        result: dict = {}
        polled = [0.0]

        def done() -> bool:  # the ServerApp writes the weights, then the metrics marked complete
            if outputs.store is not None and time.monotonic() - polled[0] < 2.0:
                return False  # an object store is asked every 2 s, not every 0.2
            polled[0] = time.monotonic()
            raw = outputs.read(outputs.metrics)
            try:
                data = json.loads(raw) if raw else {}
            except ValueError:
                return False
            if data.get("complete") and (data.get("failure") or outputs.read(outputs.state) is not None):
                result.update(data)
                return True
            return False

        def finished() -> bool:
            if done():
                return True
            if run.poll() is not None:
                time.sleep(1.0)  # the last file may still be landing
                polled[0] = 0.0
                if done():
                    return True
                raise FederatedError(f"federated training: the Flower run ended (code {run.returncode}) "
                                     f"without a final model: {log_tail(run_log)}")
            return False

        _wait(finished, timeout, processes, "the Flower run", run_log, *logs)
        if federation is None:
            nodes = _node_clients(work, partitions)
        outcome = _read_result(result, str(outputs.local_state(work)), nodes, startup, started)
        if not outcome.rounds or any(not r.train for r in outcome.rounds):
            failed = next((c.error for c in outcome.clients if c.error), "no client replied")
            raise FederatedError(f"federated training: a round had no training replies: {one_line(failed, 300)}")
    finally:
        processes.stop()
    return outcome.model_copy(update={"seconds": time.perf_counter() - started})
