"""The FGR paper's CIFAR-10 comparison, scaled to a CPU: Standard, AT, IGR (3 lambdas), ADT,
FGR (3 lambdas) and FGR+ADT, each trained with the one training loop and attacked with the
flow single-step (SS), multi-step (MS), stAdv (OB, c = 10) and evolution-strategies (GF, c = 10)
attacks at the flow budget 0.01 in grid_sample units (0.155 px at 32 px).

ONE command runs everything and resumes after a kill: each model's training resumes from its
epoch checkpoint (:func:`gradshield.training.train`); each evaluation is a resumable per-example
results file of :func:`gradshield.evaluation.run_suite` (a killed run loses at most one batch);
the report (``results/fgr-cifar10.md``, ``.json``, PNG figures) is rewritten after every model.

    .venv/bin/python benchmarks/fgr_experiment.py                  # the scaled setting
    .venv/bin/python benchmarks/fgr_experiment.py --report-only    # rebuild the report

Models are trained and evaluated in priority order (Standard, FGR, IGR, AT, ADT, FGR+ADT, then the
other lambdas), so an interrupted run has the most informative comparisons first. Phase 2 (after
every model's table) adds the curves: robust accuracy over the flow budget (MS) and over c (OB),
like the paper's Figure 2, and the loss along the adversarial and a random flow direction
(Figure 3).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

import gradshield.attacks as attacks
from gradshield.checkpoint import load_model, read_checkpoint
from gradshield.data import load_dataset
from gradshield.defenses.recipes import make_recipe
from gradshield.defenses.regularizers import flow_gradient, paper_fgr_lambda
from gradshield.evaluation import run_suite, summarize
from gradshield.models import create_model
from gradshield.paths import cache_dir
from gradshield.suites import Suite, parse_suite
from gradshield.training import CHECKPOINT_NAME, TrainConfig, train
from gradshield.utils import derived_generator, eval_mode
from gradshield.warp import normalized_to_pixels, warp

REPO = Path(__file__).resolve().parents[1]
EPS_NORMALIZED = 0.01
FGR_PAPER_LAMBDAS = (100.0, 200.0, 300.0)  # the paper code's --fgr_lamb (batch-mean loss, B=128)
IGR_LAMBDAS = (0.05, 0.15, 0.5)            # [0, 1]-scale input gradient, per-example mean
SWEEP_EPS = (0.0025, 0.005, 0.01, 0.02, 0.04)  # normalised units
SWEEP_C = (1.0, 10.0, 100.0)
CLEAN_TOLERANCE = 0.03  # "similar clean accuracy" for the FGR-vs-IGR pairing
TABLE_ATTACKS = {"flow-SS": "SS", "flow-MS": "MS", "flow-OB-stAdv": "OB",
                 "flow-GF-evolution": "GF"}


def model_specs(train_attack_steps: int) -> list[dict]:
    """(key, label, recipe name, options), in training priority order."""
    fgr = {p: paper_fgr_lambda(p) for p in FGR_PAPER_LAMBDAS}
    k = train_attack_steps
    specs = [
        ("standard", "Standard", "standard", {}),
        ("fgr-300", "FGR (lam 300/128^2)", "fgr", {"lam": fgr[300.0]}),
        ("igr-0.15", "IGR (lam 0.15)", "igr", {"lam": 0.15}),
        ("at", f"AT (PGD-Linf 8/255, {k} steps)", "at", {"steps": k}),
        ("adt", f"ADT (flow 0.01, {k} steps)", "adt", {"steps": k}),
        ("fgr_adt", f"FGR+ADT (lam 300/128^2, {k} steps)", "fgr_adt",
         {"steps": k, "lam": fgr[300.0]}),
        ("fgr-100", "FGR (lam 100/128^2)", "fgr", {"lam": fgr[100.0]}),
        ("igr-0.05", "IGR (lam 0.05)", "igr", {"lam": 0.05}),
        ("fgr-200", "FGR (lam 200/128^2)", "fgr", {"lam": fgr[200.0]}),
        ("igr-0.5", "IGR (lam 0.5)", "igr", {"lam": 0.5}),
        # the same FGR trained with the finite-difference penalty gradient (~2x cheaper a step)
        ("fgr-300-fd", "FGR, finite-difference gradient (lam 300/128^2)", "fgr",
         {"lam": fgr[300.0], "method": "finite_difference"}),
        ("fgr-100-fd", "FGR, finite-difference gradient (lam 100/128^2)", "fgr",
         {"lam": fgr[100.0], "method": "finite_difference"}),
    ]
    return [dict(zip(("key", "label", "recipe", "options"), s, strict=True)) for s in specs]


# --------------------------------------------------------------------------- suites


def _entry(attack_id: str, attack: str, **settings) -> str:
    body = "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())
    return f'[[attack]]\nid = "{attack_id}"\nattack = "{attack}"\n{body}'


def table_suites(args) -> list[tuple[str, Suite]]:
    """The paper's table as two resumable parts: the gradient attacks SS + MS, then OB + GF.

    OB = stAdv with SGD and c = 10 (:data:`gradshield.attacks.FGR_PAPER`; unbounded, the
    smoothness term keeps the flow small) for ``--ob-steps`` iterations; GF = NES evolution
    strategies inside the same 0.01 (0.155 px) L-inf flow budget, margin loss, ``--gf-samples``
    antithetic pairs x ``--gf-steps`` steps (gradshield's ES is budget-constrained: the paper's
    c has no counterpart there)."""
    ms_id = "ss-ms" if args.ms_steps == 20 else f"ss-ms{args.ms_steps}"
    gradient = _entry("flow-SS", "flow_single_step", norm="linf", eps_normalized=EPS_NORMALIZED)
    gradient += _entry("flow-MS", "flow_pgd", norm="linf", eps_normalized=EPS_NORMALIZED,
                       steps=args.ms_steps)
    other = _entry("flow-GF-evolution", "evolution_strategies", space="flow", norm="linf",
                    eps_normalized=EPS_NORMALIZED, samples=args.gf_samples, steps=args.gf_steps)
    return [(ms_id, parse_suite(gradient, "fgr_experiment:table-gradient")),
            ("gf", parse_suite(other, "fgr_experiment:table-gf"))]


def run_direct(model, x, y, attack_id: str, fn, path: Path, *, batch: int = 250) -> dict:
    """Run ``fn(model, x, y)`` batch by batch, saving per-example success after every batch to
    ``path`` (JSON) so a kill loses at most one batch. For attacks the suite runner cannot take
    (stAdv has no budget ``eps``). Returns {"robust_accuracy", "ar", ...} once complete."""
    state = json.loads(path.read_text()) if path.is_file() else {"id": attack_id, "success": [],
                                                                    "clean_correct": []}
    from gradshield.metrics import predict

    for begin in range(len(state["success"]), x.shape[0], batch):
        xb, yb = x[begin:begin + batch], y[begin:begin + batch]
        t0 = time.perf_counter()
        result = fn(model, xb, yb)
        state["success"] += result.success.int().tolist()
        state["clean_correct"] += (predict(model, xb) == yb).int().tolist()
        state.setdefault("seconds", []).append(time.perf_counter() - t0)
        path.write_text(json.dumps(state))
        print(f"  {attack_id}: {len(state['success'])}/{x.shape[0]}", flush=True)
    success = torch.tensor(state["success"], dtype=torch.bool)
    correct = torch.tensor(state["clean_correct"], dtype=torch.bool)
    robust = correct & ~success
    return {"robust_accuracy": float(robust.float().mean()),
            "ar": float(robust.sum() / correct.sum().clamp_min(1)),
            "seconds_per_example": sum(state["seconds"]) / len(state["success"])}


def stadv_attack(c: float, steps: int):
    def run(model, x, y):
        return attacks.stadv(model, x, y, **{**attacks.FGR_PAPER, "c": c}, steps=steps)
    return run


def sweep_suites(args) -> list[tuple[str, Suite]]:
    """Curves like the paper's Figure 2: MS over the flow budget, OB (stAdv) over c."""
    eps = "".join(_entry(f"MS-{e}", "flow_pgd", norm="linf", eps_normalized=e,
                         steps=args.ms_steps) for e in SWEEP_EPS)
    return [("sweep-eps", parse_suite(eps, "fgr_experiment:sweep-eps"))]


