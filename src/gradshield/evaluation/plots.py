"""Figures: the sign of input gradients (GCM paper, Figure 4).

Built with matplotlib's object-oriented API, so the user's pyplot backend and figure list are
never touched.

Each function returns the matplotlib Figure and writes a PNG when ``path`` is given, so the report
module can reuse them.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from gradshield.utils import eval_mode


def new_figure(**kwargs):
    """A matplotlib Figure not registered with pyplot (no backend switch, no global figure list)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def figure_png(fig, dpi: int = 100) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient of the summed per-example cross-entropy w.r.t. the [0, 1] input (eval mode)."""
    with eval_mode(model), torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(model(x), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad.detach()


def sign_image(grad: torch.Tensor) -> torch.Tensor:
    """Sign of the channel-summed gradient (H, W): -1 -> 0 (black), 0 -> 0.5, +1 -> 1 (white)."""
    return ((torch.sign(grad.sum(0)) + 1) / 2).cpu()


def plot_gradient_sign(models: Mapping[str, nn.Module], x: torch.Tensor, y: torch.Tensor, *,
                       classes: Sequence[str] | None = None, path: str | os.PathLike | None = None,
                       title: str | None = None, dpi: int = 150):
    """One row per image: the image, then the sign of d loss / d x (summed over the colour
    channels; black -1, white +1) for each model, labelled with the share of pixels whose sign
    agrees with the first model's.

    A smooth model shows image structure in its gradient sign; under GCM the sign is the true
    one times a pseudo-random +-1 per pixel, i.e. noise with ~50 % agreement (the paper's
    Figure 4).
    """
    n, cols = x.shape[0], 1 + len(models)
    grads = {name: input_gradient(model, x, y) for name, model in models.items()}
    fig = new_figure(figsize=(1.9 * cols, 1.9 * n + (0.5 if title else 0.2)))
    axes = fig.subplots(n, cols, squeeze=False)
    for i in range(n):
        label = classes[int(y[i])] if classes is not None else str(int(y[i]))
        axes[i, 0].imshow(x[i].permute(1, 2, 0).cpu().clamp(0, 1).numpy(),
                          interpolation="nearest")
        axes[i, 0].set_ylabel(label, fontsize=9)
        reference = torch.sign(next(iter(grads.values()))[i].sum(0))
        for j, (name, grad) in enumerate(grads.items(), start=1):
            axes[i, j].imshow(sign_image(grad[i]).numpy(), cmap="gray", vmin=0, vmax=1,
                              interpolation="nearest")
            agree = float((torch.sign(grad[i].sum(0)) == reference).float().mean())
            axes[i, j].set_xlabel(f"{100 * agree:.0f} % agree", fontsize=7)
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
