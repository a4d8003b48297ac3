"""FAISS: the vector index, a derived cache of the catalog keyed by catalog row ids.

An index *is* its factory string (faiss.index_factory), wrapped in IndexIDMap2 so ids are the
catalog's. The file records the catalog generation it was built from in a sidecar JSON, written
after the index itself, so a crash leaves a stale-but-detectable cache, never a wrong one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

import faiss
import numpy as np

from .errors import VectorIndexError


def _atomic_write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class VectorIndex:
    """Inner-product search over L2-normalised vectors (= cosine similarity)."""

    def __init__(self, index: faiss.Index, factory: str):
        self.index = index
        self.factory = factory

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def build(cls, factory: str, dim: int, ids: np.ndarray, vectors: np.ndarray) -> "VectorIndex":
        """Build `factory` over (ids, vectors); trains it first when the structure needs training."""
        try:
            inner = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise VectorIndexError(f"bad FAISS factory string '{factory}': {str(exc).strip().splitlines()[-1]}") from exc
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if not inner.is_trained:
            nlist = _ivf_lists(inner)
            need = max(nlist, 1) if nlist else 1
            if len(vectors) < need:
                raise VectorIndexError(
                    f"factory '{factory}' needs at least {need} vectors to train, the index has {len(vectors)}; "
                    f"use a smaller one (e.g. 'IVF{max(1, len(vectors) // 39)},Flat') or 'Flat'")
            inner.train(vectors)
        index = faiss.IndexIDMap2(inner)
        if len(vectors):
            index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
        return cls(index, factory)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                                    np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids: Sequence[int]) -> bool:
        """Remove ids in place; False when the structure cannot remove (HNSW): the caller rebuilds."""
        if not len(ids):
            return True
        try:
            self.index.remove_ids(faiss.IDSelectorBatch(np.asarray(ids, dtype=np.int64)))
        except RuntimeError:
            return False
        return True

    def search(self, queries: np.ndarray, k: int, allowed_ids: Optional[np.ndarray] = None):
        """(scores [n,k], ids [n,k]); missing slots have id -1. allowed_ids restricts the search
        to those ids (an IDSelector inside FAISS), so a filter still yields k hits when k exist."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = int(min(k, self.ntotal))
        if k <= 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        if allowed_ids is None:
            return self.index.search(queries, k)
        allowed_ids = np.asarray(allowed_ids, dtype=np.int64)
        k = int(min(k, len(allowed_ids)))
        if k <= 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        params = _search_params(self.index, faiss.IDSelectorBatch(allowed_ids))
        try:
            return self.index.search(queries, k, params=params)
        except RuntimeError:  # structures without selector support (PQ, ...): widen and filter
            return self._search_widening(queries, k, allowed_ids)

    def _search_widening(self, queries: np.ndarray, k: int, allowed_ids: np.ndarray):
        allowed = set(allowed_ids.tolist())
        out_s = np.full((len(queries), k), -np.inf, np.float32)
        out_i = np.full((len(queries), k), -1, np.int64)
        for q in range(len(queries)):
            kk = min(self.ntotal, 4 * k)
            while True:
                s, i = self.index.search(queries[q:q + 1], kk)
                keep = [(a, b) for a, b in zip(s[0], i[0]) if b in allowed][:k]
                if len(keep) == k or kk >= self.ntotal:
                    break
                kk = min(self.ntotal, kk * 4)
            for j, (a, b) in enumerate(keep):
                out_s[q, j], out_i[q, j] = a, b
        return out_s, out_i

    def reconstruct(self, image_id: int) -> np.ndarray:
        return self.index.reconstruct(int(image_id))

    # ---- persistence --------------------------------------------------------------------------
    def save(self, path: Path, generation: int) -> None:
        path = Path(path)
        tmp = path.with_suffix(".tmp")
        faiss.write_index(self.index, str(tmp))
        os.replace(tmp, path)
        _atomic_write_json(path.with_suffix(".json"),
                           {"generation": generation, "factory": self.factory, "ntotal": self.ntotal})

    @classmethod
    def load(cls, path: Path, generation: int) -> Optional["VectorIndex"]:
        """The cached index if it exists, is readable and was built from this catalog generation; else None."""
        path = Path(path)
        try:
            info = json.loads(path.with_suffix(".json").read_text())
            if info.get("generation") != generation or not path.is_file():
                return None
            try:  # memory-map flat codes instead of reading them: a fresh query process starts faster
                index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
            except RuntimeError:
                index = faiss.read_index(str(path))
        except (OSError, ValueError, RuntimeError):
            return None
        if index.ntotal != info.get("ntotal"):
            return None
        return cls(index, info["factory"])


def _ivf_lists(index: faiss.Index) -> int:
    try:
        return int(faiss.extract_index_ivf(index).nlist)
    except (RuntimeError, AttributeError):
        return 0


def _search_params(index: faiss.Index, selector) -> faiss.SearchParameters:
    """Search parameters of the right kind for the wrapped structure, carrying the id selector."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    if isinstance(inner, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=max(64, inner.hnsw.efSearch))
    try:
        ivf = faiss.extract_index_ivf(inner)
        return faiss.SearchParametersIVF(sel=selector, nprobe=ivf.nprobe)
    except RuntimeError:
        return faiss.SearchParameters(sel=selector)
