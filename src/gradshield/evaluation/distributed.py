"""Which results file a process writes and which batches it runs: one process, or one rank of a
torchrun launch (:mod:`gradshield.distributed`) sharing a suite's examples with the others.

Design: per-rank shard files merged at the end (no SQLite file is ever written by two processes,
so nothing depends on SQLite's locking across processes or over a network filesystem):

- The examples are the runner's fixed batches. The batches with work left are dealt round-robin to
  the ranks, whole: attack ``a`` on batch ``b`` draws from ``derived_generator(seed, a, b)``
  wherever it runs, so every per-example outcome is the one a single process gets.
- Rank 0 alone opens the results file (creating it, or resuming it after checking its identity)
  and first merges any shards a killed launch left; every rank receives what the file already
  holds about its batches.
- Each rank writes its batches, one transaction each, into its own shard
  ``<results>.shards/rank-<r>-of-<N>.db`` (the results schema) as it goes.
- At the end rank 0 merges the shards into the results file (one transaction per shard;
  merging twice changes nothing), keeps the example images one process would keep (the first
  ``samples_per_attack`` per attack in batch order, successes first), deletes the shards, then
  adds the gradient figure and diagnostics and marks the file complete. ``gradshield report``
  reads it like any other.
- After a kill of any rank, the same command (with any number of processes, one included)
  merges what the shards hold and runs only what is left.

Transfer adversarials (``crafted``) are read from the shared file, written to a per-rank file
beside it, and merged into it by rank 0 at the end. The results file's folder must be on a
filesystem every rank sees (checked).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gradshield import distributed
from gradshield.errors import GradshieldError
from gradshield.evaluation.crafted import Crafted, CraftedStore
from gradshield.evaluation.store import CLEAN, IDENTITY, create_or_resume, open_results
from gradshield.evaluation.suites import AttackSpec

SHARDS = ".shards"
#: Tables a shard contributes to the results file (the meta, attacks and artifacts are rank 0's).
MERGED_TABLES = ("examples", "results", "batches", "samples")


def shard_folder(path: str | os.PathLike) -> Path:
    """Where the ranks' shards of the results (or crafted) file ``path`` live."""
    return Path(f"{path}{SHARDS}")


