"""Time gradshield's PGD-Linf (10 steps) against torchattacks' PGD and the ideal cost.

Same model, same batch, same settings (no random start, step 2.5 * eps / 10), in one process;
the three are run interleaved ``--repeats`` times and the medians are compared:

- ``ideal``: 10 forward + backward passes (gradient w.r.t. the input) of the bare model on the batch;
- ``torchattacks``: ``torchattacks.PGD(model, eps, alpha, steps=10, random_start=False)``;
- ``gradshield``: :func:`gradshield.attacks.pgd` (one clean forward, 10 gradient steps, one final
  forward; examples leave the batch once fooled).

Two rows: the given ``--eps`` with the true labels (gradshield skips clean-misclassified examples
and drops fooled ones), and ``eps = 1e-4`` with the model's own predictions as labels (nothing is
skipped and almost nothing is fooled: the engine's overhead with the full batch at every step).
Usage::

    python benchmarks/bench_attacks.py [--batch 256] [--repeats 5] [--eps 0.0314] [--checkpoint PATH]

Without ``--checkpoint`` the newest test-fixture checkpoint of the compact net is used if the
test suite has built one, else a randomly initialised compact net (the table says which).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from _common import batch, ideal, load, time_interleaved
from gradshield.attacks import pgd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import torchattacks

    model, model_name = load(args.checkpoint)
    x, labels, data_name = batch(args.batch)
    print(f"model: {model_name}; batch: {len(labels)} {data_name}; torch threads: {torch.get_num_threads()}; "
          f"repeats: {args.repeats} (interleaved, medians)")
    print(f"{'labels':>9} {'eps':>10} {'ideal s':>9} {'torchatt. s':>11} {'gradshield s':>12} "
          f"{'gs/ta':>7} {'gs/ideal':>8} {'ta/ideal':>8} {'fooled gs':>9} {'fooled ta':>9}")
    with torch.no_grad():
        predicted = model(x).argmax(1)
    for eps, y in ((args.eps, labels), (1e-4, predicted)):
        alpha = 2.5 * eps / 10
        attack = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=10, random_start=False)
        runs = {"ideal": lambda y=y: ideal(model, x, y),
                "ta": lambda attack=attack, y=y: attack(x, y),
                "gs": lambda eps=eps, y=y: pgd(model, x, y, eps=eps, steps=10)}
        ideal(model, x, y, steps=2)  # warm-up
        times, outputs = time_interleaved(runs, args.repeats)
        med = {key: statistics.median(values) for key, values in times.items()}
        with torch.no_grad():
            fooled_ta = float((model(outputs["ta"]).argmax(1) != y).float().mean())
        fooled_gs = outputs["gs"].success_rate
        gs, ta, best = med["gs"], med["ta"], med["ideal"]
        name = "true" if y is labels else "predicted"
        print(f"{name:>9} {eps:>10.4g} {best:>9.3f} {ta:>11.3f} {gs:>12.3f} {gs / ta:>7.2f} "
              f"{gs / best:>8.2f} {ta / best:>8.2f} {fooled_gs:>9.1%} {fooled_ta:>9.1%}")


if __name__ == "__main__":
    main()
