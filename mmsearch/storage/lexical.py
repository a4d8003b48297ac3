"""The catalog's words: what OCR read in each image (lines, boxes, confidences), the words of its file
and folder names and of the metadata people type (EXIF/XMP), and the FTS5 index over them.

The FTS5 table is derived: it is an external-content index of `image_text`, kept in step by triggers
in the same transactions as the images (so a kill -9 leaves the two consistent, as it leaves the
images), and rebuilt from `image_text` when it is missing. Image rows without a document (a catalog
written before words were indexed, an import) get their name words here and their OCR in the next
`mmsearch index` run (indexing/backfill.py).
"""
from __future__ import annotations

import json
import sqlite3
from typing import Iterable, Optional

from mmsearch.storage.fsnames import display, from_db, to_db
from mmsearch.storage.schema import FTS_SCHEMA, FTS_TABLE, LEXICAL_SCHEMA
from mmsearch.storage.words import name_words, spaced

# bm25 weights of the FTS5 columns: name, meta, ocr. A word in a file name or a typed caption says more
# about the photo than one word among a page of OCR text.
BM25_WEIGHTS = (2.0, 2.0, 1.0)
META_FIELDS = ("title", "description", "keywords", "make", "model", "lens", "comment", "artist")
OCR_OK, OCR_NONE, OCR_ERROR, OCR_OFF = "ok", "none", "error", "off"
# a video's other shots (path + NUL + n: schema.shot_path) are no files: nothing to read words from
NOT_A_SHOT = "instr(CAST(i.path AS BLOB), X'00') = 0"


def meta_text(meta: Optional[dict]) -> str:
    """The searchable form of the metadata fields (in META_FIELDS order)."""
    if not meta:
        return ""
    parts = []
    for k in META_FIELDS:
        v = meta.get(k)
        if v:
            parts.append(" ".join(v) if isinstance(v, (list, tuple)) else str(v))
    return spaced("\n".join(parts))


