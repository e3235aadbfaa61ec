"""An experiment's report, drawn from its stored results and analyses only: Markdown (+ PNG
figures) and JSON for ``results/``, and a self-contained HTML page.

The report is the experiment's ``[[report]]`` blocks, in file order. Every block has an optional
``title`` (a section heading) and ``text`` (Markdown shown under it; settings and reasoning,
never measured numbers, which come from the stored results). Block types:

- ``settings``: data, models (how each was made), runs, seed and the regenerating command;
- ``table`` with ``rows = "attacks"``: one row per attack of ``suite`` (or the ``attacks``
  listed; ``clean_row = true`` adds clean accuracy first), ``columns = [{label, model, through,
  worst_case}]``, cells ``metric`` (``ar``, ``robust``, ``clean``); ``worst_case = true``: an
  example counts as broken if ANY stored attack of that model at the row's norm and budget broke
  it;
- ``table`` with ``rows = "models"``: one row per model (``models``, names or grids),
  ``columns = [{label, attack, suite, through, metric}]`` (``stat = "median_size"``: the median
  size of the attack's successful perturbations instead of a rate) or ``{label, param = "w"}`` (a grid value)
  or ``{label, analysis = "<id>", field = "evidence.examples_non_finite"}``;
- ``figure``: ``kind`` = ``curve`` (``metric`` against each attack's eps, or ``x = "budget"``
  as the suite writes it, or ``x`` = an attack setting such as ``"c"``; one line per model),
  ``gradient_sign``, ``fgsm_examples``, ``loss_surface`` (from the analysis ``analysis``),
  ``training_curve`` (test accuracy per epoch of trained models); ``file`` names it;
- ``claims``: every claim (or ``ids``) with its verdict and paired comparisons;
- ``diagnostics``: the text verdicts of a ``diagnostics`` analysis;
- ``training``: per trained model, final test accuracy, epochs and time (``seeds``: mean and spread).

Every rate carries its example count and 95 % Wilson interval.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from gradshield.errors import GradshieldError
from gradshield.evaluation.analyses import load_analysis
from gradshield.evaluation.claims import evaluate_claims
from gradshield.evaluation.plots import figure_png, new_figure
from gradshield.evaluation.report import Figure, Section, pct, rate_cell, to_html, to_markdown
from gradshield.evaluation.resultset import ResultSet
from gradshield.evaluation.stats import wilson
from gradshield.training import PRESETS, describe_preset

BLOCK_TYPES = ("text", "settings", "table", "figure", "claims", "diagnostics", "training")
FIGURE_KINDS = ("curve", "gradient_sign", "fgsm_examples", "loss_surface", "training_curve")
TABLE_METRICS = ("ar", "robust", "clean")
METRIC_NAMES = {"ar": "AR", "robust": "robust accuracy", "clean": "ACC"}


# --------------------------------------------------------------------------- checks


def check_block(experiment, entry: dict, where: str) -> None:
    if not isinstance(entry, dict):
        raise GradshieldError(f"{where}: each [[report]] block must be a table")
    kind = entry.get("type")
    if kind not in BLOCK_TYPES:
        raise GradshieldError(f"{where}: type must be one of {BLOCK_TYPES}, got {kind!r}")
    if kind == "table":
        if entry.get("rows") not in ("attacks", "models"):
            raise GradshieldError(f"{where}: a table needs rows = \"attacks\" or \"models\"")
        if entry.get("metric", "ar") not in TABLE_METRICS:
            raise GradshieldError(f"{where}: metric must be one of {TABLE_METRICS}")
        columns = entry.get("columns")
        if not isinstance(columns, list) or not columns:
            raise GradshieldError(f"{where}: a table needs columns = [{{label = ..., ...}}]")
        if entry["rows"] == "attacks":
            if "suite" not in entry:
                raise GradshieldError(f"{where}: rows = \"attacks\" needs suite = \"...\"")
            experiment.suite(entry["suite"])
            for column in columns:
                experiment.expand(column.get("model", []), where)
        else:
            experiment.expand(entry.get("models", []), where)
            for column in columns:
                if "suite" in column:
                    experiment.suite(column["suite"])
    if kind == "figure":
        if entry.get("kind") not in FIGURE_KINDS:
            raise GradshieldError(f"{where}: figure kind must be one of {FIGURE_KINDS}")
        if "file" not in entry:
            raise GradshieldError(f"{where}: a figure needs file = \"<name>\" (its PNG's name)")
        experiment.expand(entry.get("models", []), where)
        analysis_ids = {a["id"] for a in experiment.analyses}
        if entry["kind"] in ("gradient_sign", "fgsm_examples", "loss_surface") and \
                entry.get("analysis") not in analysis_ids:
            raise GradshieldError(f"{where}: figure {entry['kind']!r} needs analysis = \"<id>\" "
                                  f"of an [[analyses]] entry (ids: {sorted(analysis_ids)})")
    if kind == "diagnostics" and entry.get("analysis") not in {a["id"] for a in experiment.analyses}:
        raise GradshieldError(f"{where}: diagnostics needs analysis = \"<id of a diagnostics "
                              "analysis>\"")


# --------------------------------------------------------------------------- formatting


def _rate(mask: np.ndarray, over: np.ndarray | None = None) -> tuple[int, int]:
    if over is not None:
        mask = mask[over]
    return int(mask.sum()), int(mask.size)


def _metric(outcome, metric: str) -> tuple[int, int]:
    if metric == "clean":
        return _rate(outcome.clean)
    if metric == "robust":
        return _rate(outcome.robust)
    return _rate(outcome.robust, outcome.clean)   # ar: over the clean-correct examples


# --------------------------------------------------------------------------- tables


def _worst_case(results: ResultSet, model: str, norm: str, eps: float, n: int) -> np.ndarray | None:
    """Clean-correct and unbroken by every stored attack of ``model`` at (norm, eps), on the first
    ``n`` examples (runs with fewer examples are left out)."""
    broken, correct, found = np.zeros(n, dtype=bool), None, False
    for _, run in results.runs(model):
        if run.n < n:
            continue
        correct = run.clean_correct[:n] if correct is None else correct
        for a, attack in enumerate(run.attacks):
            if attack["norm"] == norm and attack["eps"] is not None and \
                    math.isclose(float(attack["eps"]), eps, rel_tol=1e-9):
                broken |= run.success[a][:n] == 1
                found = True
    return (correct & ~broken) if found else None


def attacks_table(entry: dict, experiment, results: ResultSet) -> Section:
    suite = experiment.suite(entry["suite"])
    wanted = entry.get("attacks")
    specs = [s for s in suite.attacks if wanted is None or s.id in wanted]
    metric = entry.get("metric", "ar")
    head = ["attack"] + [c.get("label", c.get("model")) for c in entry["columns"]]
    rows = []
    if entry.get("clean_row"):  # ACC of each column's model on the same examples
        row = ["clean (ACC)"]
        for column in entry["columns"]:
            outcome = results.outcome(column["model"], "clean", suite=entry["suite"],
                                      through=column.get("through"),
                                      examples=column.get("examples", entry.get("examples")))
            row.append("–" if outcome is None else rate_cell(*_metric(outcome, "clean")))
        rows.append(row)
    for spec in specs:
        row = [spec.id]
        for column in entry["columns"]:
            model = column["model"]
            outcome = results.outcome(model, spec.id, suite=entry["suite"],
                                      through=column.get("through"),
                                      examples=column.get("examples", entry.get("examples")))
            if outcome is None:
                row.append("–")
                continue
            if column.get("worst_case"):
                eps = spec.eps_for(tuple(outcome.run.meta["image_shape"]))
                robust = _worst_case(results, model, spec.norm, eps, outcome.n) \
                    if eps is not None else None
                if robust is None:
                    row.append("–")
                    continue
                k, n = _rate(robust, outcome.clean if metric == "ar" else None)
                row.append(rate_cell(k, n))
                continue
            row.append(rate_cell(*_metric(outcome, metric)))
        rows.append(row)
    return _section(entry, [("table", head, rows), ("text", _metric_note(metric))])


def _lookup(data: dict, dotted: str):
    for key in dotted.split("."):
        data = data.get(key) if isinstance(data, dict) else None
    return data


def models_table(entry: dict, experiment, results: ResultSet, workspace) -> Section:
    models = experiment.expand(entry["models"], "table")
    default_metric = entry.get("metric", "ar")
    head = ["model"] + [c.get("label", c.get("attack", c.get("param", ""))) for c in entry["columns"]]
    rows = []
    for model in models:
        spec = experiment.models[model]
        row = [model]
        for column in entry["columns"]:
            if "param" in column:
                value = spec.params.get(column["param"], (spec.gcm or {}).get(column["param"]))
                row.append("–" if value is None else (f"{value:g}" if isinstance(value, float)
                                                      else str(value)))
                continue
            if "analysis" in column:
                stored = load_analysis(workspace.analyses, column["analysis"], model)
                value = None if stored is None else _lookup(stored[0], column.get("field", ""))
                row.append("–" if value is None else str(value))
                continue
            attack = column.get("attack", "clean")
            metric = "clean" if attack == "clean" else column.get("metric", default_metric)
            outcome = results.outcome(model, attack, suite=column.get("suite", entry.get("suite")),
                                      through=column.get("through"),
                                      examples=column.get("examples", entry.get("examples")))
            if outcome is None:
                row.append("–")
            elif column.get("stat") == "median_size":  # of the successful perturbations
                sizes = outcome.run.size[outcome.attack][outcome.run.success[outcome.attack] == 1]
                sizes = sizes[np.isfinite(sizes)]
                row.append(f"{np.median(sizes):.3g} (n={sizes.size})" if sizes.size else "–")
            else:
                row.append(rate_cell(*_metric(outcome, metric)))
        rows.append(row)
    rates = any("attack" in c and c.get("stat") is None for c in entry["columns"])
    note = [("text", _metric_note(default_metric))] if rates else []
    return _section(entry, [("table", head, rows), *note])


def _metric_note(metric: str) -> str:
    return {"ar": "Cells: AR %, the share of the clean-correct examples still correct after the "
                  "attack, with its 95 % Wilson interval and the number of clean-correct examples "
                  "n; ACC cells: clean accuracy over all n examples.",
            "robust": "Cells: robust accuracy %, the share of all n examples classified correctly "
                      "after the attack (ACC under attack), with its 95 % Wilson interval.",
            "clean": "Cells: clean accuracy % with its 95 % Wilson interval over n examples."}[metric]


# --------------------------------------------------------------------------- figures


def curve_figure(entry: dict, experiment, results: ResultSet) -> Figure:
    suite = experiment.suite(entry["suite"])
    wanted = entry.get("attacks")
    specs = [s for s in suite.attacks if wanted is None or s.id in wanted]
    metric = entry.get("metric", "robust")
    x_key = entry.get("x")
    fig = new_figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    for model in experiment.expand(entry["models"], "figure"):
        points = []
        for spec in specs:
            outcome = results.outcome(model, spec.id, suite=entry["suite"],
                                      through=entry.get("through"))
            if outcome is None:
                continue
            if x_key == "budget":          # the budget as the suite writes it
                x = spec.budget
            elif x_key:                    # an attack setting, e.g. stAdv's c
                x = spec.hyper.get(x_key)
            else:                          # the eps the attack gets (its own units)
                x = spec.eps_for(tuple(outcome.run.meta["image_shape"]))
            if x is None:
                continue
            k, n = _metric(outcome, metric)
            r = wilson(k, n)
            points.append((float(x), r.value, r.low, r.high))
        if not points:
            continue
        points.sort()
        xs, ys, lo, hi = (np.array(v) for v in zip(*points, strict=True))
        ax.errorbar(xs, 100 * ys, yerr=[100 * (ys - lo), 100 * (hi - ys)], marker="o", capsize=2,
                    label=model, linewidth=1.2, markersize=3)
    if entry.get("log_x"):
        ax.set_xscale("log")
    ax.set_xlabel(entry.get("x_label", x_key or "budget"))
    ax.set_ylabel(f"{METRIC_NAMES[metric]} (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return Figure(f"{experiment.name}-{entry['file']}", figure_png(fig),
                  entry.get("caption", f"{METRIC_NAMES[metric]} against {x_key or 'budget'} "
                                       "(95 % Wilson intervals)"))


def _stored(workspace, analysis: str, models: list[str]) -> dict[str, tuple[dict, dict]]:
    out = {}
    for model in models:
        stored = load_analysis(workspace.analyses, analysis, model)
        if stored is not None:
            out[model] = stored
    return out


def _img(chw: np.ndarray) -> np.ndarray:
    return np.clip(np.transpose(chw, (1, 2, 0)), 0, 1)


def gradient_sign_figure(entry, experiment, workspace, classes) -> Figure | None:
    models = experiment.expand(entry["models"], "figure")
    stored = _stored(workspace, entry["analysis"], models)
    if not stored:
        return None
    first = next(iter(stored.values()))
    images, n = first[1]["image"], first[1]["image"].shape[0]
    cols = 1 + len(stored)
    fig = new_figure(figsize=(1.9 * cols, 1.9 * n + 0.4))
    axes = fig.subplots(n, cols, squeeze=False)
    reference = first[1]["sign"]
    for i in range(n):
        axes[i, 0].imshow(_img(images[i]), interpolation="nearest")
        axes[i, 0].set_ylabel(classes[first[0]["labels"][i]], fontsize=9)
        for j, (model, (_, arrays)) in enumerate(stored.items(), start=1):
            sign = arrays["sign"][i]
            axes[i, j].imshow((sign + 1) / 2, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            agree = float((sign == reference[i]).mean())
            axes[i, j].set_xlabel(f"{100 * agree:.0f} % agree", fontsize=7)
            if i == 0:
                axes[i, j].set_title(model, fontsize=8)
    axes[0, 0].set_title("image", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("sign of d loss / d input (black -1, white +1)", fontsize=9)
    fig.tight_layout()
    return Figure(f"{experiment.name}-{entry['file']}", figure_png(fig), entry.get(
        "caption", "Sign of the input gradient, summed over colour channels; agreement with the "
                   f"first model's sign ({models[0]}) per image"))


def fgsm_examples_figure(entry, experiment, workspace, classes) -> Figure | None:
    models = experiment.expand(entry["models"], "figure")
    stored = _stored(workspace, entry["analysis"], models)
    if not stored:
        return None
    rows = sum(arrays["image"].shape[0] for _, arrays in stored.values())
    fig = new_figure(figsize=(6.0, 2.0 * rows + 0.3))
    axes = fig.subplots(rows, 3, squeeze=False)
    r = 0
    for model, (data, arrays) in stored.items():
        for i in range(arrays["image"].shape[0]):
            p = arrays["perturbation"][i]
            scale = np.abs(p).max() or 1.0
            tiles = [(arrays["image"][i], f"{model}: {classes[data['clean_pred'][i]]}"),
                     (arrays["adversarial"][i], f"FGSM: {classes[data['adv_pred'][i]]}"),
                     (p / (2 * scale) + 0.5, f"perturbation (x{0.5 / scale:.0f})")]
            for c, (tile, title) in enumerate(tiles):
                axes[r, c].imshow(_img(tile), interpolation="nearest")
                axes[r, c].set_title(title, fontsize=7)
                axes[r, c].set_xticks([])
                axes[r, c].set_yticks([])
            r += 1
    fig.tight_layout()
    eps = next(iter(stored.values()))[0]["eps"]
    return Figure(f"{experiment.name}-{entry['file']}", figure_png(fig), entry.get(
        "caption", f"FGSM (L-inf {eps * 255:.0f}/255) adversarials and perturbations with the "
                   "predicted class, per model"))


def loss_surface_figure(entry, experiment, workspace) -> Figure | None:
    models = experiment.expand(entry["models"], "figure")
    stored = _stored(workspace, entry["analysis"], models)
    if not stored:
        return None
    cols = min(4, len(stored))
    rows = math.ceil(len(stored) / cols)
    fig = new_figure(figsize=(3.2 * cols, 3.0 * rows))
    top = max(float(arrays["loss"].max()) for _, arrays in stored.values())
    for k, (model, (_, arrays)) in enumerate(stored.items()):
        ax = fig.add_subplot(rows, cols, k + 1, projection="3d")
        grid_a, grid_b = np.meshgrid(arrays["axis"], arrays["axis"], indexing="ij")
        ax.plot_surface(grid_a, grid_b, arrays["loss"], cmap="viridis", vmin=0, vmax=top,
                        linewidth=0, antialiased=True)
        ax.set_zlim(0, top)
        ax.set_title(model, fontsize=8)
        ax.set_xlabel("adversarial", fontsize=7)
        ax.set_ylabel("random", fontsize=7)
        ax.tick_params(labelsize=6)
    unit = next(iter(stored.values()))[0]["unit"]
    fig.tight_layout()
    return Figure(f"{experiment.name}-{entry['file']}", figure_png(fig), entry.get(
        "caption", f"Cross-entropy over the plane of flows a*d_adv + b*d_rand (a, b in {unit} "
                   "flow units; d_adv the sign of the flow gradient, d_rand a random sign flow)"))


def _history(workspace, model: str) -> list[dict]:
    path = workspace.model_dir(model) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_curve_figure(entry, experiment, workspace) -> Figure | None:
    fig = new_figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    drawn = False
    for model in experiment.expand(entry["models"], "figure"):
        rows = [r for r in _history(workspace, model) if "test_acc" in r]
        if rows:
            ax.plot([r["elapsed_s"] / 60 for r in rows], [100 * r["test_acc"] for r in rows],
                    marker="o", markersize=3, label=model)
            drawn = True
    if not drawn:
        return None
    if entry.get("target") is not None:
        ax.axhline(100 * float(entry["target"]), color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("training time (min)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return Figure(f"{experiment.name}-{entry['file']}", figure_png(fig), entry.get(
        "caption", "Test accuracy after each epoch against training time"))


# --------------------------------------------------------------------------- other blocks


def _section(entry: dict, blocks: list) -> Section:
    head = [("text", entry["text"].strip())] if entry.get("text") else []
    return Section(entry.get("title", ""), head + blocks)


def settings_section(entry, experiment, workspace, command: str) -> Section:
    data = experiment.data
    lines = [f"- **Regenerate**: `{command}` (resumable: rerun the same command after a kill).",
             f"- **Data**: {data.get('dataset', 'cifar10')} test split, "
             f"{data.get('examples', 'all')} examples drawn by `torch.randperm` with seed "
             f"{experiment.seed}, in that order; a run with `examples = k` uses the first k.",
             f"- **Seed**: {experiment.seed} (data subset, training, attack randomness)."]
    for name, spec in experiment.models.items():
        if spec.grid is not None and spec.grid in experiment.grids and \
                experiment.grids[spec.grid][0] != name:
            continue
        label = name if spec.grid is None else f"{spec.grid} ({', '.join(experiment.grids[spec.grid])})"
        if spec.checkpoint:
            how = f"checkpoint `{spec.checkpoint}`"
        elif spec.train:
            how = "trained by the experiment: " + ", ".join(
                f"{k}={json.dumps(v)}" for k, v in sorted(spec.train.items()))
            if spec.train.get("preset") in PRESETS:  # what the preset stands for
                how += f" (preset {spec.train['preset']} = {describe_preset(spec.train['preset'])};" \
                       " a setting written beside it wins)"
        else:
            how = f"`{spec.base}` with GCM " + ", ".join(
                f"{k}={_short(v) if k in ('w', 'eps') else json.dumps(v)}"
                for k, v in sorted(spec.gcm.items()) if k not in spec.params)
        if spec.grid is not None:
            members = [experiment.models[m].params for m in experiment.grids[spec.grid]]
            how += "; the grid varies " + "; ".join(
                f"{key} over {', '.join(_short(p[key]) for p in members)}"
                for key in sorted(spec.params))
        lines.append(f"- **Model {label}**: {how}.")
    lines.append(f"- **Compute**: {compute_text(experiment, workspace)}")
    return _section(entry, [("text", "\n".join(lines))])


def compute_text(experiment, workspace) -> str:
    """What regenerating cost where it ran: training time from each trained model's epochs,
    attack time from each results file's stored batches (evaluations and analyses excluded)."""
    from gradshield.evaluation.store import compute_seconds

    train_s, attack_s, files = 0.0, 0.0, 0
    where: dict[str, None] = {}
    for name, spec in experiment.models.items():
        history = [r for r in _history(workspace, name) if "elapsed_s" in r] if spec.train else []
        if history:
            train_s += history[-1]["elapsed_s"]
            where.update(dict.fromkeys(r.get("machine", "machine not recorded") for r in history))
    for run in experiment.runs:
        path = workspace.run_path(run)
        if path.is_file():
            seconds, machines = compute_seconds(path)
            attack_s, files = attack_s + seconds, files + 1
            where.update(dict.fromkeys(machines or ["machine not recorded"]))
    if not files and not train_s:
        return "nothing run yet."
    attacks = (f", attacks {attack_s / 60:.1f} min in {files} of {len(experiment.runs)} results "
               "files (stored batch times; clean evaluations and analyses not counted)"
               if experiment.runs else " (an experiment without attacks)")
    return f"training {train_s / 60:.1f} min{attacks}, on: {'; '.join(where)}."


