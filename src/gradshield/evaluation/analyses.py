"""Analyses: what an experiment computes from its models besides attack suites (gradient-masking
diagnostics over all of a model's results, gradient health, the data behind the papers' figures),
stored once in ``analyses.db`` so the report is drawn from stored data only.

An ``[[analyses]]`` entry: ``id`` (unique), ``kind`` (a name of :data:`KINDS`), ``models`` (names
or grids) and the kind's own settings; ``examples`` (default 256) is how many of the experiment's
examples (the first k) it uses. Each kind computes one output per model, a JSON-able dict and
optionally named arrays, keyed by the model's fingerprint: a changed model is analysed again.
"""

from __future__ import annotations

import io
import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from gradshield.errors import GradshieldError

SCHEMA = """CREATE TABLE IF NOT EXISTS analyses(id TEXT NOT NULL, model TEXT NOT NULL,
fingerprint TEXT NOT NULL, settings TEXT NOT NULL, data TEXT NOT NULL, arrays BLOB,
PRIMARY KEY(id, model))"""
COMMON = ("id", "kind", "models", "examples", "title")


@dataclass(frozen=True)
class Kind:
    """An analysis kind: its settings (with defaults) and ``compute(model, x, y, context,
    **settings) -> (data dict, arrays dict)``."""

    settings: dict
    compute: Callable
    doc: str


# --------------------------------------------------------------------------- the kinds


def _diagnostics(model, x, y, context, *, unbounded_examples, fd_examples):
    """Gradient-masking diagnostics with the records of every per-attack run of the model."""
    from gradshield.evaluation.diagnostics import diagnose

    records = context["records"](x.shape[0])
    verdict = diagnose(model, x, y, records=records, unbounded_examples=unbounded_examples,
                       fd_examples=fd_examples, generator=torch.Generator().manual_seed(
                           context["seed"]))
    return {**verdict.to_dict(), "text": verdict.text(),
            "records": [r.name for r in records]}, {}


def _gradient_health(model, x, y, context):
    from gradshield.evaluation.diagnostics import gradient_health

    finding = gradient_health(model, x, y)
    return {"flagged": finding.flagged, "summary": finding.summary,
            "evidence": finding.evidence}, {}


def _gradient_sign(model, x, y, context, *, images):
    """The sign of the channel-summed input gradient (GCM paper, Fig. 4) on ``images`` images of
    distinct classes; agreement with the first model of the entry is computed at report time."""
    from gradshield.evaluation.plots import input_gradient

    index = _distinct_classes(y, images)
    grad = input_gradient(model, x[index], y[index])
    return {"index": index.tolist(), "labels": y[index].tolist()}, {
        "image": x[index].cpu().numpy(), "sign": torch.sign(grad.sum(1)).cpu().numpy()}


def _fgsm_examples(model, x, y, context, *, eps, images):
    """FGSM adversarials and perturbations with the predicted classes (GCM paper, Fig. 1), on
    the first clean-correct example of each of ``images`` classes."""
    from gradshield.attacks import fgsm
    from gradshield.metrics import predict

    eps = _budget(eps)
    correct = predict(model, x) == y
    chosen = _distinct_classes(y[correct], images)
    index = correct.nonzero().squeeze(1)[chosen] if chosen.numel() else chosen
    result = fgsm(model, x[index], y[index], eps=eps)
    return {"index": index.tolist(), "labels": y[index].tolist(), "eps": eps,
            "clean_pred": predict(model, x[index]).tolist(),
            "adv_pred": predict(model, result.adversarial).tolist(),
            "success": result.success.tolist()}, {
        "image": x[index].cpu().numpy(), "adversarial": result.adversarial.cpu().numpy(),
        "perturbation": (result.adversarial - x[index]).cpu().numpy()}


def _loss_surface(model, x, y, context, *, radius, points, unit):
    """Mean cross-entropy over the plane of flows ``a * d_adv + b * d_rand`` (FGR paper, Fig. 3):
    ``d_adv`` = sign of the flow gradient at the identity (per example), ``d_rand`` = a random
    sign flow; ``a, b`` in [-radius, radius] (``unit``: "normalized" grid_sample units or
    "pixels")."""
    from gradshield.defenses.regularizers import flow_gradient
    from gradshield.utils import derived_generator, eval_mode
    from gradshield.warp import normalized_to_pixels, warp

    scale = normalized_to_pixels(1.0, x.shape[-1]) if unit == "normalized" else 1.0
    with eval_mode(model):
        _, grad = flow_gradient(model, x, y, unit="pixels")
    generator = derived_generator(context["seed"], 31)
    d_adv = grad.sign()
    d_rand = (torch.randint(0, 2, grad.shape, generator=generator).to(grad) * 2 - 1)
    steps = torch.linspace(-radius, radius, points)
    surface = torch.zeros(points, points)
    with eval_mode(model), torch.no_grad():
        for i, a in enumerate(steps):
            for j, b in enumerate(steps):
                flow = (float(a) * d_adv + float(b) * d_rand) * scale
                surface[i, j] = F.cross_entropy(model(warp(x, flow)), y)
    return {"radius": radius, "points": points, "unit": unit,
            "examples": int(x.shape[0])}, {"axis": steps.numpy(), "loss": surface.numpy()}


def _gcm_facts(model, x, y, context):
    """What GCM does to these images in float32: its largest change, the share of values it
    changes, the gradient factor's median size and sign, and how often one ulp flips that sign."""
    from gradshield.defenses.concealment import concealment_facts

    return concealment_facts(model, x), {}


