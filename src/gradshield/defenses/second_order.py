"""Cheaper double backpropagation through train-mode BatchNorm and exact GELU.

The exact IGR/FGR penalties differentiate an input gradient w.r.t. the parameters (double
backpropagation). PyTorch's second-order formulas for ``native_batch_norm_backward`` and
``gelu_backward`` are long chains of unfused element-wise operations; on a CPU they took ~50 % of
an FGR step on the compact net (``results/performance.notes.md``). This module gives both
layers a hand-derived second-order pass with fewer full-size passes, and changes nothing else:

- :func:`second_order_kernels` is a context manager (a :class:`torch.overrides.TorchFunctionMode`)
  active only around the forward pass whose input gradient will be differentiated again. Inside
  it, ``F.batch_norm`` in training mode and ``F.gelu(approximate="none")`` are routed to the
  autograd functions below; everything else (eval-mode BatchNorm, tanh-GELU, other layers) runs
  as usual. Values and first-order gradients are those of the native kernels (they are called);
  second-order gradients are mathematically identical (checked against PyTorch's own double
  backward and float64 finite differences in ``tests/test_second_order.py``).

Derivation (per channel, M = N*H*W values, r = 1/sqrt(var + eps), xh = (x - mean) * r):
the BatchNorm input gradient is ``gx = gamma r (gy - a - xh b)`` with ``a = mean(gy)``,
``b = mean(gy xh)``. For an upstream gradient ``h`` of ``gx`` (sums over the channel's values:
H1 = sum h, Hx = sum h xh, Hg = sum h gy, K = Hg - a H1 - b Hx):

- d/d gy    = gamma r (h - H1/M - xh Hx/M)  (the BatchNorm backward of h: P is symmetric)
- d/d gamma = r K
- d/d x     = -(gamma r^2 / M) (xh (K - 2 b Hx) + Hx gy + M b h - a Hx - b H1)

and for GELU, ``gx = g * gelu'(x)``: d/d g = h gelu'(x), d/d x = h g phi(x) (2 - x^2).
"""

from __future__ import annotations

import inspect
import math

import torch
from torch.autograd import Function
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

_aten = torch.ops.aten
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _channel(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-channel vector (C,) as (1, C, 1, ...) to broadcast against an (N, C, ...) tensor."""
    return t.view(1, -1, *([1] * (ndim - 2)))


def _channel_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the channels (dim 1), accumulated and returned in float32+."""
    dims = [0, *range(2, t.dim())]
    if t.dtype in (torch.bfloat16, torch.float16):  # accumulates in float32 without a float32 copy
        return t.sum(dim=dims).float()
    return t.sum(dim=dims)


class _BatchNormTrainBackward(Function):
    """(gy, x, weight) -> (gx, gweight, gbias) of train-mode BatchNorm, twice differentiable."""

    @staticmethod
    def forward(ctx, grad_out, x, weight, save_mean, save_invstd, eps):
        grads = _aten.native_batch_norm_backward(grad_out, x, weight, None, None, save_mean,
                                                 save_invstd, True, eps, [True, True, True])
        ctx.save_for_backward(grad_out, x, weight, save_mean, save_invstd)
        ctx.eps = eps
        ctx.set_materialize_grads(False)
        return grads

    @staticmethod
    def backward(ctx, h_x, h_weight, h_bias):
        if torch.is_grad_enabled():  # a third derivative would treat the batch statistics as constants
            raise RuntimeError("second_order_kernels supports derivatives up to second order through "
                               "train-mode BatchNorm; for a third derivative run the forward pass "
                               "outside it (PyTorch's own formulas)")
        grad_out, x, weight, mean, invstd = ctx.saved_tensors
        nd = x.dim()
        count = x.numel() // x.shape[1]
        r, gamma = _channel(invstd, nd), _channel(weight, nd)
        dtype = x.dtype  # full-size tensors stay in the activations' dtype (bf16 under autocast);
        # per-channel sums and coefficients are float32+
        xhat = (x - _channel(mean, nd).to(dtype)) * r.to(dtype)
        a = _channel(_channel_sum(grad_out), nd) / count
        b = _channel(_channel_sum(grad_out * xhat), nd) / count
        g_grad_out = g_x = g_weight = None
        if h_x is not None:
            h1 = _channel(_channel_sum(h_x), nd)
            hx = _channel(_channel_sum(h_x * xhat), nd)
            hg = _channel(_channel_sum(h_x * grad_out), nd)
            k = hg - a * h1 - b * hx
            # d/d gy is the BatchNorm backward of h (fused native kernel)
            g_grad_out = _aten.native_batch_norm_backward(h_x, x, weight, None, None, mean, invstd,
                                                          True, ctx.eps, [True, False, False])[0]
            g_weight = (r * k).flatten()
            coef = -(gamma * r * r) / count
            g_x = torch.addcmul((coef * -(a * hx + b * h1)).to(dtype), xhat,
                                (coef * (k - 2 * b * hx)).to(dtype))
            g_x = g_x.addcmul_(grad_out, (coef * hx).to(dtype)).addcmul_(h_x, (coef * (count * b)).to(dtype))
        if h_weight is not None:  # gweight = sum gy xhat
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
    """(g, x) -> g * gelu'(x) (exact GELU), twice differentiable."""

    @staticmethod
    def forward(ctx, grad_out, x):
        ctx.save_for_backward(grad_out, x)
        return _aten.gelu_backward(grad_out, x)

    @staticmethod
    def backward(ctx, h):
        grad_out, x = ctx.saved_tensors
        g_grad_out = _aten.gelu_backward(h, x) if ctx.needs_input_grad[0] else None
        g_x = None
        if ctx.needs_input_grad[1]:
            sq = x * x
            g_x = (h * grad_out) * (torch.exp(sq * -0.5) * (2.0 - sq)) * _INV_SQRT_2PI
        return g_grad_out, g_x


class _Gelu(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _aten.gelu(x)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _GeluBackward.apply(grad_out, x)
        return _aten.gelu_backward(grad_out, x)


_BATCH_NORM_SIGNATURE = inspect.signature(F.batch_norm)


class second_order_kernels(TorchFunctionMode):
    """Inside this context, train-mode ``F.batch_norm`` with affine parameters and exact
    ``F.gelu`` use the hand-derived second-order passes of this module (see the module doc)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            bound = _BATCH_NORM_SIGNATURE.bind(*args, **kwargs)
            bound.apply_defaults()
            b = bound.arguments
            if (b["training"] and b["weight"] is not None and b["bias"] is not None
                    and b["momentum"] is not None and b["input"].dim() >= 2):
                return _BatchNormTrain.apply(b["input"], b["weight"], b["bias"], b["running_mean"],
                                             b["running_var"], b["momentum"], b["eps"])
        elif func is F.gelu and kwargs.get("approximate", "none") == "none" and len(args) == 1:
            return _Gelu.apply(args[0])
        return func(*args, **kwargs)

