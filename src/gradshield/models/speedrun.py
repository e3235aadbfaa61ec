"""A CIFAR network in the shape of the fast speed-run nets (Jordan 2024, "94% on CIFAR-10 in 3.29
seconds", arXiv:2404.00498): a frozen whitening stem of 2x2 patches, three conv-pool-conv blocks,
global max pooling and a scaled linear head. As in airbench, the BatchNorm scales are fixed at 1
(only the shifts are learnt) and each convolution's first ``in_channels`` filters start as the
identity (Dirac).

Widths at ``width`` 1: 24 whitening channels, then 32-128-128 (the speed-run net, airbench94, has
64-256-256: ``width=2``). The stem's weights are not learnt: :meth:`SpeedrunNet.init_from_data`
sets them from the training images before the first step (the eigenvectors of the 2x2-patch
covariance scaled by 1/sqrt(eigenvalue), each with its negative), and the training loop calls it
on a fresh run. They are saved in the state dict, so a checkpoint needs no data to rebuild.
"""

from __future__ import annotations

import torch
from torch import nn

from gradshield.models.compact import _block
from gradshield.models.registry import register_model, scaled

#: Patches drawn for the whitening statistics (a seeded-order prefix of the training set).
WHITEN_IMAGES = 5000
#: Added to each eigenvalue before the 1/sqrt scaling (inputs are normalised to unit variance).
WHITEN_EPS = 5e-4


class SpeedrunNet(nn.Module):
    init_images = WHITEN_IMAGES
    def __init__(self, num_classes: int = 10, width: float = 1.0, head_scale: float = 1 / 9) -> None:
        super().__init__()
        patch = 3 * 2 * 2
        w = [scaled(c, width) for c in (32, 128, 128)]
        self.stem = nn.Conv2d(3, 2 * patch, 2, padding=0, bias=True)
        self.stem.weight.requires_grad_(False)
        self.act = nn.GELU()
        self.block1, self.block2, self.block3 = _block(2 * patch, w[0]), _block(w[0], w[1]), \
            _block(w[1], w[2])
        self.pool = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.head = nn.Linear(w[2], num_classes, bias=False)
        self.head_scale = head_scale
        for module in (self.block1, self.block2, self.block3):
            for layer in module.modules():
                if isinstance(layer, nn.BatchNorm2d):  # airbench: scales fixed at 1, shifts learnt
                    layer.weight.requires_grad_(False)
                elif isinstance(layer, nn.Conv2d):  # airbench: identity init of the first filters
                    with torch.no_grad():
                        nn.init.dirac_(layer.weight[:layer.weight.shape[1]])

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        """Set the stem to whiten the 2x2 patches of ``x`` (N, 3, H, W), the network's input
        (already normalised): weights V / sqrt(lambda + eps) and their negatives, bias 0."""
        patches = x.float().unfold(2, 2, 1).unfold(3, 2, 1)  # N, C, H-1, W-1, 2, 2
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double()
        cov = torch.cov(patches.T)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        filters = (eigenvectors.T / (eigenvalues + WHITEN_EPS).sqrt()[:, None]).view(-1, 3, 2, 2)
        self.stem.weight.copy_(torch.cat([filters, -filters]).to(self.stem.weight.dtype))
        self.stem.bias.zero_()

    def forward(self, x):
        x = self.act(self.stem(x))
        x = self.block3(self.block2(self.block1(x)))
        return self.head(self.pool(x)) * self.head_scale


@register_model("speedrun", "speed-run CIFAR net: whitened 2x2 stem, 32-128-128 channels x width")
def speedrun(num_classes: int = 10, width: float = 1.0, head_scale: float = 1 / 9) -> nn.Module:
    return SpeedrunNet(num_classes, width, head_scale)
