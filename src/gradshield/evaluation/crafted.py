"""Transfer adversarials, crafted once on a surrogate and reused for every target model.

A transfer entry crafts its adversarials on the surrogate for a whole batch of examples (every
example of the batch, whatever the target gets right), with the batch's own generator, so the
adversarials depend only on (surrogate, attack, examples, seed) and not on the target. They are
kept in an SQLite file under a key of exactly those, so the second target (another GCM placement,
another eps or w) scores the same adversarials without crafting them again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import urllib.parse
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SCHEMA = """CREATE TABLE IF NOT EXISTS crafted(key TEXT PRIMARY KEY, meta TEXT NOT NULL,
adversarial BLOB NOT NULL, perturbation BLOB NOT NULL, size BLOB NOT NULL)"""


@dataclass
class Crafted:
    """Per example of a batch: the adversarial image, its perturbation (additive delta or flow
    field) and the perturbation's size in the attack's norm."""

    adversarial: torch.Tensor
    perturbation: torch.Tensor
    size: torch.Tensor


def crafted_key(*parts) -> str:
    """sha256 of the JSON of ``parts`` (fingerprints, the attack's settings, seed, batch)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _pack(t: torch.Tensor) -> bytes:
    array = t.detach().cpu().contiguous().numpy()
    header = json.dumps({"shape": list(array.shape), "dtype": str(array.dtype)}).encode()
    return len(header).to_bytes(4, "little") + header + zlib.compress(array.tobytes(), 1)


def _unpack(blob: bytes) -> torch.Tensor:
    length = int.from_bytes(blob[:4], "little")
    header = json.loads(blob[4:4 + length])
    array = np.frombuffer(zlib.decompress(blob[4 + length:]), dtype=header["dtype"])
    return torch.from_numpy(array.reshape(header["shape"]).copy())


class CraftedStore:
    """The adversarials of transfer entries, by key, in one SQLite file (created on first use).
    ``readonly``: only :meth:`get` (the file is never written, nor created)."""

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly

    def _connect(self) -> sqlite3.Connection:
        if self.readonly:
            uri = f"file:{urllib.parse.quote(str(self.path.resolve()))}?mode=ro"
            return sqlite3.connect(uri, uri=True, timeout=60)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=60)
        conn.execute(SCHEMA)
        return conn

    def get(self, key: str) -> Crafted | None:
        if not self.path.is_file():
            return None
        conn = self._connect()
        try:
            row = conn.execute("SELECT adversarial, perturbation, size FROM crafted WHERE key = ?",
                               (key,)).fetchone()
        finally:
            conn.close()
        return None if row is None else Crafted(*(_unpack(blob) for blob in row))

    def put(self, key: str, crafted: Crafted, meta: dict) -> None:
        conn = self._connect()
        try:
            with conn:
                conn.execute("INSERT OR REPLACE INTO crafted VALUES (?,?,?,?,?)",
                             (key, json.dumps(meta, default=str), _pack(crafted.adversarial),
                              _pack(crafted.perturbation), _pack(crafted.size)))
        finally:
            conn.close()

    def entries(self):
        """(meta, Crafted) of every stored batch (meta: attack id, surrogate, generator key)."""
        if not self.path.is_file():
            return []
        conn = self._connect()
        try:
            rows = conn.execute("SELECT meta, adversarial, perturbation, size FROM crafted "
                                "ORDER BY meta").fetchall()
        finally:
            conn.close()
        return [(json.loads(meta), Crafted(*(_unpack(b) for b in blobs))) for meta, *blobs in rows]

    def __len__(self) -> int:
        if not self.path.is_file():
            return 0
        conn = self._connect()
        try:
            return conn.execute("SELECT COUNT(*) FROM crafted").fetchone()[0]
        finally:
            conn.close()
