"""The bilinear warp's exactness: zero flow is the identity bit for bit, whole-pixel flows shift
exactly, fractional flows interpolate linearly, it agrees with torch's grid_sample, and
channels-last images give the same values in their own layout."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from gradshield.errors import GradshieldError
from gradshield.warp import (
    flow_gradient_adjoint,
    flow_gradient_closed_form,
    normalized_to_pixels,
    pixels_to_normalized,
    warp,
)


@pytest.fixture
def images(test_batch):
    return test_batch[0][:4]  # real CIFAR-10 images, float32 in [0, 1]


def constant_flow(images: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    n, _, h, w = images.shape
    flow = torch.empty(n, 2, h, w, dtype=images.dtype)
    flow[:, 0], flow[:, 1] = dx, dy
    return flow


@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_zero_flow_returns_the_image_bit_for_bit(images, padding):
    assert torch.equal(warp(images, torch.zeros(4, 2, 32, 32), padding=padding), images)
    assert torch.equal(warp(images.double(), torch.zeros(4, 2, 32, 32), padding=padding),
                       images.double())


def test_one_pixel_flow_shifts_the_image_by_one_pixel(images):
    """Output pixel (r, c) samples the input at (r + v_y, c + v_x)."""
    right = warp(images, constant_flow(images, 1.0, 0.0))
    assert torch.equal(right[..., :, :-1], images[..., :, 1:])
    assert torch.equal(right[..., :, -1], images[..., :, -1])  # border padding repeats the edge
    down = warp(images, constant_flow(images, 0.0, 1.0))
    assert torch.equal(down[..., :-1, :], images[..., 1:, :])
    left_zeros = warp(images, constant_flow(images, -1.0, 0.0), padding="zeros")
    assert torch.equal(left_zeros[..., :, 1:], images[..., :, :-1])
    assert torch.equal(left_zeros[..., :, 0], torch.zeros_like(images[..., :, 0]))
    diagonal = warp(images, constant_flow(images, 2.0, -3.0))
    assert torch.equal(diagonal[..., 3:, :-2], images[..., :-3, 2:])


def test_fractional_flow_interpolates_linearly_between_neighbours(images):
    x = images.double()
    quarter = warp(x, constant_flow(x, 0.25, 0.0))
    expected = 0.75 * x[..., :, :-1] + 0.25 * x[..., :, 1:]
    torch.testing.assert_close(quarter[..., :, :-1], expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_warp_agrees_with_grid_sample_align_corners(images, padding):
    """The FGR paper's code warps with grid_sample(align_corners=True) in normalised units."""
    x = images.double()
    n, _, h, w = x.shape
    flow = (torch.rand(n, 2, h, w, generator=torch.Generator().manual_seed(0),
                       dtype=torch.float64) - 0.5) * 3  # up to 1.5 px
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, dtype=x.dtype),
                            torch.linspace(-1, 1, w, dtype=x.dtype), indexing="ij")
    grid = torch.stack([xs + pixels_to_normalized(flow[:, 0], w),
                        ys + pixels_to_normalized(flow[:, 1], h)], dim=-1)
    theirs = F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=True)
    torch.testing.assert_close(warp(x, flow, padding=padding), theirs, rtol=0, atol=1e-12)


def test_unit_conversions_and_the_papers_budget():
    assert normalized_to_pixels(0.01, 32) == pytest.approx(0.155)
    assert pixels_to_normalized(normalized_to_pixels(0.37, 224), 224) == pytest.approx(0.37)


def test_flow_gradient_adjoint_is_the_transpose_of_the_closed_form(images):
    x = images.double()
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    v = torch.randn(x.shape[0], 2, *x.shape[2:], generator=gen, dtype=x.dtype)
    lhs = (flow_gradient_closed_form(x, g) * v).sum()
    rhs = (g * flow_gradient_adjoint(x, v)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=0)


def test_warp_rejects_bad_shapes_and_padding(images):
    with pytest.raises(GradshieldError, match="flow must have shape"):
        warp(images, torch.zeros(4, 2, 16, 16))
    with pytest.raises(GradshieldError, match="padding"):
        warp(images, torch.zeros(4, 2, 32, 32), padding="reflect")


@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_channels_last_images_give_the_same_values_and_flow_gradient_in_their_layout(padding):
    gen = torch.Generator().manual_seed(11)
    images = torch.rand(3, 3, 9, 7, generator=gen, dtype=torch.float64)
    flow = (3 * torch.randn(3, 2, 9, 7, generator=gen, dtype=torch.float64)).requires_grad_()
    weights = torch.randn(3, 3, 9, 7, generator=gen, dtype=torch.float64)
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        warped = warp(images.contiguous(memory_format=layout), flow, padding=padding)
        assert warped.is_contiguous(memory_format=layout)
        (grad,) = torch.autograd.grad((warped * weights).sum(), flow)
        results.append((warped, grad))
    (plain, plain_grad), (last, last_grad) = results
    torch.testing.assert_close(last, plain, rtol=0, atol=0)
    torch.testing.assert_close(last_grad, plain_grad, rtol=0, atol=0)
