"""Run an attack suite over a model and a data set, keeping per-example results in SQLite.

One results file per run (stdlib ``sqlite3``). Each finished batch is written in one transaction
(its per-example rows, a few example images and a "batch done" marker together), so a killed run
loses at most the batch in flight and a rerun of the same command resumes where it stopped. A
file written for another suite, model, data set, seed, mode or batch size is refused, never
overwritten.

Two modes (stored in the file, shown in the report):

- ``per-attack`` (default): every attack runs on every clean-correct example, so each attack's
  robust accuracy is exact, and the worst case over attacks is exact too;
- ``worst-case``: as AutoAttack, an attack runs only on the examples no earlier attack has broken.
  Cheaper; the worst case is the same, but a single attack's own number is not available — the
  report then shows the cumulative robust accuracy after each attack.

Determinism: the examples are split into fixed batches (index order) and attack ``a`` on batch
``b`` draws its randomness from ``derived_generator(seed, a, b)``, so a resumed run equals an
uninterrupted one.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import io
import json
import math
import os
import platform
import sqlite3
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gradshield import __version__
from gradshield.errors import GradshieldError
from gradshield.suites import AttackSpec, Suite, attack_function, load_suite
from gradshield.utils import derived_generator, eval_mode

FORMAT = "gradshield-results"
SCHEMA_VERSION = 1
MODES = ("per-attack", "worst-case")
CLEAN = -1  # batch-marker "attack" id of the clean pass

SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE examples(idx INTEGER PRIMARY KEY, label INTEGER NOT NULL, clean_pred INTEGER NOT NULL,
                      clean_correct INTEGER NOT NULL);
CREATE TABLE attacks(aid INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, attack TEXT NOT NULL,
                     family TEXT NOT NULL, norm TEXT NOT NULL, label TEXT NOT NULL, kind TEXT NOT NULL,
                     through TEXT NOT NULL, budget REAL, eps REAL, spec TEXT NOT NULL);
CREATE TABLE results(aid INTEGER NOT NULL, idx INTEGER NOT NULL, success INTEGER NOT NULL,
                     size REAL, queries INTEGER, seconds REAL, PRIMARY KEY(aid, idx)) WITHOUT ROWID;
CREATE TABLE batches(aid INTEGER NOT NULL, batch INTEGER NOT NULL, attacked INTEGER NOT NULL,
                     seconds REAL NOT NULL, PRIMARY KEY(aid, batch));
CREATE TABLE samples(aid INTEGER NOT NULL, idx INTEGER NOT NULL, success INTEGER NOT NULL,
                     shape TEXT NOT NULL, clean BLOB NOT NULL, adversarial BLOB NOT NULL,
                     pshape TEXT NOT NULL, perturbation BLOB NOT NULL, PRIMARY KEY(aid, idx));
CREATE TABLE artifacts(name TEXT PRIMARY KEY, kind TEXT NOT NULL, data BLOB NOT NULL);
"""
#: meta keys that must match for a rerun to resume a results file.
IDENTITY = ("format", "schema_version", "suite_digest", "model_fingerprint", "data_fingerprint",
            "examples", "seed", "mode", "batch_size", "surrogate_fingerprint")


# --------------------------------------------------------------------------- fingerprints


