"""What the ServerApp and the ClientApp share: the network, a node's partition, local training
and evaluation. The server side only builds the network; partitions are read on the nodes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pipelines.training.nets import build_module

# The app's own folder: a spec's training code travels in it (the runner copies the module's
# files here, and Flower ships the app to every node).
APP_ROOT = Path(__file__).resolve().parent.parent


def build_net(run_config) -> torch.nn.Module:
    """The network of the run config's `net-config` (JSON: EdgeNet's arguments, or the spec's
    own builder, whose module lies in the app's folder)."""
    return build_module(json.loads(str(run_config["net-config"])), APP_ROOT)


def _store(location: str, endpoint: str):
    """The artifact store folder of an object URI, and the object's name in it."""
    from pipelines.storage import ObjectStore

    folder, _, name = location.rpartition("/")
    return ObjectStore(folder, endpoint or None), name


def read_location(location: str, endpoint: str = "") -> bytes:
    """The bytes at a local path, or at a `file://` or `s3://` object URI (a federation the train
    stage does not run: the server writes where the train stage can read)."""
    if "://" not in location:
        return Path(location).read_bytes()
    store, name = _store(location, endpoint)
    return store.read_bytes(name)


def write_location(location: str, data: bytes, endpoint: str = "") -> None:
    """Write whole: a local file is replaced atomically, an object is put in one request."""
    if "://" not in location:
        path = Path(location)
        partial = path.with_suffix(".partial")
        partial.write_bytes(data)
        partial.replace(path)
        return
    store, name = _store(location, endpoint)
    store.put_bytes(data, name)


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


def privacy_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of DP-SGD after `steps` noisy steps at `sample_rate` (Opacus' RDP accountant)."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)] if steps else []
    return float(accountant.get_epsilon(delta)) if steps else 0.0


def private_steps(rows: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """DP-SGD's sampling rate and its steps in `epochs` over `rows` (Poisson batches of
    `batch_size` rows on average)."""
    per_epoch = max(1, -(-rows // batch_size))  # as Opacus' DPDataLoader: sample rate 1 / len(loader)
    return 1.0 / per_epoch, per_epoch * max(1, epochs)


def train_private(net, x, y, epochs: int, learning_rate: float, batch_size: int, mu: float, seed: int,
                  noise_multiplier: float, max_grad_norm: float) -> float:
    """Local epochs of DP-SGD (Opacus): each example's gradient clipped to `max_grad_norm`,
    Gaussian noise added to each batch's sum, batches drawn by Poisson sampling. FedProx's pull
    towards the received weights is applied after each step (it depends on no example)."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(seed)
    global_weights = [p.detach().clone() for p in net.parameters()]
    optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size,
                        generator=torch.Generator().manual_seed(seed))
    engine = PrivacyEngine(accountant="rdp")
    private, optimizer, loader = engine.make_private(module=net, optimizer=optimizer, data_loader=loader,
                                                     noise_multiplier=noise_multiplier,
                                                     max_grad_norm=max_grad_norm, poisson_sampling=True)
    private.train()
    last = 0.0
    for _ in range(max(1, epochs)):
        total, rows = 0.0, 0
        for xb, yb in loader:
            if len(xb) == 0:  # Poisson sampling may draw an empty batch
                continue
            optimizer.zero_grad()
            loss = nll(private(xb), yb)
            loss.backward()
            optimizer.step()
            if mu > 0:
                with torch.no_grad():
                    for w, g in zip(net.parameters(), global_weights):
                        w -= learning_rate * mu * (w - g)
            total += loss.item() * len(xb)
            rows += len(xb)
        last = total / max(rows, 1)
    private.remove_hooks()
    net.eval()
    return last


def nll(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """EdgeNet outputs probabilities: the negative log-likelihood of the targets."""
    return torch.nn.functional.nll_loss(torch.log(probs + 1e-9), target)


def train(net: torch.nn.Module, x, y, epochs: int, learning_rate: float, batch_size: int, mu: float,
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


def evaluate(net: torch.nn.Module, x, y) -> tuple[float, float]:
    """Loss and accuracy on held-out rows."""
    net.eval()
    with torch.no_grad():
        probs = net(x)
        return float(nll(probs, y)), float((probs.argmax(dim=1) == y).float().mean())
