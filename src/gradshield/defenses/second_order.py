"""Cheaper double backpropagation through the layers of CIFAR networks.

The exact IGR/FGR penalties differentiate an input gradient w.r.t. the parameters (double
backpropagation). PyTorch's own second-order formulas are slow on a CPU: those of
``native_batch_norm_backward`` and ``gelu_backward`` are long chains of unfused element-wise
operations (~50 % of an FGR step on the compact net before this module), a convolution's
takes the weight gradient's derivative as a convolution with the batch as channels (~3x a
weight gradient), and max pooling's returns NCHW tensors (every later element-wise pass then
mixes layouts) plus a zero tensor for its input
(``results/performance-amd-avx512-bf16.notes.md``). This module gives these layers hand-derived
second-order passes, and changes nothing else:

- :func:`second_order_kernels` is a context manager (a :class:`torch.overrides.TorchFunctionMode`)
  active only around the forward pass whose input gradient will be differentiated again. Inside
  it, ``F.batch_norm`` in training mode, ``F.gelu(approximate="none")``, ``F.conv{1,2,3}d`` (not
  with string padding) and ``F.max_pool2d`` are routed to the autograd functions below;
  everything else (eval-mode BatchNorm, tanh-GELU, other layers) runs as usual. Values and
  first-order gradients are those of the native kernels (they are called); second-order
  gradients are mathematically identical (checked against PyTorch's own double backward and
  float64 finite differences in ``tests/test_second_order.py``).
- The passes call private PyTorch functions (``torch._C._will_engine_execute_node``,
  ``aten.native_batch_norm_backward``, ...). :func:`enabled` says whether to use them: only on
  the torch minor versions they were tested with (:data:`TESTED_TORCH`), else PyTorch's own
  double backward is used and a :class:`SecondOrderWarning` says so once.
  ``GRADSHIELD_SECOND_ORDER=off`` turns them off by hand, ``=on`` forces them on an untested
  torch (run ``tests/test_second_order.py`` there first).
- The first backward pass (the input gradient, ``autograd.grad(loss, x, create_graph=True)``)
  computes no weight gradients of convolutions: the engine is asked which gradients that pass
  uses. GELU's derivative is computed once and reused by the three passes that need it.

Derivation (per channel, M = N*H*W values, r = 1/sqrt(var + eps), xh = (x - mean) * r):
the BatchNorm input gradient is ``gx = gamma r (gy - a - xh b)`` with ``a = mean(gy)``,
``b = mean(gy xh)``. For an upstream gradient ``h`` of ``gx`` (sums over the channel's values:
H1 = sum h, Hx = sum h xh, Hg = sum h gy, K = Hg - a H1 - b Hx):

- d/d gy    = gamma r (h - H1/M - xh Hx/M)  (the BatchNorm backward of h: P is symmetric)
- d/d gamma = r K
- d/d x     = -(gamma r^2 / M) (xh (K - 2 b Hx) + Hx gy + M b h - a Hx - b H1)

(a M and b M are the first backward's bias and weight gradients; H1, Hx and d/d gy come from
one native BatchNorm backward of h, Hg from another). For GELU, ``gx = g * gelu'(x)``:
d/d g = h gelu'(x), d/d x = h g phi(x) (2 - x^2). A convolution's ``gx = A(w)^T gy`` is linear
in gy and in w: d/d gy = A(w) h (a convolution of h), d/d w = the weight gradient of a
convolution of h with output gradient gy. Max pooling's ``gx`` scatters gy to the window maxima:
d/d gy gathers h there, and gx is constant in x.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import re
import warnings

import torch
from torch.autograd import Function
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

_aten = torch.ops.aten
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
#: torch (major, minor) versions whose private calls the passes were checked against.
TESTED_TORCH = ((2, 13), (2, 14))
#: Environment switch: "off" never uses the passes, "on" uses them on any torch, "auto" (default).
SWITCH = "GRADSHIELD_SECOND_ORDER"
_PRIVATE = ("_will_engine_execute_node",)


class SecondOrderWarning(UserWarning):
    """The second-order passes were switched off (untested torch); PyTorch's own are used."""