def tensor_digest(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        digest.update(str((t.dtype, tuple(t.shape))).encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's structure (its repr, which shows GCM placements and w/eps) and weights."""
    state = model.state_dict()
    digest = hashlib.sha256(repr(model).encode())
    digest.update(tensor_digest(*[state[k] for k in sorted(state)]).encode())
    return digest.hexdigest()


def versions() -> dict:
    import matplotlib

    return {"gradshield": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "matplotlib": matplotlib.__version__, "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version, "platform": platform.platform()}


# --------------------------------------------------------------------------- the results file


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def _read_meta(conn: sqlite3.Connection, path: Path) -> dict:
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "meta" not in tables:
            raise GradshieldError(
                f"{path} is an SQLite file but not a gradshield results file (no 'meta' table); "
                "it was not touched. Pass another --db path")
        meta = {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM meta")}
        check = conn.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as err:
        raise GradshieldError(
            f"{path} is not a readable gradshield results file ({err}); it may be corrupt or "
            "another kind of file. It was not modified: move it away or pass another --db") from err
    if meta.get("format") != FORMAT:
        raise GradshieldError(f"{path} is not a gradshield results file (format "
                              f"{meta.get('format')!r}); it was not touched. Pass another --db")
    if check != "ok":
        raise GradshieldError(f"{path} is corrupt (sqlite quick_check: {check}); it was not "
                              "modified. Move it away and rerun to start over")
    if meta.get("schema_version", 0) > SCHEMA_VERSION:
        raise GradshieldError(f"{path} was written by a newer gradshield; upgrade to read it")
    return meta


def _uri(path: Path, mode: str) -> str:
    return f"file:{urllib.parse.quote(str(path.resolve()))}?mode={mode}"


def open_results(path: str | os.PathLike, *, readonly: bool = False) -> tuple[sqlite3.Connection, dict]:
    """Open an existing results file after checking it is one; returns (conn, meta)."""
    path = Path(path)
    if not path.is_file():
        raise GradshieldError(f"results file not found: {path}; run `gradshield evaluate --suite ...`")
    try:
        conn = sqlite3.connect(_uri(path, "ro" if readonly else "rw"), uri=True, timeout=30)
    except sqlite3.Error as err:
        raise GradshieldError(f"cannot open {path}: {err}") from err
    meta = _read_meta(conn, path)
    return conn, meta


def create_or_resume(path: str | os.PathLike, identity: dict, info: dict, specs: Sequence[AttackSpec],
                     image_shape: tuple[int, int, int]) -> tuple[sqlite3.Connection, bool]:
    """Open ``path`` for this run: create it, or resume it if its identity matches; else refuse.

    Returns (connection, resumed).
    """
    path = Path(path)
    if path.exists() and path.stat().st_size > 0 and not _empty_database(path):
        conn, meta = open_results(path)
        different = {k: (meta.get(k), v) for k, v in identity.items() if meta.get(k) != v}
        if different:
            conn.close()
            lines = "; ".join(f"{k}: file has {_short(a)}, this run has {_short(b)}"
                              for k, (a, b) in different.items())
            raise GradshieldError(
                f"{path} holds results of a different run ({lines}). It was not modified: pass "
                "another --db for this run, or delete the file to start over")
        conn.execute("PRAGMA journal_mode=WAL")
        with conn:
            history = [*meta.get("commands", []), info.get("command", "")]
            conn.execute("REPLACE INTO meta VALUES ('commands', ?)", (json.dumps(history),))
        return conn, True
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = _connect(path)
    conn.isolation_level = None  # one explicit transaction: the schema (DDL) included
    conn.execute("BEGIN")
    try:
        for statement in SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        rows = {**info, **identity, "status": "running", "created": time.time(),
                "commands": [info.get("command", "")]}
        conn.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in rows.items()])
        conn.executemany(
            "INSERT INTO attacks VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            [(i, s.id, s.attack, s.family, s.norm, s.label, s.kind, s.through, s.budget,
              s.eps_for(image_shape), json.dumps(s.to_dict())) for i, s in enumerate(specs)])
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        conn.close()
        raise
    conn.isolation_level = ""
    return conn, False


def _empty_database(path: Path) -> bool:
    """An SQLite file with no tables at all (e.g. a run killed while creating it): safe to reuse."""
    try:
        conn = sqlite3.connect(_uri(path, "ro"), uri=True)
        try:
            return conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return False


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) < 40 else text[:16] + "..." + text[-8:]


# --------------------------------------------------------------------------- models per attack


def _gcm_layers(model: nn.Module):
    from gradshield.defenses.concealment import GradientConcealment

    return [m for m in model.modules() if isinstance(m, GradientConcealment)]


