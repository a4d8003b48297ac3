"""What a running server holds: one index opened for many threads, its searcher, its thumbnails.

The server never writes the catalog or the vector file (the indexer owns them), so `mmsearch index`
can run beside it. Each request looks at the catalog generation; when it moved, the vectors are
reloaded (or rebuilt in memory from the catalog) and the meta re-read, so new images appear without
a restart. Files are served by catalog id only, and only while their path is inside an indexed folder.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Optional

from mmsearch.storage.catalog import Catalog
from mmsearch.storage.fsnames import json_safe
from mmsearch.search.query import Searcher
from mmsearch.storage.store import IMAGE_VECTORS, IndexStore
from mmsearch.serve.errors import ApiError
from mmsearch.serve.thumbs import ThumbCache


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


def inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class ServeState:
    def __init__(self, index_dir, device: str = "cpu", max_upload_bytes: int = 20 << 20):
        self.store = ServingStore.open_shared(index_dir)
        # "auto" embeds uploads on the CPU (the index's ONNX tower when it has one: no torch start-up);
        # naming a GPU (--device cuda) embeds them with torch there
        self.store.device = "cpu" if device in (None, "auto") else device
        self.searcher = Searcher(self.store, allow_paths=False)
        self.thumbs = ThumbCache(self.store.dir)
        self.max_upload_bytes = max_upload_bytes
        self.embed_lock = threading.Lock()  # uploads embed one at a time: bounded CPU and memory
        self._folders: tuple = (None, [])
        self._roots: tuple = (None, [])

    # ---- rows and files -------------------------------------------------------------------------
    def row(self, image_id: int) -> dict:
        row = self.store.catalog.rows([image_id]).get(image_id)
        if row is None:
            raise ApiError(404, f"no image with id {image_id} in the index")
        return row

    def roots(self) -> list[str]:
        gen = self.store.catalog.generation()
        if self._roots[0] != gen:  # the indexer records new roots in the same run that bumps the generation
            self._roots = (gen, list(self.store.catalog.meta().get("roots") or []))
        return self._roots[1]

    def servable_path(self, row: dict) -> str:
        """The stored path of a row, if it may be read: it still exists as a regular file and, with
        symlinks resolved, lies inside a folder the indexer was given (for an index written before
        roots were recorded: inside its own folder). Never a path taken from the request."""
        path = row["path"]
        roots = self.roots() or [os.path.dirname(path)]
        if not any(inside(path, r) for r in roots):
            raise ApiError(403, f"image {row['id']} is outside the indexed folders")
        real = os.path.realpath(path)
        if not any(inside(real, os.path.realpath(r)) for r in roots):
            raise ApiError(403, f"image {row['id']} resolves outside the indexed folders (symlink)")
        if not os.path.isfile(real):
            raise ApiError(410, f"image {row['id']} is gone from disk (moved or deleted); re-run `mmsearch index`")
        return real

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
