"""The catalog's video rows: a video is one row per shot in `images` (schema.py says how), written here.

A mixin of Catalog: it uses the catalog's connection (`self.conn`), its transactions and `insert_image`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Optional, Sequence

if TYPE_CHECKING:  # annotations only: a catalog opens without numpy
    import numpy as np

from mmsearch.storage.fsnames import to_db
from mmsearch.storage.schema import SHOT_SEP, VIDEO_COLUMNS, shot_path


class VideoRows:
    def has_video_columns(self) -> bool:
        """False for a catalog of schema 1 opened read-only (not migrated): it holds no videos."""
        if not hasattr(self, "_video_columns"):
            cols = {r[1] for r in self.conn.execute("PRAGMA table_info(images)")}
            self._video_columns = set(VIDEO_COLUMNS) <= cols
        return self._video_columns

    def insert_video(self, row: dict, shots: Sequence[tuple], embeddings: np.ndarray,
                     tokens: Optional[np.ndarray] = None) -> tuple[list[int], list[int]]:
        """Write a video's shots [(start_s, end_s, frame_s)] with their vectors; `row` holds the file's
        columns (path, size, ...) and a duration_s. Inside the caller's transaction. Returns (the new rows'
        ids, the first being the video's own; the ids of the shots it replaced)."""
        old = self.id_for_path(row["path"])
        replaced = self.delete_video_shots(old) if old is not None else []
        ids: list[int] = []
        for n, (start, end, frame) in enumerate(shots):
            cols = dict(row, path=shot_path(row["path"], n), start_s=float(start), end_s=float(end),
                        frame_s=float(frame), video_id=ids[0] if ids else None)
            if n:
                cols["quick_hash"] = None  # only the file's row is matched when looking for moved files
            ids.append(self.insert_image(cols, embeddings[n], None if tokens is None else tokens[n]))
            if n == 0:
                self.conn.execute("UPDATE images SET video_id=id WHERE id=?", (ids[0],))
        return ids, replaced

    def video_rows(self, video_ids: Iterable[int]) -> list[int]:
        """Every row id of these videos (their files' rows and their shots)."""
        out: list[int] = []
        ids = [int(i) for i in video_ids]
        if not ids or not self.has_video_columns():
            return out
        for s in range(0, len(ids), 900):
            chunk = ids[s:s + 900]
            out += [r[0] for r in self.conn.execute(
                f"SELECT id FROM images WHERE video_id IN ({','.join('?' * len(chunk))}) AND video_id IS NOT NULL",
                chunk)]
        return out

    def video_shot_ids(self, video_ids: Iterable[int]) -> list[int]:
        """The rows of these videos other than their files' own rows."""
        files = {int(i) for i in video_ids}
        return [i for i in self.video_rows(files) if i not in files]

    def delete_video_shots(self, video_id: int) -> list[int]:
        """Delete a video's shots but its file's row; returns their ids (none for a photo)."""
        ids = self.video_shot_ids([video_id])
        self.delete_images(ids)
        return ids

    def rename_video(self, video_id: int, path: str) -> None:
        """After a move of the file (its own row already updated): its shots follow it."""
        rows = self.conn.execute("SELECT id, CAST(path AS BLOB) FROM images WHERE video_id=? AND id != ? "
                                 "AND video_id IS NOT NULL", (int(video_id), int(video_id))).fetchall()
        sep = SHOT_SEP.encode()
        self.conn.executemany("UPDATE images SET path=CAST(? AS TEXT) WHERE id=?",
                              [(to_db(path) + sep + bytes(p).split(sep, 1)[1], i) for i, p in rows])

    def shot_times(self, ids: Iterable[int]) -> dict[int, dict]:
        """{id: {video_id, start_s, end_s, frame_s, duration_s}} of the ids that are video shots, read
        from a small index (grouping search results needs it for every candidate)."""
        ids = [int(i) for i in ids]
        out: dict[int, dict] = {}
        if not ids or not self.has_video_columns():
            return out
        for s in range(0, len(ids), 900):
            chunk = ids[s:s + 900]
            for r in self.conn.execute(
                    f"SELECT id, {', '.join(VIDEO_COLUMNS)} FROM images INDEXED BY images_shots "
                    f"WHERE id IN ({','.join('?' * len(chunk))}) AND video_id IS NOT NULL", chunk):
                out[r[0]] = dict(zip(VIDEO_COLUMNS, r[1:]))
        return out

    def shot_numbers(self, ids: Iterable[int]) -> dict[int, int]:
        """{id: n} of the ids that are video rows: 0 for a file's own row, n for its shot n (exports)."""
        ids = list(self.shot_times(ids))
        out: dict[int, int] = {}
        sep = SHOT_SEP.encode()
        for s in range(0, len(ids), 900):
            chunk = ids[s:s + 900]
            for i, p in self.conn.execute(f"SELECT id, CAST(path AS BLOB) FROM images WHERE id IN "
                                          f"({','.join('?' * len(chunk))})", chunk):
                p = bytes(p)
                out[i] = int(p.split(sep, 1)[1]) if sep in p else 0
        return out

    def restore_video_rows(self, entries: Iterable[tuple]) -> None:
        """After an import wrote the rows (a shot's under shot_path): [(file path, n, start_s, end_s, frame_s,
        duration_s)] become video rows again, each linked to its file's row (written before its shots)."""
        self.conn.executemany(
            "UPDATE images SET start_s=?, end_s=?, frame_s=?, duration_s=?, "
            "video_id=(SELECT id FROM images WHERE path=CAST(? AS TEXT)) WHERE path=CAST(? AS TEXT)",
            [(a, b, f, d, to_db(p), to_db(shot_path(p, int(n)))) for p, n, a, b, f, d in entries])

    def has_videos(self) -> bool:
        """O(1) through the partial index: the query path asks it on every search."""
        return self.has_video_columns() and self.conn.execute(
            "SELECT 1 FROM images INDEXED BY images_video WHERE video_id IS NOT NULL LIMIT 1").fetchone() is not None

    def count_videos(self) -> tuple[int, int]:
        """(videos, their shots)."""
        if not self.has_video_columns():
            return 0, 0
        return tuple(self.conn.execute(
            "SELECT count(DISTINCT video_id), count(*) FROM images INDEXED BY images_video "
            "WHERE video_id IS NOT NULL").fetchone())