def base_model(model: nn.Module) -> nn.Module | None:
    """The model without GCM if ``model`` came from :func:`gradshield.defenses.concealment.conceal`."""
    from gradshield.defenses.concealment import ConcealedModel

    return model.model if isinstance(model, ConcealedModel) else None


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
        from gradshield.attacks import bpda
        from gradshield.defenses.concealment import ConcealedModel, GradientConcealment

        if not _gcm_layers(model):
            return AttackTarget(fn, model, note="no GCM layer in the model: BPDA = white-box")
        if isinstance(model, ConcealedModel) and set(model.placements) - {"front"}:
            raise GradshieldError(
                f"attack {spec.id!r}: BPDA needs GCM at 'front' only; placements after modules "
                f"{sorted(set(model.placements) - {'front'})} are forward hooks that bpda() cannot "
                "replace. Evaluate with --gcm front for the BPDA rows")
        return AttackTarget(fn, bpda(model, lambda m: isinstance(m, GradientConcealment)),
                            note="GCM back-propagates as the identity")
    if spec.through == "transfer":
        if surrogate is None:
            return AttackTarget(fn, model, surrogate=model,
                                note="no GCM to remove and no surrogate given: crafted on the model "
                                     "itself (white-box); pass --surrogate CHECKPOINT for a transfer")
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
    if target.surrogate is not None:
        from gradshield.attacks import transfer_attack

        return transfer_attack(target.function, target.surrogate, target.model, x, y, **kwargs)
    return target.function(target.model, x, y, **kwargs)


# --------------------------------------------------------------------------- the runner


def _array_blob(t: torch.Tensor) -> tuple[str, bytes]:
    a = t.detach().cpu().to(torch.float16).numpy()
    return json.dumps(list(a.shape)), a.tobytes()


def blob_array(shape: str, blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.float16).reshape(json.loads(shape)).astype(np.float32)


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


