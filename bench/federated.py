"""Federated training on Flower's deployment runtime against centralized training on the same rows.

The digits of `builtin:mnist-5k` (784 pixels, 10 classes): a fifth held out centrally, the rest
split over N clients non-IID (each client's share of every class drawn from a Dirichlet(alpha)
distribution, so most clients see a few digits mostly), one folder per client as a device would
hold it. The same MLP (EdgeNet, one hidden layer of 64) is trained

- centrally, in this process, with the same local training function the clients run (Adam,
  `rounds x local epochs` epochs over every training row), and
- federated, by `pipelines.training.federated.run_federated`: a SuperLink and N SuperNodes as
  processes of the Flower environment, FedAvg, every client in every round,

and both are scored on the central held-out rows. Printed per client count: accuracy of both,
seconds per round, start-up, bytes of weights per client per round (received + sent, train and
evaluate).

    .venv/bin/python bench/federated.py [--clients 10 50] [--rounds 3] [--alpha 0.5] [--fraction 1.0]
                                        [--dp-noise 0.8]

`--fraction` samples that share of the clients for each round's training and evaluation;
`--dp-noise` trains with DP-SGD on every client (clipping 1.0, delta 1e-4) and prints the
largest epsilon spent.

Writes `$EDGE_STATE_DIR/bench/federated.json` (default `.edge-state`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "pipelines" / "training" / "flower_app"))

from pipelines.settings import get_settings  # noqa: E402
from pipelines.training.federated import FederatedConfig, FederatedError, run_federated  # noqa: E402

NET = {"n_features": 784, "n_classes": 10, "hidden_layers": [64], "input_scale": 255.0}


def _data(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from pipelines.data.builtin import load_mnist_5k

    frame = load_mnist_5k()
    x = frame[[c for c in frame.columns if c.startswith("pixel_")]].to_numpy(np.float32)
    y = frame["label"].to_numpy(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    held = len(x) // 5
    return x[order[held:]], y[order[held:]], x[order[:held]], y[order[:held]]


def _split(x: np.ndarray, y: np.ndarray, clients: int, alpha: float, seed: int, folder: Path) -> dict[str, Path]:
    """Non-IID: each class's rows are dealt to the clients in Dirichlet(alpha) shares."""
    rng = np.random.default_rng(seed)
    owner = np.empty(len(y), dtype=np.int64)
    for label in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == label))
        shares = rng.dirichlet(np.full(clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(int)
        for client, part in enumerate(np.split(rows, cuts)):
            owner[part] = client
    out = {}
    for client in range(clients):
        rows = np.flatnonzero(owner == client)
        if len(rows) < 10:  # a client with (almost) nothing keeps a few random rows
            rows = rng.choice(len(y), size=10, replace=False)
        path = folder / f"device-{client:03d}"
        path.mkdir(parents=True)
        np.save(path / "features.npy", x[rows])
        np.save(path / "labels.npy", y[rows])
        out[path.name] = path
    return out


def _centralized(x, y, x_test, y_test, epochs: int, config: FederatedConfig) -> tuple[float, float]:
    import torch
    from edge_federated.task import evaluate, train

    from pipelines.training.nets import EdgeNet

    torch.manual_seed(config.seed)
    net = EdgeNet(**NET)
    started = time.perf_counter()
    train(net, torch.from_numpy(x), torch.from_numpy(y), epochs, config.learning_rate, config.batch_size, 0.0,
          config.seed)
    seconds = time.perf_counter() - started
    return evaluate(net, torch.from_numpy(x_test), torch.from_numpy(y_test))[1], seconds


def _federated_accuracy(state_path: str, x_test, y_test) -> float:
    import torch
    from edge_federated.task import evaluate

    from pipelines.training.nets import EdgeNet

    net = EdgeNet(**NET)
    net.load_state_dict(torch.load(state_path))
    return evaluate(net, torch.from_numpy(x_test), torch.from_numpy(y_test))[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--fraction", type=float, default=1.0, help="share of the clients sampled per round")
    parser.add_argument("--dp-noise", type=float, default=0.0, help="DP-SGD noise multiplier (0: off)")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="the clients' (and the centralized) learning rate; default 1e-3, 0.02 with DP-SGD")
    parser.add_argument("--keep", type=Path, default=None, help="keep the partitions and Flower's logs here")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    x, y, x_test, y_test = _data(seed=0)
    print(f"mnist-5k: {len(x):,} training rows over the clients, {len(x_test):,} held out centrally; "
          f"non-IID Dirichlet({args.alpha}); {args.rounds} rounds x {args.local_epochs} local epochs, FedAvg; "
          f"learning rate {args.learning_rate or (0.02 if args.dp_noise else 1e-3):g}")
    results = []
    for clients in args.clients:
        sampled = max(2, int(np.ceil(args.fraction * clients)))
        private = {"dp_noise_multiplier": args.dp_noise, "dp_delta": 1e-4} if args.dp_noise else {}
        config = FederatedConfig(rounds=args.rounds, local_epochs=args.local_epochs, min_clients=sampled,
                                 fraction_train=args.fraction, fraction_evaluate=args.fraction,
                                 learning_rate=args.learning_rate or (0.02 if args.dp_noise else 1e-3),
                                 batch_size=32, seed=0,
                                 round_timeout=1800, **private)
        central, central_s = _centralized(x, y, x_test, y_test, args.rounds * args.local_epochs, config)
        with tempfile.TemporaryDirectory(prefix="federated-bench.") as scratch:
            tmp = args.keep / f"{clients}-clients" if args.keep else Path(scratch)
            partitions = _split(x, y, clients, args.alpha, seed=clients, folder=Path(tmp) / "devices")
            sizes = [len(np.load(p / "labels.npy")) for p in partitions.values()]
            started = time.perf_counter()
            try:
                run = run_federated(NET, partitions, config, Path(tmp) / "run", timeout=3600, startup_timeout=600)
            except FederatedError as error:
                print(f"{clients:>3} clients: did not complete after {time.perf_counter() - started:.0f} s: {error}")
                results.append({"clients": clients, "error": str(error)})
                continue
            federated = _federated_accuracy(run.state_dict_path, x_test, y_test)
        # Per round, the mean over the clients that took part in it (sampled ones).
        per_round = [float(np.mean([b for b in moved if b])) for moved in zip(*run.client_bytes.values())
                     if any(moved)]
        row = {"clients": clients, "rows_per_client_min": min(sizes), "rows_per_client_max": max(sizes),
               "centralized_accuracy": round(central, 4), "centralized_seconds": round(central_s, 2),
               "federated_accuracy": round(federated, 4), "startup_seconds": round(run.startup_seconds, 1),
               "round_seconds": [round(s, 1) for s in run.round_seconds],
               "bytes_per_client_per_round": round(float(np.mean(per_round)), 0) if per_round else None,
               "worst_client_accuracy": min((c.accuracy for c in run.clients if c.phase == "evaluate"
                                             and c.round == args.rounds and c.accuracy is not None), default=None),
               "sampled_per_round": sampled, "epsilon": run.epsilon, "seconds": round(run.seconds, 1)}
        results.append(row)
        print(f"{clients:>3} clients ({min(sizes)}-{max(sizes)} rows each): federated accuracy "
              f"{federated:.3f} vs centralized {central:.3f} ({central_s:.1f} s); start-up "
              f"{run.startup_seconds:.1f} s, seconds per round {', '.join(f'{s:.1f}' for s in run.round_seconds)}; "
              f"{row['bytes_per_client_per_round']:,.0f} bytes of weights per sampled client per round; worst client's "
              f"own accuracy {row['worst_client_accuracy']:.3f}"
              + (f"; {sampled} clients sampled per round" if sampled < clients else "")
              + (f"; DP-SGD epsilon {run.epsilon:.2f} (delta 1e-4)" if run.epsilon is not None else "")
              + f"; {run.seconds:.0f} s in all")
    out = get_settings().state / "bench" / "federated.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rounds": args.rounds, "local_epochs": args.local_epochs, "alpha": args.alpha,
                               "fraction": args.fraction, "dp_noise": args.dp_noise, "results": results}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
