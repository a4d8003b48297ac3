"""The catalog's schema, its ordered migrations, and how vectors are stored in it (blobs)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, Optional

if TYPE_CHECKING:  # annotations only: numpy loads where it is used, not on import
    import numpy as np

from mmsearch.errors import NonFiniteVectorError

CATALOG_NAME = "catalog.db"
# A 512-d float32 embedding makes an image row ~2.2 KB: with SQLite's default 4 KB pages only one row
# fits per page (4.2 KB per image measured at 20k images); 16 KB pages hold seven (about 2.5 KB per image).
PAGE_SIZE = 16384

# Video shots are rows of `images` (so FAISS ids stay catalog ids and every filter and the re-ranker see
# them as photos): a video's first shot is the row of its file (its real path, size, mtime and hash, what
# the incremental diff reads); its other shots carry the path + SHOT_SEP + n, which no file can have (NUL),
# and sort right after the file's row. video_id is the file row's id on every row of the video.
VIDEO_COLUMNS = ("video_id", "start_s", "end_s", "frame_s", "duration_s")
SHOT_SEP = "\x00"

# Ordered migrations: MIGRATIONS[v] upgrades a schema of version v to v+1 (columns). A new table or index
# needs none: SCHEMA is all CREATE ... IF NOT EXISTS and runs on every writable open that lacks one of
# ADDITIVE (Catalog.open), so older readers still open the catalog.
MIGRATIONS: dict[int, str] = {
    1: "ALTER TABLE images ADD COLUMN video_id INTEGER; ALTER TABLE images ADD COLUMN start_s REAL; "
       "ALTER TABLE images ADD COLUMN end_s REAL; ALTER TABLE images ADD COLUMN frame_s REAL; "
       "ALTER TABLE images ADD COLUMN duration_s REAL;",
}

ADDITIVE = {"index": {"images_state", "images_date", "images_ext", "images_video", "images_shots"},
            "table": {"albums"}}

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
    indexed_at REAL,
    video_id INTEGER,
    start_s REAL,
    end_s REAL,
    frame_s REAL,
    duration_s REAL
);
CREATE INDEX IF NOT EXISTS images_hash ON images(quick_hash);
CREATE INDEX IF NOT EXISTS images_taken ON images(taken_at);
-- Added for 1M-image catalogs (additive, created when a catalog is opened writable). The embedding and
-- tokens blobs make each row about a page, so a query that reads rows reads the whole table: these
-- covering indices let the incremental diff and the filters read a few dozen bytes per image instead.
CREATE INDEX IF NOT EXISTS images_state ON images(path, id, size, mtime_ns, quick_hash);
CREATE INDEX IF NOT EXISTS images_date ON images(coalesce(taken_at, mtime_ns / 1e9), id);
CREATE INDEX IF NOT EXISTS images_ext ON images(ext, id);
-- video rows only (partial): a video's rows by its id, and a shot's times by its id without reading the row
CREATE INDEX IF NOT EXISTS images_video ON images(video_id, id) WHERE video_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS images_shots ON images(id, video_id, start_s, end_s, frame_s, duration_s)
    WHERE video_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS failures (
    path TEXT PRIMARY KEY,
    size INTEGER,
    mtime_ns INTEGER,
    reason TEXT NOT NULL,
    failed_at REAL
);
-- Saved searches (additive: created when an older catalog is opened writable; readers treat a missing
-- table as no albums). A row keeps the query and its filters, not photos: opening it searches again.
CREATE TABLE IF NOT EXISTS albums (
    name TEXT PRIMARY KEY,
    query TEXT NOT NULL,
    filters TEXT,
    sort TEXT NOT NULL DEFAULT 'date',
    good_only INTEGER NOT NULL DEFAULT 1,
    k INTEGER NOT NULL DEFAULT 200,
    created_at REAL
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

# The words of each image (additive: created when a catalog is opened writable, and rebuilt from
# `image_text` when the FTS5 table is missing). `ocr_lines` holds what OCR read, line by line, with the
# box as four corner points in fractions of the (EXIF-rotated) image; `image_text` is one document per
# image, in the form FTS5 indexes (storage/words.py: CJK characters set apart), and FTS5 indexes it as
# an external-content table kept in step by triggers, inside the same transactions as the images.
LEXICAL_SCHEMA = """
CREATE TABLE IF NOT EXISTS ocr_lines (
    image_id INTEGER NOT NULL,
    line INTEGER NOT NULL,
    text TEXT NOT NULL,
    score REAL,
    box TEXT,
    PRIMARY KEY (image_id, line)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS image_text (
    image_id INTEGER PRIMARY KEY,
    name TEXT,
    meta TEXT,
    ocr TEXT,
    ocr_status TEXT,
    ocr_error TEXT,
    meta_json TEXT
);
CREATE INDEX IF NOT EXISTS image_text_status ON image_text(ocr_status);
CREATE TRIGGER IF NOT EXISTS images_text_gone AFTER DELETE ON images BEGIN
    DELETE FROM image_text WHERE image_id = old.id;
    DELETE FROM ocr_lines WHERE image_id = old.id;
END;
"""

FTS_TABLE = "image_text_fts"
FTS_SCHEMA = f"""
CREATE VIRTUAL TABLE IF NOT EXISTS {FTS_TABLE} USING fts5(
    name, meta, ocr, content='image_text', content_rowid='image_id', tokenize='unicode61 remove_diacritics 2');
CREATE TRIGGER IF NOT EXISTS image_text_ai AFTER INSERT ON image_text BEGIN
    INSERT INTO {FTS_TABLE}(rowid, name, meta, ocr) VALUES (new.image_id, new.name, new.meta, new.ocr);
END;
CREATE TRIGGER IF NOT EXISTS image_text_ad AFTER DELETE ON image_text BEGIN
    INSERT INTO {FTS_TABLE}({FTS_TABLE}, rowid, name, meta, ocr) VALUES ('delete', old.image_id, old.name, old.meta, old.ocr);
END;
CREATE TRIGGER IF NOT EXISTS image_text_au AFTER UPDATE ON image_text BEGIN
    INSERT INTO {FTS_TABLE}({FTS_TABLE}, rowid, name, meta, ocr) VALUES ('delete', old.image_id, old.name, old.meta, old.ocr);
    INSERT INTO {FTS_TABLE}(rowid, name, meta, ocr) VALUES (new.image_id, new.name, new.meta, new.ocr);
END;
"""


def shot_path(path: str, n: int) -> str:
    """The stored path of a video's shot n (0: the file's own row)."""
    return path if n == 0 else f"{path}{SHOT_SEP}{n}"


def file_path(stored: str) -> str:
    """The file a stored path names (a shot's path without its suffix)."""
    return stored.split(SHOT_SEP, 1)[0]


def is_shot_path(stored) -> bool:
    """Whether a stored path (a str, or the stored bytes) is a shot's rather than a file's."""
    return SHOT_SEP in stored if isinstance(stored, str) else b"\x00" in bytes(stored)


def non_finite_rows(vectors) -> np.ndarray:
    """Row numbers of `vectors` ([n, d], or one [d] vector as row 0) holding NaN or +-inf."""
    import numpy as np  # in each function, not at the top: an unchanged re-run opens the catalog without numpy

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


def to_blob(vec: np.ndarray, dtype="float32") -> bytes:
    import numpy as np

    return np.ascontiguousarray(vec, dtype=dtype).tobytes()


def from_blobs(blobs: Iterable[bytes], dim: int, dtype="float32") -> np.ndarray:
    import numpy as np

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