def run_suite(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, suite: Suite,
              db_path: str | os.PathLike, *, seed: int = 0, batch_size: int = 256,
              mode: str = "per-attack", classes: Sequence[str] | None = None,
              surrogate: nn.Module | None = None, samples_per_attack: int = 4,
              diagnose: bool = False, gradient_figure: bool = True, info: dict | None = None,
              progress: str = "bar") -> dict:
    """Run ``suite`` on (``images`` in [0, 1], ``labels``) and store everything in ``db_path``.

    ``surrogate`` (for ``through = "transfer"`` entries): defaults to the model without GCM when
    the model came from ``conceal``. ``info``: extra run metadata to store (command, checkpoint,
    data description). ``progress``: ``"bar"``, ``"lines"`` or ``"none"``. Returns :func:`summarize`.
    """
    from gradshield.checkpoint import data_identity
    from gradshield.metrics import predict
    from gradshield.validation import check_images, check_labels

    if mode not in MODES:
        raise GradshieldError(f"mode must be one of {MODES}, got {mode!r}")
    if batch_size < 1:
        raise GradshieldError(f"batch_size must be >= 1, got {batch_size}")
    check_images(images)
    num_classes = getattr(getattr(model, "config", None), "num_classes", None)
    base = base_model(model)
    if num_classes is None and base is not None:
        num_classes = getattr(getattr(base, "config", None), "num_classes", None)
    identity = data_identity(model)
    if identity is not None:  # a model from a checkpoint knows the classes and image shape it learnt
        identity.check(classes, tuple(images.shape[1:]))
    elif classes is not None and num_classes is not None and len(classes) != num_classes:
        raise GradshieldError(f"the model has {num_classes} classes but the data set has {len(classes)}; "
                              "evaluate the model on the data set it was trained on")
    if surrogate is not None and data_identity(surrogate) is not None:
        data_identity(surrogate).check(classes, tuple(images.shape[1:]), model="the surrogate")
    check_labels(labels, images.shape[0], num_classes)
    if surrogate is None:
        surrogate = base
    n, image_shape = images.shape[0], tuple(images.shape[1:])
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    identity = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "suite_digest": suite.digest,
                "model_fingerprint": model_fingerprint(model),
                "data_fingerprint": tensor_digest(images, labels), "examples": n, "seed": seed,
                "mode": mode, "batch_size": batch_size,
                "surrogate_fingerprint": None if surrogate is None else model_fingerprint(surrogate)}
    meta = {"suite": suite.name, "suite_origin": suite.origin, "suite_toml": suite.source,
            "suite_description": suite.description, "versions": versions(),
            "image_shape": list(image_shape), "classes": list(classes) if classes else None,
            "model": repr(model) if len(repr(model)) < 4000 else repr(model)[:4000] + "...",
            "gcm_layers": len(_gcm_layers(model)),
            "data": {"dataset": "in-memory tensors", "split": ""}, **(info or {})}
    specs = suite.attacks
    # a suite entry may name its own surrogate checkpoint (surrogate = "path/checkpoint.pt")
    named = {s.surrogate: _load_surrogate(s.surrogate, classes, image_shape).to(device) for s in specs
             if s.through == "transfer" and s.surrogate != "base"}
    if named:
        identity["surrogate_fingerprint"] = {"base": identity["surrogate_fingerprint"],
                                             **{k: model_fingerprint(m) for k, m in named.items()}}
    targets = [attack_target(s, model, named.get(s.surrogate, surrogate))  # fail early, before any work
               for s in specs]
    conn, _resumed = create_or_resume(db_path, identity, meta, specs, image_shape)
    starts = list(range(0, n, batch_size))
    done = {(a, b) for a, b in conn.execute("SELECT aid, batch FROM batches")}
    bar = _Progress(progress, (len(specs) + 1) * len(starts), len(done), suite.name)
    try:
        with eval_mode(model):
            for b, start in enumerate(starts):  # the clean pass
                if (CLEAN, b) in done:
                    continue
                t0 = time.perf_counter()
                stop = min(start + batch_size, n)
                pred = predict(model, images[start:stop].to(device), batch_size).cpu()
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
                for b, start in enumerate(starts):
                    if (a, b) in done:
                        continue
                    _attack_batch(conn, a, b, spec, target, images, labels, correct, start,
                                  min(start + batch_size, n), mode, seed, image_shape, device,
                                  samples_per_attack)
                    bar.update(spec.id, b)
        if gradient_figure:
            _store_gradient_figure(conn, model, base, images, labels, classes)
        if diagnose:
            _store_diagnostics(conn, model, images, labels, correct, specs, mode, seed, device)
        with conn:
            conn.execute("REPLACE INTO meta VALUES ('status', ?)", (json.dumps("complete"),))
            conn.execute("REPLACE INTO meta VALUES ('finished', ?)", (json.dumps(time.time()),))
            notes = {s.id: t.note for s, t in zip(specs, targets, strict=True) if t.note}
            conn.execute("REPLACE INTO meta VALUES ('attack_notes', ?)", (json.dumps(notes),))
    finally:
        bar.close()
        conn.close()
    return summarize(db_path)


def _attack_batch(conn, a, b, spec, target, images, labels, correct, start, stop, mode, seed,
                  image_shape, device, samples_per_attack) -> None:
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
        x, y = images[index].to(device), labels[index].to(device)
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
                shape, clean = _array_blob(x[j])
                _, adv = _array_blob(result.adversarial[j])
                pshape, pert = _array_blob(result.perturbation[j])
                sample_rows.append((a, int(index[j]), int(success[j]), shape, clean, adv, pshape, pert))
    with conn:  # one transaction: rows, samples and the done marker together
        conn.executemany("INSERT OR REPLACE INTO results VALUES (?,?,?,?,?,?)", rows)
        conn.executemany("INSERT OR REPLACE INTO samples VALUES (?,?,?,?,?,?,?,?)", sample_rows)
        conn.execute("INSERT INTO batches VALUES (?,?,?,?)",
                     (a, b, int(index.numel()), time.perf_counter() - t0))


