"""ImageNet scale on this machine: PGD-Linf at 224 px on ResNet-50, the streamed data pipeline,
and memory against the data set's size. Prints one JSON object (writes nothing).

- ``attack``: PGD-Linf 10 steps on torchvision's ResNet-50 (random init), batch 16 at 224x224:
  gradshield / torchattacks and gradshield / ideal (10 input-gradient passes), interleaved
  (``_common.time_interleaved``), the ``overhead`` setting of benchmarks/run.py (the model's own
  predictions as labels, eps 1e-4: nothing is dropped).
- ``data``: images/s of ``FileExamples.batches`` (JPEG decode, resize 256, center crop 224, in
  DataLoader workers) on a synthetic folder, against the images/s PGD consumes: the attack waits
  for data only if the first is smaller.
- ``memory``: peak RSS of a fresh process that scans, fingerprints and streams every image of a
  1,000- and a 10,000-image folder (the 10,000 are hard links of the 1,000 under other names, so
  making them costs nothing; a 96 px crop keeps the streaming short): flat if the pipeline
  never holds the data set.

With ``--out DIR`` the result is also written to ``DIR/performance-imagenet-<cpu family>.json``
and ``.md`` (targets: gradshield <= torchattacks, <= 1.05 x the ideal; data faster than the attack
consumes it; the 10,000-image peak within 5 % of the 1,000-image one).

Usage: .venv/bin/python benchmarks/bench_imagenet.py [--repeats 1] [--workers N] [--skip-attack]
    [--out results]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ideal, time_interleaved
from gradshield.machine import cpu_family, cpu_name

STEPS, BATCH = 10, 16


def make_folder(root: Path, n: int, classes: int = 100, size=(500, 375)) -> Path:
    """``n`` random JPEGs of ``size`` (W, H) (ImageNet's typical size) in ``classes`` folders."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / "val" / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        # smooth-ish content so JPEG sizes are realistic (pure noise compresses badly)
        small = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize(size, Image.BILINEAR).save(folder / f"{i}.JPEG", quality=85)
    return root


def linked_copies(source: Path, target: Path, copies: int) -> Path:
    for copy in range(copies):
        for file in (source / "val").rglob("*.JPEG"):
            dest = target / "val" / file.parent.name / f"c{copy}_{file.name}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.link(file, dest)
    return target


def attack(repeats: int) -> dict:
    import torchattacks

    from gradshield.attacks import pgd
    from gradshield.models import create_model

    torch.manual_seed(0)
    model = create_model("torchvision:resnet50").eval()
    x = torch.rand(BATCH, 3, 224, 224)
    with torch.no_grad():
        y = model(x).argmax(1)
    eps = 1e-4
    peer = torchattacks.PGD(model, eps=eps, alpha=2.5 * eps / STEPS, steps=STEPS, random_start=False)
    runs = {"ideal": lambda: ideal(model, x, y, STEPS), "torchattacks": lambda: peer(x, y),
            "gradshield": lambda: pgd(model, x, y, eps=eps, steps=STEPS)}
    times, _ = time_interleaved(runs, repeats)
    median = {k: float(np.median(v)) for k, v in times.items()}
    return {"seconds": median, "gradshield_vs_torchattacks": median["gradshield"] / median["torchattacks"],
            "gradshield_vs_ideal": median["gradshield"] / median["ideal"],
            "attack_images_per_s": BATCH / median["gradshield"], "repeats": repeats}


def data_rate(folder: Path, workers: int, n: int) -> dict:
    from gradshield.data import Preprocess, image_folder_split

    files = image_folder_split(folder, "val", Preprocess(crop=(224, 224), resize=256), workers=workers)
    ranges = [(a, min(a + BATCH, n)) for a in range(0, n, BATCH)]
    start = time.perf_counter()
    count = sum(x.shape[0] for x in files.batches(ranges))
    return {"images": count, "workers": workers, "images_per_s": count / (time.perf_counter() - start)}


def memory_child(folder: str, workers: int) -> None:
    from gradshield.data import Preprocess, image_folder_split

    files = image_folder_split(folder, "val", Preprocess(crop=(96, 96), resize=110), workers=workers)
    files.fingerprint  # noqa: B018  (stats every file)
    ranges = [(a, min(a + 64, len(files))) for a in range(0, len(files), 64)]
    total = sum(x.shape[0] for x in files.batches(ranges))
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"images": total, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                      / 1024, "peak_rss_worker_mib": children}))


