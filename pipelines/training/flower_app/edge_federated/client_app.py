"""The ClientApp: trains and evaluates the global network on the node's own partition (the node
config's `data-path`); reports its metrics, its rows and the bytes of the arrays it received
and sent, under the node config's `client-id`.

With differential privacy (run config `dp-noise-multiplier` > 0) the node trains with DP-SGD
and keeps its own privacy ledger (the DP-SGD steps its rows went through in this run, in the
node's context state): it reports the epsilon spent so far, and declines to train a round that
would take it past `dp-max-epsilon`."""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from edge_federated.task import (
    array_bytes,
    build_net,
    evaluate,
    load_partition,
    privacy_spent,
    private_steps,
    train,
    train_private,
)

LEDGER = "privacy-ledger"

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
    seed = int(run["seed"]) + int(config.get("server-round", 0))
    epochs, rate, batch = int(run["local-epochs"]), float(run["learning-rate"]), int(run["batch-size"])
    sigma = float(run.get("dp-noise-multiplier", 0.0))
    privacy = {}
    if sigma > 0:
        ledger = context.state.config_records.get(LEDGER, ConfigRecord({"steps": 0}))
        sample_rate, steps = private_steps(len(x), batch, epochs)
        total = int(ledger["steps"]) + steps
        delta = float(run["dp-delta"])
        epsilon = privacy_spent(sigma, sample_rate, total, delta)
        budget = float(run.get("dp-max-epsilon", 0.0))
        if budget and epsilon > budget:
            raise RuntimeError(f"privacy budget: this round would spend epsilon {epsilon:.3f} > {budget:g} "
                               f"(delta {delta:g}); the client declines to train")
        loss = train_private(net, x, y, epochs, rate, batch, mu, seed, sigma, float(run["dp-max-grad-norm"]))
        context.state.config_records[LEDGER] = ConfigRecord({"steps": total})
        privacy = {"epsilon": epsilon, "dp-steps": total, "dp-sample-rate": sample_rate}
    else:
        loss = train(net, x, y, epochs, rate, batch, mu, seed)
    sent = ArrayRecord(net.state_dict())
    metrics = MetricRecord({"loss": loss, "proximal-mu": mu, "num-examples": len(x),
                            "bytes-received": array_bytes(received),
                            "bytes-sent": array_bytes(sent), "seconds": time.perf_counter() - start, **privacy})
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