def _png(fig) -> bytes:
    from matplotlib import pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def _store_gradient_figure(conn, model, base, images, labels, classes, count: int = 4) -> None:
    if conn.execute("SELECT 1 FROM artifacts WHERE name = 'gradient_sign'").fetchone():
        return
    from gradshield.plots import plot_gradient_sign

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    models = {"evaluated model": model} if base is None else {"without GCM": base, "with GCM": model}
    x, y = images[:count].to(device), labels[:count].to(device)
    fig = plot_gradient_sign(models, x, y, classes=classes)
    with conn:
        conn.execute("INSERT INTO artifacts VALUES ('gradient_sign', 'png', ?)", (_png(fig),))


def success_matrix(conn: sqlite3.Connection, n: int, attacks: int) -> np.ndarray:
    """(attacks, n) int8: 1 broken, 0 robust, -1 not attacked (clean-wrong, or skipped in worst-case)."""
    out = np.full((attacks, n), -1, dtype=np.int8)
    rows = np.array(conn.execute("SELECT aid, idx, success FROM results").fetchall(), dtype=np.int64)
    if rows.size:
        out[rows[:, 0], rows[:, 1]] = rows[:, 2]
    return out


def _store_diagnostics(conn, model, images, labels, correct, specs, mode, seed, device) -> None:
    from gradshield.diagnostics import AttackRecord, diagnose

    records = []
    if mode == "per-attack":
        matrix = success_matrix(conn, images.shape[0], len(specs))
        for a, spec in enumerate(specs):
            eps = spec.eps_for(tuple(images.shape[1:]))
            if eps is not None:
                records.append(AttackRecord(spec.id, spec.kind, spec.family, eps,
                                            torch.from_numpy(matrix[a] == 1)))
    verdict = diagnose(model, images.to(device), labels.to(device), records=records,
                       clean_correct=correct, unbounded_examples=min(256, images.shape[0]),
                       generator=derived_generator(seed, 10_000))
    payload = {**verdict.to_dict(), "text": verdict.text(),
               "records": "per-attack results" if records else "none (worst-case mode)"}
    with conn:
        conn.execute("REPLACE INTO artifacts VALUES ('diagnostics', 'json', ?)",
                     (json.dumps(payload, default=float).encode(),))


# --------------------------------------------------------------------------- reading results


@dataclass
class RunResults:
    """A results file in memory: meta, per-example clean outcome, attack table, success matrix."""

    path: Path
    meta: dict
    labels: np.ndarray
    clean_correct: np.ndarray          # (n,) bool
    attacks: list[dict]                # one dict per attack (aid order)
    success: np.ndarray                # (attacks, n) int8: 1 broken, 0 robust, -1 not attacked
    size: np.ndarray                   # (attacks, n) float, NaN where not attacked
    queries: np.ndarray                # (attacks, n) float, NaN where not attacked
    seconds: np.ndarray                # (attacks, n) float
    complete_batches: int
    total_batches: int

    @property
    def n(self) -> int:
        return int(self.clean_correct.shape[0])

    @property
    def complete(self) -> bool:
        return self.meta.get("status") == "complete"

    def robust(self, a: int) -> np.ndarray:
        """Examples correct before and after attack ``a`` (exact in per-attack mode)."""
        return self.clean_correct & (self.success[a] == 0)

    def robust_or_cumulative(self, a: int) -> np.ndarray:
        """``robust(a)`` in per-attack mode; robust to attacks 0..a in worst-case mode."""
        return self.robust(a) if self.meta["mode"] == "per-attack" else self.worst_case(range(a + 1))

    def worst_case(self, attacks: Sequence[int] | None = None) -> np.ndarray:
        """Examples no attack (of ``attacks``, default all) broke, among the clean-correct ones.

        In worst-case mode only all attacks, or the first k, give an exact answer (later attacks
        skipped the examples earlier ones broke)."""
        rows = self.success if attacks is None else self.success[list(attacks)]
        return self.clean_correct & ~(rows == 1).any(0)


