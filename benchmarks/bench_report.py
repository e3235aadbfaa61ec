"""Time ``gradshield report`` on a synthetic results file of 10,000 examples x 12 attacks.

The file is written with the runner's own schema (gradshield.evaluation.create_or_resume) and
filled with random outcomes, sizes and queries, a few example images per attack (additive and
flow), so the report has every section to draw. Usage::

    python benchmarks/bench_report.py [--examples 10000] [--attacks 12] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gradshield.evaluation.report import write_report
from gradshield.evaluation.store import CLEAN, array_blob, create_or_resume
from gradshield.evaluation.suites import parse_suite


def synthetic_suite(attacks: int):
    """Half PGD L-inf sweep, a quarter PGD L2, a quarter flow PGD (at least one of each)."""
    entries = []
    for i in range(attacks):
        kind = ("pgd", "linf") if i % 4 < 2 else (("pgd", "l2") if i % 4 == 2 else ("flow_pgd", "linf"))
        eps = (i + 1) / 255 if kind == ("pgd", "linf") else (i + 1) / 20
        entries.append(f'[[attack]]\nattack = "{kind[0]}"\nnorm = "{kind[1]}"\neps = {eps}\n'
                       f'id = "a{i}-{kind[0]}-{kind[1]}"\nlabel = "{eps:.3g}"\nsteps = 10\n')
    return parse_suite('name = "synthetic"\n' + "\n".join(entries), "synthetic")


def make_synthetic_run(path: str | Path, examples: int = 10_000, attacks: int = 12, seed: int = 0,
                       samples: int = 4, complete: bool = True) -> Path:
    """Write a results file with random (but plausible) outcomes; returns its path."""
    rng = np.random.default_rng(seed)
    suite = synthetic_suite(attacks)
    shape = (3, 32, 32)
    batch = 500
    identity = {"format": "gradshield-results", "schema_version": 1, "suite_digest": suite.digest,
                "model_fingerprint": "synthetic", "data_fingerprint": f"synthetic-{examples}",
                "examples": examples, "seed": seed, "mode": "per-attack", "batch_size": batch,
                "surrogate_fingerprint": None}
    info = {"suite": suite.name, "suite_origin": suite.origin, "suite_toml": suite.source,
            "command": "benchmarks/bench_report.py (synthetic)", "versions": {"torch": torch.__version__},
            "classes": [f"class{i}" for i in range(10)], "data": {"dataset": "synthetic"}}
    conn, _ = create_or_resume(path, identity, info, suite.attacks, shape)
    labels = rng.integers(0, 10, examples)
    correct = rng.random(examples) < 0.9
    with conn:
        conn.executemany("INSERT INTO examples VALUES (?,?,?,?)",
                         [(i, int(labels[i]), int(labels[i]) if correct[i] else int((labels[i] + 1) % 10),
                           int(correct[i])) for i in range(examples)])
        conn.executemany("INSERT INTO batches VALUES (?,?,?,?)",
                         [(CLEAN, b, batch, 0.1) for b in range(-(-examples // batch))])
        attacked = np.flatnonzero(correct)
        for a, spec in enumerate(suite.attacks):
            success = rng.random(attacked.size) < min(0.95, 0.1 + 0.07 * a)
            size = rng.random(attacked.size) * (spec.budget or 1.0)
            conn.executemany("INSERT INTO results VALUES (?,?,?,?,?,?)",
                             zip([a] * attacked.size, attacked.tolist(), success.astype(int).tolist(),
                                 size.tolist(), [11] * attacked.size, [0.002] * attacked.size,
                                 strict=True))
            conn.executemany("INSERT INTO batches VALUES (?,?,?,?)",
                             [(a, b, batch, 1.0) for b in range(-(-examples // batch))])
            flow = spec.attack == "flow_pgd"
            for j in attacked[:samples].tolist():
                x = torch.rand(shape)
                pert = torch.randn(2, 32, 32) * 0.1 if flow else (torch.rand(shape) - 0.5) * 0.06
                s, clean = array_blob(x)
                _, adv = array_blob((x + (0 if flow else pert)).clamp(0, 1))
                ps, pb = array_blob(pert)
                conn.execute("INSERT INTO samples VALUES (?,?,?,?,?,?,?,?)",
                             (a, j, 1, s, clean, adv, ps, pb))
        if complete:
            conn.execute("REPLACE INTO meta VALUES ('status', ?)", (json.dumps("complete"),))
    conn.close()
    return Path(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=10_000)
    parser.add_argument("--attacks", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = make_synthetic_run(Path(tmp) / "synthetic.db", args.examples, args.attacks)
        times = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            write_report([db], Path(tmp) / "report")
            times.append(time.perf_counter() - started)
        size = (Path(tmp) / "report" / "report.html").stat().st_size
    print(json.dumps({"examples": args.examples, "attacks": args.attacks,
                      "report_seconds": [round(t, 2) for t in times], "best_s": round(min(times), 2),
                      "html_bytes": size}))


if __name__ == "__main__":
    main()
