"""The hand-derived second-order passes of train-mode BatchNorm, GELU, convolutions and max
pooling: float64 gradchecks, agreement with PyTorch's own double backward and with finite
differences of the penalties, running statistics, the weight gradients the first backward skips,
memory layouts, and what the context leaves to the native kernels."""

from __future__ import annotations

import contextlib
import copy
import os
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from gradshield.defenses import second_order
from gradshield.defenses.regularizers import fgr_penalty, igr_penalty
from gradshield.defenses.second_order import (
    _BatchNormTrainBackward,
    _ConvolutionBackward,
    _gelu_derivative,
    _GeluBackward,
    _MaxPool2dBackward,
    second_order_kernels,
)
from gradshield.models import create_model

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

    def gelu_backward(g, x):  # the derivative argument recomputed from x, as _Gelu does
        return _GeluBackward.apply(g, x, _gelu_derivative(x))

    assert torch.autograd.gradcheck(gelu_backward, (grad_out, x))
    assert torch.autograd.gradgradcheck(gelu_backward, (grad_out, x))


# (stride, padding, dilation, groups) of a convolution 4 -> 6 channels
CONVOLUTIONS = [(1, 1, 1, 1), (2, 1, 1, 1), (1, 2, 2, 1), (2, 0, 1, 2)]


@pytest.mark.parametrize("stride,padding,dilation,groups", CONVOLUTIONS)
def test_convolution_backward_is_differentiable_exactly(stride, padding, dilation, groups):
    """All three outputs (gx, gweight, gbias) against float64 finite differences in all three
    inputs, and the derivative of that backward (a third derivative) too."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 7, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 4 // groups, 3, 3, generator=gen, dtype=torch.float64,
                         requires_grad=True)
    out_shape = F.conv2d(x, weight, stride=stride, padding=padding, dilation=dilation,
                         groups=groups).shape
    grad_out = torch.randn(out_shape, generator=gen, dtype=torch.float64, requires_grad=True)
    params = ([6], [stride] * 2, [padding] * 2, [dilation] * 2, False, [0, 0], groups)

    def backward(g, xx, w):
        return _ConvolutionBackward.apply(g, xx, w, params, [True, True, True])

    assert torch.autograd.gradcheck(backward, (grad_out, x, weight))
    assert torch.autograd.gradgradcheck(backward, (grad_out, x, weight))


@pytest.mark.parametrize("stride,padding,dilation,groups", CONVOLUTIONS)
@pytest.mark.parametrize("bias", [False, True])
def test_convolution_double_backward_matches_the_native_one(stride, padding, dilation, groups,
                                                            bias):
    """A penalty on the input gradient through two convolutions: the same parameter gradient
    (float64) as PyTorch's own double backward."""
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Conv2d(4, 6, 3, stride=stride, padding=padding, dilation=dilation, groups=groups,
                  bias=bias), nn.Tanh(), nn.Conv2d(6, 4, 3, padding=1, bias=bias)).double()
    x = torch.randn(3, 4, 9, 9, dtype=torch.float64)

    def parameter_gradient(use_ours):
        model.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(True)
        with second_order_kernels() if use_ours else contextlib.nullcontext():
            out = model(xx)
        loss = out.pow(2).sum() * 0.1 + out.sum()
        (g,) = torch.autograd.grad(loss, xx, create_graph=True)
        (loss + g.pow(2).sum()).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    torch.testing.assert_close(parameter_gradient(True), parameter_gradient(False),
                               rtol=1e-10, atol=1e-12)


def test_convolution_with_string_padding_is_left_to_pytorch():
    conv = nn.Conv2d(3, 4, 3, padding="same").double()
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    with second_order_kernels():
        out = conv(x)
    assert type(out.grad_fn).__name__ == "ConvolutionBackward0"
    torch.testing.assert_close(out, conv(x), rtol=0, atol=0)


