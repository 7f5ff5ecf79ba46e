"""The ServerApp: FedAvg or FedProx over the run config's rounds, client fraction and minimum
clients, from the initial weights the runner wrote. It never reads partition data: it writes the
aggregated and per-client metrics of each round (`metrics-path`, JSON, rewritten after each
round) and the final weights (`output-path`, a torch state dict)."""

from __future__ import annotations

import io
import json
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx

from edge_federated.task import build_net, read_location, write_location

app = ServerApp()


def _plain(record: MetricRecord | None) -> dict:
    return {key: value for key, value in (record or {}).items()}


class RoundFailed(RuntimeError):
    """Fewer clients replied to a round than the strategy's minimum."""


def recording(base: type) -> type:
    """`base` (a strategy class) that also keeps each client's metrics and each round's time."""

    class Recording(base):
        def __init__(self, *args, metrics_path: str, endpoint: str = "", **kwargs):
            super().__init__(*args, **kwargs)
            self.metrics_path = metrics_path
            self.endpoint = endpoint
            self.rounds: dict[int, dict] = {}
            self.failure = ""
            self.started = time.perf_counter()

        def _round(self, server_round: int) -> dict:
            return self.rounds.setdefault(server_round, {"round": server_round, "train": {}, "evaluate": {},
                                                         "clients": [], "seconds": 0.0})

        def _clients(self, server_round: int, phase: str, replies: list) -> None:
            for msg in replies:
                node = int(msg.metadata.src_node_id)
                if msg.has_error():
                    self._round(server_round)["clients"].append(
                        {"phase": phase, "client": "", "node": node, "error": str(msg.error.reason)})
                    continue
                client = msg.content.config_records.get("client", ConfigRecord())
                metrics = next(iter(msg.content.metric_records.values()), MetricRecord())
                self._round(server_round)["clients"].append(
                    {"phase": phase, "client": str(client.get("client-id", "")), "node": node, **_plain(metrics)})
            replied = sum(not msg.has_error() for msg in replies)
            needed = self.min_train_nodes if phase == "train" else \
                self.min_evaluate_nodes if self.fraction_evaluate > 0 else 0
            if replied < needed:
                failed = next((msg for msg in replies if msg.has_error()), None)
                reason = f": node {failed.metadata.src_node_id}: {failed.error.reason}" if failed else ""
                self.failure = (f"round {server_round} {phase}: {replied} client(s) replied without an error, "
                                f"the strategy needs {needed}{reason}")
                self.write(complete=True)
                raise RoundFailed(self.failure)

        def configure_train(self, server_round, arrays, config, grid):
            self._round(server_round)["start"] = time.perf_counter()
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            self._clients(server_round, "train", replies)
            arrays, metrics = super().aggregate_train(server_round, replies)
            self._round(server_round)["train"] = _plain(metrics)
            return arrays, metrics

        def aggregate_evaluate(self, server_round, replies):
            replies = list(replies)
            self._clients(server_round, "evaluate", replies)
            metrics = super().aggregate_evaluate(server_round, replies)
            entry = self._round(server_round)
            entry["evaluate"] = _plain(metrics)
            entry["seconds"] = time.perf_counter() - entry.get("start", self.started)
            self.write(complete=False)
            return metrics

        def write(self, complete: bool) -> None:
            rounds = [{k: v for k, v in entry.items() if k != "start"} for _, entry in sorted(self.rounds.items())]
            data = {"complete": complete, "strategy": base.__name__.lower(), "rounds": rounds,
                    "failure": self.failure, "seconds": time.perf_counter() - self.started}
            write_location(self.metrics_path, json.dumps(data, indent=1).encode(), self.endpoint)

    return Recording


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = context.run_config
    name = str(run["strategy"]).lower()
    minimum = int(run["min-clients"])
    options = {"fraction_train": float(run["fraction-train"]), "fraction_evaluate": float(run["fraction-evaluate"]),
               "min_train_nodes": minimum, "min_evaluate_nodes": minimum, "min_available_nodes": minimum,
               "metrics_path": str(run["metrics-path"]), "endpoint": str(run.get("store-endpoint", ""))}
    if name == "fedprox":
        strategy = recording(FedProx)(proximal_mu=float(run["proximal-mu"]), **options)
    elif name == "fedavg":
        strategy = recording(FedAvg)(**options)
    else:
        raise ValueError(f"strategy {name!r}: fedavg or fedprox")
    endpoint = str(run.get("store-endpoint", ""))
    net = build_net(run)
    if str(run["initial-path"]):
        net.load_state_dict(torch.load(io.BytesIO(read_location(str(run["initial-path"]), endpoint)),
                                       weights_only=True))
    try:
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(net.state_dict()),
                                num_rounds=int(run["num-server-rounds"]), timeout=float(run["round-timeout"]),
                                train_config=ConfigRecord({}), evaluate_config=ConfigRecord({}))
    except RoundFailed:
        return  # the metrics file says why
    weights = io.BytesIO()
    torch.save(result.arrays.to_torch_state_dict(), weights)
    write_location(str(run["output-path"]), weights.getvalue(), endpoint)
    strategy.write(complete=True)
