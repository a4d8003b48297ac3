"""The catalog: one SQLite file (WAL) that is the source of truth for an index.

It holds the meta (model spec, fingerprint, dim, factory, schema version, generation), one row per
indexed image with its embedding (float32 blob) and optional re-ranker tokens (float16 blob), the
failures of the last runs, and the text corpus for image->text search.

Reads and writes use the stdlib sqlite3 connection directly (plain SQL upserts), so neither a query
nor an unchanged re-run pays for importing sqlite-utils. Paths are stored as the exact bytes
of their names (fsnames.py: names that are not UTF-8 too); dbfile.py opens the file (read-only folders
included) and turns SQLite's corruption and read-only errors into typed errors on every method.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Optional

if TYPE_CHECKING:  # annotations only: numpy loads where it is used, not on import
    import numpy as np

from mmsearch.config import SCHEMA_VERSION
from mmsearch.errors import IndexNotFoundError, IndexVersionError
from mmsearch.storage import dbfile
from mmsearch.storage.failures import FailureRows
from mmsearch.storage.filtersql import FilterRows
from mmsearch.storage.fsnames import display, from_db, to_db
from mmsearch.storage.lexical import LexicalRows
from mmsearch.storage.schema import (ADDITIVE, CATALOG_NAME, MIGRATIONS, PAGE_SIZE, SCHEMA, VIDEO_COLUMNS,  # noqa: F401
                                     check_finite, file_path, from_blobs, is_shot_path, sqlite_utils_without_pandas,
                                     to_blob)
from mmsearch.storage.texts import TextRows
from mmsearch.storage.videos import VideoRows

_ROW_KEYS = ("id", "path", "size", "mtime_ns", "width", "height", "taken_at", "ext", "indexed_at")


@dbfile.typed_errors
class Catalog(TextRows, FailureRows, LexicalRows, VideoRows, FilterRows):
    """One index's SQLite catalog. Create with `Catalog.create`, open with `Catalog.open`."""

    def __init__(self, directory: Path, conn, readonly: bool = False):
        self.dir = Path(directory)
        self.path = self.dir / CATALOG_NAME
        self.conn = conn
        self.readonly = readonly  # opened read-only (asked for, or a folder this process cannot write)

    # ---- lifecycle ----------------------------------------------------------------------------
    @staticmethod
    def exists(directory) -> bool:
        return (Path(directory) / CATALOG_NAME).is_file()

    @classmethod
    def create(cls, directory, meta: dict) -> "Catalog":
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        try:
            conn, _ = dbfile.connect(directory / CATALOG_NAME, readonly=False, page_size=PAGE_SIZE)
        except sqlite3.DatabaseError as exc:
            dbfile.raise_typed(exc, directory / CATALOG_NAME)
        cat = cls(directory, conn)
        with conn:
            conn.executescript(SCHEMA)
            cat.set_meta(schema_version=SCHEMA_VERSION, generation=0, created_at=time.time(), **meta)
        cat.ensure_lexical()
        return cat

    @classmethod
    def open(cls, directory, readonly: bool = False, threads: bool = False) -> "Catalog":
        directory = Path(directory)
        path = directory / CATALOG_NAME
        if not path.is_file():
            raise IndexNotFoundError(
                f"no index at {directory} (run `mmsearch index FOLDER --index {directory}` first)")
        try:
            conn, readonly = dbfile.connect(path, readonly=readonly, threads=threads)
            rows = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as exc:
            err = dbfile.typed(exc, path)
            if err is not None:
                raise err from exc
            raise IndexVersionError(f"{path} is not an mmsearch catalog ({exc})") from exc
        version = json.loads(rows.get("schema_version", "null"))
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise IndexVersionError(
                f"{directory} was written by a newer or unknown mmsearch (schema {version}, this one reads "
                f"up to {SCHEMA_VERSION}); upgrade mmsearch or re-index into a new folder")
        cat = cls(directory, conn, readonly=readonly)
        if version < SCHEMA_VERSION and not readonly:
            cat._migrate(version)
        if not readonly:
            cat._add_indices()
        return cat

    def _add_indices(self) -> None:
        """Additive schema (CREATE ... IF NOT EXISTS): catalogs written before an index or table existed get it."""
        have = set(self.conn.execute("SELECT type, name FROM sqlite_master"))
        if any((kind, name) not in have for kind, names in ADDITIVE.items() for name in names):
            try:
                with self.conn:
                    self.conn.executescript(SCHEMA)
            except sqlite3.OperationalError:
                pass  # read-only file or busy: the indices only make things faster
        try:
            self.lexical_repairs = self.ensure_lexical()  # the word tables and FTS5 index: created or rebuilt
        except sqlite3.OperationalError:
            pass  # read-only file: searches by words wait for the next writable open

    def _migrate(self, version: int) -> None:
        with self.conn:
            for v in range(version, SCHEMA_VERSION):
                if v not in MIGRATIONS:
                    raise IndexVersionError(f"no migration from catalog schema {v}; re-index into a new folder")
                self.conn.executescript(MIGRATIONS[v])
            self.set_meta(schema_version=SCHEMA_VERSION)

    @property
    def db(self):
        """sqlite-utils view of the same connection, for writes (imported lazily: queries never need it)."""
        if not hasattr(self, "_db"):
            self._db = sqlite_utils_without_pandas().Database(self.conn)
        return self._db

    def close(self) -> None:
        self.conn.close()

    def check_integrity(self) -> None:
        """CatalogCorruptError if the file is damaged (PRAGMA quick_check: one read of every page; writers
        run it when they take the index, so a damaged catalog is refused before it is written further)."""
        dbfile.quick_check(self.conn, self.path)

    @contextmanager
    def transaction(self):
        """One atomic unit of work (a batch): everything in it lands or nothing does."""
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            with self.conn:
                yield self.conn
        except sqlite3.DatabaseError as exc:  # the commit, or a statement run on the connection
            dbfile.raise_typed(exc, self.path)
        finally:
            self._depth -= 1

    # ---- meta ---------------------------------------------------------------------------------
    def meta(self) -> dict:
        return {k: json.loads(v) for k, v in self.conn.execute("SELECT key, value FROM meta")}

    def set_meta(self, **values) -> None:
        self._write("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                    [(k, json.dumps(v)) for k, v in values.items()])

    def _write(self, sql: str, rows: list) -> None:
        """An upsert in plain SQL (no sqlite-utils to import: an unchanged re-run writes its meta). Inside
        a transaction it is part of it; outside one it commits at once, as sqlite-utils did."""
        inside = self.conn.in_transaction or getattr(self, "_depth", 0) > 0
        self.conn.executemany(sql, rows)
        if not inside:
            self.conn.commit()

    def generation(self) -> int:
        row = self.conn.execute("SELECT value FROM meta WHERE key='generation'").fetchone()
        return int(json.loads(row[0])) if row else 0

    def delete_meta(self, key: str) -> None:
        self.conn.execute("DELETE FROM meta WHERE key=?", (key,))

    def bump_generation(self) -> int:
        """Called inside a transaction that changed image vectors; the FAISS cache records this number."""
        gen = self.generation() + 1
        self.set_meta(generation=gen)
        return gen

    # ---- images -------------------------------------------------------------------------------
    def count_images(self) -> int:
        return self.conn.execute("SELECT count(*) FROM images").fetchone()[0]

    def has_images(self) -> bool:
        """O(1), unlike count(*) which walks an index (tens of ms at 1M rows): the query path uses this."""
        return self.conn.execute("SELECT 1 FROM images LIMIT 1").fetchone() is not None

    def max_image_id(self) -> int:
        return self.conn.execute("SELECT coalesce(max(id), 0) FROM images").fetchone()[0]

    def image_ids(self) -> np.ndarray:
        """Every image id, ascending (from the table's own b-tree of row ids: 8 bytes an image)."""
        import numpy as np

        return np.fromiter((r[0] for r in self.conn.execute("SELECT id FROM images ORDER BY id")), dtype=np.int64)

    def image_states(self) -> dict[str, tuple]:
        """path -> (id, size, mtime_ns, quick_hash) of every file (a video by its own row, not its shots)."""
        return {from_db(r[0]): r[1:] for r in self.conn.execute(
            "SELECT CAST(path AS BLOB), id, size, mtime_ns, quick_hash FROM images") if not is_shot_path(r[0])}

    def image_states_under(self, root: str) -> Iterator[tuple]:
        """(path bytes, id, size, mtime_ns, quick_hash) of the images at or under `root`, ascending by path,
        streamed from the covering index: the incremental diff never holds the whole catalog. The path
        comes as the stored bytes (fsnames.to_db): the merge with the walk compares bytes, decoding nothing.
        A video is its file's row; its other shots (whose paths sort right after it) are not files: skipped."""
        root = root.rstrip("/") or "/"
        prefix = to_db(root if root.endswith("/") else root + "/")
        for row in self.conn.execute(
                "SELECT CAST(path AS BLOB), id, size, mtime_ns, quick_hash FROM images INDEXED BY images_state "
                "WHERE (path >= CAST(? AS TEXT) AND path < CAST(? AS TEXT)) OR path = CAST(? AS TEXT) ORDER BY path",
                (prefix, prefix[:-1] + b"0", to_db(root))):
            if not is_shot_path(row[0]):
                yield row

    def insert_image(self, row: dict, embedding: np.ndarray, tokens: Optional[np.ndarray] = None) -> int:
        import numpy as np

        check_finite(embedding, lambda _: display(row["path"]), "embedding")
        cols = dict(row, embedding=to_blob(embedding), indexed_at=time.time(),
                    tokens=None if tokens is None else to_blob(tokens, np.float16))
        cols["path"] = to_db(cols["path"])
        keys = ", ".join(cols)
        marks = ", ".join("CAST(? AS TEXT)" if k == "path" else "?" for k in cols)
        updates = ", ".join(f"{k}=excluded.{k}" for k in cols if k != "path")
        cur = self.conn.execute(
            f"INSERT INTO images ({keys}) VALUES ({marks}) ON CONFLICT(path) DO UPDATE SET {updates} RETURNING id",
            list(cols.values()))
        return cur.fetchone()[0]

    def upsert_images(self, rows: list[dict], embeddings: np.ndarray) -> None:
        """Bulk insert-or-update by path (imports). A row whose embedding changed loses its re-ranker
        tokens (they described the old pixels); missing size/mtime come from the file when it exists,
        so a later `index` of the same folder sees it unchanged."""
        check_finite(embeddings, lambda j: display(rows[j]["path"]), "embedding")  # before a single row is written
        now = time.time()
        args = []
        for r, e in zip(rows, embeddings):
            size, mtime = r.get("size"), r.get("mtime_ns")
            if size is None or mtime is None:
                try:
                    st = os.stat(r["path"])
                    size, mtime = st.st_size, st.st_mtime_ns
                except OSError:
                    size, mtime = size or 0, mtime or 0
            args.append((to_db(r["path"]), int(size), int(mtime), r.get("quick_hash"), r.get("width"), r.get("height"),
                         r.get("taken_at"), r.get("ext"), to_blob(e), now))
        self.conn.executemany(
            "INSERT INTO images (path, size, mtime_ns, quick_hash, width, height, taken_at, ext, embedding, "
            "indexed_at) VALUES (CAST(? AS TEXT),?,?,?,?,?,?,?,?,?) ON CONFLICT(path) DO UPDATE SET size=excluded.size, "
            "mtime_ns=excluded.mtime_ns, quick_hash=coalesce(excluded.quick_hash, quick_hash), "
            "width=coalesce(excluded.width, width), height=coalesce(excluded.height, height), "
            "taken_at=coalesce(excluded.taken_at, taken_at), ext=excluded.ext, "
            "tokens=CASE WHEN embedding = excluded.embedding THEN tokens ELSE NULL END, "
            "embedding=excluded.embedding, indexed_at=excluded.indexed_at", args)
        self.name_new_images([a[0] for a in args])

    def update_image(self, image_id: int, **fields) -> None:
        if "path" in fields:
            fields["path"] = to_db(fields["path"])
        sets = ", ".join(f"{k}=CAST(? AS TEXT)" if k == "path" else f"{k}=?" for k in fields)
        self.conn.execute(f"UPDATE images SET {sets} WHERE id=?", [*fields.values(), image_id])

    def set_tokens(self, image_id: int, tokens: np.ndarray) -> None:
        import numpy as np

        self.conn.execute("UPDATE images SET tokens=? WHERE id=?", (to_blob(tokens, np.float16), image_id))

    def delete_images(self, ids: Iterable[int]) -> None:
        self.conn.executemany("DELETE FROM images WHERE id=?", [(int(i),) for i in ids])

    def rows(self, ids: Iterable[int]) -> dict[int, dict]:
        """{id: row} with the file's path; a video's rows also carry video_id, start_s, end_s, frame_s, duration_s."""
        ids = [int(i) for i in ids]
        names = _ROW_KEYS + (VIDEO_COLUMNS if self.has_video_columns() else ())
        extra = "".join(f", {c}" for c in names[len(_ROW_KEYS):])
        out = {}
        for start in range(0, len(ids), 900):  # stay under SQLite's bound-parameter limit
            chunk = ids[start:start + 900]
            q = (f"SELECT id, CAST(path AS BLOB), size, mtime_ns, width, height, taken_at, ext, indexed_at{extra} "
                 f"FROM images "
                 f"WHERE id IN ({','.join('?' * len(chunk))})")
            for r in self.conn.execute(q, chunk):
                row = dict(zip(names, r), path=from_db(r[1]))
                if row.get("video_id") is None:
                    for c in VIDEO_COLUMNS:
                        row.pop(c, None)
                else:
                    row["path"] = file_path(row["path"])
                out[r[0]] = row
        return out

    def columns(self, ids: Iterable[int], names: Iterable[str]) -> dict[int, dict]:
        """id -> {name: value} of these (non-path) columns, for exports."""
        names, ids, out = list(names), [int(i) for i in ids], {}
        for s in range(0, len(ids), 900):
            chunk = ids[s:s + 900]
            q = f"SELECT id, {', '.join(names)} FROM images WHERE id IN ({','.join('?' * len(chunk))})"
            for r in self.conn.execute(q, chunk):
                out[r[0]] = dict(zip(names, r[1:]))
        return out

    def folders(self) -> list[str]:
        """The folders holding indexed images, sorted."""
        seen = {os.path.dirname(r[0]) for r in self.conn.execute("SELECT CAST(path AS BLOB) FROM images")}
        return sorted(from_db(f) for f in seen)

    def id_for_path(self, path: str) -> Optional[int]:
        row = self.conn.execute("SELECT id FROM images WHERE path=CAST(? AS TEXT)", (to_db(path),)).fetchone()
        return row[0] if row else None

    def embeddings(self, dim: int, ids: Optional[Iterable[int]] = None,
                   limit: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [n], float32 [n, dim]) for all images (the first `limit`) or the given ids, in id order."""
        import numpy as np

        if ids is None:
            cur = self.conn.execute("SELECT id, embedding FROM images ORDER BY id LIMIT ?",
                                    (-1 if limit is None else int(limit),))
            pairs = cur.fetchall()
        else:
            ids = sorted(int(i) for i in ids)
            pairs = []
            for s in range(0, len(ids), 900):
                chunk = ids[s:s + 900]
                pairs += self.conn.execute(
                    f"SELECT id, embedding FROM images WHERE id IN ({','.join('?' * len(chunk))}) ORDER BY id",
                    chunk).fetchall()
        return np.array([p[0] for p in pairs], dtype=np.int64), from_blobs((p[1] for p in pairs), dim)

    def iter_embeddings(self, dim: int, chunk: int = 50_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All (ids, vectors) in id order, `chunk` rows at a time: memory stays bounded at any catalog size."""
        import numpy as np

        last = -1
        while True:
            pairs = self.conn.execute("SELECT id, embedding FROM images WHERE id > ? ORDER BY id LIMIT ?",
                                      (last, chunk)).fetchall()
            if not pairs:
                return
            last = pairs[-1][0]
            yield np.array([p[0] for p in pairs], dtype=np.int64), from_blobs((p[1] for p in pairs), dim)

    def sample_embeddings(self, dim: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """About n (ids, vectors) drawn uniformly at random (deterministic for a seed), for training an ANN."""
        import numpy as np

        top = self.max_image_id()
        if top == 0:
            return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
        if n >= self.count_images():
            return self.embeddings(dim)
        rng = np.random.default_rng(seed)
        want = np.unique(rng.integers(1, top + 1, size=int(n * 1.2) + 10))  # ids are dense: few misses
        return self.embeddings(dim, want.tolist())

    def tokens(self, ids: Iterable[int], shape: tuple[int, int]) -> dict[int, Optional[np.ndarray]]:
        import numpy as np

        ids = [int(i) for i in ids]
        out: dict[int, Optional[np.ndarray]] = {}
        for s in range(0, len(ids), 900):
            chunk = ids[s:s + 900]
            for i, blob in self.conn.execute(
                    f"SELECT id, tokens FROM images WHERE id IN ({','.join('?' * len(chunk))})", chunk):
                out[i] = None if blob is None else np.frombuffer(blob, dtype=np.float16).reshape(shape)
        return out

    def ids_missing_tokens(self) -> list[tuple[int, str]]:
        return [(i, from_db(p)) for i, p in self.conn.execute(
            "SELECT id, CAST(path AS BLOB) FROM images WHERE tokens IS NULL ORDER BY id")]

    def bytes_on_disk(self) -> int:
        """Everything the index keeps: catalog (+ WAL), vector caches and the exported text tower."""
        return sum(f.stat().st_size for f in self.dir.rglob("*") if f.is_file())
