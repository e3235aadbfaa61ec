"""BatchNorm over the global batch of a data-parallel run, differentiable to any order.

In training mode a BatchNorm layer normalises with its batch's statistics, so N processes that
each normalise their share of a batch compute another function than one process on the whole
batch (and their running statistics drift apart). :class:`GlobalBatchNorm` normalises every
rank's share with the statistics of the global batch, so N ranks compute, to float rounding, what
one process computes on the global batch.

Why not ``torch.nn.SyncBatchNorm``: its backward is a hand-written function of non-differentiable
kernels (``batch_norm_backward_elemt``) and an in-place all-reduce, so double backpropagation
(the exact IGR/FGR penalties) fails through it (pytorch/pytorch#61222), and it runs on GPUs only.
Here each rank's statistics come from PyTorch's BatchNorm kernel, are combined with a
differentiable all-reduce (:class:`_SumOverRanks`, whose backward is itself again;
``torch.distributed.nn.functional.all_reduce`` does the same but is deprecated, its successor
private), and the normalisation by the global statistics is PyTorch's fused eval-mode kernel.
The backward passes are PyTorch's kernels too, except while a graph is being built (double
backpropagation): then they are ordinary tensor operations, so autograd differentiates them
again, to any order. An input gradient taken on one rank (``autograd.grad(local losses, local
x)``) so includes the other ranks' terms through the shared statistics, exactly as one process's
per-example gradients include the cross-example terms of its batch statistics.

Per layer and forward pass: one all-reduce of a (world size, 2C + 1) table (each rank's count,
mean and variance per channel, combined with Chan et al.'s parallel formula); its backward one
more. The statistics are float32 at least (bf16 autocast included). In eval mode, or with one
process, the layer is plain BatchNorm (running statistics).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from gradshield.errors import GradshieldError

#: The BatchNorm layers swapped for :class:`GlobalBatchNorm` (exactly these types: a subclass may
#: do more in its forward, e.g. timm's BatchNormAct2d adds an activation).
PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _SumOverRanks(torch.autograd.Function):
    """``t`` summed over the ranks of ``group``; its gradient is the sum over ranks of the
    gradients, taken by this same function (so differentiable to any order)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _SumOverRanks.apply(grad, ctx.group), None


