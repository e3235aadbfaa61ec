"""CIFAR variants of VGG-11 and ResNet-18 (3x3 stem, no initial max-pool), with a width multiplier.

These are the architectures of the FGR paper's CIFAR-10 experiments.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from gradshield.models.registry import register_model, scaled

VGG11_LAYOUT = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    def __init__(self, layout, num_classes: int, width: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for item in layout:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                c_out = scaled(item, width)
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                           nn.BatchNorm2d(c_out), nn.ReLU(inplace=False)]
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet; stages are named ``layer1``..``layer4`` (GCM placements refer to them)."""

    def __init__(self, blocks_per_stage, num_classes: int, width: float) -> None:
        super().__init__()
        widths = [scaled(c, width) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        c_in = widths[0]
        stages = []
        for i, (c_out, n_blocks) in enumerate(zip(widths, blocks_per_stage, strict=True)):
            stride = 1 if i == 0 else 2
            stage = []
            for j in range(n_blocks):
                stage.append(BasicBlock(c_in, c_out, stride if j == 0 else 1))
                c_in = c_out
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.pool(x))


@register_model("vgg11", "VGG-11 with BatchNorm, CIFAR variant (32x32 input)")
def vgg11(num_classes: int = 10, width: float = 1.0) -> nn.Module:
    return VGG(VGG11_LAYOUT, num_classes, width)


@register_model("resnet18", "ResNet-18, CIFAR variant (3x3 stem, no max-pool)")
def resnet18(num_classes: int = 10, width: float = 1.0) -> nn.Module:
    return ResNet((2, 2, 2, 2), num_classes, width)