# --------------------------------------------------------------------------- training


def train_one(spec: dict, args, train_data, run_dir: Path):
    """Train (or resume, or find finished) one model; returns it in eval mode on args.device."""
    recipe = make_recipe(spec["recipe"], **spec["options"])
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         seed=args.seed, amp=args.amp)
    torch.manual_seed(args.seed)
    model = create_model(args.arch, width=args.width).to(args.device)
    print(f"[{spec['key']}] training (resumes / skips when done) {recipe.describe()}", flush=True)
    train(model, train_data, None, config, run_dir, recipe=recipe, progress=args.progress,
          extra_metadata={"experiment": "fgr-cifar10", "key": spec["key"]})
    model, blob = load_model(run_dir / CHECKPOINT_NAME)
    return model.to(args.device), blob


# --------------------------------------------------------------------------- loss curves


def loss_curves(model, x, y, *, eps_px: float, seed: int) -> dict:
    """Mean cross-entropy along t * d for t in [0, 4 eps]: d = the steepest-ascent L-inf flow
    direction at the identity, sign(dL/dv) (every example, even misclassified ones), and d = a
    random sign flow (each component +-1)."""
    with eval_mode(model):
        _, grad = flow_gradient(model, x, y, unit="pixels")
    gen = derived_generator(seed, 99)
    directions = {"adversarial": grad.sign(),
                  "random": (torch.randint(0, 2, grad.shape, generator=gen).float() * 2 - 1
                             ).to(grad.device)}
    ts = [i * eps_px / 4 for i in range(17)]  # 0 .. 4 eps, in pixels
    out = {"t_pixels": ts, "t_normalized": [t / normalized_to_pixels(1.0, x.shape[-1]) for t in ts]}
    with eval_mode(model), torch.no_grad():
        for name, d in directions.items():
            out[name] = [float(F.cross_entropy(model(warp(x, t * d)), y)) for t in ts]
    return out