def _channel(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.view(1, -1, *([1] * (ndim - 2)))


def _wide(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 (autocast) up to float32; float32/float64 unchanged."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


class _Moments(torch.autograd.Function):
    """Per-channel mean and biased variance of ``x`` (over every dimension but 1), in float32 at
    least, from PyTorch's BatchNorm statistics kernel (``torch.var_mean`` is several times
    slower on CPUs); differentiable to any order."""

    @staticmethod
    def forward(ctx, x, eps):
        wide = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype
        unit = torch.ones(x.shape[1], dtype=wide, device=x.device)  # float32 statistics for bf16 x
        _, mean, invstd = torch.native_batch_norm(x, unit, torch.zeros_like(unit), None, None, True,
                                                  0.0, eps)
        ctx.save_for_backward(x, mean)
        return mean, (invstd.pow(-2) - eps).clamp_min(0)  # invstd = (var + eps)^(-1/2)

    @staticmethod
    def backward(ctx, grad_mean, grad_var):
        x, mean = ctx.saved_tensors
        dims = [0, *range(2, x.dim())]
        n = x.numel() // x.shape[1]
        wide = _wide(x)
        grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
        grad_var = torch.zeros_like(mean) if grad_var is None else grad_var
        scale = _channel(grad_var * (2.0 / n), x.dim())  # d/dx = grad_mean / n + scale (x - mean)
        if torch.is_grad_enabled():  # building a graph: the mean as a function of x
            mean = wide.mean(dims)
            grad = _channel(grad_mean / n, x.dim()) + scale * (wide - _channel(mean, x.dim()))
        else:  # one fused pass
            grad = torch.addcmul(_channel(grad_mean / n, x.dim()) - scale * _channel(mean, x.dim()),
                                 wide, scale)
        return grad.to(x.dtype), None


class _Normalize(torch.autograd.Function):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` per channel, for given (global) statistics
    ``mean`` and ``var`` (float32 or float64, differentiable): PyTorch's fused BatchNorm kernels in eval
    mode forward, and backward where no graph is being built; where one is (double
    backpropagation), the backward is made of differentiable tensor operations instead."""

    @staticmethod
    def forward(ctx, x, mean, var, weight, bias, eps):
        ctx.save_for_backward(x, mean, var, weight, bias)
        ctx.eps = eps
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx, grad):
        x, mean, var, weight, bias = ctx.saved_tensors
        dims = [0, *range(2, x.dim())]
        invstd = torch.rsqrt(var + ctx.eps)
        gain = invstd if weight is None else invstd * weight
        if torch.is_grad_enabled():  # building a graph: differentiable operations
            xhat = (_wide(x) - _channel(mean, x.dim())) * _channel(invstd, x.dim())
            grad_f = _wide(grad)
            grad_x = (grad_f * _channel(gain, x.dim())).to(x.dtype)
            sum_grad, sum_grad_xhat = grad_f.sum(dims), (grad_f * xhat).sum(dims)
        else:  # PyTorch's kernel: the input gradient with the statistics held fixed, and the sums
            grad_x, sum_grad_xhat_w, sum_grad_b = torch.ops.aten.native_batch_norm_backward(
                grad, x, weight, mean, var, None, None, False, ctx.eps,
                [True, weight is not None, bias is not None])
            sum_grad = sum_grad_b if bias is not None else _wide(grad).sum(dims)
            sum_grad_xhat = sum_grad_xhat_w if weight is not None else \
                (_wide(grad) * (_wide(x) - _channel(mean, x.dim())) * _channel(invstd, x.dim())).sum(dims)
        grad_mean = -gain * sum_grad  # through the statistics: per channel, then the caller's graph
        grad_var = -0.5 * gain * invstd * sum_grad_xhat
        return (grad_x, grad_mean, grad_var,
                None if weight is None else sum_grad_xhat.to(weight.dtype),
                None if bias is None else sum_grad.to(bias.dtype), None)


def _world(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class GlobalBatchNorm(_BatchNorm):
    """A BatchNorm layer whose training-mode statistics are those of the global batch (all ranks
    of ``group``, default the whole world); same parameters, buffers and state-dict keys as
    ``nn.BatchNorm{1,2,3}d``. Build one from an existing layer with :meth:`sharing`."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, group=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.group = group

    @classmethod
    def sharing(cls, layer: _BatchNorm, group=None) -> GlobalBatchNorm:
        """A GlobalBatchNorm that shares ``layer``'s parameters and buffers (trains them in place)."""
        new = cls(layer.num_features, layer.eps, layer.momentum, layer.affine,
                  layer.track_running_stats, group)
        for name in ("weight", "bias"):
            setattr(new, name, getattr(layer, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            new._buffers[name] = layer._buffers.get(name)
        new.train(layer.training)
        return new

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise GradshieldError(f"BatchNorm expects (N, C, ...) input, got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rank, world = _world(self.group)
        if not self.training or world == 1:
            return super().forward(x)
        self._check_input_dim(x)
        c = x.shape[1]
        mean, var = _Moments.apply(x, self.eps)
        count = torch.full((1,), float(x.numel() // max(1, c)), dtype=mean.dtype, device=x.device)
        mine = torch.cat([mean, var, count])
        zero = torch.zeros_like(mine)
        table = _SumOverRanks.apply(torch.stack([mine if r == rank else zero for r in range(world)]),
                                    self.group)
        means, variances, counts = table[:, :c], table[:, c:2 * c], table[:, 2 * c:]
        total = counts.sum()
        global_mean = (counts * means).sum(0) / total
        global_var = (counts * (variances + (means - global_mean) ** 2)).sum(0) / total
        if self.track_running_stats and self.num_batches_tracked is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                          else self.momentum)
                unbiased = global_var * (total / (total - 1))
                self.running_mean.mul_(1 - factor).add_(global_mean.detach().to(self.running_mean.dtype),
                                                         alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.detach().to(self.running_var.dtype),
                                                        alpha=factor)
        return _Normalize.apply(x, global_mean, global_var, self.weight, self.bias, self.eps)


@contextlib.contextmanager
def global_batchnorm(model: nn.Module, group=None) -> Iterator[nn.Module]:
    """Inside this context every BatchNorm layer of ``model`` is a :class:`GlobalBatchNorm` sharing
    its parameters and buffers; the original layers (trained in place) are put back after. A
    BatchNorm subclass it cannot stand in for is refused."""
    swaps = []
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            if isinstance(child, _BatchNorm) and not isinstance(child, GlobalBatchNorm):
                if type(child) not in PLAIN_BATCHNORMS:
                    where = f"{parent_name}.{name}" if parent_name else name
                    raise GradshieldError(
                        f"layer {where} is a {type(child).__name__}, a BatchNorm variant gradshield "
                        "cannot synchronise across processes; train this model in one process, or "
                        "build it with plain nn.BatchNorm{1,2,3}d layers")
                swaps.append((parent, name, child))
    for parent, name, child in swaps:
        setattr(parent, name, GlobalBatchNorm.sharing(child, group))
    try:
        yield model
    finally:
        for parent, name, child in reversed(swaps):
            child.train(getattr(parent, name).training)
            setattr(parent, name, child)