def _conv_weight_gradients_computed(model, x, y, use_ours) -> int:
    """How many convolution backward calls compute a weight gradient in the FIRST backward pass
    of the IGR penalty (the input gradient, which needs none)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is aten.convolution_backward.default:
                calls.append(args[-1][1])
            return func(*args, **(kwargs or {}))

    xx = x.detach().requires_grad_(True)
    with second_order_kernels() if use_ours else contextlib.nullcontext():
        losses = F.cross_entropy(model(xx), y, reduction="none")
    with Record():
        torch.autograd.grad(losses.sum(), xx, create_graph=True)
    return sum(calls)


def test_the_first_backward_computes_no_weight_gradients(trained_model, test_batch):
    x, y = test_batch[0][:8], test_batch[1][:8]
    model = trained_model.train()
    assert _conv_weight_gradients_computed(model, x, y, use_ours=True) == 0
    assert _conv_weight_gradients_computed(model, x, y, use_ours=False) == 0  # native: none either


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("kernel,stride,padding,ceil_mode", [(2, 2, 0, False), (3, 2, 1, True),
                                                              (3, 1, 1, False)])
def test_max_pool_backward_is_differentiable_exactly_and_keeps_the_layout(channels_last, kernel,
                                                                          stride, padding,
                                                                          ceil_mode):
    gen = torch.Generator().manual_seed(8)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 3, 7, 7, generator=gen, dtype=torch.float64).contiguous(memory_format=layout)
    params = ([kernel] * 2, [stride] * 2, [padding] * 2, [1, 1], ceil_mode)
    out, indices = aten.max_pool2d_with_indices(x, *params)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).contiguous(
        memory_format=layout).requires_grad_()
    assert torch.autograd.gradcheck(lambda g: _MaxPool2dBackward.apply(g, x, indices, params),
                                    (grad_out,))
    # the double backward: ours against PyTorch's own, and in the caller's layout
    h = torch.randn(x.shape, generator=gen, dtype=torch.float64).contiguous(memory_format=layout)
    (ours,) = torch.autograd.grad(_MaxPool2dBackward.apply(grad_out, x, indices, params), grad_out, h)
    native_gx = aten.max_pool2d_with_indices_backward(grad_out, x, *params, indices)
    (native,) = torch.autograd.grad(native_gx, grad_out, h)
    torch.testing.assert_close(ours, native, rtol=0, atol=0)
    assert ours.is_contiguous(memory_format=layout)


def bn_gelu_model(seed: int = 0) -> nn.Module:
    """Float64 CNN with the compact net's layer kinds but no max pooling (smooth in x)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.GELU(),
        nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.GELU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).double().train()