# --------------------------------------------------------------------------- report


def load_summary(db: Path) -> dict | None:
    return summarize(db) if db.is_file() else None


def collect(args, specs: list[dict]) -> dict:
    out_dir = Path(args.out_dir)
    models = {}
    for spec in specs:
        run_dir = out_dir / spec["key"]
        row = {"label": spec["label"], "recipe": spec["recipe"], "options": spec["options"]}
        ckpt = run_dir / CHECKPOINT_NAME
        if ckpt.is_file():
            blob = read_checkpoint(ckpt)
            row["epochs_done"] = blob["epoch"] + 1
            row["train_seconds"] = round(blob["elapsed_s"], 1)
            row["final_train_loss"] = blob["metrics"][-1]["train_loss"]
        for db in sorted(run_dir.glob("eval-*.db")):
            part = db.stem[len("eval-"):]
            summary = load_summary(db)
            row.setdefault("clean_accuracy", summary["clean_accuracy"])
            row.setdefault("eval_examples", summary["examples"])
            row[f"{part}_status"] = f"{summary['status']} ({summary['batches_done']} batches)"
            correct = round(summary["clean_accuracy"] * summary["examples"])
            for a in summary["attacks"]:
                if a["attacked"] != correct:  # unfinished: its robust accuracy is not final
                    continue
                row.setdefault("attacks", {})[a["id"]] = {
                    "robust_accuracy": a["robust_accuracy"], "ar": a["ar"],
                    "seconds_per_example": a["seconds_per_example"]}
        for direct in sorted(run_dir.glob("direct-*.json")):
            state = json.loads(direct.read_text())
            success = torch.tensor(state["success"], dtype=torch.bool)
            correct = torch.tensor(state["clean_correct"], dtype=torch.bool)
            n_total = args.test_size if state["id"] == "flow-OB-stAdv" else args.sweep_size
            row[f"{direct.stem}_status"] = f"{len(success)}/{n_total} examples"
            if len(success) == n_total:
                robust = correct & ~success
                row.setdefault("attacks", {})[state["id"]] = {
                    "robust_accuracy": float(robust.float().mean()),
                    "ar": float(robust.sum() / correct.sum().clamp_min(1)),
                    "seconds_per_example": sum(state["seconds"]) / len(success)}
        curves = run_dir / "loss-curves.json"
        if curves.is_file():
            row["loss_curves"] = json.loads(curves.read_text())
        models[spec["key"]] = row
    return models