def _remove_sqlite(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _check_shard_identity(path: Path, identity: dict) -> None:
    conn, meta = open_results(path)
    conn.close()
    different = [k for k in IDENTITY if k in identity and meta.get(k) != identity[k]]
    if different:
        raise GradshieldError(
            f"{path} holds results of another run (differs in {', '.join(different)}); it was not "
            f"merged. Delete the folder {path.parent} to start those examples over")


def _trim_samples(conn: sqlite3.Connection, keep: int, batch_size: int) -> None:
    """Keep per attack the example images one process keeps: the first ``keep`` in batch order,
    within a batch the successes first, then by example index."""
    rows = conn.execute("SELECT aid, idx, success FROM samples").fetchall()
    drop = []
    for aid in {r[0] for r in rows}:
        mine = sorted((r for r in rows if r[0] == aid),
                      key=lambda r: (r[1] // batch_size, not r[2], r[1]))
        drop += [(aid, idx) for _, idx, _ in mine[keep:]]
    with conn:
        conn.executemany("DELETE FROM samples WHERE aid = ? AND idx = ?", drop)


def merge_shards(conn: sqlite3.Connection, results_path: str | os.PathLike, identity: dict, *,
                 samples_per_attack: int, batch_size: int) -> int:
    """Merge every shard of ``results_path`` into its open results file ``conn`` (shard by shard,
    each in one transaction, then deleted); returns how many were merged."""
    folder = shard_folder(results_path)
    shards = sorted(folder.glob("rank-*.db")) if folder.is_dir() else []
    for path in shards:
        _check_shard_identity(path, identity)
        conn.execute("ATTACH DATABASE ? AS shard", (str(path),))
        try:
            with conn:
                for table in MERGED_TABLES:
                    conn.execute(f"INSERT OR REPLACE INTO main.{table} SELECT * FROM shard.{table}")
        finally:
            conn.execute("DETACH DATABASE shard")
        _remove_sqlite(path)
    if shards:
        _trim_samples(conn, samples_per_attack, batch_size)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    return len(shards)


def _rows_of(conn: sqlite3.Connection, batches: Sequence[int], batch_size: int, mode: str) -> dict:
    """What the results file holds about ``batches``: their done markers, clean outcomes and (in
    worst-case mode, where later attacks skip what earlier ones broke) attack results."""
    out = {"batches": [], "examples": [], "results": []}
    for b in batches:
        lo, hi = b * batch_size, (b + 1) * batch_size
        out["batches"] += conn.execute("SELECT * FROM batches WHERE batch = ?", (b,)).fetchall()
        out["examples"] += conn.execute("SELECT * FROM examples WHERE idx >= ? AND idx < ?",
                                        (lo, hi)).fetchall()
        if mode == "worst-case":
            out["results"] += conn.execute("SELECT * FROM results WHERE idx >= ? AND idx < ?",
                                           (lo, hi)).fetchall()
    return out


class RankCraftedStore:
    """A rank's view of the transfer adversarials: read from the shared file (read-only) or the
    rank's own file, written to the rank's own file (merged by :func:`merge_crafted`)."""

    def __init__(self, shared: Path, own: Path) -> None:
        self.shared, self.own = CraftedStore(shared, readonly=True), CraftedStore(own)

    def get(self, key: str) -> Crafted | None:
        found = self.own.get(key)
        return found if found is not None else self.shared.get(key)

    def put(self, key: str, crafted: Crafted, meta: dict) -> None:
        self.own.put(key, crafted, meta)


def merge_crafted(path: Path) -> None:
    """Move the ranks' transfer adversarials into the shared file ``path``."""
    folder = shard_folder(path)
    if not folder.is_dir():
        return
    conn = CraftedStore(path)._connect()
    try:
        for part in sorted(folder.glob("rank-*.db")):
            conn.execute("ATTACH DATABASE ? AS part", (str(part),))
            try:
                with conn:
                    conn.execute("INSERT OR IGNORE INTO main.crafted SELECT * FROM part.crafted")
            finally:
                conn.execute("DETACH DATABASE part")
            _remove_sqlite(part)
    finally:
        conn.close()
    if not any(folder.iterdir()):
        folder.rmdir()


@dataclass
class ResultsPlan:
    """The results connection this process writes, the batch numbers it runs, its store of
    transfer adversarials, and how it finishes (see the module doc)."""

    conn: sqlite3.Connection | None
    batches: list[int]
    crafted: CraftedStore | RankCraftedStore | None
    context: distributed.Context
    results_path: Path
    identity: dict
    samples_per_attack: int
    batch_size: int
    crafted_path: Path | None = None

    @property
    def writes_results(self) -> bool:
        """Whether this process finishes the results file (figure, diagnostics, status)."""
        return self.context.main

    def finish(self) -> sqlite3.Connection | None:
        """After the last batch: the results file, complete in its batches, on the process that
        finishes it (rank 0 merges the shards first); None on the other ranks."""
        if not self.context.distributed:
            return self.conn
        self.conn.close()
        self.conn = None
        distributed.barrier(self.context)  # every shard holds its rank's last batch
        if not self.context.main:
            return None
        self.conn, _ = open_results(self.results_path)
        merge_shards(self.conn, self.results_path, self.identity,
                     samples_per_attack=self.samples_per_attack, batch_size=self.batch_size)
        if self.crafted_path is not None:
            merge_crafted(self.crafted_path)
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def wait(self) -> None:
        """The other ranks wait here until rank 0 has finished the results file."""
        distributed.barrier(self.context)


def plan_results(results_path: str | os.PathLike, identity: dict, meta: dict,
                 specs: Sequence[AttackSpec], image_shape: tuple[int, ...], n_batches: int, *,
                 samples_per_attack: int, crafted: str | os.PathLike | None = None,
                 context: distributed.Context | None = None) -> ResultsPlan:
    """Open what this process writes: the results file itself (one process), or this rank's
    shard (a torchrun launch; collective: every rank calls it)."""
    context = distributed.current() if context is None else context
    results_path = Path(results_path)
    batch_size = int(identity["batch_size"])
    crafted_path = Path(crafted) if crafted is not None else None
    common = {"context": context, "results_path": results_path, "identity": identity,
              "samples_per_attack": samples_per_attack, "batch_size": batch_size,
              "crafted_path": crafted_path}
    if not context.distributed:
        conn, _ = create_or_resume(results_path, identity, meta, specs, image_shape)
        try:  # shards a killed torchrun launch left
            merge_shards(conn, results_path, identity, samples_per_attack=samples_per_attack,
                         batch_size=batch_size)
        except BaseException:
            conn.close()
            raise
        if crafted_path is not None:
            merge_crafted(crafted_path)
        store = CraftedStore(crafted_path) if crafted_path is not None else None
        return ResultsPlan(conn, list(range(n_batches)), store, **common)

    distributed.check_same(identity, "the model, data, suite and settings to evaluate", context)
    world, attack_ids = context.world_size, [CLEAN, *range(len(specs))]

    def prepare() -> tuple[list[list[int]], list[dict]]:  # rank 0: the file and what is left
        conn, _ = create_or_resume(results_path, identity, meta, specs, image_shape)
        try:
            merge_shards(conn, results_path, identity, samples_per_attack=samples_per_attack,
                         batch_size=batch_size)
            done = set(conn.execute("SELECT aid, batch FROM batches").fetchall())
            pending = [b for b in range(n_batches) if any((a, b) not in done for a in attack_ids)]
            assignment = [pending[r::world] for r in range(world)]
            return assignment, [_rows_of(conn, mine, batch_size, identity["mode"])
                                for mine in assignment]
        finally:
            conn.close()

    assignment, rows = distributed.on_main(prepare, context)
    folder = shard_folder(results_path)
    distributed.check_shared_folder(folder, context, "the results file's folder")
    path = folder / f"rank-{context.rank:04d}-of-{world:04d}.db"
    _remove_sqlite(path)
    conn, _ = create_or_resume(path, {**identity, "shard": [context.rank, world]}, meta, specs,
                               image_shape)
    mine = rows[context.rank]
    with conn:  # what the results file already holds about this rank's batches
        conn.executemany("INSERT OR REPLACE INTO batches VALUES (?,?,?,?)", mine["batches"])
        conn.executemany("INSERT OR REPLACE INTO examples VALUES (?,?,?,?)", mine["examples"])
        conn.executemany("INSERT OR REPLACE INTO results VALUES (?,?,?,?,?,?)", mine["results"])
    store = None
    if crafted_path is not None:
        own = shard_folder(crafted_path) / f"rank-{context.rank:04d}.db"
        store = RankCraftedStore(crafted_path, own)
    return ResultsPlan(conn, assignment[context.rank], store, **common)
