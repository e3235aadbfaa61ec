"""Cost of one training step per defense recipe, as a ratio to a standard step.

One run times Standard, IGR and FGR (exact double backprop, and the finite-difference
method: igr-fd, fgr-fd), AT(k), ADT(k) and FGR+ADT(k) on the compact model, batch 256 of
real CIFAR-10 images, with bf16 autocast exactly as the training loop uses it and in float32.
Repeats are interleaved (round-robin over recipes) and summarised by medians (and minima, the
least disturbed by other processes on a shared machine), so a load change hits every recipe
alike. A step = recipe loss + backward + SGD update in
train mode (what :func:`gradshield.training.train` does per batch).

    .venv/bin/python benchmarks/bench_training_step.py --repeats 5 --out runs/training-step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from gradshield.data import load_dataset
from gradshield.defenses.recipes import make_recipe
from gradshield.models import create_model


def recipes(k: int) -> dict:
    return {
        "standard": make_recipe("standard"),
        "igr": make_recipe("igr"),
        "fgr": make_recipe("fgr"),
        "igr-fd": make_recipe("igr", method="finite_difference"),
        "fgr-fd": make_recipe("fgr", method="finite_difference"),
        f"at({k})": make_recipe("at", steps=k),
        f"adt({k})": make_recipe("adt", steps=k),
        f"fgr_adt({k})": make_recipe("fgr_adt", steps=k),
    }


def time_step(model, optimizer, recipe, x, y, bf16: bool) -> float:
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = recipe(model, x, y, generator)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--attack-steps", type=int, default=7, help="k for AT/ADT/FGR+ADT")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--precisions", default="bf16,fp32")
    parser.add_argument("--data", default="/work/shared/datasets")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    train, _ = load_dataset("cifar10", args.data)
    x, y = train.subset(args.batch_size, seed=0).as_float()
    x = x.contiguous(memory_format=torch.channels_last)
    model = create_model("compact", width=args.width).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)  # tiny lr: stay put
    table = recipes(args.attack_steps)
    precisions = args.precisions.split(",")
    times = {p: {name: [] for name in table} for p in precisions}
    for p in precisions:  # warm-up (allocator, oneDNN kernels)
        for recipe in table.values():
            time_step(model, optimizer, recipe, x, y, p == "bf16")
    for r in range(args.repeats):
        for p in precisions:
            for name, recipe in table.items():
                times[p][name].append(time_step(model, optimizer, recipe, x, y, p == "bf16"))
        print(f"repeat {r + 1}/{args.repeats} done", flush=True)
    result = {"batch_size": args.batch_size, "width": args.width, "repeats": args.repeats,
              "threads": torch.get_num_threads(), "torch": torch.__version__, "precisions": {}}
    for p in precisions:
        base = statistics.median(times[p]["standard"])
        base_min = min(times[p]["standard"])
        rows = {name: {"median_s": statistics.median(t), "ratio": statistics.median(t) / base,
                       "min_s": min(t), "ratio_of_minima": min(t) / base_min,
                       "all_s": [round(v, 4) for v in t]} for name, t in times[p].items()}
        result["precisions"][p] = rows
        print(f"\n{p}: seconds per step, median (ratio to standard) | min (ratio of minima)")
        for name, row in rows.items():
            print(f"  {name:12s} {row['median_s']:7.3f} s {row['ratio']:5.2f}x | "
                  f"{row['min_s']:7.3f} s {row['ratio_of_minima']:5.2f}x")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
