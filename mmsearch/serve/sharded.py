"""The server's state over a sharded index: the same interface as ServeState (serve/state.py), so the
routes, the API and the page are unchanged; a search reply also says which shards did not answer.

The searcher is search/sharded.py's ShardedSearcher, whose shards are in this process (`mmsearch serve
--shards DIR`) or Ray Serve deployments (`--ray`, mmsearch/distributed/serving.py). Ids are global ids
(storage/shardmap.py): the owner of an image is known from its id, so a row, a thumbnail or a
"more like this" goes to one shard only.
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from mmsearch.config import VERSION
from mmsearch.errors import ShardUnavailableError
from mmsearch.serve.errors import ApiError
from mmsearch.serve.state import FileRules
from mmsearch.serve.thumbs import ThumbCache
from mmsearch.serve.uploads import UploadSlots

INFO_TTL_S = 2.0  # roots, folders and counts are read from the shards at most this often


class ShardedServeState(FileRules):
    def __init__(self, searcher, root, max_upload_bytes: int = 20 << 20):
        self.searcher = searcher
        self.store = searcher.towers  # the model and re-ranker record (every shard has the same)
        self.root = Path(root)
        self.thumbs = ThumbCache(self.root)  # keyed by global id; not kept when the folder is read-only
        self.max_upload_bytes = max_upload_bytes
        self.upload_slots = UploadSlots()  # uploads decoded (and held) at once: bounded memory
        self.embed_lock = threading.Lock()
        self._cache: tuple = (0.0, {}, [])
        self._lock = threading.Lock()

    def _infos(self) -> tuple[dict, list]:
        """({shard: info}, missing), at most INFO_TTL_S old."""
        at, infos, missing = self._cache
        if time.monotonic() - at > INFO_TTL_S:
            with self._lock:
                if time.monotonic() - self._cache[0] > INFO_TTL_S:
                    infos, missing = self.searcher.infos()
                    self._cache = (time.monotonic(), infos, missing)
                at, infos, missing = self._cache
        return infos, missing

    def info(self) -> dict:
        infos, missing = self._infos()
        meta = self.store.meta
        shards = []
        for nm in self.searcher.names:
            i = infos.get(nm)
            shards.append({"name": nm, "up": i is not None, **({k: i[k] for k in (
                "folder", "version", "images", "generation", "rss_bytes", "cpu_ms_per_query", "queries", "error")}
                if i else {"reason": self.searcher.down.get(self.searcher.names.index(nm))})})
        return {"index": str(self.root.resolve()), "sharded": True, "shards": shards, "router": self.searcher.stats(),
                "partial": bool(missing),
                "missing": missing, "images": sum(i["images"] for i in infos.values()),
                "failed": sum(i["failed"] for i in infos.values()),
                "texts": max((i["texts"] for i in infos.values()), default=0),
                "model": dict(self.store.spec.to_dict(), arch=meta.get("arch"), fingerprint=meta["fingerprint"]),
                "precision": self.store.precision, "dim": self.store.dim, "factory": self.store.factory,
                "reranker": self.store.reranker_info(), "schema_version": meta.get("schema_version"),
                "bytes_on_disk": sum(i["bytes_on_disk"] for i in infos.values()), "version": VERSION,
                "roots": self.roots(), "folders": self.folders(),  # (the route makes odd file names JSON-safe)
                "rerank_available": self.store.reranker_info() is not None, "max_upload_bytes": self.max_upload_bytes}

    def health(self) -> dict:
        infos, missing = self._infos()
        return {"status": "degraded" if missing else "ok", "images": sum(i["images"] for i in infos.values()),
                "generation": sum(i["generation"] for i in infos.values()), "missing": missing,
                "torch_loaded": "torch" in sys.modules}

    def count_images(self) -> int:
        return sum(i["images"] for i in self._infos()[0].values())

    def count_texts(self) -> int:
        return max((i["texts"] for i in self._infos()[0].values()), default=0)

    def warm(self) -> None:
        self._infos()
        if self.store.meta.get("arch"):  # a model-less catalog (synthetic vectors) has no tower to load
            self.store.text_encoder().encode_texts(["warm up"])

    def row(self, image_id: int) -> dict:
        try:
            row = self.searcher.row(image_id)
        except ShardUnavailableError as exc:
            raise ApiError(503, str(exc)) from None
        if row is None:
            raise ApiError(404, f"no image with id {image_id} in the index")
        return row

    def roots(self) -> list[str]:
        return sorted({r for i in self._infos()[0].values() for r in i["roots"]})

    def folders(self, limit: int = 500) -> list[str]:
        replies, _ = self.searcher.gather({i: ("folders", (limit,)) for i in range(self.searcher.n)})
        return sorted({f for fs in replies.values() for f in fs})[:limit]


def local_state(root, max_upload_bytes: int = 20 << 20, timeout_s: float = 5.0) -> ShardedServeState:
    """Every shard of the layout at `root` in this process (`mmsearch serve --shards DIR`)."""
    from mmsearch.search.sharded import open_local

    return ShardedServeState(open_local(root, timeout_s=timeout_s, allow_paths=False), root, max_upload_bytes)
