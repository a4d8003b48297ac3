"""The catalog's schema, its ordered migrations, and how vectors are stored in it (blobs)."""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import numpy as np

from mmsearch.errors import NonFiniteVectorError

CATALOG_NAME = "catalog.db"
# A 512-d float32 embedding makes an image row ~2.2 KB: with SQLite's default 4 KB pages only one row
# fits per page (4.2 KB per image measured at 20k images); 16 KB pages hold seven (about 2.5 KB per image).
PAGE_SIZE = 16384

# Ordered migrations: MIGRATIONS[v] upgrades a schema of version v to v+1.
MIGRATIONS: dict[int, str] = {}

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    quick_hash TEXT,
    width INTEGER,
    height INTEGER,
    taken_at REAL,
    ext TEXT,
    embedding BLOB NOT NULL,
    tokens BLOB,
    indexed_at REAL
);
CREATE INDEX IF NOT EXISTS images_hash ON images(quick_hash);
CREATE INDEX IF NOT EXISTS images_taken ON images(taken_at);
-- Added for 1M-image catalogs (additive, created when a catalog is opened writable). The embedding and
-- tokens blobs make each row about a page, so a query that reads rows reads the whole table: these
-- covering indices let the incremental diff and the filters read a few dozen bytes per image instead.
CREATE INDEX IF NOT EXISTS images_state ON images(path, id, size, mtime_ns, quick_hash);
CREATE INDEX IF NOT EXISTS images_date ON images(coalesce(taken_at, mtime_ns / 1e9), id);
CREATE INDEX IF NOT EXISTS images_ext ON images(ext, id);
CREATE TABLE IF NOT EXISTS failures (
    path TEXT PRIMARY KEY,
    size INTEGER,
    mtime_ns INTEGER,
    reason TEXT NOT NULL,
    failed_at REAL
);
CREATE TABLE IF NOT EXISTS texts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    text TEXT NOT NULL UNIQUE,
    embedding BLOB NOT NULL,
    states BLOB,
    state_len INTEGER,
    added_at REAL
);
"""


def non_finite_rows(vectors) -> np.ndarray:
    """Row numbers of `vectors` ([n, d], or one [d] vector as row 0) holding NaN or +-inf."""
    arr = np.asarray(vectors)
    if arr.ndim == 1:
        arr = arr[None, :]
    return np.flatnonzero(~np.isfinite(arr).all(axis=1))


def check_finite(vectors, name_row: Optional[Callable[[int], str]] = None, what: str = "vector") -> None:
    """The one check every door for vectors uses (imports, the catalog's inserts, query and upload
    embeddings, query weights): NonFiniteVectorError naming the first bad row, else nothing."""
    bad = non_finite_rows(vectors)
    if len(bad):
        row = int(bad[0])
        where = name_row(row) if name_row else f"row {row}"
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise NonFiniteVectorError(f"{where}: the {what} holds NaN or infinity{more}; refused")


def to_blob(vec: np.ndarray, dtype=np.float32) -> bytes:
    return np.ascontiguousarray(vec, dtype=dtype).tobytes()


def from_blobs(blobs: Iterable[bytes], dim: int, dtype=np.float32) -> np.ndarray:
    blobs = list(blobs)
    if not blobs:
        return np.zeros((0, dim), dtype=np.float32)
    return np.frombuffer(b"".join(blobs), dtype=dtype).reshape(len(blobs), dim).astype(np.float32, copy=False)


def sqlite_utils_without_pandas():
    """sqlite_utils without pandas: it imports pandas whenever installed (0.5 s here, for guessing
    column types from DataFrames, which we never pass), which tripled an unchanged re-run's time."""
    import sys

    if "sqlite_utils" in sys.modules or "pandas" in sys.modules:
        import sqlite_utils

        return sqlite_utils
    sys.modules["pandas"] = None  # `import pandas` raises ImportError: sqlite_utils then does without
    try:
        import sqlite_utils
    finally:
        del sys.modules["pandas"]
    return sqlite_utils
