"""What a running server holds: one index opened for many threads, its searcher, its thumbnails.

The routes only talk to a state object: `searcher` (search, search_texts), `row`, `roots`, `folders`,
`info`, `health`, `count_texts`, `warm`, `thumbs`, `upload_slots`, `image_size`, `servable_path` and
`describe`. ServeState is one index (storage/shared.py: the reloading ServingStore, which never writes);
serve/sharded.py gives the same interface over the shards of a sharded index, so the API and the page
are the same for both. Files are served by catalog id only, and only while their path is inside a
folder the index recorded (storage/roots.py; an index that records none serves no file).
"""
from __future__ import annotations

import json
import os
import sys
import threading
from typing import Optional

from mmsearch.config import VERSION
from mmsearch.errors import FileGoneError, NotServableError
from mmsearch.storage.fsnames import json_safe
from mmsearch.storage.roots import recorded_roots, servable_path
from mmsearch.search.query import Searcher
from mmsearch.serve.errors import ApiError
from mmsearch.storage.shared import ServingStore  # noqa: F401  (its home was here: imports of it keep working)
from mmsearch.serve.thumbs import ThumbCache
from mmsearch.serve.uploads import UploadSlots


class FileRules:
    """What every state shares: which stored paths may be read, and how a row is shown."""

    max_upload_bytes: int = 20 << 20

    def roots(self) -> list[str]:
        raise NotImplementedError

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

    def image_size(self) -> int:
        """The image tower's input side: uploads are draft-decoded to the smallest scale at least this."""
        return int(self.store.meta.get("image_size") or 256)


class ServeState(FileRules):
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

    # ---- what the info routes show ----------------------------------------------------------------
    def info(self) -> dict:
        data = self.store.info()
        calibration = self.searcher.calibration.get()
        data.update(version=VERSION, roots=self.roots(), folders=self.folders(),
                    rerank_available=self.store.reranker_info() is not None, max_upload_bytes=self.max_upload_bytes,
                    calibrated=calibration is not None,
                    good_threshold=None if calibration is None else calibration.threshold,
                    watching=self.watcher is not None, partial=False, missing=[])
        return data

    def health(self) -> dict:
        """With `serve --watch`, `watcher` says what the watcher is doing (state, folders and whether each
        is away, runs, errors)."""
        return {"status": "ok", "images": self.count_images(), "generation": self.store.catalog.generation(),
                "torch_loaded": "torch" in sys.modules,  # torch loads only to embed an upload (or for a watcher)
                "watcher": None if self.watcher is None else self.watcher.status()}

    def count_images(self) -> int:
        return self.store.catalog.count_images()

    def count_texts(self) -> int:
        return self.store.catalog.count_texts()

    def warm(self) -> None:
        """Map the vectors and load the text tower, so the first query is fast too."""
        if self.store.catalog.count_images():
            self.store.image_vectors()
            self.store.text_encoder().encode_texts(["warm up"])

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

    def folders(self, limit: int = 500) -> list[str]:
        """Folders holding indexed images (for the page's folder filter), cached per catalog generation."""
        gen = self.store.catalog.generation()
        if self._folders[0] != gen:
            self._folders = (gen, self.store.catalog.folders()[:limit])
        return self._folders[1]


def thumb_url(row: dict, size: int = 256, image_id: Optional[int] = None) -> str:
    # the file's mtime is in the URL: a changed file gets a new URL, so browsers may cache forever
    return f"/api/images/{row['id'] if image_id is None else image_id}/thumb?size={size}&v={row['mtime_ns']}"