def load_run(path: str | os.PathLike) -> RunResults:
    """Read a results file (complete or not) into memory."""
    conn, meta = open_results(path, readonly=True)
    try:
        attacks = [dict(zip(("aid", "id", "attack", "family", "norm", "label", "kind", "through",
                             "budget", "eps", "spec"), row, strict=True))
                   for row in conn.execute("SELECT * FROM attacks ORDER BY aid")]
        ex = np.array(conn.execute("SELECT idx, label, clean_correct FROM examples ORDER BY idx")
                      .fetchall(), dtype=np.int64).reshape(-1, 3)
        n = int(meta["examples"])
        labels = np.full(n, -1, dtype=np.int64)
        correct = np.zeros(n, dtype=bool)
        labels[ex[:, 0]], correct[ex[:, 0]] = ex[:, 1], ex[:, 2].astype(bool)
        k = len(attacks)
        success = np.full((k, n), -1, dtype=np.int8)
        size, queries, seconds = (np.full((k, n), np.nan) for _ in range(3))
        rows = conn.execute("SELECT aid, idx, success, size, queries, seconds FROM results").fetchall()
        if rows:
            r = np.array(rows, dtype=np.float64)
            aid, idx = r[:, 0].astype(np.int64), r[:, 1].astype(np.int64)
            success[aid, idx] = r[:, 2].astype(np.int8)
            size[aid, idx], queries[aid, idx], seconds[aid, idx] = r[:, 3], r[:, 4], r[:, 5]
        batches = conn.execute("SELECT COUNT(*) FROM batches").fetchone()[0]
        total = (k + 1) * math.ceil(n / int(meta["batch_size"]))
    finally:
        conn.close()
    return RunResults(Path(path), meta, labels, correct, attacks, success, size, queries, seconds,
                      batches, total)


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


# --------------------------------------------------------------------------- command line


