"""What :func:`gradshield.machine.keep_freed_memory` (called by the ``gradshield`` command) buys:
the same work timed in child processes with and without it, alternating, so a load change on the
shared machine hits both alike; a figure is the ratio of the medians over the rounds (kept / the
system's default allocator: below 1 is faster).

Work, each on real CIFAR-10 training images, the loop's precision (bf16 autocast where the CPU
has it), channels-last, after two untimed calls: one training step of the speedrun net at batch
512 and of the compact net at batch 256 (standard and FGR recipes, as
``bench_training_step.time_step``), and PGD-L-inf (10 steps, batch 128) on the compact net in
eval mode with the harness's ``overhead`` setting (the net's own predictions as labels, eps 1e-4:
no example is dropped).

    .venv/bin/python benchmarks/bench_allocator.py --rounds 4    # results/performance-<family>-allocator.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = ("speedrun step (512)", "compact step (256)", "compact fgr step (256)", "compact pgd-10 (128)")


def child(keep: bool, repeats: int) -> dict:
    """Seconds per call of each case (median of ``repeats``), in this process."""
    import torch

    from _common import images
    from bench_training_step import time_step
    from gradshield.attacks import pgd
    from gradshield.defenses.recipes import make_recipe
    from gradshield.machine import keep_freed_memory
    from gradshield.models import create_model
    from gradshield.training import bf16_is_fast

    applied = keep_freed_memory() if keep else False
    bf16 = bf16_is_fast()
    torch.manual_seed(0)
    work = {}
    for name, arch, batch, recipe in (("speedrun step (512)", "speedrun", 512, "standard"),
                                      ("compact step (256)", "compact", 256, "standard"),
                                      ("compact fgr step (256)", "compact", 256, "fgr")):
        x, y = images(batch, split="train")
        x = x.contiguous(memory_format=torch.channels_last)
        model = create_model(arch).to(memory_format=torch.channels_last).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)  # tiny lr: stay put
        step = make_recipe(recipe)
        work[name] = (lambda m=model, o=optimizer, s=step, x=x, y=y: time_step(m, o, s, x, y, bf16))
    model = create_model("compact").eval()
    x, _ = images(128)
    with torch.no_grad():
        y = model(x).argmax(1)  # its own predictions, a tiny budget: every step on the full batch

    def attack(model=model, x=x, y=y) -> float:
        start = time.perf_counter()
        pgd(model, x, y, eps=1e-4, steps=10)
        return time.perf_counter() - start

    work["compact pgd-10 (128)"] = attack
    times = {}
    for name, run in work.items():
        run(), run()
        times[name] = statistics.median(run() for _ in range(repeats))
    return {"applied": applied, "seconds": times}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="child pairs (kept, system), alternating")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case in each child")
    parser.add_argument("--out", default=None,
                        help="JSON file (default: results/performance-<family>-allocator.json)")
    parser.add_argument("--child", choices=("kept", "system"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child == "kept", args.repeats)))
        return {}

    from gradshield.machine import cpu_family, cpu_name

    runs = {"kept": [], "system": []}
    for r in range(args.rounds):
        for mode in ("kept", "system") if r % 2 == 0 else ("system", "kept"):
            done = subprocess.run([sys.executable, __file__, "--child", mode, "--repeats", str(args.repeats)],
                                  capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    if not all(run["applied"] for run in runs["kept"]):
        print("note: keep_freed_memory() did not apply here (not glibc, or GRADSHIELD_MALLOC=system)")
    result = {"command": " ".join(["python benchmarks/bench_allocator.py", *sys.argv[1:]]),
              "cpu": cpu_name(), "family": cpu_family(), "rounds": args.rounds,
              "repeats": args.repeats, "cases": {}}
    print(f"\n{cpu_name()} ({cpu_family()}): seconds per call, median over {args.rounds} children each")
    for case in CASES:
        kept = [run["seconds"][case] for run in runs["kept"]]
        system = [run["seconds"][case] for run in runs["system"]]
        ratio = statistics.median(kept) / statistics.median(system)
        result["cases"][case] = {"kept_s": kept, "system_s": system, "kept / system": round(ratio, 3)}
        print(f"  {case:24s} kept {statistics.median(kept):.4f}  system {statistics.median(system):.4f}"
              f"  kept / system {ratio:.3f}")
    out = Path(args.out or Path(__file__).resolve().parents[1] / "results" /
               f"performance-{cpu_family()}-allocator.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