class LexicalRows:
    """Mixed into Catalog: needs self.conn (and self.transaction)."""

    conn: sqlite3.Connection

    # ---- the schema ----------------------------------------------------------------------------
    def has_lexical(self) -> bool:
        """Whether the FTS5 table exists (a catalog opened read-only may predate it)."""
        if getattr(self, "_has_fts", None) is None:
            self._has_fts = self.conn.execute("SELECT 1 FROM sqlite_master WHERE name=?", (FTS_TABLE,)).fetchone() \
                is not None
        return self._has_fts

    def ensure_lexical(self) -> dict:
        """Create the word tables when missing; rebuild the FTS5 index from `image_text` when it is
        missing; then (only then: this runs on every writable open) give every image without a document
        its name words. Returns what was done."""
        done = {"created": False, "rebuilt": False, "named": 0}
        have = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master")}
        if {"image_text", "images_text_gone", "image_text_status", FTS_TABLE, "image_text_ai", "image_text_ad",
                "image_text_au"} <= have:
            self._has_fts = True
            return done
        with self.conn:
            if not {"image_text", "images_text_gone", "image_text_status"} <= have:
                self.conn.executescript(LEXICAL_SCHEMA)
                done["created"] = True
            if FTS_TABLE not in have or not {"image_text_ai", "image_text_ad", "image_text_au"} <= have:
                self.conn.executescript(FTS_SCHEMA)
                self.conn.execute(f"INSERT INTO {FTS_TABLE}({FTS_TABLE}) VALUES ('rebuild')")
                done["rebuilt"] = True
            missing = self.conn.execute("SELECT i.id, CAST(i.path AS BLOB) FROM images i LEFT JOIN image_text t "
                                        "ON t.image_id = i.id WHERE t.image_id IS NULL AND " + NOT_A_SHOT).fetchall()
            self.conn.executemany("INSERT INTO image_text (image_id, name, meta, ocr) VALUES (?, ?, '', '')",
                                  [(i, name_words(display(from_db(p)))) for i, p in missing])
            done["named"] = len(missing)
        self._has_fts = True
        return done

    # ---- writing (inside the caller's transaction) -----------------------------------------------
    def put_words(self, image_id: int, path: str, meta: Optional[dict], lines: Optional[list],
                  status: str, error: Optional[str] = None) -> None:
        """Replace one image's words: `lines` are (text, score, box) with box [[x, y] x4] in fractions."""
        self.conn.execute("DELETE FROM ocr_lines WHERE image_id=?", (image_id,))
        self.conn.execute("DELETE FROM image_text WHERE image_id=?", (image_id,))  # fires the FTS delete
        lines = lines or []
        self.conn.executemany("INSERT INTO ocr_lines (image_id, line, text, score, box) VALUES (?, ?, ?, ?, ?)",
                              [(image_id, n, t, None if s is None else round(float(s), 4),
                                json.dumps([[round(float(x), 5), round(float(y), 5)] for x, y in b]) if b is not None
                                else None) for n, (t, s, b) in enumerate(lines)])
        self.conn.execute(
            "INSERT INTO image_text (image_id, name, meta, ocr, ocr_status, ocr_error, meta_json) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (image_id, name_words(display(path)), meta_text(meta), spaced("\n".join(t for t, _, _ in lines)), status, error,
             json.dumps(meta, ensure_ascii=False) if meta else None))

    def name_new_images(self, paths: Iterable[str]) -> None:
        """Name words for images written without a document (imports): their OCR comes with the next run."""
        raw = [p if isinstance(p, bytes) else to_db(p) for p in paths]  # stored names are bytes (fsnames.py)
        self.conn.executemany(
            "INSERT INTO image_text (image_id, name, meta, ocr) SELECT id, ?, '', '' FROM images "
            "WHERE path = CAST(? AS TEXT) AND NOT EXISTS (SELECT 1 FROM image_text WHERE image_id = images.id)",
            [(name_words(display(from_db(p))), p) for p in raw])

    def rename_words(self, image_id: int, path: str) -> None:
        """A moved file keeps what OCR read; its name words follow the new path."""
        name = name_words(display(path))  # a name that is not UTF-8: its readable form (fsnames.py)
        cur = self.conn.execute("UPDATE image_text SET name=? WHERE image_id=?", (name, image_id))
        if cur.rowcount == 0:
            self.conn.execute("INSERT INTO image_text (image_id, name, meta, ocr) VALUES (?, ?, '', '')", (image_id, name))

    # ---- reading -------------------------------------------------------------------------------
    def ocr_lines(self, image_id: int) -> list[dict]:
        return [{"line": n, "text": t, "score": s, "box": json.loads(b) if b else None}
                for n, t, s, b in self.conn.execute(
                    "SELECT line, text, score, box FROM ocr_lines WHERE image_id=? ORDER BY line", (image_id,))]

    def lines_of(self, ids: Iterable[int]) -> dict[int, list[dict]]:
        ids = [int(i) for i in ids]
        out: dict[int, list[dict]] = {i: [] for i in ids}
        for s in range(0, len(ids), 900):
            chunk = ids[s:s + 900]
            for i, n, t, sc, b in self.conn.execute(
                    f"SELECT image_id, line, text, score, box FROM ocr_lines WHERE image_id IN "
                    f"({','.join('?' * len(chunk))}) ORDER BY image_id, line", chunk):
                out[i].append({"line": n, "text": t, "score": sc, "box": json.loads(b) if b else None})
        return out

    def words_state(self, image_id: int) -> Optional[dict]:
        """OCR status, error and metadata of one image, or None when it has no document."""
        row = self.conn.execute("SELECT ocr_status, ocr_error, meta_json FROM image_text WHERE image_id=?",
                                (image_id,)).fetchone()
        if row is None:
            return None
        return {"ocr_status": row[0], "ocr_error": row[1], "meta": json.loads(row[2]) if row[2] else {}}

    def documents(self, ids: Iterable[int]) -> dict[int, str]:
        """{id: the words FTS5 indexed for it (name, metadata, OCR text), one text}."""
        ids = [int(i) for i in ids]
        out = {}
        for s in range(0, len(ids), 900):
            chunk = ids[s:s + 900]
            for i, n, m, o in self.conn.execute(f"SELECT image_id, name, meta, ocr FROM image_text WHERE image_id IN "
                                                f"({','.join('?' * len(chunk))})", chunk):
                out[i] = "\n".join(x or "" for x in (n, m, o))
        return out

    def metas_of(self, ids: Iterable[int]) -> dict[int, dict]:
        ids = [int(i) for i in ids]
        out = {}
        for s in range(0, len(ids), 900):
            chunk = ids[s:s + 900]
            for i, m in self.conn.execute(f"SELECT image_id, meta_json FROM image_text WHERE image_id IN "
                                          f"({','.join('?' * len(chunk))})", chunk):
                out[i] = json.loads(m) if m else {}
        return out

    def has_words(self) -> bool:
        """Whether any image has a document (names count): hybrid search is the default then."""
        return self.has_lexical() and self.conn.execute("SELECT 1 FROM image_text LIMIT 1").fetchone() is not None

    def lexical_search(self, match: str, limit: Optional[int], where: str = "", args: Iterable = ()) -> list[tuple]:
        """(image id, bm25 score: higher is better) best first, for an FTS5 MATCH expression, kept by a
        filter's WHERE clause over `images` (Catalog.filter_sql); limit None: every match."""
        w = ", ".join(str(x) for x in BM25_WEIGHTS)
        sql = (f"SELECT f.rowid, -bm25({FTS_TABLE}, {w}) AS s FROM {FTS_TABLE} f "
               + ("JOIN images ON images.id = f.rowid " if where else "")
               + f"WHERE {FTS_TABLE} MATCH ?" + (f" AND {where}" if where else "") + " ORDER BY s DESC, f.rowid"
               + ("" if limit is None else f" LIMIT {int(limit)}"))
        try:
            return [(int(i), float(s)) for i, s in self.conn.execute(sql, [match, *args])]
        except sqlite3.OperationalError as exc:
            from mmsearch.errors import QueryError

            raise QueryError(f"cannot search the words of the images: {exc}") from exc

    def match_counts(self, exprs: list[str], ids: Iterable[int]) -> dict[int, int]:
        """For each of `ids`: how many of the MATCH expressions `exprs` it matches (one FTS5 lookup each)."""
        ids = [int(i) for i in ids]
        counts: dict[int, int] = {}
        if not ids:
            return counts
        marks = ",".join(str(i) for i in ids)  # integers only: no injection through the id list
        for e in exprs:
            for (i,) in self.conn.execute(f"SELECT rowid FROM {FTS_TABLE} WHERE {FTS_TABLE} MATCH ? AND rowid IN ({marks})",
                                          (e,)):
                counts[i] = counts.get(i, 0) + 1
        return counts

    def ids_needing_ocr(self) -> list[tuple[int, str]]:
        """(id, path) of images OCR has not read: never tried, or indexed while OCR was off."""
        return [(i, from_db(p)) for i, p in self.conn.execute(
            "SELECT t.image_id, CAST(i.path AS BLOB) FROM image_text t JOIN images i ON i.id = t.image_id "
            "WHERE (t.ocr_status IS NULL OR t.ocr_status = ?) AND " + NOT_A_SHOT + " ORDER BY t.image_id", (OCR_OFF,))]

    def ids_needing_words(self) -> list[tuple[int, str]]:
        """(id, path) of images whose metadata was never read (OCR off: no OCR either)."""
        return [(i, from_db(p)) for i, p in self.conn.execute(
            "SELECT t.image_id, CAST(i.path AS BLOB) FROM image_text t JOIN images i ON i.id = t.image_id "
            "WHERE t.ocr_status IS NULL AND " + NOT_A_SHOT + " ORDER BY t.image_id")]

    def ocr_failures(self) -> list[dict]:
        return [{"path": from_db(p), "reason": f"OCR failed (the image is indexed): {e}", "id": i}
                for i, p, e in self.conn.execute(
                    "SELECT i.id, CAST(i.path AS BLOB), t.ocr_error FROM image_text t JOIN images i ON i.id = t.image_id "
                    "WHERE t.ocr_status = ? ORDER BY i.path", (OCR_ERROR,))]

    def words_stats(self) -> dict:
        if not self.has_lexical():
            return {"documents": 0, "with_text": 0, "lines": 0, "ocr_failed": 0}
        docs, with_text, failed = self.conn.execute(
            "SELECT count(*), sum(ocr_status = ?), sum(ocr_status = ?) FROM image_text", (OCR_OK, OCR_ERROR)).fetchone()
        lines = self.conn.execute("SELECT count(*) FROM ocr_lines").fetchone()[0]
        return {"documents": docs, "with_text": with_text or 0, "lines": lines, "ocr_failed": failed or 0}