def add_evaluate_suite_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``gradshield evaluate --suite``; the parser must already have ``--checkpoint``,
    ``--batch-size``, ``--seed`` and the data options (``--dataset``, ``--data-dir``,
    ``--cache-dir``, ``--download``, ``--test-limit``)."""
    group = parser.add_argument_group("attack suite")
    group.add_argument("--suite", default=None,
                       help="built-in suite (gcm-paper, fgr-paper, adaptive, quickstart) or a suite .toml "
                            "file; its budgets are on the [0, 1] pixel scale for intensity "
                            "attacks (e.g. eps = \"8/255\") and in pixels for flow attacks")
    group.add_argument("--gcm", default=None, metavar="AT",
                       help="evaluate the checkpoint with GCM inserted: 'front', 'all' or "
                            "comma-separated module names (default: no GCM)")
    group.add_argument("--gcm-w", type=float, default=1e20,
                       help="GCM frequency w in x + eps*sin(w*x), radians per unit of [0, 1] "
                            "pixel value (default: %(default)g)")
    group.add_argument("--gcm-eps", type=float, default=1e-8,
                       help="GCM amplitude eps, [0, 1] pixel scale (default: %(default)g)")
    group.add_argument("--db", default=None,
                       help="results file (SQLite); rerun the same command to resume it "
                            "(default: runs/evaluate/<suite>-<checkpoint folder>[-gcm-<AT>].db)")
    group.add_argument("--mode", default="per-attack", choices=MODES,
                       help="per-attack: every attack on every clean-correct example (exact per-"
                            "attack numbers); worst-case: skip examples already broken "
                            "(default: %(default)s)")
    group.add_argument("--surrogate", default=None,
                       help="checkpoint of the surrogate for transfer attacks (default: the "
                            "evaluated model without GCM)")
    group.add_argument("--samples", type=int, default=4,
                       help="example images kept per attack for the report (default: %(default)s)")
    group.add_argument("--diagnose", action="store_true",
                       help="also run the gradient-masking diagnostics and store the verdict")
    group.add_argument("--progress", default="bar", choices=("bar", "lines", "none"),
                       help="progress display (default: %(default)s)")
    group.add_argument("--device", default="cpu",
                       help="torch device for model and attacks, e.g. cuda (default: %(default)s; "
                            "resume a run on the device it started on: results are exact per device)")


def _file_sha256(path: str | os.PathLike) -> str:
    from gradshield.data import sha256_file

    return sha256_file(Path(path))


def run_suite_cli(args: argparse.Namespace) -> int:
    """``gradshield evaluate --suite ...``: load checkpoint and data, run, print the summary as JSON."""
    from gradshield.checkpoint import load_model
    from gradshield.data import load_dataset

    if not args.suite:
        raise GradshieldError("--suite is required (built-in: gcm-paper, fgr-paper, adaptive, or a .toml)")
    from gradshield.cli import image_size

    suite = load_suite(args.suite)
    model, _ = load_model(args.checkpoint)
    surrogate = load_model(args.surrogate)[0] if args.surrogate else None
    _, test = load_dataset(args.dataset, args.data_dir, args.cache_dir, download=args.download,
                           image_size=image_size(args))
    test = test.subset(args.test_limit, seed=args.seed)
    for name, loaded in (("checkpoint", model), ("surrogate", surrogate)):
        if loaded is not None:
            loaded.data_identity.check(test.classes, test.image_shape,
                                       model=f"the {name} {getattr(args, name)}",
                                       data=f"the data set {args.dataset}")
    if args.gcm:
        from gradshield.defenses.concealment import conceal

        at = args.gcm if args.gcm in ("front", "all") else args.gcm.split(",")
        model = conceal(model, at=at, w=args.gcm_w, eps=args.gcm_eps)
    device = torch.device(getattr(args, "device", "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GradshieldError("--device cuda but torch sees no CUDA GPU; use --device cpu")
    model = model.to(device)
    surrogate = surrogate.to(device) if surrogate is not None else None
    db = args.db or Path("runs/evaluate") / (
        f"{suite.name}-{Path(args.checkpoint).resolve().parent.name}"
        + (f"-gcm-{args.gcm.replace(',', '+')}" if args.gcm else "") + ".db")
    x, y = test.as_float()
    info = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "checkpoint": str(args.checkpoint), "checkpoint_sha256": _file_sha256(args.checkpoint),
            "gcm": {"at": args.gcm, "w": args.gcm_w, "eps": args.gcm_eps} if args.gcm else None,
            "surrogate": str(args.surrogate) if args.surrogate else None, "device": str(device),
            "data": {"dataset": args.dataset, "split": "test", "test_limit": args.test_limit,
                     "subset_seed": args.seed}}
    summary = run_suite(model, x, y, suite, db, seed=args.seed, batch_size=args.batch_size,
                        mode=args.mode, classes=test.classes, surrogate=surrogate,
                        samples_per_attack=args.samples, diagnose=args.diagnose, info=info,
                        progress=args.progress)
    short = {k: v for k, v in summary.items() if k != "attacks"}
    key = "robust_accuracy" if args.mode == "per-attack" else "cumulative_robust_accuracy"
    short[key] = {r["id"]: r[key] for r in summary["attacks"]}
    short = json.loads(json.dumps(short), parse_constant=lambda _: None)  # NaN -> null
    print(json.dumps(short))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser (``python -m gradshield.evaluation``) with the data options too."""
    parser = argparse.ArgumentParser(prog="python -m gradshield.evaluation",
                                     description="Run an attack suite (see gradshield.suites).")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--test-limit", type=int, default=None)
    add_evaluate_suite_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_suite_cli(args)
    except GradshieldError as err:
        print(f"gradshield: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("gradshield: interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
