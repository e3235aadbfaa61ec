"""Bilinear warping of images by a per-pixel flow field, in pixel units.

Convention: a flow ``v`` has shape (N, 2, H, W); channel 0 is the horizontal displacement (along
columns, x), channel 1 the vertical one (along rows, y), both in **pixels**. The warped image is
``I(x, g + v)``: output pixel (r, c) samples the input at (r + v_y, c + v_x) bilinearly.

Exactness and derivative choices (explicit, not inherited from ``grid_sample``):
- zero flow returns the image bit-for-bit (sampling weights are exactly 0 and 1);
- an integer flow shifts the image by whole pixels exactly;
- at integer positions (the identity grid) the derivative w.r.t. the flow is the one-sided
  **forward difference** ``I(p + e) - I(p)`` (the bilinear weight uses ``floor``), which is what
  ``grid_sample`` also yields there; the FGR paper's code relies on it;
- ``padding="border"`` repeats edge pixels (the derivative pointing outward is then 0);
  ``padding="zeros"`` samples zeros outside the image.

Units at the edge: the FGR paper's code measures flow in ``grid_sample`` normalised coordinates
with ``align_corners=True``; :func:`normalized_to_pixels` converts (0.01 at 32 px = 0.155 px).
"""

from __future__ import annotations

import torch

from gradshield.errors import GradshieldError

PADDING_MODES = ("border", "zeros")


def normalized_to_pixels(value: float | torch.Tensor, size: int) -> float | torch.Tensor:
    """Flow in grid_sample normalised units (align_corners=True) -> pixels: ``value * (size-1)/2``."""
    return value * (size - 1) / 2


def pixels_to_normalized(value: float | torch.Tensor, size: int) -> float | torch.Tensor:
    """Flow in pixels -> grid_sample normalised units (align_corners=True)."""
    return value * 2 / (size - 1)


def identity_grid(height: int, width: int, *, dtype: torch.dtype = torch.float32,
                  device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column coordinates of every pixel, shapes (1, H, 1) and (1, 1, W), in pixels."""
    rows = torch.arange(height, dtype=dtype, device=device).view(1, height, 1)
    cols = torch.arange(width, dtype=dtype, device=device).view(1, 1, width)
    return rows, cols


def warp(images: torch.Tensor, flow: torch.Tensor, *, padding: str = "border") -> torch.Tensor:
    """Sample ``images`` (N, C, H, W) at the identity grid plus ``flow`` (N, 2, H, W) pixels.
    The result has ``images``' memory layout (channels-last stays channels-last)."""
    if padding not in PADDING_MODES:
        raise GradshieldError(f"padding must be one of {PADDING_MODES}, got {padding!r}")
    n, c, h, w = images.shape
    if flow.shape != (n, 2, h, w):
        raise GradshieldError(
            f"flow must have shape (N, 2, H, W) = {(n, 2, h, w)} to match the images, "
            f"got {tuple(flow.shape)}")
    flow = flow.to(images.dtype)
    rows, cols = identity_grid(h, w, dtype=images.dtype, device=images.device)
    px = cols + flow[:, 0]  # (N, H, W) sampling column
    py = rows + flow[:, 1]  # (N, H, W) sampling row
    x0, y0 = px.detach().floor(), py.detach().floor()
    wx, wy = px - x0, py - y0  # in [0, 1); carries the gradient w.r.t. the flow
    x0, y0 = x0.long(), y0.long()
    flat = images.reshape(n, c, h * w)  # NCHW (a channels-last gather is slower), then back

    def tap(yi: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        inside = None
        if padding == "zeros":
            inside = ((yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)).to(images.dtype)
        index = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).view(n, 1, h * w)
        values = flat.gather(2, index.expand(n, c, h * w)).view(n, c, h, w)
        return values if inside is None else values * inside[:, None]

    wx, wy = wx[:, None], wy[:, None]
    top = tap(y0, x0) * (1 - wx) + tap(y0, x0 + 1) * wx
    bottom = tap(y0 + 1, x0) * (1 - wx) + tap(y0 + 1, x0 + 1) * wx
    return (top * (1 - wy) + bottom * wy).contiguous(memory_format=_layout(images))


def _layout(images: torch.Tensor) -> torch.memory_format:
    """channels_last for a channels-last (and not also NCHW-contiguous) 4-d tensor."""
    if images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def forward_differences(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``I(p + e_x) - I(p)`` and ``I(p + e_y) - I(p)`` per pixel (0 past the last column/row,
    border padding), each shaped like ``images``: the warp's derivative at the identity."""
    dx = torch.zeros_like(images)
    dy = torch.zeros_like(images)
    dx[..., :, :-1] = images[..., :, 1:] - images[..., :, :-1]
    dy[..., :-1, :] = images[..., 1:, :] - images[..., :-1, :]
    return dx, dy


def flow_gradient_closed_form(images: torch.Tensor, input_grad: torch.Tensor) -> torch.Tensor:
    """dL/dv at v = 0 from dL/dx: per pixel, sum over channels of input gradient x forward difference.

    With border padding, the forward difference past the last row/column is 0. Returns (N, 2, H, W).
    """
    dx, dy = forward_differences(images)
    return torch.stack([(input_grad * dx).sum(1), (input_grad * dy).sum(1)], dim=1)


def flow_gradient_adjoint(images: torch.Tensor, flow_grad: torch.Tensor) -> torch.Tensor:
    """The adjoint of :func:`flow_gradient_closed_form` in its input-gradient argument: maps a flow
    field (N, 2, H, W) to the input-space field (N, C, H, W) ``v_x * dI/dx + v_y * dI/dy``."""
    dx, dy = forward_differences(images)
    return flow_grad[:, :1] * dx + flow_grad[:, 1:] * dy