def pooling_model(seed: int = 0) -> nn.Module:
    """Float64 CNN with every rerouted layer: biased and strided convolutions, max pooling,
    BatchNorm, GELU (max pooling is smooth away from ties, which random float64 inputs avoid)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2), nn.BatchNorm2d(4), nn.GELU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.GELU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).double().train()


def _penalty(kind, model, x, y):
    fn = igr_penalty if kind == "igr" else fgr_penalty
    return fn(model, x, y).penalty


@pytest.mark.parametrize("make_model,size", [(bn_gelu_model, 6), (pooling_model, 8)])
@pytest.mark.parametrize("kind", ["igr", "fgr"])
def test_penalty_gradients_through_the_rerouted_layers_match_finite_differences(kind, make_model,
                                                                               size):
    model = make_model()
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(4, 3, size, size, generator=gen, dtype=torch.float64)
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
    """The penalty's parameter gradient with the passes switched on or off by the user's switch."""
    saved = os.environ.get(second_order.SWITCH)
    os.environ[second_order.SWITCH] = "on" if use_ours else "off"
    try:
        model.zero_grad(set_to_none=True)
        fn = igr_penalty if kind == "igr" else fgr_penalty
        fn(model, x, y).total(0.5).backward()
    finally:
        if saved is None:
            del os.environ[second_order.SWITCH]
        else:
            os.environ[second_order.SWITCH] = saved
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


def test_only_the_supported_layers_are_rerouted():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GELU(),
                          nn.GELU(approximate="tanh"), nn.BatchNorm2d(4, affine=False),
                          nn.MaxPool2d(2), nn.AvgPool2d(2))
    x = torch.rand(2, 3, 10, 10, requires_grad=True)
    with second_order_kernels():
        names = _node_names(model.train()(x))
    assert {"_BatchNormTrainBackward", "_GeluBackward", "_ConvolutionBackward",
            "_MaxPool2dBackward"} <= names
    assert "AvgPool2DBackward0" in names  # no pass of its own: native
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


@settings(max_examples=25, deadline=None)
@given(kernel=st.integers(1, 3), stride=st.integers(1, 2), padding=st.integers(0, 2),
       dilation=st.integers(1, 2), groups=st.sampled_from([1, 2]), bias=st.booleans(),
       pool=st.booleans(), channels_last=st.booleans(), seed=st.integers(0, 2**16))
def test_any_convolution_and_pooling_gets_the_native_double_backward(kernel, stride, padding, dilation,
                                                                     groups, bias, pool, channels_last,
                                                                     seed):
    """Random convolution settings, with or without max pooling, in either layout: the penalty's
    parameter gradient equals PyTorch's own double backward (float64)."""
    torch.manual_seed(seed)
    layers = [nn.Conv2d(4, 6, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                        bias=bias), nn.Tanh()]
    layers += [nn.MaxPool2d(2, ceil_mode=True)] if pool else []
    model = nn.Sequential(*layers, nn.Conv2d(6, 3, 1, bias=bias), nn.Flatten()).double()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64).contiguous(memory_format=layout)

    def parameter_gradient(use_ours):
        model.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(True)
        with second_order_kernels() if use_ours else contextlib.nullcontext():
            out = model(xx)
        loss = (out.sin() * out).sum()
        (g,) = torch.autograd.grad(loss, xx, create_graph=True)
        (loss + g.pow(2).sum()).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    torch.testing.assert_close(parameter_gradient(True), parameter_gradient(False),
                               rtol=1e-9, atol=1e-11)


def test_an_untested_torch_switches_the_passes_off_says_so_once_and_gives_the_same_gradient(
        monkeypatch):
    """On a torch minor version the passes were not tested with, the penalties use PyTorch's own
    double backward (never the rerouted passes), with one warning; the gradient is unchanged."""
    import gradshield.defenses.regularizers as regularizers

    torch.manual_seed(0)
    model = create_model("compact", width=0.25).double().train()
    x, y = torch.rand(6, 3, 32, 32, dtype=torch.float64), torch.arange(6) % 10
    monkeypatch.delenv(second_order.SWITCH, raising=False)
    reference = _parameter_gradient(model, x, y, "fgr", use_ours=True)
    monkeypatch.delenv(second_order.SWITCH, raising=False)

    class Refuse:
        def __enter__(self):
            raise AssertionError("the rerouted passes ran on an untested torch")

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(regularizers, "second_order_kernels", Refuse)
    monkeypatch.setattr(torch, "__version__", "2.99.0+fake")
    with pytest.warns(second_order.SecondOrderWarning):
        assert not second_order.enabled()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            fgr_penalty(model, x, y).total(0.5).backward()
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    messages = [w for w in caught if issubclass(w.category, second_order.SecondOrderWarning)]
    assert len(messages) == 1 and "2.99.0+fake" in str(messages[0].message)
    torch.testing.assert_close(got, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("switch,version,expected", [
    ("off", "2.14.1", False), ("on", "2.99.0", True), ("auto", "2.14.1+cpu", True),
    ("auto", "2.13.0", True), ("auto", "2.12.0", False), ("auto", "3.0.0", False),
    ("auto", "garbage", False)])
def test_the_switch_and_the_version_decide(monkeypatch, switch, version, expected):
    monkeypatch.setenv(second_order.SWITCH, switch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert second_order.enabled(version) is expected


def test_a_bad_switch_value_is_an_error(monkeypatch):
    monkeypatch.setenv(second_order.SWITCH, "maybe")
    with pytest.raises(ValueError, match="on, off or auto"):
        second_order.enabled()
