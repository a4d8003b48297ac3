"""FAISS: the vector index, a derived cache of the catalog keyed by catalog row ids.

An index *is* its factory string (faiss.index_factory), wrapped in IndexIDMap2 so ids are the
catalog's. The file records the catalog generation it was built from in a sidecar JSON, written
after the index itself, so a crash leaves a stale-but-detectable cache, never a wrong one.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Callable, Optional, Sequence

import faiss
import numpy as np

from mmsearch.errors import VectorIndexError
from mmsearch.storage.flat import exact_search, is_fresh, sidecar  # noqa: F401 (exact_search: re-exported)


def _tmp_name(path: Path) -> Path:
    """A temporary name of its own per writer: two processes saving at once never share a half-written file."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _atomic_write_json(path: Path, data: dict) -> None:
    tmp = _tmp_name(path)
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class VectorIndex:
    """Inner-product search over L2-normalised vectors (= cosine similarity).

    `params` are the search parameters the structure was tuned to (nprobe for IVF, efSearch for
    HNSW, k_factor for a refine step); they travel with the file in its sidecar JSON."""

    def __init__(self, index: faiss.Index, factory: str, params: Optional[dict] = None):
        self.index = index
        self.factory = factory
        self.params: dict = {}
        # with params["refine"] = R: ids -> their exact stored vectors (the catalog's), to re-score the
        # R x k candidates coarse codes (PQ fast-scan) find; the store attaches it (IndexStore.attach_refine)
        self.refine_source: Optional[Callable[[np.ndarray], np.ndarray]] = None
        self.set_params(**(params or {}))

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def create(cls, factory: str, dim: int, train: Optional[np.ndarray] = None) -> "VectorIndex":
        """An empty index of `factory`, trained on `train` when the structure needs training.
        IVF structures keep catalog ids in their inverted lists; others are wrapped in IndexIDMap2."""
        try:
            inner = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise VectorIndexError(f"bad FAISS factory string '{factory}': {str(exc).strip().splitlines()[-1]}") from exc
        if not inner.is_trained:
            train = np.zeros((0, dim), np.float32) if train is None else np.ascontiguousarray(train, np.float32)
            nlist = _ivf_lists(inner)
            need = max(nlist, 1) if nlist else 1
            if len(train) < need:
                raise VectorIndexError(
                    f"factory '{factory}' needs at least {need} vectors to train, the index has {len(train)}; "
                    f"use a smaller one (e.g. 'IVF{max(1, len(train) // 39)},Flat') or 'Flat'")
            if nlist:  # 10 k-means iterations, not FAISS's 25: 2.5x less training; tuning restores recall
                faiss.extract_index_ivf(inner).cp.niter = KMEANS_ITERATIONS
            inner.train(train)
        index = inner if _ivf_lists(inner) and _is_plain_ivf(inner) else faiss.IndexIDMap2(inner)
        return cls(index, factory)

    @classmethod
    def build(cls, factory: str, dim: int, ids: np.ndarray, vectors: np.ndarray) -> "VectorIndex":
        """Build `factory` over (ids, vectors); trains it first when the structure needs training."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        out = cls.create(factory, dim, vectors)
        out.add(ids, vectors)
        return out

    def set_params(self, nprobe: Optional[int] = None, efSearch: Optional[int] = None,
                   k_factor: Optional[float] = None, refine: Optional[int] = None, **_) -> None:
        """Apply tuned search parameters (those the structure does not have are ignored). `refine`: search
        refine x k candidates in the codes, return the k best by their exact stored vectors (0: off)."""
        inner = _inner(self.index)
        if nprobe is not None and _ivf_lists(inner):
            ivf = faiss.extract_index_ivf(inner)
            ivf.nprobe = int(nprobe)
            quantizer = faiss.downcast_index(ivf.quantizer)
            if isinstance(quantizer, faiss.IndexHNSW):  # the lists to probe must be found by the quantizer
                quantizer.hnsw.efSearch = max(64, 2 * int(nprobe))
            self.params["nprobe"] = int(nprobe)
        if refine is not None:
            if int(refine) > 0:
                self.params["refine"] = int(refine)
            else:
                self.params.pop("refine", None)
        if efSearch is not None and isinstance(inner, faiss.IndexHNSW):
            inner.hnsw.efSearch = int(efSearch)
            self.params["efSearch"] = int(efSearch)
        if k_factor is not None and isinstance(inner, faiss.IndexRefine):
            inner.k_factor = float(k_factor)
            self.params["k_factor"] = float(k_factor)

    @property
    def nlist(self) -> int:
        return _ivf_lists(_inner(self.index))

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

    def search(self, queries: np.ndarray, k: int, allowed_ids: Optional[np.ndarray] = None,
               stored: Optional[Callable[[np.ndarray], np.ndarray]] = None, widen: float = 1.0,
               excluded_ids: Optional[np.ndarray] = None):
        """(scores [n,k], ids [n,k]); missing slots have id -1. With a refine factor R (and its source
        attached), the codes give R x k candidates and their exact stored vectors the k best: coarse
        codes in RAM, the embeddings read once from where they already are (the catalog)."""
        refine = self.params.get("refine")
        if not refine or self.refine_source is None:
            return self._search_codes(queries, k, allowed_ids, stored, widen, excluded_ids)
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = int(min(k, self.ntotal))
        scores, ids = self._search_codes(queries, k * int(refine), allowed_ids, stored, widen, excluded_ids)
        return refine_exact(queries, ids, k, self.refine_source)

    def _search_codes(self, queries: np.ndarray, k: int, allowed_ids: Optional[np.ndarray] = None,
                      stored: Optional[Callable[[np.ndarray], np.ndarray]] = None, widen: float = 1.0,
                      excluded_ids: Optional[np.ndarray] = None):
        """The search of the structure itself (search() without the refine step).

        allowed_ids restricts the search to those ids, so a filter still yields k hits when k exist:
        a small subset is searched exactly over its stored vectors (`stored(ids)` -> float32 [n, d],
        when given); a larger one through a bitmap id selector inside FAISS, with the tuned search
        widened by `widen` (the k allowed neighbours lie deeper than the k nearest overall).
        excluded_ids is the other way to say the same, for a filter that keeps most ids: a selector
        that passes every id but those (its cost grows with what the filter removes)."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = int(min(k, self.ntotal))
        if k <= 0:
            return _empty(len(queries))
        if excluded_ids is not None:
            return self._search_excluding(queries, k, np.unique(np.asarray(excluded_ids, dtype=np.int64)), widen)
        if allowed_ids is None:
            return self.index.search(queries, k)
        allowed_ids = np.unique(np.asarray(allowed_ids, dtype=np.int64))
        k = int(min(k, len(allowed_ids)))
        if k <= 0:
            return _empty(len(queries))
        if stored is not None and len(allowed_ids) <= EXACT_SUBSET_MAX:
            return exact_search(queries, allowed_ids, stored(allowed_ids), k)
        if len(allowed_ids) >= self.ntotal:  # the filter keeps everything: no selector at all
            return self.index.search(queries, k)
        selector = _bitmap_selector(allowed_ids)  # held here: FAISS keeps only a raw pointer to it
        params = _search_params(self.index, selector, widen)
        try:
            return self.index.search(queries, k, params=params)
        except RuntimeError:  # structures without selector support (PQ, ...): widen and filter
            return self._search_widening(queries, k, lambda ids: np.isin(ids, allowed_ids))

    def _search_excluding(self, queries: np.ndarray, k: int, excluded: np.ndarray, widen: float):
        if len(excluded) == 0:
            return self.index.search(queries, k)
        k = int(min(k, max(0, self.ntotal - len(excluded))))
        if k <= 0:
            return _empty(len(queries))
        inner = _bitmap_selector(excluded)
        selector = faiss.IDSelectorNot(inner)
        params = _search_params(self.index, selector, widen)
        try:
            return self.index.search(queries, k, params=params)
        except RuntimeError:
            return self._search_widening(queries, k, lambda ids: ~np.isin(ids, excluded))

    def _search_widening(self, queries: np.ndarray, k: int, passes: Callable[[np.ndarray], np.ndarray]):
        out_s = np.full((len(queries), k), -np.inf, np.float32)
        out_i = np.full((len(queries), k), -1, np.int64)
        for q in range(len(queries)):
            kk = min(self.ntotal, 4 * k)
            while True:
                s, i = self.index.search(queries[q:q + 1], kk)
                ok = passes(i[0]) & (i[0] >= 0)
                keep_s, keep_i = s[0][ok][:k], i[0][ok][:k]
                if len(keep_i) == k or kk >= self.ntotal:
                    break
                kk = min(self.ntotal, kk * 4)
            out_s[q, :len(keep_i)], out_i[q, :len(keep_i)] = keep_s, keep_i
        return out_s, out_i

    def range_search(self, queries: np.ndarray, threshold: float):
        """(lims, scores, ids): for query j, ids[lims[j]:lims[j+1]] score > threshold (inner product)."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        try:
            if self.params.get("refine") and self.refine_source is not None:
                raise RuntimeError("coarse codes: their scores are not the ones to cut at")
            return self.index.range_search(queries, float(threshold))
        except RuntimeError:  # structures without range search (HNSW), coarse codes: k-NN (refined), then cut
            k = min(self.ntotal, 64)
            scores, ids = self.search(queries, k)
            keep = (scores > threshold) & (ids >= 0)
            lims = np.concatenate([[0], np.cumsum(keep.sum(1))]).astype(np.int64)
            return lims, scores[keep], ids[keep]

    def ids(self) -> np.ndarray:
        """Every id the index holds (unsorted, duplicates kept), read from its id map or inverted lists."""
        index = faiss.downcast_index(self.index)
        if isinstance(index, faiss.IndexIDMap):
            return faiss.vector_to_array(index.id_map).astype(np.int64)
        from faiss.contrib.inspect_tools import get_invlist

        invlists = faiss.extract_index_ivf(index).invlists
        parts = [get_invlist(invlists, lst)[0] for lst in range(invlists.nlist) if invlists.list_size(lst)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def reconstruct(self, image_id: int) -> np.ndarray:
        return self.index.reconstruct(int(image_id))

    def memory_bytes(self) -> int:
        """Bytes the structure holds (its serialised size: codes, ids, quantizer), for bytes/vector."""
        return int(faiss.serialize_index(self.index).nbytes)

    # ---- persistence --------------------------------------------------------------------------
    def save(self, path: Path, generation: int, extra: Optional[dict] = None) -> None:
        path = Path(path)
        tmp = _tmp_name(path)
        try:
            faiss.write_index(self.index, str(tmp))
            os.replace(tmp, path)
        except RuntimeError as exc:  # FAISS's own I/O errors (a read-only folder, a full disk)
            tmp.unlink(missing_ok=True)
            raise OSError(f"cannot write {path}: {str(exc).strip().splitlines()[-1]}") from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _atomic_write_json(path.with_suffix(".json"), {
            "generation": generation, "factory": self.factory, "ntotal": self.ntotal, "params": self.params,
            **(extra or {})})

    @staticmethod
    def is_fresh(path: Path, generation: int) -> bool:
        """The sidecar's word that the file at `path` was built from this catalog generation."""
        return is_fresh(path, generation)

    @classmethod
    def load(cls, path: Path, generation: int, mmap: bool = True) -> Optional["VectorIndex"]:
        """The cached index if it exists, is readable and was built from this catalog generation; else None.
        mmap=True maps the codes read-only (IVF lists, flat codes) instead of reading them, so a fresh
        query process starts fast and shares pages with others; updates need mmap=False."""
        path = Path(path)
        try:
            info = json.loads(path.with_suffix(".json").read_text())
            if info.get("generation") != generation or not path.is_file():
                return None
            index = None
            if mmap:
                try:
                    index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
                except RuntimeError:
                    index = None
            if index is None:
                index = faiss.read_index(str(path))
        except (OSError, ValueError, RuntimeError):
            return None
        if index.ntotal != info.get("ntotal"):
            return None
        return cls(index, info["factory"], info.get("params"))

    @staticmethod
    def sidecar(path: Path) -> dict:
        return sidecar(path)


