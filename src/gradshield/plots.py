"""Figures (matplotlib, Agg backend): the sign of input gradients (GCM paper, Figure 4).

Each function returns the matplotlib Figure and writes a PNG when ``path`` is given, so the report
module can reuse them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from gradshield.utils import eval_mode


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient of the summed per-example cross-entropy w.r.t. the [0, 1] input (eval mode)."""
    with eval_mode(model), torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(model(x), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad.detach()


def sign_image(grad: torch.Tensor) -> torch.Tensor:
    """Per-channel sign mapped to colours: -1 -> 0, 0 -> 0.5, +1 -> 1 (HWC, for imshow)."""
    return ((torch.sign(grad) + 1) / 2).permute(1, 2, 0).cpu()


def plot_gradient_sign(models: Mapping[str, nn.Module], x: torch.Tensor, y: torch.Tensor, *,
                       classes: Sequence[str] | None = None, path: str | os.PathLike | None = None,
                       title: str | None = None, dpi: int = 150):
    """One row per image: the image, then sign(d loss / d x) of each model (RGB channels).

    A smooth model shows the object's structure in its gradient sign; under GCM the sign is the
    true one times a pseudo-random +-1 per pixel, i.e. noise (the paper's Figure 4).
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    n, cols = x.shape[0], 1 + len(models)
    grads = {name: input_gradient(model, x, y) for name, model in models.items()}
    fig, axes = plt.subplots(n, cols, figsize=(1.9 * cols, 1.9 * n + (0.5 if title else 0.2)),
                             squeeze=False)
    for i in range(n):
        label = classes[int(y[i])] if classes is not None else str(int(y[i]))
        axes[i, 0].imshow(x[i].permute(1, 2, 0).cpu().clamp(0, 1).numpy(),
                          interpolation="nearest")
        axes[i, 0].set_ylabel(label, fontsize=9)
        for j, (name, grad) in enumerate(grads.items(), start=1):
            axes[i, j].imshow(sign_image(grad[i]).numpy(), interpolation="nearest")
            if i == 0:
                axes[i, j].set_title(f"sign grad: {name}", fontsize=8)
        if i == 0:
            axes[i, 0].set_title("image", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    return fig
