"""PyTorch networks for edge models. Preprocessing (scaling raw features, reshaping to the
image) is part of the network, so the exported ONNX takes the raw feature vector."""

from __future__ import annotations

import torch
from torch import nn


class EdgeNet(nn.Module):
    """A small CNN (`image_shape` set) or MLP over a flat feature vector; outputs probabilities."""

    def __init__(self, n_features: int, n_classes: int, image_shape: list[int] | None = None,
                 conv_channels: list[int] | None = None, hidden: int = 64,
                 hidden_layers: list[int] | None = None, input_scale: float = 1.0):
        super().__init__()
        self.config = {"n_features": n_features, "n_classes": n_classes, "image_shape": image_shape,
                       "conv_channels": conv_channels, "hidden": hidden, "hidden_layers": hidden_layers,
                       "input_scale": input_scale}
        self.scale = float(input_scale)
        self.shape = list(image_shape) if image_shape else None
        layers: list[nn.Module] = []
        if self.shape:
            channels = [self.shape[0], *(conv_channels or [8, 16])]
            height, width = self.shape[1], self.shape[2]
            for c_in, c_out in zip(channels, channels[1:]):
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
                height, width = height // 2, width // 2
            layers += [nn.Flatten(), nn.Linear(channels[-1] * height * width, hidden), nn.ReLU(),
                       nn.Linear(hidden, n_classes)]
        else:
            sizes = [n_features, *(hidden_layers or [128])]
            for a, b in zip(sizes, sizes[1:]):
                layers += [nn.Linear(a, b), nn.ReLU()]
            layers.append(nn.Linear(sizes[-1], n_classes))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x / self.scale
        if self.shape is not None:
            x = x.reshape(-1, *self.shape)
        return torch.softmax(self.body(x), dim=1)


class Shaped(nn.Module):
    """A module that takes rows of `shape` (an image), fed the flat feature vector devices send."""

    def __init__(self, module: nn.Module, shape: list[int], n_features: int):
        super().__init__()
        size = 1
        for dim in shape:
            size *= dim
        if size != n_features:
            raise ValueError(f"training.inputShape: {shape} holds {size} values, the data has {n_features} features")
        self.module = module
        self.shape = list(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.reshape(-1, *self.shape))


def build_module(net: dict, folder=None) -> nn.Module:
    """The network federated training shares between the runner, the server and the clients:
    `{"config": <EdgeNet arguments>}`, or `{"entrypoint": "module:function", "n_features",
    "n_classes", "params", "seed", "input_shape"}`: the spec's own builder,
    `function(n_features, n_classes, params, seed) -> nn.Module`, imported from `folder`."""
    if "entrypoint" not in net:
        return EdgeNet(**net["config"])
    from pathlib import Path

    from pipelines.training.entrypoint import TrainingCodeError, load_module, located

    module_name, _, function_name = str(net["entrypoint"]).partition(":")
    module = load_module(net["entrypoint"], Path(folder or "."))
    function = getattr(module, function_name, None)
    if not callable(function):
        raise TrainingCodeError(f"{getattr(module, '__file__', module_name)}: training.entrypoint: no function "
                                f"{function_name!r} in module {module_name}")
    torch.manual_seed(int(net.get("seed", 0)))
    try:
        built = function(int(net["n_features"]), int(net["n_classes"]), dict(net.get("params") or {}),
                         int(net.get("seed", 0)))
    except Exception as error:  # noqa: BLE001 - user code: one line naming its file and line
        raise TrainingCodeError(located(error, Path(folder or "."), f"training.entrypoint {net['entrypoint']}")) \
            from error
    if not isinstance(built, nn.Module):
        raise TrainingCodeError(f"{module.__file__}: training.entrypoint {net['entrypoint']} returned "
                                f"{type(built).__name__}, not an nn.Module (federated training builds the network "
                                "and trains it on the clients)")
    if net.get("input_shape"):
        built = Shaped(built, list(net["input_shape"]), int(net["n_features"]))
    return built
