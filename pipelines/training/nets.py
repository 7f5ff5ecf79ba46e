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
