"""Does ``torch.compile`` help gradshield's hot passes on this machine? Eager vs compiled net,
channels-last: in eval mode a forward pass (score-based attacks, evaluation) and a forward +
input-gradient pass (every gradient attack); in train mode a training step (forward, backward to
the weights, an SGD step). Interleaved repeats, medians; compile time printed.

    .venv/bin/python benchmarks/bench_compile.py --model compact --batch 128 --repeats 8
    .venv/bin/python benchmarks/bench_compile.py --model speedrun --batch 512 --repeats 5 --cases train
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn import functional as F

from _common import images
from gradshield.models import create_model

CASES = ("forward", "forward+backward", "train")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="compact")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {CASES}")
    args = parser.parse_args(argv)
    cases = args.cases.split(",")
    if not set(cases) <= set(CASES):
        parser.error(f"--cases: choose from {', '.join(CASES)}")
    x, y = images(args.batch)
    x = x.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    eager = create_model(args.model).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(eager.parameters(), lr=1e-9, momentum=0.9, nesterov=True)

    def forward_backward(model):
        xr = x.clone().requires_grad_()
        torch.autograd.grad(F.cross_entropy(model(xr), y), xr)

    def forward(model):
        with torch.no_grad():
            model(x)

    def train_step(model):  # a tiny lr: the weights barely move between the repeats
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    fns = {"forward": forward, "forward+backward": forward_backward, "train": train_step}
    modes = {"forward": "eval", "forward+backward": "eval", "train": "train"}
    compiled = torch.compile(eager)
    start = time.perf_counter()
    for case in cases:  # one graph per mode and pass
        getattr(eager, modes[case])()
        fns[case](compiled)
    compile_s = time.perf_counter() - start
    times = {(c, m): [] for c in cases for m in ("eager", "compiled")}
    for _ in range(args.repeats):
        for case in cases:
            getattr(eager, modes[case])()
            for name, model in (("eager", eager), ("compiled", compiled)):
                t0 = time.perf_counter()
                fns[case](model)
                times[(case, name)].append(time.perf_counter() - t0)
    result = {"model": args.model, "compile_s": compile_s, "batch": args.batch,
              "threads": torch.get_num_threads()}
    print(f"{args.model}, batch {args.batch}: compile (first pass of each case) {compile_s:.1f} s")
    for case in cases:
        e, c = (statistics.median(times[(case, m)]) for m in ("eager", "compiled"))
        result[case] = {"eager_s": e, "compiled_s": c, "compiled_over_eager": c / e}
        print(f"{case:17s} eager {e * 1e3:7.1f} ms  compiled {c * 1e3:7.1f} ms  ratio {c / e:.2f}")
    return result


if __name__ == "__main__":
    main()