KMEANS_ITERATIONS = 10

# A filter keeping at most this many images is answered exactly from their stored vectors: measured
# at 1M (benchmarks/ann_scale.py), fetching 20k embeddings by id and scoring them costs about what a
# widened selector search costs, and is exact.
EXACT_SUBSET_MAX = 20_000


def refine_exact(queries: np.ndarray, ids: np.ndarray, k: int, source: Callable[[np.ndarray], np.ndarray]):
    """The k best of each query's candidate ids by exact inner product with their stored vectors,
    fetched once for the whole batch."""
    out_s = np.full((len(queries), k), -np.inf, np.float32)
    out_i = np.full((len(queries), k), -1, np.int64)
    uniq = np.unique(ids[ids >= 0])
    if not len(uniq) or k <= 0:
        return out_s, out_i
    vecs = np.asarray(source(uniq), np.float32)
    for q in range(len(queries)):
        cand = ids[q][ids[q] >= 0]
        if not len(cand):
            continue
        sc = vecs[np.searchsorted(uniq, cand)] @ queries[q]
        top = np.argsort(-sc, kind="stable")[:k]
        out_s[q, :len(top)], out_i[q, :len(top)] = sc[top], cand[top]
    return out_s, out_i


def _empty(n: int):
    return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)


def _bitmap_selector(allowed_ids: np.ndarray):
    """A bitmap over id space: one bit per id, built in numpy (no hash set of a million ids)."""
    bits = np.zeros(int(allowed_ids[-1]) + 1, dtype=bool)
    bits[allowed_ids] = True
    packed = np.packbits(bits, bitorder="little")
    sel = faiss.IDSelectorBitmap(len(packed), faiss.swig_ptr(packed))  # n is in bytes
    sel.referenced = packed  # keep the buffer alive as long as the selector
    return sel


def _inner(index: faiss.Index) -> faiss.Index:
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else faiss.downcast_index(index)


def _is_plain_ivf(index: faiss.Index) -> bool:
    return isinstance(faiss.downcast_index(index), faiss.IndexIVF)


def _ivf_lists(index: faiss.Index) -> int:
    try:
        return int(faiss.extract_index_ivf(index).nlist)
    except (RuntimeError, AttributeError):
        return 0


def _search_params(index: faiss.Index, selector, widen: float = 1.0) -> faiss.SearchParameters:
    """Search parameters of the right kind for the wrapped structure, carrying the id selector,
    with the tuned nprobe / efSearch multiplied by `widen`."""
    inner = _inner(index)
    if isinstance(inner, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=int(max(64, inner.hnsw.efSearch * widen)))
    if _ivf_lists(inner):
        ivf = faiss.extract_index_ivf(inner)
        nprobe = int(min(ivf.nlist, max(1, round(ivf.nprobe * widen))))
        return faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
    return faiss.SearchParameters(sel=selector)