def _acc(row: dict, attack_id: str) -> float:
    value = row.get("attacks", {}).get(attack_id, {}).get("robust_accuracy")
    return float("nan") if value is None else value


def per_example_robust(run_dir: Path, attack_id: str):
    """Per-example 'correct after the attack' (numpy bool) of a finished attack, else None."""
    import numpy as np

    from gradshield.evaluation import load_run

    for db in sorted(run_dir.glob("eval-*.db")):
        run = load_run(db)
        for a, attack in enumerate(run.attacks):
            if attack["id"] == attack_id and (run.success[a] >= 0).sum() == run.clean_correct.sum():
                return run.robust(a)
    for direct in sorted(run_dir.glob("direct-*.json")):
        state = json.loads(direct.read_text())
        if state["id"] == attack_id:
            return np.array(state["clean_correct"], bool) & ~np.array(state["success"], bool)
    return None


def paired(out_dir: Path, a_key: str, b_key: str, attack_id: str) -> str:
    """'+0.031 +- 0.017 (significant)': mean paired difference of a over b on the same images
    and its 95 % half-width (1.96 x standard error of the per-image differences)."""
    ra = per_example_robust(out_dir / a_key, attack_id)
    rb = per_example_robust(out_dir / b_key, attack_id)
    if ra is None or rb is None or ra.shape != rb.shape:
        return "n/a"
    d = ra.astype(float) - rb.astype(float)
    half = 1.96 * d.std(ddof=1) / math.sqrt(d.size)
    word = "significant" if abs(d.mean()) > half else "within noise"
    return f"{d.mean():+.3f} +- {half:.3f} ({word})"


