"""Exact search in numpy, and the FAISS file's sidecar read without FAISS.

A small index whose vector cache is Flat (exact) is searched here, over the catalog's own stored
vectors, so a fresh query process never loads FAISS (its import was a fifth of a text query's start-up
on our CPUs): the same exact inner-product top-k that IndexFlatIP computes, ties broken by id. The
catalog is the truth, so this path is never stale. Past EXACT_START_MAX vectors reading them from
SQLite costs more than mapping the FAISS file, and FAISS answers (mmsearch.storage.vectors).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

# vectors read from the catalog in a fresh process instead of loading FAISS: 4096 x 512-d is 8 MB,
# about what importing FAISS costs in CPU time
EXACT_START_MAX = 4096


def sidecar(path) -> dict:
    """The JSON written beside a FAISS file (generation, factory, ntotal, params, ann), {} when unreadable."""
    try:
        return json.loads(Path(path).with_suffix(".json").read_text())
    except (OSError, ValueError):
        return {}


def is_fresh(path, generation: int) -> bool:
    """The sidecar's word that the FAISS file at `path` was built from this catalog generation."""
    return sidecar(path).get("generation") == generation and Path(path).is_file()


def exact_search(queries, ids, vectors, k: int):
    """Brute-force top-k of queries over (ids, vectors); ties broken by id order (stable)."""
    import numpy as np

    scores = queries @ np.asarray(vectors, np.float32).T
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else \
        np.tile(np.arange(scores.shape[1]), (len(queries), 1))
    part_s = np.take_along_axis(scores, part, 1)
    order = np.lexsort((part, -part_s), axis=1)  # by score, then by position (= id order)
    top = np.take_along_axis(part, order, 1)
    return np.take_along_axis(scores, top, 1).astype(np.float32), ids[top]


class ExactVectors:
    """The search half of VectorIndex over (ids, vectors) held in numpy: what Searcher needs."""

    factory = "Flat"
    params: dict = {}

    def __init__(self, ids, vectors):
        import numpy as np

        order = np.argsort(ids, kind="stable")
        self.ids = np.asarray(ids, np.int64)[order]
        self.vectors = np.ascontiguousarray(vectors, np.float32)[order]

    @property
    def ntotal(self) -> int:
        return len(self.ids)

    def search(self, queries, k: int, allowed_ids=None, stored=None, widen: float = 1.0, excluded_ids=None):
        """(scores [n,k], ids [n,k]), as VectorIndex.search; a filter selects rows exactly."""
        import numpy as np

        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        keep: Optional[np.ndarray] = None
        if allowed_ids is not None:
            keep = np.isin(self.ids, np.asarray(allowed_ids, np.int64))
        elif excluded_ids is not None:
            keep = ~np.isin(self.ids, np.asarray(excluded_ids, np.int64))
        ids, vectors = (self.ids, self.vectors) if keep is None else (self.ids[keep], self.vectors[keep])
        k = int(min(k, len(ids)))
        if k <= 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        return exact_search(queries, ids, vectors, k)

    def reconstruct(self, image_id: int):
        import numpy as np

        pos = int(np.searchsorted(self.ids, image_id))
        if pos >= len(self.ids) or self.ids[pos] != image_id:
            raise KeyError(image_id)
        return self.vectors[pos].copy()