def memory(folder: Path, workers: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--memory-child", str(folder), "--workers",
                          str(workers)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(result: dict, command: str) -> str:
    """The result as a table of figures against their targets."""
    rows = []
    if "attack" in result:
        a = result["attack"]
        rows += [("PGD-Linf 10 steps, ResNet-50, batch 16, 224 px: gradshield / torchattacks",
                  a["gradshield_vs_torchattacks"], "<= 1"),
                 ("the same: gradshield / ideal (10 input-gradient passes)", a["gradshield_vs_ideal"],
                  "<= 1.05"),
                 ("data images/s / attack images/s", result["data_vs_attack"], ">= 1")]
    small, large = result["memory"]["1000"], result["memory"]["10000"]
    for key, what in (("peak_rss_mib", "main process"), ("peak_rss_worker_mib", "largest decoding worker")):
        rows.append((f"peak memory, 10,000 / 1,000 images ({what}; {large[key]:.0f} / {small[key]:.0f} MiB)",
                     large[key] / small[key], "<= 1.05"))
    verdict = {"<= 1": lambda v: v <= 1, "<= 1.05": lambda v: v <= 1.05, ">= 1": lambda v: v >= 1}
    lines = [f"# ImageNet scale on {result['cpu']} ({cpu_family()}, {result['threads']} threads)", "",
             "Produced by:", "", f"    {command}", "",
             "Data: synthetic ImageNet-layout JPEGs made by the command (500x375, 100 classes; the "
             "10,000-image folder is hard links of the 1,000 under other names). Model: torchvision "
             "ResNet-50, random init (`torch.manual_seed(0)`). See the docstring of "
             "`benchmarks/bench_imagenet.py` for each measurement.", "",
             "| figure | value | target | result |", "|---|---|---|---|"]
    lines += [f"| {name} | {value:.3f} | {target} | {'PASS' if verdict[target](value) else 'MISS'} |"
              for name, value, target in rows]
    if "attack" in result:
        seconds = ", ".join(f"{k} {v:.2f} s" for k, v in result["attack"]["seconds"].items())
        lines += ["", f"Attack medians over {result['attack']['repeats']} interleaved repeats: {seconds}. "
                  f"Data pipeline: {result['data']['images_per_s']:.1f} images/s with "
                  f"{result['data']['workers']} workers."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-attack", action="store_true")
    parser.add_argument("--out", default=None,
                        help="also write performance-imagenet-<cpu family>.json/.md here")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.workers)
        return
    result = {"cpu": cpu_name(), "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        small = make_folder(Path(tmp) / "1k", 1000)
        large = linked_copies(small, Path(tmp) / "10k", 10)
        result["data"] = data_rate(small, args.workers, 256)
        result["memory"] = {"1000": memory(small, args.workers), "10000": memory(large, args.workers)}
    if not args.skip_attack:
        result["attack"] = attack(args.repeats)
        result["data_vs_attack"] = result["data"]["images_per_s"] / result["attack"]["attack_images_per_s"]
    print(json.dumps(result, indent=1))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"performance-imagenet-{cpu_family()}"
        command = " ".join([".venv/bin/python benchmarks/bench_imagenet.py", *sys.argv[1:]])
        stem.with_suffix(".json").write_text(json.dumps({"command": command, **result}, indent=1))
        stem.with_suffix(".md").write_text(markdown(result, command))


if __name__ == "__main__":
    main()
