"""Where one training step's time goes: every aten operation timed as it runs, by op, shape
and the inputs' memory layouts.

A ``TorchDispatchMode`` wraps each operation of a training step (recipe loss + backward + SGD
update, train mode, channels-last, bf16 autocast where the training loop would use it) with a
wall-clock timer; CPU operations are synchronous, so the sums are the operations' own times
(plus ~10 us of Python per operation). ``torch.profiler`` was less useful here: on this CPU it
inflated large element-wise operations two- to threefold. Prints the total, the time per
operation, and per operation and input shape (per step, averaged over ``--repeats`` steps).

    .venv/bin/python benchmarks/profile_step.py --recipe fgr --model compact --batch 256
"""

from __future__ import annotations

import argparse
import collections
import functools
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from _common import images
from bench_training_step import time_step
from gradshield.defenses.recipes import make_recipe
from gradshield.models import create_model
from gradshield.training import bf16_is_fast


def layout(t: torch.Tensor) -> str:
    """``nchw`` (contiguous), ``cl`` (channels-last), ``bcast`` (expanded: a zero stride) or
    ``strided``; scalars and vectors are ``-``."""
    if t.dim() < 2:
        return "-"
    if t.is_contiguous():
        return "nchw"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "cl"
    return "bcast" if 0 in t.stride() else "strided"


class OperationTimer(TorchDispatchMode):
    """Seconds spent in each (op, first input's shape, dtype, the tensor inputs' layouts) and how
    often it ran: a mix of layouts in one element-wise operation is several times slower."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds = collections.defaultdict(float)
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        elapsed = time.perf_counter() - start
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        layouts = ",".join(layout(a) for a in args if isinstance(a, torch.Tensor))
        key = (func.__name__, tuple(first.shape) if first is not None else (),
               str(first.dtype).removeprefix("torch.") if first is not None else "", layouts)
        self.seconds[key] += elapsed
        self.calls[key] += 1
        return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="fgr", help="a training recipe (standard, igr, fgr, at, ...)")
    parser.add_argument("--model", default="compact")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=40, help="rows of the per-shape table")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    x, y = images(args.batch, split="train")
    x = x.contiguous(memory_format=torch.channels_last)
    model = create_model(args.model).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)  # tiny lr: stay put
    bf16 = bf16_is_fast()  # the training loop's default on this CPU
    step = functools.partial(time_step, model, optimizer, make_recipe(args.recipe), x, y, bf16)
    step()
    step()  # warm-up: allocator, oneDNN kernels
    timer = OperationTimer()
    start = time.perf_counter()
    with timer:
        for _ in range(args.repeats):
            step()
    wall = (time.perf_counter() - start) / args.repeats
    total = sum(timer.seconds.values()) / args.repeats
    print(f"{args.recipe} on {args.model}, batch {args.batch}, bf16 {bf16}: {wall * 1e3:.1f} ms per "
          f"step, {total * 1e3:.1f} ms inside operations")
    by_op = collections.defaultdict(float)
    for (name, *_), seconds in timer.seconds.items():
        by_op[name] += seconds / args.repeats
    print("\nper operation (ms per step):")
    for name, seconds in sorted(by_op.items(), key=lambda item: -item[1])[:20]:
        print(f"  {name:40s} {seconds * 1e3:8.2f}")
    print("\nper operation, first input and the inputs' layouts (ms per step, calls per step):")
    for key, seconds in sorted(timer.seconds.items(), key=lambda item: -item[1])[:args.top]:
        name, shape, dtype, layouts = key
        print(f"  {name:40s} {shape!s:22s} {dtype:9s} {layouts:16s} "
              f"{seconds / args.repeats * 1e3:8.2f}  x{timer.calls[key] // args.repeats}")


if __name__ == "__main__":
    main()
