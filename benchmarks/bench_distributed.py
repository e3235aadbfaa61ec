"""Throughput of data-parallel training and sharded evaluation: N processes x T threads against
one process x N*T threads, on the same work, as ratios (> 1: the processes are faster); and the
CPU time per image of the N processes against one process of T threads (the processes' overhead).

Each configuration runs in fresh processes started alike (torch.multiprocessing, a gloo group;
one process joins a group of one, which is gradshield's one-process path). Inside, after a
barrier, the work is timed: ``train`` (one epoch of the training loop, compact net, CIFAR-10) and
``evaluate`` (``run_suite`` of a PGD suite, results merged by rank 0 included). The
configurations alternate, ``--repeats`` times each; a ratio is of the medians (images per
second); beside it the CPU time per image (all processes and threads: the processes' overhead
in work, less sensitive to other load on the machine than wall time, though threads that
spin-wait while descheduled count too), and the start-up (imports, data loading, joining the
group) as the median wall time of a whole launch. On a 2-core CPU two processes cannot be faster than one
process with two threads: the figure there is the overhead of the processes and their
communication. Usage::

    .venv/bin/python benchmarks/bench_distributed.py [--processes 2] [--threads 1] [--repeats 3]
        [--train-images 2048] [--eval-images 256] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from _common import dataset, load
from gradshield.machine import cpu_name

SUITE = """
name = "bench"
[[attack]]
attack = "pgd"
eps = "8/255"
steps = 10
random_start = true
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _work(rank: int, world: int, threads: int, port: int, what: str, settings: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from gradshield.evaluation import run_suite
        from gradshield.evaluation.suites import parse_suite
        from gradshield.models import create_model
        from gradshield.training import TrainConfig, train

        train_data, test_data, _ = dataset()
        scratch = Path(out).with_suffix("")
        torch.distributed.barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        if what == "train":
            torch.manual_seed(0)
            model = create_model("compact")
            config = TrainConfig(epochs=1, batch_size=settings["batch"], seed=0)
            train(model, train_data.subset(settings["train_images"], seed=0), None, config,
                  scratch / "run", progress=False, resume=False)
            images = settings["train_images"] // settings["batch"] * settings["batch"]
        else:
            model, _ = load()
            x, y = test_data.subset(settings["eval_images"], seed=0).as_float()
            run_suite(model, x, y, parse_suite(SUITE), scratch / "eval.db", batch_size=settings["batch"],
                      progress="none", gradient_figure=False)
            images = settings["eval_images"]
        seconds = time.perf_counter() - start
        cpu = torch.tensor([time.process_time() - cpu_start], dtype=torch.float64)
        torch.distributed.all_reduce(cpu)  # CPU seconds of all processes (all their threads)
        if rank == 0:
            Path(out).write_text(json.dumps({"seconds": seconds, "cpu_s": float(cpu), "images": images}))
    finally:
        torch.distributed.destroy_process_group()


def launch(world: int, threads: int, what: str, settings: dict) -> dict:
    """One launch of ``world`` processes x ``threads`` threads doing ``what``; its timings."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "timing.json")
        start = time.perf_counter()
        mp.start_processes(_work, args=(world, threads, _port(), what, settings, out), nprocs=world,
                           join=True, start_method="spawn")
        wall = time.perf_counter() - start
        timing = json.loads(Path(out).read_text())
    return {**timing, "launch_s": wall, "images_per_s": timing["images"] / timing["seconds"],
            "cpu_ms_per_image": 1000 * timing["cpu_s"] / timing["images"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="threads per process")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-images", type=int, default=2048)
    parser.add_argument("--eval-images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=128, help="global batch (training and evaluation)")
    parser.add_argument("--only", default="train,evaluate")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    settings = {"train_images": args.train_images, "eval_images": args.eval_images, "batch": args.batch}
    n, t = args.processes, args.threads
    configs = {f"{n} processes x {t} thread(s)": (n, t), f"1 process x {n * t} threads": (1, n * t),
               f"1 process x {t} thread(s)": (1, t)}
    report = {"cpu": cpu_name(), "cores": os.cpu_count(),
              "torch": torch.__version__, "settings": settings, "repeats": args.repeats, "work": {}}
    for what in args.only.split(","):
        runs = {name: [] for name in configs}
        for _ in range(args.repeats):  # alternate, so a load change hits both alike
            for name, (world, threads) in configs.items():
                runs[name].append(launch(world, threads, what, settings))
        rows = {name: {"images_per_s": statistics.median(r["images_per_s"] for r in rs),
                       "work_s": statistics.median(r["seconds"] for r in rs),
                       "cpu_ms_per_image": statistics.median(r["cpu_ms_per_image"] for r in rs),
                       "launch_s": statistics.median(r["launch_s"] for r in rs)}
                for name, rs in runs.items()}
        many, threaded, single = (rows[name] for name in configs)
        report["work"][what] = {
            "configs": rows,
            "throughput_processes_over_threads": many["images_per_s"] / threaded["images_per_s"],
            "cpu_per_image_processes_over_threads": many["cpu_ms_per_image"] / threaded["cpu_ms_per_image"],
            "cpu_per_image_processes_over_one": many["cpu_ms_per_image"] / single["cpu_ms_per_image"]}
        print(json.dumps({what: report["work"][what]}), file=sys.stderr, flush=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