KINDS: dict[str, Kind] = {
    "diagnostics": Kind({"unbounded_examples": 256, "fd_examples": 32}, _diagnostics,
                        _diagnostics.__doc__),
    "gradient_health": Kind({}, _gradient_health, "inf/NaN or zero input gradients"),
    "gradient_sign": Kind({"images": 4}, _gradient_sign, _gradient_sign.__doc__),
    "fgsm_examples": Kind({"eps": "8/255", "images": 4}, _fgsm_examples, _fgsm_examples.__doc__),
    "loss_surface": Kind({"radius": 0.02, "points": 11, "unit": "normalized"}, _loss_surface,
                         _loss_surface.__doc__),
    "gcm_facts": Kind({}, _gcm_facts, _gcm_facts.__doc__),
}


def _budget(value) -> float:
    from gradshield.evaluation.suites import parse_budget

    return parse_budget(value, "analysis eps")


def _distinct_classes(y: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the first example of each of the first ``count`` classes present (in order)."""
    seen, out = set(), []
    for i, label in enumerate(y.tolist()):
        if label not in seen:
            seen.add(label)
            out.append(i)
        if len(out) == count:
            break
    return torch.tensor(out, dtype=torch.long)


# --------------------------------------------------------------------------- checking, storing


def check_analysis(experiment, entry: dict, where: str) -> None:
    if not isinstance(entry, dict):
        raise GradshieldError(f"{where}: each [[analyses]] must be a table")
    for key in ("id", "kind", "models"):
        if key not in entry:
            raise GradshieldError(f"{where}: needs {key} = ...")
    if entry["kind"] not in KINDS:
        raise GradshieldError(f"{where}: unknown kind {entry['kind']!r}; choose one of {sorted(KINDS)}")
    kind = KINDS[entry["kind"]]
    unknown = [k for k in entry if k not in COMMON and k not in kind.settings]
    if unknown:
        raise GradshieldError(f"{where}: unknown key(s) {unknown} for kind {entry['kind']!r}; its "
                              f"settings are {sorted(kind.settings)} plus {list(COMMON)}")
    experiment.expand(entry["models"], where)


def settings_of(entry: dict) -> dict:
    kind = KINDS[entry["kind"]]
    return {k: entry.get(k, v) for k, v in kind.settings.items()}


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=60)
    conn.execute(SCHEMA)
    return conn


def _npz(arrays: dict) -> bytes | None:
    if not arrays:
        return None
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def load_analysis(path: str | Path, analysis_id: str, model: str) -> tuple[dict, dict] | None:
    """(data, arrays) stored for one model of an analysis, or None."""
    path = Path(path)
    if not path.is_file():
        return None
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT data, arrays FROM analyses WHERE id = ? AND model = ?",
                           (analysis_id, model)).fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        conn.close()
    if row is None:
        return None
    arrays = {}
    if row[1] is not None:
        with np.load(io.BytesIO(row[1])) as npz:
            arrays = {k: npz[k] for k in npz.files}
    return json.loads(row[0]), arrays


def execute_analysis(entry: dict, experiment, workspace, data, models) -> None:
    """Compute (or find stored) the analysis for each of its models."""
    from gradshield.evaluation.store import model_fingerprint

    kind = KINDS[entry["kind"]]
    settings = settings_of(entry)
    k = min(int(entry.get("examples", 256)), data.size)
    names = experiment.expand(entry["models"], f"analysis {entry['id']}")
    conn = _connect(workspace.analyses)
    try:
        for name in names:
            model = models(name)
            x, y = data.first(k, model)  # a streamed data set: preprocessed for this model
            fingerprint = model_fingerprint(model)
            key = json.dumps({"settings": settings, "examples": int(x.shape[0]),
                              "seed": experiment.seed}, sort_keys=True)
            row = conn.execute("SELECT fingerprint, settings FROM analyses WHERE id = ? AND "
                               "model = ?", (entry["id"], name)).fetchone()
            if row == (fingerprint, key):
                continue
            context = {"seed": experiment.seed,
                       "records": lambda n, name=name: records_of(experiment, workspace, name, n)}
            device = models.device
            out, arrays = kind.compute(model, x.to(device), y.to(device), context, **settings)
            with conn:
                conn.execute("INSERT OR REPLACE INTO analyses VALUES (?,?,?,?,?,?)",
                             (entry["id"], name, fingerprint, key, json.dumps(out, default=float),
                              _npz(arrays)))
    finally:
        conn.close()


def records_of(experiment, workspace, model: str, n: int):
    """AttackRecords of the model's per-attack runs that cover the first ``n`` examples: every
    attack with a budget, its success on those examples (skipped examples count as not fooled)."""
    from gradshield.evaluation.diagnostics import AttackRecord
    from gradshield.evaluation.store import load_run

    out = []
    for run in experiment.runs_of(model):
        path = workspace.run_path(run)
        if run.mode != "per-attack" or not path.is_file():
            continue
        results = load_run(path)
        if results.n < n:
            continue
        for a, attack in enumerate(results.attacks):
            if attack["eps"] is None:
                continue
            name = attack["id"] + (f" ({run.through})" if run.through else "")
            success = torch.from_numpy(results.success[a][:n] == 1)
            out.append(AttackRecord(name, attack["kind"], attack["family"], float(attack["eps"]),
                                    success))
    return out
