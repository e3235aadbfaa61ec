"""Headline numbers from a results file: per-attack rows, the worst case, two runs side by side."""

from __future__ import annotations

import os

import numpy as np

from gradshield.evaluation.store import RunResults, load_run


def _rate(mask: np.ndarray, over: np.ndarray | None = None) -> float:
    if over is None:
        return float(mask.mean()) if mask.size else float("nan")
    return float((mask & over).sum() / over.sum()) if over.any() else float("nan")


def attack_rows(run: RunResults) -> list[dict]:
    """Per attack: robust accuracy, AR, cumulative worst case, perturbation size, queries, time."""
    rows = []
    for a, attack in enumerate(run.attacks):
        attacked = run.success[a] >= 0
        per_attack = run.meta["mode"] == "per-attack"
        robust = run.robust(a)
        cumulative = run.worst_case(range(a + 1))
        broken = run.success[a] == 1
        rows.append({
            **{k: attack[k] for k in ("id", "attack", "family", "norm", "label", "kind", "through",
                                      "eps")},
            "attacked": int(attacked.sum()),
            "robust_accuracy": _rate(robust) if per_attack else float("nan"),
            "ar": _rate(robust, run.clean_correct) if per_attack else float("nan"),
            "cumulative_robust_accuracy": _rate(cumulative),
            "success_rate": _rate(broken, attacked) if attacked.any() else float("nan"),
            "median_size_success": float(np.median(run.size[a][broken])) if broken.any() else float("nan"),
            "mean_queries": float(np.nanmean(run.queries[a])) if attacked.any() else float("nan"),
            "seconds_per_example": float(np.nanmean(run.seconds[a])) if attacked.any() else float("nan"),
        })
    return rows


def summarize(path_or_run: str | os.PathLike | RunResults) -> dict:
    """Headline numbers of a run: ACC, per-attack rows, worst case over all attacks."""
    run = path_or_run if isinstance(path_or_run, RunResults) else load_run(path_or_run)
    worst = run.worst_case()
    return {"path": str(run.path), "suite": run.meta.get("suite"), "mode": run.meta["mode"],
            "examples": run.n, "status": run.meta.get("status"),
            "batches_done": f"{run.complete_batches}/{run.total_batches}",
            "clean_accuracy": _rate(run.clean_correct),
            "worst_case_robust_accuracy": _rate(worst),
            "worst_case_ar": _rate(worst, run.clean_correct),
            "attacks": attack_rows(run)}


def compare_runs(a: str | os.PathLike | RunResults, b: str | os.PathLike | RunResults) -> dict:
    """Side by side: per attack id present in both, each run's numbers and, on the same examples,
    how many examples one run keeps robust and the other does not. A worst-case-mode run
    contributes its cumulative robustness after that attack (see ``modes``)."""
    ra = a if isinstance(a, RunResults) else load_run(a)
    rb = b if isinstance(b, RunResults) else load_run(b)
    same_data = ra.meta.get("data_fingerprint") == rb.meta.get("data_fingerprint")
    ids_b = {att["id"]: i for i, att in enumerate(rb.attacks)}
    rows = []
    for i, att in enumerate(ra.attacks):
        j = ids_b.get(att["id"])
        if j is None:
            continue
        x, y = ra.robust_or_cumulative(i), rb.robust_or_cumulative(j)
        row = {"id": att["id"], "a_robust_accuracy": _rate(x), "b_robust_accuracy": _rate(y)}
        if same_data:
            row.update(only_a_robust=int((x & ~y).sum()), only_b_robust=int((y & ~x).sum()))
        rows.append(row)
    return {"a": str(ra.path), "b": str(rb.path), "same_examples": same_data,
            "modes": (ra.meta["mode"], rb.meta["mode"]),
            "clean_accuracy": (_rate(ra.clean_correct), _rate(rb.clean_correct)),
            "worst_case_robust_accuracy": (_rate(ra.worst_case()), _rate(rb.worst_case())),
            "attacks": rows}


