"""A compact CIFAR network for the 2-core CPU (the default): ~11 MFLOPs per 32x32 image at width 1.

Three conv-pool-conv blocks after a stem, BatchNorm + GELU, global max pooling, a linear head
(the shape of the fast CIFAR-10 speed-run networks, narrowed for CPUs).
"""

from __future__ import annotations

from torch import nn

from gradshield.models.registry import register_model, scaled


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.MaxPool2d(2),
        nn.BatchNorm2d(c_out), nn.GELU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU(),
    )


class CompactNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        w = [scaled(c, width) for c in (16, 32, 64, 128)]
        self.stem = nn.Sequential(nn.Conv2d(3, w[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(w[0]), nn.GELU())
        self.block1, self.block2, self.block3 = _block(w[0], w[1]), _block(w[1], w[2]), _block(w[2], w[3])
        self.pool = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.head = nn.Linear(w[3], num_classes, bias=False)
        self.head_scale = 1 / 8  # logit temperature, as in the speed-run nets

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.stem(x))))
        return self.head(self.pool(x)) * self.head_scale


@register_model("compact", "compact CPU CIFAR net (16-32-64-128 channels x width), the default")
def compact(num_classes: int = 10, width: float = 1.0) -> nn.Module:
    return CompactNet(num_classes, width)
