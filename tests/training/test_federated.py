"""Federated training on Flower's deployment runtime: a SuperLink and SuperNodes as processes,
each node holding a non-IID partition of a small synthetic classification problem."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.settings import Settings
from pipelines.training.federated import FederatedConfig, FederatedError, run_federated
from pipelines.training.nets import EdgeNet

FLOWER_VENV = Settings().flower_venv
pytestmark = pytest.mark.skipif(not (FLOWER_VENV / "bin" / "flower-superlink").exists(),
                                reason=f"the Flower environment {FLOWER_VENV.name} is not built (`make venv`)")

NET = {"n_features": 8, "n_classes": 3, "hidden_layers": [16]}
MEANS = np.random.default_rng(7).normal(0, 2.0, size=(3, 8))


def rows(rng, n: int, class_share: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = rng.choice(3, size=n, p=class_share)
    return (MEANS[y] + rng.normal(0, 1.0, size=(n, 8))).astype(np.float32), y


def partitions(folder: Path, clients: int = 3) -> dict[str, Path]:
    """Non-IID by device group: group i holds mostly class i (80 %)."""
    rng = np.random.default_rng(1)
    out = {}
    for i in range(clients):
        share = np.full(3, 0.1)
        share[i] = 0.8
        x, y = rows(rng, 200, share)
        path = folder / f"group-{i}"
        path.mkdir(parents=True)
        np.save(path / "features.npy", x)
        np.save(path / "labels.npy", y)
        out[f"group-{i}"] = path
    return out


def accuracy(state_path: Path) -> float:
    x, y = rows(np.random.default_rng(99), 600, np.full(3, 1 / 3))
    net = EdgeNet(**NET)
    net.load_state_dict(torch.load(state_path, weights_only=True))
    with torch.no_grad():
        return float((net(torch.from_numpy(x)).argmax(dim=1).numpy() == y).mean())


def flower_processes(work: Path) -> list[int]:
    """Processes whose Flower home lies in `work` (the runner's, and whatever Flower spawned)."""
    needle = f"FLWR_HOME={work.resolve()}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if any(item.startswith(needle) for item in (entry / "environ").read_bytes().split(b"\0")):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_fedavg_over_three_non_iid_clients_improves_the_global_model(tmp_path):
    parts = partitions(tmp_path / "data")
    work = tmp_path / "work"
    config = FederatedConfig(strategy="fedavg", rounds=2, min_clients=3, local_epochs=2, learning_rate=0.01,
                             batch_size=32)
    result = run_federated(NET, parts, config, work, flower_venv=FLOWER_VENV, timeout=150)
    print(f"\nFedAvg, 3 clients, 2 rounds: {result.seconds:.1f} s (start-up {result.startup_seconds:.1f} s, "
          f"rounds {[round(s, 1) for s in result.round_seconds]} s)")
    for entry in result.rounds:
        print(f"round {entry.round}: train loss {entry.train['loss']:.3f}, "
              f"evaluate loss {entry.evaluate['loss']:.3f} accuracy {entry.evaluate['accuracy']:.3f}")
    print("bytes per client per round:", result.client_bytes)

    before, after = accuracy(work / "initial.pt"), accuracy(Path(result.state_dict_path))
    print(f"central held-out accuracy: initial {before:.3f}, federated {after:.3f}")
    assert after > before + 0.2 and after > 0.8
    assert result.strategy == "fedavg" and [r.round for r in result.rounds] == [1, 2]
    assert result.rounds[1].train["loss"] < result.rounds[0].train["loss"]
    assert all(r.seconds > 0 for r in result.rounds) and len(result.round_seconds) == 2
    for phase in ("train", "evaluate"):
        reported = {(c.round, c.client) for c in result.clients if c.phase == phase}
        assert reported == {(r, f"group-{i}") for r in (1, 2) for i in range(3)}
    # The serialised arrays: the tensors' bytes and each array's header.
    weights = result.clients[0].bytes_received
    assert weights > sum(t.numel() * t.element_size() for t in EdgeNet(**NET).state_dict().values())
    for client in result.clients:
        assert client.error == "" and client.bytes_received == weights
        if client.phase == "train":
            assert client.num_examples == 160 and client.bytes_sent == weights and client.loss is not None
        else:
            assert client.num_examples == 40 and 0 <= client.accuracy <= 1
    assert result.client_bytes == {f"group-{i}": [3 * weights, 3 * weights] for i in range(3)}
    assert not flower_processes(work), "a Flower process outlived the run"


def test_fedprox_sends_its_proximal_term_and_tolerates_a_failed_client_above_the_minimum(tmp_path):
    parts = partitions(tmp_path / "data")
    np.save(parts["group-2"] / "labels.npy", np.zeros(10, dtype=np.int64))  # 200 rows, 10 labels
    work = tmp_path / "work"
    config = FederatedConfig(strategy="fedprox", proximal_mu=0.5, rounds=1, min_clients=2, fraction_evaluate=0.0,
                             learning_rate=0.01)
    result = run_federated(NET, parts, config, work, flower_venv=FLOWER_VENV, timeout=120)
    print(f"\nFedProx, 3 clients (one failing), 1 round: {result.seconds:.1f} s")
    assert result.strategy == "fedprox" and result.rounds[0].train["proximal-mu"] == pytest.approx(0.5)
    assert {c.client for c in result.clients if c.phase == "train" and not c.error} == {"group-0", "group-1"}
    [failed] = [c for c in result.clients if c.error]
    print("failed client:", failed.client, failed.error)
    assert failed.client == "group-2" and "200 feature rows and 10 labels" in failed.error
    assert Path(result.state_dict_path).exists()
    assert not flower_processes(work)


def test_a_missing_partition_or_flower_environment_is_one_line(tmp_path):
    parts = partitions(tmp_path / "data", clients=2)
    parts["group-9"] = tmp_path / "nowhere"
    with pytest.raises(FederatedError, match="partition folder of client group-9 .* does not exist") as error:
        run_federated(NET, parts, FederatedConfig(), tmp_path / "work", flower_venv=FLOWER_VENV)
    assert "\n" not in str(error.value)
    with pytest.raises(FederatedError, match="make venv") as error:
        run_federated(NET, parts, FederatedConfig(), tmp_path / "work", flower_venv=tmp_path / "no-venv")
    assert "\n" not in str(error.value)


def test_a_timeout_tears_every_process_down(tmp_path):
    parts = partitions(tmp_path / "data", clients=2)
    work = tmp_path / "work"
    start = time.perf_counter()
    with pytest.raises(FederatedError, match="the Flower run timed out after 1 s") as error:
        run_federated(NET, parts, FederatedConfig(min_clients=2), work, flower_venv=FLOWER_VENV, timeout=1)
    print(f"\n{error.value} ({time.perf_counter() - start:.1f} s)")
    assert "\n" not in str(error.value)
    assert not flower_processes(work)


BUILDER = '''
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, n_features, n_classes, hidden):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(n_features, hidden), nn.Tanh(), nn.Linear(hidden, n_classes))

    def forward(self, x):
        return torch.softmax(self.body(x), dim=1)


def build(n_features, n_classes, params, seed):
    return Tiny(n_features, n_classes, params["hidden"])
'''


def test_dp_sgd_clients_keep_a_privacy_ledger_and_a_spec_builder_travels_with_the_app(tmp_path):
    """A network from the spec's own code (its module shipped in the Flower App to the nodes),
    trained with DP-SGD: each client's epsilon grows with the steps its rows went through, and
    the run reports the largest, as Opacus' accountant computes it."""
    from opacus.accountants import RDPAccountant

    code = tmp_path / "spec"
    code.mkdir()
    (code / "fedmodel.py").write_text(BUILDER)
    parts = partitions(tmp_path / "data")
    net = {"entrypoint": "fedmodel:build", "n_features": 8, "n_classes": 3, "params": {"hidden": 12}, "seed": 3}
    config = FederatedConfig(rounds=2, min_clients=3, local_epochs=1, learning_rate=0.02, batch_size=32,
                             dp_noise_multiplier=1.1, dp_max_grad_norm=1.0, dp_delta=1e-3)
    work = tmp_path / "work"
    result = run_federated(net, parts, config, work, flower_venv=FLOWER_VENV, timeout=150,
                           code=([code / "fedmodel.py"], code))
    assert (work / "app" / "fedmodel.py").read_text() == BUILDER
    train = [c for c in result.clients if c.phase == "train"]
    assert {c.client for c in train} == {"group-0", "group-1", "group-2"} and not any(c.error for c in train)
    # 160 training rows, batches of 32: 5 Poisson steps at rate 1/5 per epoch.
    expected = {}
    for steps in (5, 10):
        accountant = RDPAccountant()
        accountant.history = [(1.1, 0.2, steps)]
        expected[steps] = accountant.get_epsilon(1e-3)
    for c in train:
        assert c.epsilon == pytest.approx(expected[5 * c.round], rel=1e-9), c
    assert result.epsilon == pytest.approx(expected[10])
    print(f"\nDP-SGD, 3 clients, 2 rounds: epsilon {expected[5]:.3f} -> {expected[10]:.3f} (delta 1e-3); "
          f"final weights {sorted(torch.load(result.state_dict_path))}")
    assert sorted(torch.load(result.state_dict_path)) == ["body.0.bias", "body.0.weight", "body.2.bias",
                                                          "body.2.weight"]
    assert not flower_processes(work)


def test_a_client_declines_a_round_past_its_privacy_budget(tmp_path):
    parts = partitions(tmp_path / "data", clients=2)
    config = FederatedConfig(rounds=1, min_clients=2, batch_size=32, dp_noise_multiplier=0.5, dp_delta=1e-3,
                             dp_max_epsilon=0.5)
    with pytest.raises(FederatedError, match=r"privacy budget: this round would spend epsilon [0-9.]+ > 0.5") \
            as error:
        run_federated(NET, parts, config, tmp_path / "work", flower_venv=FLOWER_VENV, timeout=120)
    print(f"\n{error.value}")
    assert "\n" not in str(error.value)
    assert not flower_processes(tmp_path / "work")
