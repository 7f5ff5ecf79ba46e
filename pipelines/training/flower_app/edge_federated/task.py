"""What the ServerApp and the ClientApp share: the network, a node's partition, local training
and evaluation. The server side only builds the network; partitions are read on the nodes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pipelines.training.nets import EdgeNet


def build_net(run_config) -> EdgeNet:
    """EdgeNet from the run config's `net-config` (its constructor arguments as JSON)."""
    return EdgeNet(**json.loads(str(run_config["net-config"])))


def array_bytes(record) -> int:
    """Bytes of the tensors an ArrayRecord carries."""
    return int(sum(len(array.data) for array in record.values()))


def load_partition(folder: str, eval_share: float, seed: int):
    """A node's rows (`features.npy`, `labels.npy` in its data folder), split into a training part
    and a held-out part (`eval_share` of the rows, seeded) for local evaluation."""
    path = Path(folder)
    x = np.load(path / "features.npy").astype(np.float32)
    y = np.load(path / "labels.npy").astype(np.int64)
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"partition {path}: {len(x)} feature rows and {len(y)} labels")
    order = np.random.default_rng(seed).permutation(len(x))
    held = max(1, int(round(len(x) * eval_share)))
    train, test = order[held:], order[:held]
    return (torch.from_numpy(x[train]), torch.from_numpy(y[train]),
            torch.from_numpy(x[test]), torch.from_numpy(y[test]))


def nll(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """EdgeNet outputs probabilities: the negative log-likelihood of the targets."""
    return torch.nn.functional.nll_loss(torch.log(probs + 1e-9), target)


def train(net: EdgeNet, x, y, epochs: int, learning_rate: float, batch_size: int, mu: float,
          seed: int) -> float:
    """Local epochs of Adam; with `mu` > 0 (FedProx) the loss adds mu/2 * ||w - w_global||^2,
    w_global being the weights received. Returns the mean loss of the last epoch."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    global_weights = [p.detach().clone() for p in net.parameters()]
    optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate)
    net.train()
    last = 0.0
    for _ in range(max(1, epochs)):
        total, rows = 0.0, 0
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            optimizer.zero_grad()
            loss = nll(net(x[idx]), y[idx])
            if mu > 0:
                proximal = sum(((w - g) ** 2).sum() for w, g in zip(net.parameters(), global_weights))
                loss = loss + (mu / 2) * proximal
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            rows += len(idx)
        last = total / max(rows, 1)
    net.eval()
    return last


def evaluate(net: EdgeNet, x, y) -> tuple[float, float]:
    """Loss and accuracy on held-out rows."""
    net.eval()
    with torch.no_grad():
        probs = net(x)
        return float(nll(probs, y)), float((probs.argmax(dim=1) == y).float().mean())
