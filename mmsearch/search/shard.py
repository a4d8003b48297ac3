"""One shard of a sharded index, opened for serving: what a router asks of it.

The same object answers in-process (search/sharded.py's local searcher) and inside a Ray Serve replica
(mmsearch/distributed/serving.py); every method takes and returns plain data (numpy arrays, dicts), and
speaks in the shard's own catalog ids (the router turns them into global ids).

The shard is opened from the shard map and its name, not from a folder: it watches the map (a stat
every WATCH_S) and, when a swap points its name at another folder, checks that folder like any shard
(the map's model) and switches to it between two requests; a refused swap leaves the old folder
serving and says why in `info()`. Re-indexing the folder in place is picked up by the reloading store
(storage/shared.py), as `mmsearch serve` picks it up.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from mmsearch.errors import MmsearchError
from mmsearch.search.filters import Filters
from mmsearch.search.query import Searcher
from mmsearch.storage.shardmap import SHARD_MAP, ShardMap
from mmsearch.storage.shared import ServingStore


@dataclass(frozen=True)
class _View:
    folder: Path
    store: ServingStore
    searcher: Searcher
    version: int


def rss_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class ShardWorker:
    WATCH_S = 0.5

    def __init__(self, root, name: str):
        self.root, self.name = Path(root), name
        self._lock = threading.Lock()
        self._checked_at = time.monotonic()
        self.error: Optional[str] = None  # why the last swap was refused
        self.queries = 0
        self._cpu0 = time.process_time()
        self._folders: tuple = (None, None, [])
        self._map_mtime = self._mtime()
        self._open(ShardMap.load(self.root))

    def _mtime(self):
        try:
            return (self.root / SHARD_MAP).stat().st_mtime_ns
        except OSError:
            return None

    def _open(self, smap: ShardMap) -> None:
        folder = smap.folder(self.name)
        smap.check_shard(self.name, folder)  # a shard of another model, or none: ShardMapError
        store = ServingStore.open_shared(folder)
        self._view = _View(folder, store, Searcher(store, allow_paths=False), smap.version)

    def view(self) -> _View:
        """The folder serving now, after a look at the map when the last one is WATCH_S old."""
        if time.monotonic() - self._checked_at >= self.WATCH_S:
            with self._lock:
                if time.monotonic() - self._checked_at >= self.WATCH_S:
                    self._watch()
                    self._checked_at = time.monotonic()
        return self._view

    def _watch(self) -> None:
        mtime = self._mtime()
        if mtime is None or mtime == self._map_mtime:
            return
        self._map_mtime = mtime
        try:
            smap = ShardMap.load(self.root)
            if smap.folder(self.name) != self._view.folder:
                self._open(smap)  # requests in flight finish on the old store; new ones get this one
            self.error = None
        except MmsearchError as exc:
            self.error = f"swap refused, still serving {self._view.folder}: {exc}"

    # ---- what the router asks ---------------------------------------------------------------------
    def ping(self) -> dict:
        v = self.view()
        return {"shard": self.name, "generation": v.store.catalog.generation(), "version": v.version}

    def search(self, vec, depth: int, filters: Optional[Filters] = None, hydrate: int = 0) -> dict:
        """This shard's `depth` nearest images kept by `filters`, best first, with the rows of the first
        `hydrate` of them (what the router shows, fetched in the same call)."""
        t = time.perf_counter()
        v = self.view()
        self.queries += 1
        if v.store.catalog.has_images():
            scores, ids = v.searcher.nearest(np.asarray(vec, np.float32), int(depth), filters)
            keep = ids >= 0
            scores, ids = scores[keep], ids[keep]
        else:  # an empty shard (a small index split many ways) has nothing to say, which is not an error
            scores, ids = np.zeros(0, np.float32), np.zeros(0, np.int64)
        rows = v.store.catalog.rows(ids[:hydrate].tolist()) if hydrate else {}
        return {"shard": self.name, "ids": ids, "scores": scores, "rows": rows,
                "took_ms": (time.perf_counter() - t) * 1000}

    def rows(self, ids) -> dict:
        return self.view().store.catalog.rows(ids)

    def embeddings(self, ids) -> dict:
        """id -> stored embedding, for the ids this shard holds (a query by indexed image)."""
        cat = self.view().store.catalog
        got, emb = cat.embeddings(self.view().store.dim, ids)
        return {int(i): e for i, e in zip(got, emb)}

    def tokens(self, ids) -> dict:
        """id -> re-ranker tokens (float16) or None, for ids this shard holds; {} without a re-ranker."""
        store = self.view().store
        shape = store.token_shape()
        return store.catalog.tokens(ids, shape) if shape else {}

    def texts(self, vec, k: int) -> list:
        """(id, score, text) of the k texts of the corpus nearest to `vec` (every shard keeps the corpus)."""
        store = self.view().store
        if store.catalog.count_texts() == 0:
            return []
        scores, ids = store.text_vectors().search(np.asarray(vec, np.float32)[None, :], int(k))
        rows = {r["id"]: r["text"] for r in store.catalog.text_rows([int(i) for i in ids[0] if i >= 0])}
        return [(int(i), float(s), rows[int(i)]) for i, s in zip(ids[0], scores[0]) if int(i) in rows]

    def folders(self, limit: int = 500) -> list[str]:
        v = self.view()
        gen = v.store.catalog.generation()
        if self._folders[:2] != (v.folder, gen):
            seen = {os.path.dirname(p) for (p,) in v.store.catalog.conn.execute("SELECT path FROM images")}
            self._folders = (v.folder, gen, sorted(seen)[:limit])
        return self._folders[2]

    def info(self) -> dict:
        """Counts, the folder and model, and this process's memory and CPU per query (to size a cluster)."""
        v = self.view()
        cat = v.store.catalog
        cpu = time.process_time() - self._cpu0
        return {"name": self.name, "folder": str(v.folder), "version": v.version, "images": cat.count_images(),
                "texts": cat.count_texts(), "failed": cat.count_failures(), "generation": cat.generation(),
                "roots": list(cat.meta().get("roots") or []), "meta": v.store.meta, "error": self.error,
                "bytes_on_disk": cat.bytes_on_disk(), "rss_bytes": rss_bytes(), "cpu_s": round(cpu, 3),
                "queries": self.queries, "cpu_ms_per_query": round(1000 * cpu / self.queries, 3) if self.queries else None,
                "pid": os.getpid()}
