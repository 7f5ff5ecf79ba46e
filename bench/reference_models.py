"""Standard architectures for the estimator's published comparison, with random weights.

torchvision cannot be installed beside this product's torch, so these are our own PyTorch
definitions, written layer for layer after torchvision's (`torchvision.models.mobilenetv2`,
`torchvision.models.resnet`, `torchvision.models.detection.ssdlite`) and, for MobileNetV1,
after the paper (Howard et al. 2017, arXiv:1704.04861, Table 1), which torchvision does not
ship. Weights are random: latency does not depend on them. Inference graphs only:

* `mobilenet_v2(width, resolution)`: torchvision's MobileNetV2 (inverted residuals, ReLU6,
  `_make_divisible` channel rounding, last channel 1280 x max(1, width), dropout + linear).
* `mobilenet_v1(width)`: 3x3 stem and 13 depthwise-separable blocks, BN + ReLU6 as in the
  TF-Slim implementation the published figures timed.
* `resnet18()`: torchvision's ResNet-18 (BasicBlock, [2, 2, 2, 2]).
* `ssdlite_mobilenet_v2()`: SSDLite over MobileNetV2 at 320 x 320, 91 classes, built from
  torchvision's SSDLite parts (the feature extractor splits the backbone at the expansion
  layer of the first stride-32 block, 4 extra blocks of 512, 256, 256, 128 channels,
  depthwise-separable class and box heads, 6 anchors per location). Box decoding and NMS
  are left out of the graph: the paper's figure does not say whether it includes them.

Every factory returns (module, input shape at batch 1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision's channel rounding: to a multiple of 8, never more than 10% down."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _conv_bn_act(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 activation: Callable[[], nn.Module] | None = nn.ReLU6) -> nn.Sequential:
    """torchvision's Conv2dNormActivation: conv without bias, BatchNorm, activation."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if activation is not None:
        layers.append(activation())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expansion, 3x3 depthwise, linear 1x1 projection, residual if shapes match."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_act(inp, hidden, 1))
        layers += [_conv_bn_act(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup
        self.is_cn = stride > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


_V2_SETTINGS = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]


def _mobilenet_v2_features(width: float) -> nn.Sequential:
    inp = _make_divisible(32 * width)
    last = _make_divisible(1280 * max(1.0, width))
    features: list[nn.Module] = [_conv_bn_act(3, inp, 3, 2)]
    for t, c, n, s in _V2_SETTINGS:
        out = _make_divisible(c * width)
        for i in range(n):
            features.append(InvertedResidual(inp, out, s if i == 0 else 1, t))
            inp = out
    features.append(_conv_bn_act(inp, last, 1))
    return nn.Sequential(*features)


class MobileNetV2(nn.Module):
    def __init__(self, width: float = 1.0, num_classes: int = 1000) -> None:
        super().__init__()
        self.features = _mobilenet_v2_features(width)
        last = _make_divisible(1280 * max(1.0, width))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(width: float = 1.0, resolution: int = 224) -> tuple[nn.Module, tuple[int, ...]]:
    return MobileNetV2(width), (1, 3, resolution, resolution)


def mobilenet_v1(width: float = 1.0, resolution: int = 224) -> tuple[nn.Module, tuple[int, ...]]:
    """MobileNetV1 (Howard et al. 2017, Table 1): 3x3 stem, 13 depthwise-separable blocks."""
    blocks = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]
    cin = int(32 * width)
    layers: list[nn.Module] = [_conv_bn_act(3, cin, 3, 2)]
    for c, s in blocks:
        cout = int(c * width)
        layers += [_conv_bn_act(cin, cin, 3, s, groups=cin), _conv_bn_act(cin, cout, 1)]
        cin = cout
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000))
    return model, (1, 3, resolution, resolution)


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = (nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
                           if stride != 1 or inplanes != planes else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, inplanes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes)))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18() -> tuple[nn.Module, tuple[int, ...]]:
    return ResNet18(), (1, 3, 224, 224)


def _extra_block(cin: int, cout: int) -> nn.Sequential:
    """torchvision ssdlite `_extra_block`: 1x1 down to half, 3x3 depthwise stride 2, 1x1 up."""
    mid = cout // 2
    return nn.Sequential(_conv_bn_act(cin, mid, 1), _conv_bn_act(mid, mid, 3, 2, groups=mid), _conv_bn_act(mid, cout, 1))


def _prediction_block(cin: int, cout: int) -> nn.Sequential:
    """torchvision ssdlite `_prediction_block`: 3x3 depthwise + BN + ReLU6, then a 1x1 conv with bias."""
    return nn.Sequential(_conv_bn_act(cin, cin, 3, groups=cin), nn.Conv2d(cin, cout, 1))


class SSDLiteMobileNetV2(nn.Module):
    """SSDLite over MobileNetV2 (Sandler et al. 2018, section 6.2), torchvision's SSDLite parts.

    Outputs the raw class logits and box regressions of every anchor (before decoding/NMS).
    """

    def __init__(self, num_classes: int = 91, anchors: int = 6) -> None:
        super().__init__()
        backbone = _mobilenet_v2_features(1.0)
        # The first stride-32 block: the first feature map is its expansion layer's output.
        c4 = [i for i, block in enumerate(backbone) if getattr(block, "is_cn", False)][-1]
        expansion = backbone[c4].conv[0]
        self.stage1 = nn.Sequential(*backbone[:c4], expansion)
        self.stage2 = nn.Sequential(backbone[c4].conv[1:], *backbone[c4 + 1:])
        channels = [expansion[0].out_channels, backbone[-1][0].out_channels, 512, 256, 256, 128]
        self.extra = nn.ModuleList([_extra_block(channels[1], 512), _extra_block(512, 256), _extra_block(256, 256),
                                    _extra_block(256, 128)])
        self.cls = nn.ModuleList([_prediction_block(c, anchors * num_classes) for c in channels])
        self.box = nn.ModuleList([_prediction_block(c, anchors * 4) for c in channels])
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = [self.stage1(x)]
        features.append(self.stage2(features[0]))
        for block in self.extra:
            features.append(block(features[-1]))
        logits = [head(f).permute(0, 2, 3, 1).reshape(1, -1, self.num_classes) for head, f in zip(self.cls, features)]
        boxes = [head(f).permute(0, 2, 3, 1).reshape(1, -1, 4) for head, f in zip(self.box, features)]
        return torch.cat(logits, 1), torch.cat(boxes, 1)


def ssdlite_mobilenet_v2() -> tuple[nn.Module, tuple[int, ...]]:
    return SSDLiteMobileNetV2(), (1, 3, 320, 320)


# Name -> factory of every reference architecture the bench builds.
REFERENCE_MODELS: dict[str, Callable[[], tuple[nn.Module, tuple[int, ...]]]] = {
    "mobilenet_v2_1.0_224": lambda: mobilenet_v2(1.0, 224),
    "mobilenet_v2_1.4_224": lambda: mobilenet_v2(1.4, 224),
    "mobilenet_v2_0.5_224": lambda: mobilenet_v2(0.5, 224),
    "mobilenet_v2_0.35_224": lambda: mobilenet_v2(0.35, 224),
    "mobilenet_v2_1.0_128": lambda: mobilenet_v2(1.0, 128),
    "mobilenet_v1_1.0_224": lambda: mobilenet_v1(1.0, 224),
    "resnet18": resnet18,
    "ssdlite_mobilenet_v2_320": ssdlite_mobilenet_v2,
}
