"""Record a training run in results/: accuracy-vs-time curve (PNG), table (Markdown) and JSON.

    python benchmarks/training_curve.py RUN_DIR --name training-cifar10 --out results/

RUN_DIR is a ``gradshield train --out`` folder (checkpoint.pt + metrics.jsonl). Everything written
comes from those files: the command, seed, model and data are read from the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from _common import cpu_name
from gradshield.checkpoint import read_checkpoint
from gradshield.training import CHECKPOINT_NAME, METRICS_NAME


def machine() -> str:
    return (f"{cpu_name()}, {torch.get_num_threads()} torch threads, {platform.python_version()}, "
            f"torch {torch.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--name", default="training-cifar10")
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--target", type=float, default=0.80, help="accuracy line to draw")
    args = parser.parse_args()

    blob = read_checkpoint(args.run_dir / CHECKPOINT_NAME)
    rows = [json.loads(line) for line in (args.run_dir / METRICS_NAME).read_text().splitlines()
            if line.strip()]
    cfg, model = blob["train_config"], blob["model_config"]
    reached = next((r for r in rows if r.get("test_acc", 0) >= args.target), None)
    summary = {
        "command": blob.get("command"), "dataset": blob.get("dataset"),
        "train_limit": blob.get("train_limit"), "model": model, "train_config": cfg,
        "recipe": blob.get("recipe"), "seed": cfg["seed"], "machine": machine(),
        "final_test_acc": rows[-1].get("test_acc"), "train_wall_time_s": rows[-1]["elapsed_s"],
        "target": args.target,
        "target_reached_at_s": reached["elapsed_s"] if reached else None,
        "epochs": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(summary, indent=1) + "\n")

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.plot([r["elapsed_s"] / 60 for r in rows], [100 * r["test_acc"] for r in rows], "o-",
            label=f"{model['arch']} x{model['width']}, seed {cfg['seed']}")
    ax.axhline(100 * args.target, color="grey", ls="--", lw=1, label=f"{args.target:.0%} target")
    ax.axvline(10, color="red", ls=":", lw=1, label="10 min budget")
    ax.set_xlabel("training wall time (min, incl. per-epoch test evaluation)")
    ax.set_ylabel("CIFAR-10 test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / f"{args.name}.png")

    lines = [
        f"# {args.name}", "",
        f"Produced by: `{blob.get('command')}`, then "
        f"`python benchmarks/training_curve.py {args.run_dir} --name {args.name}`.", "",
        f"- data: {blob.get('dataset')} (bundled JPEG archive), train subset: "
        f"{blob.get('train_limit') or 'all 50,000'}; test: all 10,000 test images",
        f"- model: `{model['arch']}` width {model['width']}, recipe `{blob['recipe']['name']}`, "
        f"seed {cfg['seed']}",
        f"- optimisation: {cfg['epochs']} epochs, batch {cfg['batch_size']}, peak lr {cfg['lr']}, "
        f"amp {cfg['amp']}, channels_last {cfg['channels_last']}",
        f"- machine: {summary['machine']}", "",
        f"**Final test accuracy {100 * summary['final_test_acc']:.2f} % after "
        f"{summary['train_wall_time_s'] / 60:.1f} min** of training wall time "
        f"(target {args.target:.0%} first reached at "
        + (f"{reached['elapsed_s'] / 60:.1f} min" if reached else "never") + ").", "",
        f"![curve]({args.name}.png)", "",
        "| epoch | train loss | test acc (%) | wall time (s) |", "|---|---|---|---|",
    ]
    lines += [f"| {r['epoch'] + 1} | {r['train_loss']:.4f} | {100 * r['test_acc']:.2f} "
              f"| {r['elapsed_s']:.0f} |" for r in rows]
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:12]))


if __name__ == "__main__":
    main()
