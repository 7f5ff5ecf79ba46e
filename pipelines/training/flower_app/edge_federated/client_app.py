"""The ClientApp: trains and evaluates the global network on the node's own partition (the node
config's `data-path`); reports its metrics, its rows and the bytes of the arrays it received
and sent, under the node config's `client-id`."""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from edge_federated.task import array_bytes, build_net, evaluate, load_partition, train

app = ClientApp()


def _setup(msg: Message, context: Context):
    torch.set_num_threads(1)
    received = msg.content["arrays"]
    net = build_net(context.run_config)
    net.load_state_dict(received.to_torch_state_dict())
    data = load_partition(str(context.node_config["data-path"]), float(context.run_config["eval-share"]),
                          int(context.run_config["seed"]))
    return received, net, data


def _client(context: Context) -> ConfigRecord:
    return ConfigRecord({"client-id": str(context.node_config.get("client-id", context.node_id))})


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    start = time.perf_counter()
    received, net, (x, y, _, _) = _setup(msg, context)
    config = msg.content["config"]
    run = context.run_config
    mu = float(config.get("proximal-mu", 0.0))  # set by FedProx
    loss = train(net, x, y, int(run["local-epochs"]), float(run["learning-rate"]), int(run["batch-size"]), mu,
                 int(run["seed"]) + int(config.get("server-round", 0)))
    sent = ArrayRecord(net.state_dict())
    metrics = MetricRecord({"loss": loss, "proximal-mu": mu, "num-examples": len(x),
                            "bytes-received": array_bytes(received),
                            "bytes-sent": array_bytes(sent), "seconds": time.perf_counter() - start})
    return Message(content=RecordDict({"arrays": sent, "metrics": metrics, "client": _client(context)}),
                   reply_to=msg)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    start = time.perf_counter()
    received, net, (_, _, x, y) = _setup(msg, context)
    loss, accuracy = evaluate(net, x, y)
    metrics = MetricRecord({"loss": loss, "accuracy": accuracy, "num-examples": len(x),
                            "bytes-received": array_bytes(received), "bytes-sent": 0,
                            "seconds": time.perf_counter() - start})
    return Message(content=RecordDict({"metrics": metrics, "client": _client(context)}), reply_to=msg)