def _short(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def claims_section(entry, claims) -> Section:
    wanted = entry.get("ids")
    blocks = []
    for claim in claims:
        if wanted is not None and claim.id not in wanted:
            continue
        blocks.append(("text", f"**{claim.text}** — {claim.verdict.upper()}. "
                               f"Source: {claim.source}"))
        if claim.comparisons:
            rows = [[c.a, c.b, c.attack,
                     rate_cell(c.rate_a.k, c.rate_a.n), rate_cell(c.rate_b.k, c.rate_b.n),
                     f"{100 * c.paired.difference:+.1f} ({100 * c.paired.low:+.1f} to "
                     f"{100 * c.paired.high:+.1f})", f"{c.paired.p_value:.2g}",
                     pct(c.clean_gap) if c.clean_gap is not None else "–", c.outcome]
                    for c in claim.comparisons]
            blocks.append(("table", ["a", "b", "attack", "a %", "b %", "a - b (95 % CI)",
                                     "McNemar p", "clean gap a - b", "outcome"], rows))
        for note in claim.notes:
            blocks.append(("text", f"- {note}"))
    return _section(entry, blocks)


def diagnostics_section(entry, experiment, workspace) -> Section:
    analysis = next(a for a in experiment.analyses if a["id"] == entry["analysis"])
    blocks = []
    for model in experiment.expand(analysis["models"], "diagnostics"):
        stored = load_analysis(workspace.analyses, analysis["id"], model)
        if stored is not None:
            blocks.append(("text", f"**{model}** ({len(stored[0].get('records', []))} stored "
                                   "attack results used):"))
            blocks.append(("code", stored[0]["text"]))
    return _section(entry, blocks)


def training_section(entry, experiment, workspace) -> Section:
    rows, finals = [], defaultdict(list)
    raw = {model: _history(workspace, model) for model in experiment.expand(entry["models"], "training")}
    histories = {model: [r for r in rows if "test_acc" in r] for model, rows in raw.items()}
    # a model evaluated with flip test-time augmentation also records its bare accuracy
    tta = any("test_acc_plain" in h[-1] for h in histories.values() if h)
    for model, history in histories.items():
        if not history:
            rows.append([model] + ["–"] * (4 + tta))
            continue
        last = history[-1]
        plain = [f"{100 * last['test_acc_plain']:.2f}" if "test_acc_plain" in last else "–"] * tta
        rows.append([model, f"{100 * last['test_acc']:.2f}", *plain, str(last["epoch"] + 1),
                     f"{last['elapsed_s'] / 60:.2f}"])
        group = experiment.models[model].grid or model
        finals[(group, "test_acc")].append(last["test_acc"])
        if "test_acc_plain" in last:
            finals[(group, "test_acc_plain")].append(last["test_acc_plain"])
    header = ["model", "final test accuracy %" + (" (flip TTA where the model has it)" if tta else ""),
              *(["without TTA %"] * tta), "epochs", "training time (min)"]
    blocks = [("table", header, rows)]
    for (group, key), values in finals.items():
        if len(values) > 1:
            mean = float(np.mean(values))
            spread = float(np.std(values, ddof=1))
            what = " without TTA" if key == "test_acc_plain" else ""
            blocks.append(("text", f"{group}{what}: mean {100 * mean:.2f} %, standard deviation "
                                   f"{100 * spread:.2f} points over {len(values)} seeds "
                                   f"(min {100 * min(values):.2f}, max {100 * max(values):.2f})."))
    blocks.append(("text", _machines_text(raw)))
    return _section(entry, blocks)


def _machines_text(histories: dict[str, list[dict]]) -> str:
    """Which machine each model's epochs ran on (the training times are that machine's)."""
    where: dict[str, list[str]] = defaultdict(list)
    for model, history in histories.items():
        if history:
            for name in dict.fromkeys(r.get("machine", "not recorded") for r in history):
                where[name].append(model)
    lines = [f"{name}: {', '.join(models)}" for name, models in where.items()]
    return "Trained on (recorded with each epoch's metrics; a model named twice was resumed "\
           "elsewhere): " + ("; ".join(lines) if lines else "nothing trained yet") + "."


# --------------------------------------------------------------------------- assembly


def make_figure(entry, experiment, workspace, results, classes) -> Figure | None:
    kind = entry["kind"]
    if kind == "curve":
        return curve_figure(entry, experiment, results)
    if kind == "gradient_sign":
        return gradient_sign_figure(entry, experiment, workspace, classes)
    if kind == "fgsm_examples":
        return fgsm_examples_figure(entry, experiment, workspace, classes)
    if kind == "loss_surface":
        return loss_surface_figure(entry, experiment, workspace)
    return training_curve_figure(entry, experiment, workspace)


def build_report(experiment, workspace, *, command: str) -> tuple[list[Section], dict]:
    """The report's sections and the JSON payload (every table cell's numbers and the claims)."""
    from gradshield.evaluation.execute import experiment_classes

    results = ResultSet(experiment, workspace)
    claims = evaluate_claims(experiment, results)
    classes = experiment_classes(experiment, workspace)
    sections: list[Section] = []
    for entry in experiment.report:
        kind = entry["type"]
        if kind == "text":
            sections.append(_section(entry, []))
        elif kind == "settings":
            sections.append(settings_section(entry, experiment, workspace, command))
        elif kind == "table":
            sections.append(attacks_table(entry, experiment, results) if entry["rows"] == "attacks"
                            else models_table(entry, experiment, results, workspace))
        elif kind == "claims":
            sections.append(claims_section(entry, claims))
        elif kind == "diagnostics":
            sections.append(diagnostics_section(entry, experiment, workspace))
        elif kind == "training":
            sections.append(training_section(entry, experiment, workspace))
        elif kind == "figure":
            figure = make_figure(entry, experiment, workspace, results, classes)
            sections.append(_section(entry, [("figure", figure)] if figure else
                                     [("text", "(not computed yet)")]))
    payload = {"experiment": experiment.name, "command": command,
               "experiment_sha256": experiment.digest,
               "claims": [c.to_dict() for c in claims],
               "tables": [{"title": s.title, "rows": [b[1:] for b in s.blocks if b[0] == "table"]}
                          for s in sections if any(b[0] == "table" for b in s.blocks)]}
    return sections, payload


def write_experiment_report(experiment, workspace, out: str | os.PathLike, *, command: str,
                            html: bool = True) -> dict:
    """Write ``out/<name>.md`` (+ ``<name>-*.png``) and ``out/<name>.json``; the HTML page goes to
    the work folder (``<work>/report/<name>.html``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sections, payload = build_report(experiment, workspace, command=command)
    markdown = to_markdown(sections, out, experiment.title, heading_level=2,
                           intro=experiment.description.strip())
    (out / f"{experiment.name}.md").write_text(markdown)
    (out / f"{experiment.name}.json").write_text(json.dumps(payload, indent=1, default=float) + "\n")
    written = {"markdown": str(out / f"{experiment.name}.md"),
               "json": str(out / f"{experiment.name}.json")}
    if html:
        page = workspace.root / "report" / f"{experiment.name}.html"
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(to_html(sections, experiment.title))
        written["html"] = str(page)
    return written