def claims(models: dict, out_dir: Path) -> list[str]:
    """The paper's claims, tested on what has been measured (plain words, nothing assumed).
    Differences are paired over the same test images with a 95 % interval."""
    lines = []
    table = ["flow-SS", "flow-MS", "flow-OB-stAdv", "flow-GF-evolution"]

    def measured(key):
        return key in models and "clean_accuracy" in models[key]

    fgrs = [k for k in models if k.startswith("fgr-") and measured(k)]
    igrs = [k for k in models if k.startswith("igr-") and measured(k)]
    if fgrs and igrs:
        # pair each FGR with the IGR of closest clean accuracy
        for f in fgrs:
            i = min(igrs, key=lambda k: abs(models[k]["clean_accuracy"] - models[f]["clean_accuracy"]))
            wins, losses, missing = [], [], []
            for a in table:
                fa, ia = _acc(models[f], a), _acc(models[i], a)
                if math.isnan(fa) or math.isnan(ia):
                    missing.append(TABLE_ATTACKS[a])
                elif fa > ia:
                    wins.append(TABLE_ATTACKS[a])
                else:
                    losses.append(TABLE_ATTACKS[a])
            gap = models[f]["clean_accuracy"] - models[i]["clean_accuracy"]
            verdict = ("HOLDS" if not losses and not missing else
                       "DOES NOT HOLD" if losses else "PARTLY MEASURED")
            if abs(gap) > CLEAN_TOLERANCE:
                verdict += (f" (but the clean accuracies differ by more than {CLEAN_TOLERANCE:.2f}, "
                            "so this is not a like-for-like comparison)")
            diffs = "; ".join(f"{TABLE_ATTACKS[a]} {paired(out_dir, f, i, a)}" for a in table)
            lines.append(f"- FGR above IGR on all four flow attacks at similar clean accuracy "
                         f"({f} vs {i}, clean gap {gap:+.3f}): {verdict} — FGR higher on "
                         f"{wins or 'none'}, not higher on {losses or 'none'}"
                         f"{f', not measured: {missing}' if missing else ''}. Paired "
                         f"differences FGR - IGR: {diffs}.")
    else:
        lines.append("- FGR vs IGR: not measured yet (needs at least one FGR and one IGR model).")
    if fgrs and measured("at"):
        at_clean = models["at"]["clean_accuracy"]
        f = min(fgrs, key=lambda k: abs(models[k]["clean_accuracy"] - at_clean))
        for a in ("flow-OB-stAdv", "flow-GF-evolution"):
            fa, aa = _acc(models[f], a), _acc(models["at"], a)
            if math.isnan(fa) or math.isnan(aa):
                lines.append(f"- FGR above AT on {TABLE_ATTACKS[a]}: not measured yet.")
            else:
                lines.append(f"- FGR above AT on {TABLE_ATTACKS[a]} ({f}, the FGR of closest clean "
                             f"accuracy: {fa:.3f} vs AT {aa:.3f}, "
                             f"paired {paired(out_dir, f, 'at', a)}): "
                             f"{'HOLDS' if fa > aa else 'DOES NOT HOLD'}.")
    else:
        lines.append("- FGR vs AT on OB/GF: not measured yet.")
    exact_fgrs = [k for k in models if k.startswith("fgr-") and not k.endswith("-fd") and measured(k)]
    for fd in [k for k in models if k.endswith("-fd") and measured(k)]:
        same_lam = fd[:-len("-fd")]
        closest = min(exact_fgrs, default=None, key=lambda k: abs(
            models[k]["clean_accuracy"] - models[fd]["clean_accuracy"]))
        for exact, why in ((same_lam, "same lambda"), (closest, "closest clean accuracy")):
            if exact is None or not measured(exact) or (why != "same lambda" and exact == same_lam):
                continue
            gap = models[fd]["clean_accuracy"] - models[exact]["clean_accuracy"]
            diffs = "; ".join(f"{TABLE_ATTACKS[a]} {paired(out_dir, fd, exact, a)}" for a in table)
            lines.append(f"- Finite-difference FGR gradient vs exact double backpropagation ({fd} vs "
                         f"{exact}, {why}, same setting and seed): clean {gap:+.3f}; paired "
                         f"differences fd - exact: {diffs}.")
    done = [k for k in models if measured(k)]
    if "fgr_adt" in done and len(done) > 1:
        ranks = []
        for a in table:
            values = {k: _acc(models[k], a) for k in done}
            if any(math.isnan(v) for v in values.values()):
                continue
            order = sorted(values, key=values.get, reverse=True)
            ranks.append(f"{TABLE_ATTACKS[a]}: rank {order.index('fgr_adt') + 1}/{len(order)}"
                         f" (best {order[0]} {values[order[0]]:.3f}, FGR+ADT "
                         f"{values['fgr_adt']:.3f})")
        lines.append("- FGR+ADT best or near best overall: " + ("; ".join(ranks) or
                                                                "no attack measured on all models yet")
                     + ".")
    else:
        lines.append("- FGR+ADT best or near best: not measured yet.")
    return lines


