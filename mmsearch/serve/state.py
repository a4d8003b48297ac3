"""What a running server holds: one index opened for many threads, its searcher, its thumbnails.

The server never writes the catalog or the vector file (the indexer owns them), so `mmsearch index`
can run beside it. Each request looks at the catalog generation; when it moved, the vectors are
reloaded (or rebuilt in memory from the catalog) and the meta re-read, so new images appear without
a restart. Files are served by catalog id only, and only while their path is inside a folder the index
recorded (storage/roots.py; an index that records none serves no file).
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Optional

from mmsearch.errors import FileGoneError, NotServableError
from mmsearch.storage.catalog import Catalog
from mmsearch.storage.fsnames import json_safe
from mmsearch.storage.roots import recorded_roots, servable_path
from mmsearch.search.query import Searcher
from mmsearch.storage.store import IMAGE_VECTORS, IndexStore
from mmsearch.serve.errors import ApiError
from mmsearch.serve.thumbs import ThumbCache
from mmsearch.serve.uploads import UploadSlots


class ServingStore(IndexStore):
    """An IndexStore for a long-running, multi-threaded reader."""

    REBUILD_EVERY_S = 2.0  # while an indexer commits batch after batch, rebuild from the catalog at most this often

    def __init__(self, directory: Path, catalog: Catalog):
        super().__init__(directory, catalog)
        self._vectors = None
        self._vectors_gen: Optional[int] = None
        self._rebuilt_at = 0.0
        self._lock = threading.RLock()

    @classmethod
    def open_shared(cls, directory) -> "ServingStore":
        return cls(Path(directory), Catalog.open(directory, readonly=True, threads=True))

    def image_vectors(self):
        _single_threaded_faiss()
        gen = self.catalog.generation()
        if self._vectors is not None and gen == self._vectors_gen:
            return self._vectors
        with self._lock:
            if self._vectors is not None and gen == self._vectors_gen:
                return self._vectors
            from mmsearch.storage.vectors import VectorIndex

            index = VectorIndex.load(self.dir / IMAGE_VECTORS, gen)  # the indexer saves it when a run ends
            if index is None:  # mid-run: rebuild from the catalog, at most every REBUILD_EVERY_S
                if self._vectors is not None and time.monotonic() - self._rebuilt_at < self.REBUILD_EVERY_S:
                    return self._vectors  # rows deleted meanwhile are dropped when hits are hydrated
                index, _ = self._build_image_vectors()  # (index, tuning info)
                self._rebuilt_at = time.monotonic()
            self.meta = self.catalog.meta()  # a re-ranker may have been enabled since
            self._vectors, self._vectors_gen = index, gen
            return index

    def query_vectors(self):
        """Always the FAISS index: a long-lived server pays its import once, and image_vectors() is where
        it notices a new catalog generation (and re-reads the meta)."""
        return self.image_vectors()

    def encoder(self):
        with self._lock:  # one torch model, loaded once, whatever the number of worker threads
            return super().encoder()

    def text_encoder(self):
        with self._lock:
            return super().text_encoder()


_thread = threading.local()


def _single_threaded_faiss() -> None:
    """One query is one small search: OpenMP threads only add hand-off cost, and on busy cores they spin
    (measured at 100k x 128: 115 ms -> 8.6 ms under load); concurrent requests use the cores instead.
    The OpenMP setting is per thread, so each worker thread sets it once."""
    if not getattr(_thread, "faiss_single", False):
        import faiss

        faiss.omp_set_num_threads(1)
        _thread.faiss_single = True


class ServeState:
    def __init__(self, index_dir, device: str = "cpu", max_upload_bytes: int = 20 << 20):
        self.store = ServingStore.open_shared(index_dir)
        # "auto" embeds uploads on the CPU (the index's ONNX tower when it has one: no torch start-up);
        # naming a GPU (--device cuda) embeds them with torch there
        self.store.device = "cpu" if device in (None, "auto") else device
        self.searcher = Searcher(self.store, allow_paths=False)
        self.thumbs = ThumbCache(self.store.dir)
        self.max_upload_bytes = max_upload_bytes
        self.upload_slots = UploadSlots()  # uploads decoded (and held) at once: bounded memory
        self.embed_lock = threading.Lock()  # uploads embed one at a time: bounded CPU
        self.watcher = None  # mmsearch.indexing.watch.Watcher with `serve --watch` (it writes; this state only reads)
        self._folders: tuple = (None, [])

    def image_size(self) -> int:
        """The image tower's input side: uploads are draft-decoded to the smallest scale at least this."""
        return int(self.store.meta.get("image_size") or 256)

    # ---- rows and files -------------------------------------------------------------------------
    def row(self, image_id: int) -> dict:
        row = self.store.catalog.rows([image_id]).get(image_id)
        if row is None:
            raise ApiError(404, f"no image with id {image_id} in the index")
        return row

    def roots(self) -> list[str]:
        """The folders the index records, read at each call (one small row): an `index` run or an import
        that only adds a root bumps no generation, and a server must see it at once."""
        row = self.store.catalog.conn.execute("SELECT value FROM meta WHERE key='roots'").fetchone()
        return recorded_roots({"roots": json.loads(row[0])} if row else {})

    def servable_path(self, row: dict) -> str:
        """The real path of a row's file if it may be read (storage/roots.py decides, from the roots the
        index recorded); 403 or 410 otherwise. Never a path taken from the request."""
        try:
            return servable_path(row["path"], self.roots(), what=f"image {row['id']}")
        except FileGoneError as exc:
            raise ApiError(410, str(exc)) from None
        except NotServableError as exc:
            raise ApiError(403, str(exc)) from None

    def describe(self, row: dict) -> dict:
        """Metadata of one row, as the API shows it."""
        i = row["id"]
        out = dict(id=i, path=row["path"], name=os.path.basename(row["path"]), folder=os.path.dirname(row["path"]),
                   size=row["size"], mtime=row["mtime_ns"] / 1e9, taken_at=row["taken_at"], width=row["width"],
                   height=row["height"], ext=row["ext"], thumbnail=thumb_url(row), file=f"/api/images/{i}/file")
        if row.get("video_id") is not None:  # a video's shot: the video (served by its own id) and the shot's times
            out.update(kind="video", video_id=row["video_id"], start_s=row["start_s"], end_s=row["end_s"],
                       frame_s=row["frame_s"], duration_s=row["duration_s"],
                       file=f"/api/images/{row['video_id']}/file")
        return json_safe(out)  # a file name that is not UTF-8 is shown readably (fsnames.json_safe)

    def folders(self, limit: int = 500) -> list[str]:
        """Folders holding indexed images (for the page's folder filter), cached per catalog generation."""
        gen = self.store.catalog.generation()
        if self._folders[0] != gen:
            self._folders = (gen, self.store.catalog.folders()[:limit])
        return self._folders[1]


def thumb_url(row: dict, size: int = 256, image_id: Optional[int] = None) -> str:
    # the file's mtime is in the URL: a changed file gets a new URL, so browsers may cache forever
    return f"/api/images/{row['id'] if image_id is None else image_id}/thumb?size={size}&v={row['mtime_ns']}"
