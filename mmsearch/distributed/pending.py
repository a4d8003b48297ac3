"""The work a distributed run has sent out and not yet committed: the catalog's `pending` table.

Additive schema (created on first use, no version bump). A run replaces the table with its plan
before sending anything; each committed batch deletes its rows in the same transaction as its images,
so after a crash the table holds exactly the images still to do, and a result that arrives twice
(a retried task) finds its row gone and is dropped.
"""
from __future__ import annotations

import time
from typing import Iterable

from mmsearch.storage.catalog import Catalog
from mmsearch.storage.fsnames import from_db, to_db

_SCHEMA = """CREATE TABLE IF NOT EXISTS pending (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    queued_at REAL
)"""


def record(cat: Catalog, files) -> int:
    """Make `files` (FileInfo) the pending work; returns how many of them an interrupted run left pending."""
    with cat.transaction() as conn:
        conn.execute(_SCHEMA)
        before = {from_db(r[0]) for r in conn.execute("SELECT CAST(path AS BLOB) FROM pending")}
        conn.execute("DELETE FROM pending")
        now = time.time()
        conn.executemany("INSERT INTO pending(path, size, mtime_ns, queued_at) VALUES (CAST(? AS TEXT),?,?,?)",
                         [(to_db(f.path), f.size, f.mtime_ns, now) for f in files])
    return sum(1 for f in files if f.path in before)


def done(cat: Catalog, paths: Iterable[str]) -> None:
    """Call inside the transaction that commits these paths."""
    cat.conn.executemany("DELETE FROM pending WHERE path=CAST(? AS TEXT)", [(to_db(p),) for p in paths])


def paths(cat: Catalog) -> set[str]:
    if not cat.conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='pending'").fetchone():
        return set()
    return {from_db(r[0]) for r in cat.conn.execute("SELECT CAST(path AS BLOB) FROM pending")}
