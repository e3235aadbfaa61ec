"""Does ``torch.compile`` help gradshield's hot passes on this machine? Eager vs compiled compact
net, channels-last, eval mode: a forward pass (score-based attacks, evaluation) and a forward +
input-gradient pass (every gradient attack). Interleaved repeats, medians; compile time printed.

    .venv/bin/python benchmarks/bench_compile.py --batch 128 --repeats 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn import functional as F

from _common import images
from gradshield.models import create_model


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args(argv)
    x, y = images(args.batch)
    x = x.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    eager = create_model("compact").to(memory_format=torch.channels_last).eval()

    def forward_backward(model):
        xr = x.clone().requires_grad_()
        torch.autograd.grad(F.cross_entropy(model(xr), y), xr)

    def forward(model):
        with torch.no_grad():
            model(x)

    start = time.perf_counter()
    compiled = torch.compile(eager)
    forward_backward(compiled)
    forward(compiled)
    compile_s = time.perf_counter() - start
    cases = {"forward": forward, "forward+backward": forward_backward}
    times = {(c, m): [] for c in cases for m in ("eager", "compiled")}
    for _ in range(args.repeats):
        for case, fn in cases.items():
            for name, model in (("eager", eager), ("compiled", compiled)):
                t0 = time.perf_counter()
                fn(model)
                times[(case, name)].append(time.perf_counter() - t0)
    result = {"compile_s": compile_s, "batch": args.batch, "threads": torch.get_num_threads()}
    print(f"compile (first forward + backward and forward): {compile_s:.1f} s")
    for case in cases:
        e, c = (statistics.median(times[(case, m)]) for m in ("eager", "compiled"))
        result[case] = {"eager_s": e, "compiled_s": c, "compiled_over_eager": c / e}
        print(f"{case:17s} eager {e * 1e3:6.1f} ms  compiled {c * 1e3:6.1f} ms  ratio {c / e:.2f}")
    return result


if __name__ == "__main__":
    main()