def torch_minor(version: str) -> tuple[int, int] | None:
    """(major, minor) of a torch version string such as ``2.14.1+cpu``; None if unreadable."""
    match = re.match(r"^(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def enabled(version: str | None = None) -> bool:
    """Whether the penalties should run under :class:`second_order_kernels` (see the module doc).

    ``version``: the torch version to judge (default: the installed one)."""
    switch = os.environ.get(SWITCH, "auto").strip().lower()
    if switch in ("off", "0", "false", "no"):
        return False
    if switch not in ("on", "1", "true", "yes", "auto", ""):
        raise ValueError(f"${SWITCH} must be on, off or auto, got {switch!r}")
    if switch in ("on", "1", "true", "yes"):
        return True
    version = torch.__version__ if version is None else version
    missing = [name for name in _PRIVATE if not hasattr(torch._C, name)]
    if torch_minor(version) in TESTED_TORCH and not missing:
        return True
    why = (f"torch {version} is not among the tested versions "
           f"{', '.join(f'{a}.{b}' for a, b in TESTED_TORCH)}" if not missing
           else f"torch {version} lacks {missing}")
    warnings.warn(f"gradshield's faster second-order passes are off: {why}; IGR/FGR use PyTorch's "
                  f"own double backward (same values, slower). Set {SWITCH}=on to force them after "
                  "running tests/test_second_order.py on this torch", SecondOrderWarning, stacklevel=2)
    return False


def _channel(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-channel vector (C,) as (1, C, 1, ...) to broadcast against an (N, C, ...) tensor."""
    return t.view(1, -1, *([1] * (ndim - 2)))


def _arguments(names: tuple[str, ...], args: tuple, kwargs: dict) -> dict:
    """A functional call's arguments by name (positional ones named in order)."""
    return dict(zip(names, args, strict=False)) | kwargs


def _ints(value, n: int) -> list[int]:
    """A size argument (an int, or a sequence of 1 or n ints) as a list of n ints."""
    if isinstance(value, (tuple, list)):
        return [int(v) for v in value] * (n if len(value) == 1 else 1)
    return [int(value)] * n


class _BatchNormTrainBackward(Function):
    """(gy, x, weight) -> (gx, gweight, gbias) of train-mode BatchNorm, twice differentiable."""

    @staticmethod
    def forward(ctx, grad_out, x, weight, save_mean, save_invstd, eps):
        grads = _aten.native_batch_norm_backward(grad_out, x, weight, None, None, save_mean,
                                                 save_invstd, True, eps, [True, True, True])
        # gweight = sum gy xh and gbias = sum gy are the pass's b * M and a * M
        ctx.save_for_backward(grad_out, x, weight, save_mean, save_invstd, grads[1], grads[2])
        ctx.eps = eps
        ctx.set_materialize_grads(False)
        return grads

    @staticmethod
    def backward(ctx, h_x, h_weight, h_bias):
        if torch.is_grad_enabled():  # a third derivative would treat the batch statistics as constants
            raise RuntimeError("second_order_kernels supports derivatives up to second order through "
                               "train-mode BatchNorm; for a third derivative run the forward pass "
                               "outside it (PyTorch's own formulas)")
        grad_out, x, weight, mean, invstd, sum_gy_xhat, sum_gy = ctx.saved_tensors
        nd = x.dim()
        count = x.numel() // x.shape[1]
        wide = torch.promote_types(x.dtype, torch.float32)  # per-channel sums and coefficients
        r, gamma, mu = (_channel(t.to(wide), nd) for t in (invstd, weight, mean))
        dtype = x.dtype  # full-size tensors stay in the activations' dtype (bf16 under autocast)
        a = _channel(sum_gy.to(wide), nd) / count
        b = _channel(sum_gy_xhat.to(wide), nd) / count
        g_grad_out = g_x = g_weight = None
        if h_x is not None:
            # one fused native pass gives d/d gy (the BatchNorm backward of h), Hx and H1 ...
            g_grad_out, hx, h1 = _aten.native_batch_norm_backward(
                h_x, x, weight, None, None, mean, invstd, True, ctx.eps,
                [ctx.needs_input_grad[0], True, True])
            # ... and another Hg = sum h gy (its "weight gradient" at mean 0, invstd 1)
            hg = _aten.native_batch_norm_backward(
                h_x, grad_out, None, None, None, torch.zeros_like(mean), torch.ones_like(invstd),
                True, ctx.eps, [False, True, False])[1]
            hx, h1, hg = (_channel(t.to(wide), nd) for t in (hx, h1, hg))
            k = hg - a * h1 - b * hx
            g_weight = (r * k).flatten()
            coef = -(gamma * r * r) / count
            x_coef = coef * (k - 2 * b * hx) * r  # of x in xh (K - 2 b Hx), xh = (x - mean) r
            constant = coef * -(a * hx + b * h1) - x_coef * mu
            g_x = torch.addcmul(constant.to(dtype), x, x_coef.to(dtype))
            g_x = g_x.addcmul_(grad_out, (coef * hx).to(dtype)).addcmul_(h_x, (coef * (count * b)).to(dtype))
        if h_weight is not None:  # gweight = sum gy xhat
            xhat = (x - mu.to(dtype)) * r.to(dtype)
            hw = _channel(h_weight, nd)
            g_grad_out = hw * xhat if g_grad_out is None else g_grad_out + hw * xhat
            extra = (hw * r) * (grad_out - a - xhat * b)
            g_x = extra if g_x is None else g_x + extra
        if h_bias is not None:  # gbias = sum gy
            hb = _channel(h_bias, nd)
            g_grad_out = hb.expand_as(grad_out) if g_grad_out is None else g_grad_out + hb
        return (_cast(g_grad_out, grad_out), _cast(g_x, x), _cast(g_weight, weight),
                None, None, None)


def _cast(grad, like: torch.Tensor):
    return None if grad is None else grad.to(like.dtype)


class _BatchNormTrain(Function):
    """Train-mode BatchNorm (native kernel, running statistics updated in place) whose backward
    is :class:`_BatchNormTrainBackward` when a graph is being built."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        out, mean, invstd = _aten.native_batch_norm(x, weight, bias, running_mean, running_var,
                                                    True, momentum, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: keep it twice differentiable
            gx, gw, gb = _BatchNormTrainBackward.apply(grad_out, x, weight, mean, invstd, ctx.eps)
        else:
            mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
            gx, gw, gb = _aten.native_batch_norm_backward(grad_out, x, weight, None, None, mean,
                                                          invstd, True, ctx.eps, mask)
        return gx, gw, gb, None, None, None, None


class _GeluBackward(Function):
    """(g, x, d) -> g * d with ``d = gelu'(x)`` (exact GELU, computed once per layer without a
    graph, see :class:`_Gelu`), twice differentiable: the total derivative w.r.t. x is
    ``g gelu''(x)``."""

    @staticmethod
    def forward(ctx, grad_out, x, derivative):
        ctx.save_for_backward(grad_out, x, derivative)
        return grad_out * derivative

    @staticmethod
    def backward(ctx, h):
        grad_out, x, derivative = ctx.saved_tensors
        g_grad_out = None
        if ctx.needs_input_grad[0]:  # a graph for a third derivative must see derivative(x)
            g_grad_out = _aten.gelu_backward(h, x) if torch.is_grad_enabled() else h * derivative
        g_x = None
        if ctx.needs_input_grad[1]:
            sq = x * x
            g_x = (h * grad_out) * (torch.exp(sq * -0.5) * (2.0 - sq)) * _INV_SQRT_2PI
        return g_grad_out, g_x, None


def _gelu_derivative(x: torch.Tensor) -> torch.Tensor:
    """``gelu'(x)`` (exact GELU) in x's dtype and layout, without a graph."""
    with torch.no_grad():
        return _aten.gelu_backward(torch.ones((), dtype=x.dtype, device=x.device).expand_as(x), x)


class _Gelu(Function):
    """Exact GELU (native kernel). When a graph is built in its backward, ``gelu'(x)`` is
    computed once and kept: the first-order pass of the first backward, the one of the second
    backward and the second-order pass are then a multiplication each, not a gelu_backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        ctx.derivative = None
        return _aten.gelu(x)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            if ctx.derivative is None:
                ctx.derivative = _gelu_derivative(x)
            return _GeluBackward.apply(grad_out, x, ctx.derivative)
        if ctx.derivative is not None:
            return grad_out * ctx.derivative
        return _aten.gelu_backward(grad_out, x)


def _gradient_edge(tensor: torch.Tensor | None):
    """Where a gradient for ``tensor`` goes (None where it takes none); a non-leaf tensor (see
    :func:`_not_a_leaf`), so that :func:`_will_be_used` can ask the engine about it."""
    if tensor is None or not tensor.requires_grad:
        return None
    return torch.autograd.graph.get_gradient_edge(tensor)


def _not_a_leaf(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A leaf that requires grad as a view of itself (the engine can tell whether a backward
    pass will run a view's node, but not a leaf's during ``autograd.grad``)."""
    if tensor is not None and tensor.requires_grad and tensor.grad_fn is None:
        return tensor.view_as(tensor)
    return tensor


def _will_be_used(edge) -> bool:
    """Whether the backward pass now running uses a gradient sent along ``edge`` (an input
    gradient ``autograd.grad(loss, x)`` uses none of the weights')."""
    return edge is not None and torch._C._will_engine_execute_node(edge.node)


class _ConvolutionBackward(Function):
    """(gy, x, weight) -> (gx, gweight, gbias) of a convolution, twice differentiable.

    Every derivative is a convolution or a convolution's weight gradient (native kernels); the
    weight gradient's derivative w.r.t. an upstream gradient ``h`` of gx is the weight gradient
    of the convolution of ``h`` (PyTorch's own double backward takes it as a convolution with
    the batch as channels, ~3x slower on a CPU)."""

    @staticmethod
    def forward(ctx, grad_out, x, weight, params, mask):
        ctx.save_for_backward(grad_out, x, weight)
        ctx.params = params
        ctx.set_materialize_grads(False)
        return tuple(_aten.convolution_backward(grad_out, x, weight, *params, mask))

    @staticmethod
    def backward(ctx, h_x, h_weight, h_bias):
        grad_out, x, weight = ctx.saved_tensors
        _, stride, padding, dilation, transposed, output_padding, groups = ctx.params
        need_grad_out, need_x, need_weight = ctx.needs_input_grad[:3]
        g_grad_out = g_x = g_weight = None
        if h_x is not None:  # gx = A(weight)^T gy: d/d gy = A h, d/d weight = weight grad at input h
            if need_grad_out:
                g_grad_out = _aten.convolution(h_x, weight, None, stride, padding, dilation,
                                               transposed, output_padding, groups)
            if need_weight:
                g_weight = _aten.convolution_backward(grad_out, h_x, weight, *ctx.params,
                                                      [False, True, False])[1]
        if h_weight is not None:  # gweight bilinear in (x, gy)
            if need_grad_out:
                extra = _aten.convolution(x, h_weight, None, stride, padding, dilation,
                                          transposed, output_padding, groups)
                g_grad_out = extra if g_grad_out is None else g_grad_out + extra
            if need_x:
                g_x = _aten.convolution_backward(grad_out, x, h_weight, *ctx.params,
                                                 [True, False, False])[0]
        if h_bias is not None and need_grad_out:  # gbias = sum of gy over all but channels
            hb = _channel(h_bias, grad_out.dim())
            g_grad_out = hb.expand_as(grad_out) if g_grad_out is None else g_grad_out + hb
        return _cast(g_grad_out, grad_out), _cast(g_x, x), _cast(g_weight, weight), None, None


class _Convolution(Function):
    """A convolution (native kernel) whose backward is :class:`_ConvolutionBackward` when a
    graph is being built; it computes only the gradients the running backward pass uses."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        bias_sizes = None if bias is None else list(bias.shape)
        ctx.params = (bias_sizes, stride, padding, dilation, False, [0] * len(stride), groups)
        ctx.save_for_backward(x, weight)
        ctx.edges = [_gradient_edge(t) for t in (x, weight, bias)]
        return _aten.convolution(x, weight, bias, *ctx.params[1:])  # stride ... groups

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            mask = [_will_be_used(edge) for edge in ctx.edges]
            grads = _ConvolutionBackward.apply(grad_out, x, weight, ctx.params, mask)
        else:
            grads = _aten.convolution_backward(grad_out, x, weight, *ctx.params,
                                               list(ctx.needs_input_grad[:3]))
        return (*grads, None, None, None, None)


_CONVOLUTION_ARGUMENTS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _convolution(nd: int, args: tuple, kwargs: dict):
    """``F.conv{nd}d`` through :class:`_Convolution`, with autocast's casts made outside it
    (so they stay in the graph); ``None`` where the call is left to PyTorch (string padding)."""
    b = _arguments(_CONVOLUTION_ARGUMENTS, args, kwargs)
    x, weight, bias = b["input"], b["weight"], b.get("bias")
    if isinstance(b.get("padding", 0), str) or x.dim() != nd + 2:
        return None
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        x, weight, bias = (t if t is None or t.dtype == torch.float64 else t.to(dtype)
                           for t in (x, weight, bias))
    x, weight, bias = (_not_a_leaf(t) for t in (x, weight, bias))
    with torch.autocast(device, enabled=False):
        return _Convolution.apply(x, weight, bias, _ints(b.get("stride", 1), nd),
                                  _ints(b.get("padding", 0), nd), _ints(b.get("dilation", 1), nd),
                                  int(b.get("groups", 1)))


def _gather_windows(h: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``h`` (N, C, H, W) read at max pooling's ``indices`` (N, C, h, w; flat positions in H*W),
    in ``indices``' layout (PyTorch's own gather returns NCHW, and every later element-wise
    pass then mixes layouts)."""
    n, c = h.shape[:2]
    if h.is_contiguous(memory_format=torch.channels_last) and not h.is_contiguous():
        gathered = h.permute(0, 2, 3, 1).reshape(n, -1, c).gather(
            1, indices.permute(0, 2, 3, 1).reshape(n, -1, c))
        return gathered.view(n, *indices.shape[2:], c).permute(0, 3, 1, 2)
    return h.flatten(2).gather(2, indices.flatten(2)).view(indices.shape)


class _MaxPool2dBackward(Function):
    """gy -> gx of 2-d max pooling (a scatter at the window maxima), twice differentiable: its
    derivative w.r.t. gy is a gather at the same positions, and it is constant in x."""

    @staticmethod
    def forward(ctx, grad_out, x, indices, params):
        ctx.save_for_backward(indices)
        return _aten.max_pool2d_with_indices_backward(grad_out, x, *params, indices)

    @staticmethod
    def backward(ctx, h):
        (indices,) = ctx.saved_tensors
        return _gather_windows(h, indices), None, None, None


class _MaxPool2d(Function):
    """2-d max pooling (native kernel) whose backward is :class:`_MaxPool2dBackward` when a
    graph is being built."""

    @staticmethod
    def forward(ctx, x, params):
        out, indices = _aten.max_pool2d_with_indices(x, *params)
        ctx.save_for_backward(x, indices)
        ctx.params = params
        ctx.mark_non_differentiable(indices)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, indices = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _MaxPool2dBackward.apply(grad_out, x, indices, ctx.params), None
        return _aten.max_pool2d_with_indices_backward(grad_out, x, *ctx.params, indices), None


_MAX_POOL_ARGUMENTS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode",
                       "return_indices")


def _max_pool2d(args: tuple, kwargs: dict):
    """``F.max_pool2d`` through :class:`_MaxPool2d`; ``None`` where it is left to PyTorch."""
    b = _arguments(_MAX_POOL_ARGUMENTS, args, kwargs)
    x = b["input"]
    if b.get("return_indices", False) or x.dim() != 4:
        return None
    kernel = _ints(b["kernel_size"], 2)
    stride = _ints(b["stride"], 2) if b.get("stride") not in (None, [], ()) else kernel
    params = (kernel, stride, _ints(b.get("padding", 0), 2), _ints(b.get("dilation", 1), 2),
              bool(b.get("ceil_mode", False)))
    return _MaxPool2d.apply(x, params)


_BATCH_NORM_SIGNATURE = inspect.signature(F.batch_norm)


def _batch_norm(args: tuple, kwargs: dict):
    """Train-mode affine ``F.batch_norm`` through :class:`_BatchNormTrain`; else ``None``."""
    bound = _BATCH_NORM_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    b = bound.arguments
    if not (b["training"] and b["weight"] is not None and b["bias"] is not None
            and b["momentum"] is not None and b["input"].dim() >= 2):
        return None
    return _BatchNormTrain.apply(b["input"], b["weight"], b["bias"], b["running_mean"],
                                 b["running_var"], b["momentum"], b["eps"])


def _gelu(args: tuple, kwargs: dict):
    """Exact ``F.gelu`` through :class:`_Gelu`; ``None`` for the tanh approximation."""
    if kwargs.get("approximate", "none") != "none" or len(args) != 1:
        return None
    return _Gelu.apply(args[0])


#: The functional calls given passes of their own; each returns None to leave a call to PyTorch.
_REROUTED = {F.conv1d: functools.partial(_convolution, 1), F.conv2d: functools.partial(_convolution, 2),
             F.conv3d: functools.partial(_convolution, 3), F.max_pool2d: _max_pool2d,
             F.batch_norm: _batch_norm, F.gelu: _gelu}


class second_order_kernels(TorchFunctionMode):
    """Inside this context, ``F.conv{1,2,3}d``, ``F.max_pool2d``, train-mode ``F.batch_norm``
    with affine parameters and exact ``F.gelu`` use the hand-derived second-order passes of this
    module (see the module doc)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        route = _REROUTED.get(func)
        out = None if route is None else route(args, kwargs)
        return func(*args, **kwargs) if out is None else out
