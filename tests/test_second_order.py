"""The hand-derived second-order passes of train-mode BatchNorm and GELU: float64 gradchecks,
agreement with PyTorch's own double backward and with finite differences of the penalties,
running statistics, and what the context leaves to the native kernels."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradshield.defenses.regularizers import fgr_penalty, igr_penalty
from gradshield.defenses.second_order import (
    _BatchNormTrainBackward,
    _GeluBackward,
    second_order_kernels,
)

aten = torch.ops.aten


def _bn_backward(grad_out, x, weight):
    """The custom BatchNorm backward with statistics recomputed from x (as gradcheck moves x)."""
    _, mean, invstd = aten.native_batch_norm(x.detach(), weight.detach(), None, None, None, True,
                                             0.1, 1e-5)
    return _BatchNormTrainBackward.apply(grad_out, x, weight, mean, invstd, 1e-5)


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (6, 3)])
def test_batchnorm_backward_is_differentiable_exactly(shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = (torch.rand(3, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(_bn_backward, (grad_out, x, weight))


def test_batchnorm_backward_matches_the_native_one_and_its_double_backward():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = (torch.rand(3, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64)
    probes = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (x, weight, bias)]

    def second_order(use_ours: bool):
        with second_order_kernels() if use_ours else contextlib.nullcontext():
            out = F.batch_norm(x, None, None, weight, bias, training=True)
        grads = torch.autograd.grad(out, (x, weight, bias), grad_out, create_graph=True)
        scalar = sum((g * p).sum() for g, p in zip(grads, probes, strict=True))
        return grads, torch.autograd.grad(scalar, (x, weight))

    (first_ours, second_ours), (first_native, second_native) = second_order(True), second_order(False)
    for ours, native in zip(first_ours + second_ours, first_native + second_native,
                              strict=True):
        torch.testing.assert_close(ours, native, rtol=1e-10, atol=1e-12)


def test_gelu_backward_is_differentiable_exactly():
    gen = torch.Generator().manual_seed(2)
    x = (3 * torch.randn(5, 7, generator=gen, dtype=torch.float64)).requires_grad_()
    grad_out = torch.randn(5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_GeluBackward.apply, (grad_out, x))
    assert torch.autograd.gradgradcheck(_GeluBackward.apply, (grad_out, x))


def bn_gelu_model(seed: int = 0) -> nn.Module:
    """Float64 CNN with the compact net's layer kinds but no max pooling (smooth in x)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.GELU(),
        nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.GELU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).double().train()


def _penalty(kind, model, x, y):
    fn = igr_penalty if kind == "igr" else fgr_penalty
    return fn(model, x, y).penalty


@pytest.mark.parametrize("kind", ["igr", "fgr"])
def test_penalty_gradients_through_batchnorm_and_gelu_match_finite_differences(kind):
    model = bn_gelu_model()
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(4, 3, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (4,), generator=gen)
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(_penalty(kind, model, x, y), params)
    h = 1e-6
    for param, grad in zip(params, grads, strict=True):
        for index in range(min(param.numel(), 4)):
            flat = param.data.view(-1)
            saved = flat[index].item()
            flat[index] = saved + h
            up = _penalty(kind, model, x, y).item()
            flat[index] = saved - h
            down = _penalty(kind, model, x, y).item()
            flat[index] = saved
            fd = (up - down) / (2 * h)
            assert abs(grad.reshape(-1)[index].item() - fd) <= 1e-6 * max(1.0, abs(fd)), (param.shape,
                                                                                       index)


def _parameter_gradient(model, x, y, kind, use_ours):
    import gradshield.defenses.regularizers as regularizers

    original = regularizers.second_order_kernels
    regularizers.second_order_kernels = original if use_ours else contextlib.nullcontext
    try:
        model.zero_grad(set_to_none=True)
        fn = igr_penalty if kind == "igr" else fgr_penalty
        fn(model, x, y).total(0.5).backward()
    finally:
        regularizers.second_order_kernels = original
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("kind", ["igr", "fgr"])
def test_trained_compact_net_gets_the_native_double_backward_gradient(kind, trained_model,
                                                                      test_batch):
    """On the real compact net (BatchNorm, GELU, max pooling) and real images, in float64 and
    in float32: the same parameter gradient as PyTorch's own second-order formulas."""
    x, y = test_batch[0][:32], test_batch[1][:32]
    for dtype, tolerance in ((torch.float64, 1e-10), (torch.float32, 2e-4)):
        model = copy.deepcopy(trained_model).to(dtype).train()
        xs = x.to(dtype)
        native = _parameter_gradient(model, xs, y, kind, use_ours=False)
        ours = _parameter_gradient(model, xs, y, kind, use_ours=True)
        assert ((ours - native).norm() / native.norm()).item() < tolerance, dtype


def test_running_statistics_are_updated_as_the_native_layer_does():
    native = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GELU()).train()
    ours = copy.deepcopy(native)
    x = torch.rand(8, 3, 7, 7)
    for _ in range(2):
        expected = native(x)
        with second_order_kernels():
            got = ours(x)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for a, b in zip(native[1].buffers(), ours[1].buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _node_names(tensor: torch.Tensor) -> set[str]:
    names, stack, seen = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_only_train_mode_batchnorm_and_exact_gelu_are_rerouted():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GELU(),
                          nn.GELU(approximate="tanh"), nn.BatchNorm2d(4, affine=False))
    x = torch.rand(2, 3, 6, 6, requires_grad=True)
    with second_order_kernels():
        names = _node_names(model.train()(x))
    assert {"_BatchNormTrainBackward", "_GeluBackward"} <= names
    assert "NativeBatchNormBackward0" in names  # affine=False: native
    assert "GeluBackward0" in names  # tanh approximation: native
    with second_order_kernels():
        names = _node_names(model.eval()(x))
    assert "_BatchNormTrainBackward" not in names  # eval mode: native


def test_bf16_autocast_penalty_gradient_is_as_accurate_as_the_native_path(trained_model,
                                                                           test_batch):
    """Under bf16 autocast (the training loop's default) the passes keep full-size tensors in
    bf16 like PyTorch's own: their error against a float64 reference must be no larger."""
    x, y = test_batch[0][:64], test_batch[1][:64]
    model = copy.deepcopy(trained_model).train()
    reference = _parameter_gradient(copy.deepcopy(model).double(), x.double(), y, "fgr",
                                    use_ours=False)
    errors = {}
    for use_ours in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            grad = _parameter_gradient(copy.deepcopy(model), x, y, "fgr", use_ours=use_ours)
        errors[use_ours] = ((grad.double() - reference).norm() / reference.norm()).item()
    assert errors[True] <= 1.1 * errors[False], errors
    assert errors[True] < 0.1, errors


def test_a_third_derivative_through_batchnorm_fails_loudly_instead_of_silently_wrong():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.ones(3, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    with second_order_kernels():
        out = F.batch_norm(x, None, None, weight, bias, training=True)
    (gx,) = torch.autograd.grad(out.pow(3).sum(), x, create_graph=True)
    torch.autograd.grad(gx.pow(2).sum(), x)  # second order: fine
    with pytest.raises(RuntimeError, match="second order"):
        torch.autograd.grad(gx.pow(2).sum(), x, create_graph=True)  # would allow a third
