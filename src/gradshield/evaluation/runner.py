"""Run an attack suite over a model and a data set, keeping per-example results in the store
(:mod:`gradshield.evaluation.store`).

Two modes (stored in the file, shown in the report):

- ``per-attack`` (default): every attack runs on every clean-correct example, so each attack's
  robust accuracy is exact, and the worst case over attacks is exact too;
- ``worst-case``: as AutoAttack, an attack runs only on the examples no earlier attack has broken.
  Cheaper; the worst case is the same, but a single attack's own number is not available — the
  report then shows the cumulative robust accuracy after each attack.

Determinism: the examples are split into fixed batches (index order) and attack ``a`` on batch
``b`` draws its randomness from ``derived_generator(seed, a, b)``, so a resumed run equals an
uninterrupted one.

Data: tensors held in memory, or any :class:`gradshield.data.Examples` (e.g. ImageNet streamed
from its files): the runner reads images only batch by batch, in the order it will use them, so
a streamed source decodes ahead while the attacks run.

Several processes (started by torchrun): the batches are dealt to the ranks, each rank writes its
own shard file as it goes, and rank 0 merges the shards into the one results file at the end,
then adds the figure and diagnostics (:mod:`gradshield.evaluation.distributed`); the per-example
outcomes are those of one process.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gradshield import distributed
from gradshield.attacks.adaptive import bpda_default, marked_for_bpda, undefended
from gradshield.attacks.base import AttackResult, is_adversarial
from gradshield.data.examples import Examples, TensorExamples, as_examples, take
from gradshield.errors import GradshieldError
from gradshield.evaluation.crafted import Crafted, CraftedStore, crafted_key
from gradshield.evaluation.distributed import plan_results
from gradshield.evaluation.store import (
    CLEAN,
    FORMAT,
    MODES,
    SCHEMA_VERSION,
    array_blob,
    model_fingerprint,
    success_matrix,
    tensor_digest,
    versions,
)
from gradshield.evaluation.suites import AttackSpec, Suite, attack_function
from gradshield.evaluation.summary import summarize
from gradshield.machine import describe
from gradshield.utils import derived_generator, eval_mode

#: a data source that is not in memory is diagnosed on its first examples only
DIAGNOSE_STREAMED = 512

# --------------------------------------------------------------------------- models per attack


@dataclass
class AttackTarget:
    """How to run one suite entry: the function and the model(s) it gets."""

    function: Callable
    model: nn.Module          # the model the attack computes gradients on (maybe a BPDA copy)
    surrogate: nn.Module | None = None  # set for transfer: crafted here, scored on ``model``
    note: str = ""


def attack_target(spec: AttackSpec, model: nn.Module, surrogate: nn.Module | None) -> AttackTarget:
    fn = attack_function(spec.attack)
    if spec.through == "bpda":
        approximated = bpda_default(model)
        if approximated is None:
            return AttackTarget(fn, model, note="no module of the model is marked for BPDA: "
                                                "BPDA = white-box")
        return AttackTarget(fn, approximated, note="the defense's marked modules back-propagate "
                                                   "as the identity")
    if spec.through == "transfer":
        if surrogate is None:
            return AttackTarget(fn, model, surrogate=model,
                                note="no defense to remove and no surrogate given: crafted on the "
                                     "model itself (white-box); pass --surrogate CHECKPOINT for a "
                                     "transfer")
        return AttackTarget(fn, model, surrogate=surrogate)
    return AttackTarget(fn, model)


def _load_surrogate(path: str, classes: Sequence[str] | None, image_shape: tuple[int, ...]) -> nn.Module:
    from gradshield.checkpoint import load_model

    surrogate = load_model(path)[0]
    surrogate.data_identity.check(classes, image_shape, model=f"the surrogate {path}")
    return surrogate


def _call(target: AttackTarget, spec: AttackSpec, x, y, image_shape, generator):
    kwargs = spec.kwargs_for(image_shape)
    if "generator" in inspect.signature(target.function).parameters:
        kwargs["generator"] = generator
    return target.function(target.model, x, y, **kwargs)


def _transfer(target: AttackTarget, spec: AttackSpec, x_batch, y_batch, rows, image_shape,
              generator_key, crafted: CraftedStore | None, surrogate_fingerprint: str) -> AttackResult:
    """A transfer entry on one batch: adversarials crafted on the surrogate for the WHOLE batch
    (so they depend on the surrogate, attack, examples and seed only; reused from ``crafted``
    when there), scored on the target for the ``rows`` it attacks."""
    key = crafted_key(surrogate_fingerprint, spec.to_dict(), list(image_shape), generator_key,
                      tensor_digest(x_batch, y_batch))
    made = crafted.get(key) if crafted is not None else None
    if made is None:
        result = _call(AttackTarget(target.function, target.surrogate), spec, x_batch, y_batch,
                       image_shape, derived_generator(*generator_key))
        made = Crafted(result.adversarial.detach().cpu(), result.perturbation.detach().cpu(),
                       result.perturbation_size.detach().cpu())
        if crafted is not None:
            crafted.put(key, made, {"attack": spec.id, "surrogate": surrogate_fingerprint,
                                    "generator": generator_key})
    device = x_batch.device
    adversarial = made.adversarial[rows].to(device)
    with eval_mode(target.model), torch.no_grad():
        success = is_adversarial(target.model(adversarial), y_batch[rows],
                                 bool(spec.hyper.get("targeted", False)))
    return AttackResult(adversarial=adversarial, success=success,
                        perturbation_size=made.size[rows].to(device),
                        queries=torch.ones(len(rows), dtype=torch.long, device=device),
                        perturbation=made.perturbation[rows].to(device))


# --------------------------------------------------------------------------- the runner


class _Progress:
    """tqdm bar (``bar``), one JSON line per committed batch on stderr (``lines``), or nothing."""

    def __init__(self, mode: str, total: int, done: int, desc: str) -> None:
        self.mode, self.bar = mode, None
        if mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, desc=desc, unit="batch", dynamic_ncols=True)

    def update(self, what: str, batch: int, **extra) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(what, refresh=False)
            self.bar.update(1)
        elif self.mode == "lines":
            print(json.dumps({"done": what, "batch": batch, **extra}), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_suite(model: nn.Module, images: torch.Tensor | Examples, labels: torch.Tensor | None,
              suite: Suite, db_path: str | os.PathLike, *, seed: int = 0, batch_size: int = 256,
              mode: str = "per-attack", classes: Sequence[str] | None = None,
              surrogate: nn.Module | None = None, samples_per_attack: int = 4,
              diagnose: bool = False, gradient_figure: bool = True, info: dict | None = None,
              progress: str = "bar", crafted: str | os.PathLike | None = None) -> dict:
    """Run ``suite`` on (``images`` in [0, 1], ``labels``) and store everything in ``db_path``.

    ``images`` may instead be a :class:`gradshield.data.Examples` (with ``labels=None``), e.g.
    ``gradshield.data.image_folder_split(...)``: its images are read batch by batch, never all at
    once; its fingerprint identifies the data in the results file (resume), its ``classes`` and
    ``description`` are stored. Gradient-masking diagnostics (``diagnose``) then use its first
    ``DIAGNOSE_STREAMED`` examples (all of them for tensors).

    ``surrogate`` (for ``through = "transfer"`` entries): defaults to the model without its
    inference-time defense where it has one (:func:`gradshield.attacks.adaptive.undefended`).
    ``crafted``: an SQLite file where transfer adversarials are kept and reused across targets
    (:mod:`gradshield.evaluation.crafted`). ``info``: extra run metadata to store (command,
    checkpoint, data description). ``progress``: ``"bar"``, ``"lines"`` or ``"none"``.
    Returns :func:`summarize`.
    """
    from gradshield.checkpoint import data_identity
    from gradshield.metrics import predict
    from gradshield.validation import check_labels

    if mode not in MODES:
        raise GradshieldError(f"mode must be one of {MODES}, got {mode!r}")
    if batch_size < 1:
        raise GradshieldError(f"batch_size must be >= 1, got {batch_size}")
    data = as_examples(images, labels, classes)
    labels, n, image_shape = data.labels, len(data), tuple(data.image_shape)
    if classes is None:
        classes = data.classes
    num_classes = getattr(getattr(model, "config", None), "num_classes", None)
    base = undefended(model)
    if num_classes is None and base is not None:
        num_classes = getattr(getattr(base, "config", None), "num_classes", None)
    identity = data_identity(model)
    if identity is not None:  # a model from a checkpoint knows the classes and image shape it learnt
        identity.check(classes, image_shape)
    elif classes is not None and num_classes is not None and len(classes) != num_classes:
        raise GradshieldError(f"the model has {num_classes} classes but the data set has {len(classes)}; "
                              "evaluate the model on the data set it was trained on")
    if surrogate is not None and data_identity(surrogate) is not None:
        data_identity(surrogate).check(classes, image_shape, model="the surrogate")
    check_labels(labels, n, num_classes)
    if surrogate is None:
        surrogate = base
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    identity = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "suite_digest": suite.digest,
                "model_fingerprint": model_fingerprint(model),
                "data_fingerprint": data.fingerprint, "examples": n, "seed": seed,
                "mode": mode, "batch_size": batch_size,
                "surrogate_fingerprint": None if surrogate is None else model_fingerprint(surrogate)}
    meta = {"suite": suite.name, "suite_origin": suite.origin, "suite_toml": suite.source,
            "suite_description": suite.description, "versions": versions(),
            "image_shape": list(image_shape), "classes": list(classes) if classes else None,
            "model": repr(model) if len(repr(model)) < 4000 else repr(model)[:4000] + "...",
            "bpda_modules": sum(marked_for_bpda(m) for m in model.modules()),
            "data": data.description,
            "machine": describe(device, bf16=False, processes=distributed.current().world_size),
            **(info or {})}
    specs = suite.attacks
    # a suite entry may name its own surrogate checkpoint (surrogate = "path/checkpoint.pt")
    named = {s.surrogate: _load_surrogate(s.surrogate, classes, image_shape).to(device) for s in specs
             if s.through == "transfer" and s.surrogate != "base"}
    if named:
        identity["surrogate_fingerprint"] = {"base": identity["surrogate_fingerprint"],
                                             **{k: model_fingerprint(m) for k, m in named.items()}}
    targets = [attack_target(s, model, named.get(s.surrogate, surrogate))  # fail early, before any work
               for s in specs]
    starts = list(range(0, n, batch_size))
    # the results file (one process) or this rank's shard of it, and the batches this process runs
    plan = plan_results(db_path, identity, meta, specs, image_shape, len(starts),
                        samples_per_attack=samples_per_attack, crafted=crafted)
    conn, store = plan.conn, plan.crafted
    fingerprints = {id(m): model_fingerprint(m) for m in {id(t.surrogate): t.surrogate
                                                          for t in targets if t.surrogate}.values()}
    done = {(a, b) for a, b in conn.execute("SELECT aid, batch FROM batches")}
    mine = set(plan.batches)
    bar = _Progress(progress if plan.writes_results else "none", (len(specs) + 1) * len(mine),
                    sum(b in mine for _, b in done), suite.name)
    todo = [(starts[b], min(starts[b] + batch_size, n)) for a in [CLEAN, *range(len(specs))]
            for b in plan.batches if (a, b) not in done]
    batches = data.batches(todo)  # every batch still to do, in the order the loops below use them
    try:
        with eval_mode(model):
            for b in plan.batches:  # the clean pass
                start = starts[b]
                if (CLEAN, b) in done:
                    continue
                x_batch = next(batches)
                t0 = time.perf_counter()
                stop = min(start + batch_size, n)
                pred = predict(model, x_batch.to(device), batch_size).cpu()
                rows = [(start + i, int(labels[start + i]), int(p), int(p == labels[start + i]))
                        for i, p in enumerate(pred)]
                with conn:
                    conn.executemany("INSERT OR REPLACE INTO examples VALUES (?,?,?,?)", rows)
                    conn.execute("INSERT INTO batches VALUES (?,?,?,?)",
                                 (CLEAN, b, stop - start, time.perf_counter() - t0))
                bar.update("clean", b)
            correct = torch.zeros(n, dtype=torch.bool)
            for idx, ok in conn.execute("SELECT idx, clean_correct FROM examples"):
                correct[idx] = bool(ok)
            for a, (spec, target) in enumerate(zip(specs, targets, strict=True)):
                for b in plan.batches:
                    if (a, b) in done:
                        continue
                    _attack_batch(conn, a, b, spec, target, next(batches), labels, correct,
                                  starts[b], min(starts[b] + batch_size, n), mode, seed,
                                  image_shape, device, samples_per_attack, store, fingerprints)
                    bar.update(spec.id, b)
        conn = plan.finish()  # a launch's shards merged into the results file, on rank 0
        if conn is not None:  # this process finishes the results file (one process, or rank 0)
            correct = torch.zeros(n, dtype=torch.bool)
            for idx, ok in conn.execute("SELECT idx, clean_correct FROM examples"):
                correct[idx] = bool(ok)
            if gradient_figure:
                _store_gradient_figure(conn, model, base, data, classes)
            if diagnose:
                _store_diagnostics(conn, model, data, correct, specs, mode, seed, device)
            with conn:
                conn.execute("REPLACE INTO meta VALUES ('status', ?)", (json.dumps("complete"),))
                conn.execute("REPLACE INTO meta VALUES ('finished', ?)", (json.dumps(time.time()),))
                notes = {s.id: t.note for s, t in zip(specs, targets, strict=True) if t.note}
                conn.execute("REPLACE INTO meta VALUES ('attack_notes', ?)", (json.dumps(notes),))
    finally:
        batches.close()  # a streamed source's decoding processes end here
        bar.close()
        plan.close()
    plan.wait()  # the other ranks return once rank 0 has completed the results file
    return summarize(db_path)


def _attack_batch(conn, a, b, spec, target, x_batch, labels, correct, start, stop, mode, seed,
                  image_shape, device, samples_per_attack, crafted, fingerprints) -> None:
    """Attack ``a`` on batch ``b``: the examples [start, stop), whose images are ``x_batch``."""
    index = torch.arange(start, stop)
    eligible = correct[start:stop].clone()
    if mode == "worst-case":
        broken = [i for (i,) in conn.execute(
            "SELECT idx FROM results WHERE success = 1 AND idx >= ? AND idx < ? AND aid < ?",
            (start, stop, a))]
        if broken:
            eligible[torch.tensor(broken) - start] = False
    index = index[eligible]
    t0 = time.perf_counter()
    rows, sample_rows = [], []
    if index.numel():
        x, y = x_batch[index - start].to(device), labels[index].to(device)
        if target.surrogate is not None:
            result = _transfer(target, spec, x_batch.to(device),
                               labels[start:stop].to(device), index - start, image_shape,
                               (seed, a, b), crafted, fingerprints[id(target.surrogate)])
        else:
            result = _call(target, spec, x, y, image_shape, derived_generator(seed, a, b))
        per_example = (time.perf_counter() - t0) / index.numel()
        success = result.success.detach().cpu().bool()
        size = result.perturbation_size.detach().cpu().double()
        threshold = spec.threshold_for(image_shape)
        if threshold is not None:  # a minimum-size attack: fooled within the budget only
            success &= size <= threshold * (1 + 1e-6)
        queries = result.queries.detach().cpu().long()
        rows = [(a, int(i), int(s), float(z) if math.isfinite(float(z)) else None, int(q), per_example)
                for i, s, z, q in zip(index.tolist(), success.tolist(), size.tolist(), queries.tolist(),
                                      strict=True)]
        have = conn.execute("SELECT COUNT(*) FROM samples WHERE aid = ?", (a,)).fetchone()[0]
        if have < samples_per_attack:
            order = sorted(range(index.numel()), key=lambda j: (not bool(success[j]), j))
            for j in order[:samples_per_attack - have]:
                shape, clean = array_blob(x[j])
                _, adv = array_blob(result.adversarial[j])
                pshape, pert = array_blob(result.perturbation[j])
                sample_rows.append((a, int(index[j]), int(success[j]), shape, clean, adv, pshape, pert))
    with conn:  # one transaction: rows, samples and the done marker together
        conn.executemany("INSERT OR REPLACE INTO results VALUES (?,?,?,?,?,?)", rows)
        conn.executemany("INSERT OR REPLACE INTO samples VALUES (?,?,?,?,?,?,?,?)", sample_rows)
        conn.execute("INSERT INTO batches VALUES (?,?,?,?)",
                     (a, b, int(index.numel()), time.perf_counter() - t0))


def _store_gradient_figure(conn, model, base, data: Examples, classes, count: int = 4) -> None:
    if conn.execute("SELECT 1 FROM artifacts WHERE name = 'gradient_sign'").fetchone():
        return
    from gradshield.evaluation.plots import figure_png, plot_gradient_sign

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    models = ({"evaluated model": model} if base is None
              else {"without the defense": base, "with the defense": model})
    count = min(count, len(data))
    x, y = take(data, 0, count).to(device), data.labels[:count].to(device)
    fig = plot_gradient_sign(models, x, y, classes=classes)
    with conn:
        conn.execute("INSERT INTO artifacts VALUES ('gradient_sign', 'png', ?)", (figure_png(fig, dpi=90),))


def _store_diagnostics(conn, model, data: Examples, correct, specs, mode, seed, device) -> None:
    from gradshield.evaluation.diagnostics import AttackRecord, diagnose

    n = len(data)
    k = n if isinstance(data, TensorExamples) else min(n, DIAGNOSE_STREAMED)
    records = []
    if mode == "per-attack":
        matrix = success_matrix(conn, n, len(specs))
        for a, spec in enumerate(specs):
            eps = spec.eps_for(tuple(data.image_shape))
            if eps is not None:
                records.append(AttackRecord(spec.id, spec.kind, spec.family, eps,
                                            torch.from_numpy(matrix[a, :k] == 1)))
    verdict = diagnose(model, take(data, 0, k).to(device), data.labels[:k].to(device),
                       records=records, clean_correct=correct[:k],
                       unbounded_examples=min(256, k), generator=derived_generator(seed, 10_000))
    payload = {**verdict.to_dict(), "text": verdict.text(),
               "records": "per-attack results" if records else "none (worst-case mode)"}
    if k < n:
        payload["examples"] = f"the first {k} of {n}"
    with conn:
        conn.execute("REPLACE INTO artifacts VALUES ('diagnostics', 'json', ?)",
                     (json.dumps(payload, default=float).encode(),))