def cost_section(bench: Path) -> list[str]:
    """Markdown lines of the training-step cost table from bench_training_step's JSON
    (none when the file is missing)."""
    if not bench.is_file():
        return []
    data = json.loads(bench.read_text())
    lines = ["", "## Cost of one training step (ratio to a standard step)", "",
             f"`python benchmarks/bench_training_step.py --repeats {data['repeats']} --out "
             f"{bench.relative_to(REPO) if bench.is_relative_to(REPO) else bench}`: compact "
             f"model, batch {data['batch_size']}, {data['threads']} threads, interleaved "
             "repeats on the shared 2-core CPU (medians; the minima are the least disturbed "
             "by other processes).", "",
             "| recipe | " + " | ".join(f"{p} median s | {p} ratio | {p} ratio of minima"
                                         for p in data["precisions"]) + " |",
             "|---|" + "---|---|---|" * len(data["precisions"])]
    names = list(next(iter(data["precisions"].values())))
    for name in names:
        cells = []
        for rows in data["precisions"].values():
            r = rows[name]
            cells += [f"{r['median_s']:.3f}", f"{r['ratio']:.2f}x",
                     f"{r.get('ratio_of_minima', float('nan')):.2f}x"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def write_report(args, specs: list[dict], command: str) -> dict:
    models = collect(args, specs)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    setting = {"model": args.arch, "width": args.width, "epochs": args.epochs,
               "train_size": args.train_size, "test_examples": args.test_size,
               "batch_size": args.batch_size, "lr": args.lr, "amp": args.amp, "seed": args.seed,
               "train_attack_steps": args.train_attack_steps, "ms_steps": args.ms_steps,
               "sweep_examples": args.sweep_size, "flow_budget_normalized": EPS_NORMALIZED,
               "flow_budget_pixels": normalized_to_pixels(EPS_NORMALIZED, 32)}
    payload = {"setting": setting, "command": command, "models": models,
               "claims": claims(models, Path(args.out_dir)), "updated": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                  time.gmtime())}
    results.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    figures = plot_figures(models, results)
    lines = [
        "# FGR and baseline training defenses on CIFAR-10 (CPU-scaled)", "",
        f"Updated {payload['updated']} by `{command}`.", "",
        "## Setting", "",
        f"- Model `{args.arch}` (width {args.width}), trained from scratch {args.epochs} epochs on a "
        f"{args.train_size}-image subset of the CIFAR-10 training set (seed {args.seed}), batch "
        f"{args.batch_size}, SGD-Nesterov peak lr {args.lr}, bf16 autocast = `{args.amp}`, "
        "standard crop+flip augmentation (the one training loop).",
        f"- Evaluation on a fixed seeded random subset of {args.test_size} CIFAR-10 test images "
        f"(budget / c sweeps: its first {args.sweep_size}; loss curves: its first "
        f"{min(200, args.sweep_size)}), float32, eval mode, one seed. Flow budget 0.01 in grid_sample "
        "units (align_corners=True) = 0.155 px per component (L-inf), border padding.",
        f"- Attacks: SS = one flow sign step of 0.155 px; MS = {args.ms_steps}-step flow PGD "
        f"(step 2.5 eps / steps); OB = stAdv, SGD, c = 10, {args.ob_steps} steps (unbounded: "
        "its smoothness term keeps the flow small); GF = NES evolution strategies in the "
        f"0.155 px budget ({args.gf_samples} antithetic pairs x {args.gf_steps} steps, margin "
        "loss; gradshield's ES has no c). Numbers are robust accuracy (share of all evaluated "
        "images classified correctly after the attack).",
        f"- Training adversaries (AT, ADT, FGR+ADT): {args.train_attack_steps} steps, generated "
        "in eval mode under the loop's bf16 autocast (measured to match float32 attacks; see "
        "`gradshield.defenses.recipes`).",
        "- FGR lambda in per-example normalised-unit form: lam = paper_lam / 128^2 (the paper "
        "code penalises the gradient of the batch-MEAN loss at batch 128). IGR lambda on the "
        "[0, 1]-scale input gradient, per-example mean.", "",
        "## Table (robust accuracy; clean = no attack)", "",
        "| model | clean | SS | MS | OB | GF | epochs | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def fmt(v):
        return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    for spec in specs:
        row = models[spec["key"]]
        cells = [fmt(row.get("clean_accuracy"))] + [fmt(_acc(row, a)) for a in TABLE_ATTACKS]
        lines.append(f"| {row['label']} | " + " | ".join(cells)
                     + f" | {row.get('epochs_done', 0)}/{args.epochs} | "
                     f"{row.get('train_seconds', '—')} |")
    lines += ["", "AR = share of the clean-correct images that stay correct (the attack's own "
              "effect, independent of clean accuracy):", "",
              "| model | SS | MS | OB | GF |", "|---|---|---|---|---|"]
    for spec in specs:
        row = models[spec["key"]]
        cells = [fmt(row.get("attacks", {}).get(a, {}).get("ar")) for a in TABLE_ATTACKS]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    lines += ["", "## The paper's claims, tested", ""] + payload["claims"]
    lines += ["", "## Figures", "", "Produced by the command above (phase 2, after the table).", ""]
    lines += [f"![{name}]({Path(path).name})" for name, path in figures.items()] or ["(none yet)"]
    lines += ["", "## Status", ""]
    for spec in specs:
        row = models[spec["key"]]
        parts = [f"{k[:-len('_status')]}: {v}" for k, v in row.items() if k.endswith("_status")]
        lines.append(f"- {spec['key']}: trained {row.get('epochs_done', 0)}/{args.epochs} epochs; "
                     + ("; ".join(parts) if parts else "not evaluated yet"))
    lines += cost_section(results.parent / f"{results.name}.bench.json")
    notes = results.parent / f"{results.name}.notes.md"
    if notes.is_file():
        lines += ["", notes.read_text().strip()]
    lines += ["", "## Full-size setting (needs a GPU; not run here)", "",
              "The paper trains VGG-11 on all 50k CIFAR-10 images for 80 epochs (batch 128, "
              "SGD lr 0.01, momentum 0.9, weight decay 5e-4, step decay; here the loop's warm-up + "
              "linear decay) and evaluates on the 10k test images. The same script does it on a "
              "GPU machine, with the library's default attack strengths (7-step training "
              "adversaries, stAdv 200 steps, ES 10 x 50):", "",
              "```",
              "python benchmarks/fgr_experiment.py --arch vgg11 --device cuda --train-size 50000 "
              "--epochs 80 --batch-size 128 --lr 0.01 --train-attack-steps 7 --test-size 10000 "
              "--ob-steps 200 --gf-samples 10 --gf-steps 50 --sweep-size 1000 "
              "--out-dir runs/fgr-vgg11 --results results/fgr-cifar10-vgg11",
              "```", ""]
    results.with_suffix(".md").write_text("\n".join(lines))
    return payload


def plot_figures(models: dict, results: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figures = {}
    sweep_eps = {k: [(_acc(r, f"MS-{e}"), e) for e in SWEEP_EPS] for k, r in models.items()}
    sweep_eps = {k: v for k, v in sweep_eps.items() if not any(math.isnan(a) for a, _ in v)}
    sweep_c = {k: [(_acc(r, f"OB-c{c}"), c) for c in SWEEP_C] for k, r in models.items()}
    sweep_c = {k: v for k, v in sweep_c.items() if not any(math.isnan(a) for a, _ in v)}
    if sweep_eps or sweep_c:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for k, v in sweep_eps.items():
            axes[0].plot([e for _, e in v], [a for a, _ in v], marker="o", label=k)
        axes[0].set(xscale="log", xlabel="flow budget (grid_sample units; x15.5 = px)",
                    ylabel="robust accuracy (MS)", title="Multi-step flow attack vs budget")
        axes[0].set_xticks(SWEEP_EPS, [f"{e:g}" for e in SWEEP_EPS])
        axes[0].minorticks_off()
        for k, v in sweep_c.items():
            axes[1].plot([c for _, c in v], [a for a, _ in v], marker="o", label=k)
        axes[1].set(xscale="log", xlabel="c", ylabel="robust accuracy (OB, stAdv)",
                    title="Optimisation-based attack vs c")
        for ax in axes:
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.tight_layout()
        path = results.parent / f"{results.name}-curves.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        figures["robust accuracy vs budget and c (cf. paper Fig. 2)"] = str(path)
    curves = {k: r["loss_curves"] for k, r in models.items() if "loss_curves" in r}
    if curves:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for ax, direction in zip(axes, ("adversarial", "random"), strict=True):
            for k, c in curves.items():
                ax.plot(c["t_normalized"], c[direction], label=k)
            ax.axvline(EPS_NORMALIZED, color="grey", ls=":", lw=1)
            ax.set(xlabel="step along the direction (grid_sample units)",
                   title=f"loss along the {direction} flow direction")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("mean cross-entropy")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        path = results.parent / f"{results.name}-loss-directions.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        figures["loss along adversarial / random flow directions (cf. paper Fig. 3)"] = str(path)
    return figures


# --------------------------------------------------------------------------- main


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default=str(cache_dir() / "fgr-cifar10"),
                        help="checkpoints and per-example results (default: %(default)s)")
    parser.add_argument("--results", default=str(REPO / "results" / "fgr-cifar10"),
                        help="report path without suffix (.md, .json, -*.png)")
    parser.add_argument("--data", default="/work/shared/datasets")
    parser.add_argument("--train-size", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--arch", default="compact", help="architecture (compact, vgg11, resnet18)")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--amp", default="bf16", choices=("auto", "bf16", "off"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-attack-steps", type=int, default=7)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--ms-steps", type=int, default=20, help="MS iterations (paper: 20; 100)")
    parser.add_argument("--ob-steps", type=int, default=50, help="stAdv (SGD, c = 10) iterations")
    parser.add_argument("--gf-steps", type=int, default=20, help="evolution-strategies steps")
    parser.add_argument("--gf-samples", type=int, default=5,
                        help="antithetic pairs per evolution-strategies step")
    parser.add_argument("--sweep-size", type=int, default=500,
                        help="test images for the budget / c sweeps and loss curves")
    parser.add_argument("--models", default=None, help="comma-separated keys (default: all)")
    parser.add_argument("--phase", default="all", choices=("all", "table", "curves"),
                        help="table: train + SS/MS/OB/GF per model; curves: sweeps + loss curves")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--report-listed-only", action="store_true",
                        help="the report covers only the --models keys (a side experiment with its "
                             "own --results/--out-dir), not the whole table")
    parser.add_argument("--progress", action="store_true", help="progress bars")
    args = parser.parse_args(argv)
    raw = list(argv or sys.argv[1:])
    kept, skip = [], False
    for item in raw:  # the report names the command for the whole table
        if skip:
            skip = False
        elif item in ("--models", "--phase") and not args.report_listed_only:
            skip = True
        elif item != "--report-only" and not item.startswith(("--models=", "--phase=")):
            kept.append(item)
    command = " ".join(["python benchmarks/fgr_experiment.py", *kept])

    specs = all_specs = model_specs(args.train_attack_steps)
    if args.models:
        wanted = args.models.split(",")
        unknown = set(wanted) - {s["key"] for s in specs}
        if unknown:
            raise SystemExit(f"unknown model keys {sorted(unknown)}")
        specs = [s for s in specs if s["key"] in wanted]
    if args.report_listed_only:
        all_specs = specs
    if args.report_only:
        write_report(args, all_specs, command)
        return
    train_set, test_set = load_dataset("cifar10", args.data)
    train_data = train_set.subset(args.train_size, seed=args.seed)
    x_test, y_test = test_set.subset(args.test_size, seed=args.seed).as_float()
    x_test, y_test = x_test.to(args.device), y_test.to(args.device)
    eps_px = float(normalized_to_pixels(EPS_NORMALIZED, 32))
    out_dir = Path(args.out_dir)
    eval_kw = {"seed": args.seed, "batch_size": 250, "gradient_figure": False,
               "progress": "lines", "classes": test_set.classes}
    table = table_suites(args)
    if args.phase in ("all", "table"):  # per model in priority order: train, SS+MS, OB, GF
        for spec in specs:
            run_dir = out_dir / spec["key"]
            model, _ = train_one(spec, args, train_data, run_dir)
            part, suite = table[0]
            print(f"[{spec['key']}] evaluating {part}", flush=True)
            run_suite(model, x_test, y_test, suite, run_dir / f"eval-{part}.db", **eval_kw)
            write_report(args, all_specs, command)
            print(f"[{spec['key']}] evaluating OB (stAdv)", flush=True)
            run_direct(model, x_test, y_test, "flow-OB-stAdv", stadv_attack(10.0, args.ob_steps),
                       run_dir / "direct-ob.json")
            part, suite = table[1]
            print(f"[{spec['key']}] evaluating {part}", flush=True)
            run_suite(model, x_test, y_test, suite, run_dir / f"eval-{part}.db", **eval_kw)
            write_report(args, all_specs, command)
    if args.phase in ("all", "curves"):
        for spec in specs:
            run_dir = out_dir / spec["key"]
            model, _ = train_one(spec, args, train_data, run_dir)
            xs, ys = x_test[:args.sweep_size], y_test[:args.sweep_size]
            curves = run_dir / "loss-curves.json"
            if not curves.is_file():
                data = loss_curves(model, xs[:200], ys[:200], eps_px=eps_px, seed=args.seed)
                curves.write_text(json.dumps(data))
            for part, suite in sweep_suites(args):
                print(f"[{spec['key']}] evaluating {part}", flush=True)
                run_suite(model, xs, ys, suite, run_dir / f"eval-{part}.db", **eval_kw)
            for c in SWEEP_C:
                print(f"[{spec['key']}] evaluating OB c={c}", flush=True)
                run_direct(model, xs, ys, f"OB-c{c}", stadv_attack(c, args.ob_steps),
                           run_dir / f"direct-sweep-c{c}.json")
            write_report(args, all_specs, command)
    write_report(args, all_specs, command)


if __name__ == "__main__":
    main()
