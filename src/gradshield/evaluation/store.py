"""The results store: one SQLite file per run (stdlib ``sqlite3``), its schema, creating or resuming
it, and reading it back.

Each finished batch is written in one transaction (its per-example rows, a few example images and a
"batch done" marker together), so a killed run loses at most the batch in flight and a rerun of
the same command resumes where it stopped. A file written for another suite, model, data set,
seed, mode or batch size is refused, never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sqlite3
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gradshield import __version__
from gradshield.errors import GradshieldError
from gradshield.evaluation.suites import AttackSpec

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


def compute_seconds(path: str | os.PathLike) -> tuple[float, list[str]]:
    """(seconds the stored batches took to attack, the machines that ran them) of a results file."""
    conn, meta = open_results(path, readonly=True)
    try:
        seconds = conn.execute("SELECT COALESCE(SUM(seconds), 0) FROM batches").fetchone()[0]
    finally:
        conn.close()
    return float(seconds), meta.get("machines", [meta["machine"]] if "machine" in meta else [])


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
            machines = meta.get("machines", [meta["machine"]] if "machine" in meta else [])
            if info.get("machine") and info["machine"] not in machines:  # resumed elsewhere
                conn.execute("REPLACE INTO meta VALUES ('machines', ?)",
                             (json.dumps([*machines, info["machine"]]),))
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
                "commands": [info.get("command", "")],
                **({"machines": [info["machine"]]} if info.get("machine") else {})}
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


# --------------------------------------------------------------------------- per-example data


def array_blob(t: torch.Tensor) -> tuple[str, bytes]:
    a = t.detach().cpu().to(torch.float16).numpy()
    return json.dumps(list(a.shape)), a.tobytes()


def blob_array(shape: str, blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.float16).reshape(json.loads(shape)).astype(np.float32)


def success_matrix(conn: sqlite3.Connection, n: int, attacks: int) -> np.ndarray:
    """(attacks, n) int8: 1 broken, 0 robust, -1 not attacked (clean-wrong, or skipped in worst-case)."""
    out = np.full((attacks, n), -1, dtype=np.int8)
    rows = np.array(conn.execute("SELECT aid, idx, success FROM results").fetchall(), dtype=np.int64)
    if rows.size:
        out[rows[:, 0], rows[:, 1]] = rows[:, 2]
    return out


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


