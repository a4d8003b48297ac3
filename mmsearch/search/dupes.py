"""Near-duplicate images: pairs with cosine >= threshold, joined into groups by union-find (connected
components).

Near-duplicates are each other's nearest neighbours, far closer than any text query's, so they sit in
the same IVF list or one of the next few. On an IVF index the pairs come from a blocked self-join: the
vectors of each list against those of the DUPES_NPROBE lists nearest its centroid, one matrix product
a list (BLAS), at a threshold lowered by SCORE_MARGIN for the quantised codes; the candidates are then
scored again on the catalog's exact embeddings: at 1M vectors (IVF4096,SQ8) 4096 products instead of a
million range searches (which took 813 s on 2 AVX2 cores). A flat index (small collections), or one of
product codes, range-searches every stored vector. Both equal brute force on the tests' planted groups.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import numpy as np

from mmsearch.checks import count, number

# Cosine of an image and its edited copy (resize, JPEG re-encode, small crop, brightness) vs distinct
# images, measured with the test model on synthetic images (benchmarks/dupes_threshold.py, README).
DEFAULT_THRESHOLD = 0.95
DUPES_NPROBE = 8
SCORE_MARGIN = 0.02  # quantised codes vs exact embeddings: SQ8 moves a cosine by ~0.003 (the tests' bound)


class _UnionFind:
    def __init__(self):
        self.parent: dict[int, int] = {}

    def find(self, a: int) -> int:
        p = self.parent.setdefault(a, a)
        while p != self.parent[p]:
            self.parent[p] = self.parent[self.parent[p]]  # path halving
            p = self.parent[p]
        return p

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def groups_from_pairs(pairs) -> list[list[int]]:
    """Connected components of the (a, b) pairs, each sorted, largest group first, then by first id."""
    uf = _UnionFind()
    for a, b in pairs:
        uf.union(int(a), int(b))
    comps: dict[int, list[int]] = {}
    for x in uf.parent:
        comps.setdefault(uf.find(x), []).append(x)
    return sorted((sorted(c) for c in comps.values() if len(c) > 1), key=lambda g: (-len(g), g[0]))


def find_pairs(index, vectors_iter, threshold: float, total: int = 0,
               progress: Optional[Callable[..., None]] = None, batch: int = 4096):
    """(a, b, cosine) for a < b with cosine >= threshold, querying `index` with every stored vector."""
    pairs = []
    done = 0
    for ids, vecs in vectors_iter:
        for s in range(0, len(ids), batch):
            q_ids = ids[s:s + batch]
            lims, scores, found = index.range_search(vecs[s:s + batch], np.nextafter(np.float32(threshold), -1))
            for j, qid in enumerate(q_ids.tolist()):
                lo, hi = lims[j], lims[j + 1]
                for b, sc in zip(found[lo:hi].tolist(), scores[lo:hi].tolist()):
                    if b > qid:  # each pair once; the query itself (b == qid) is not a duplicate
                        pairs.append((qid, b, sc))
        done += len(ids)
        if progress:
            progress(done, total, stage="dupes")
    return pairs


def ivf_pairs(index, threshold: float, nprobe: int = DUPES_NPROBE,
              progress: Optional[Callable[..., None]] = None) -> list[tuple[int, int]]:
    """(a, b) with a < b whose decoded codes score >= threshold: each IVF list against the `nprobe` lists
    nearest its centroid (itself included), one matrix product a list."""
    import faiss

    ivf = faiss.downcast_index(faiss.extract_index_ivf(index.index))
    nlist, invl = ivf.nlist, ivf.invlists
    centroids = ivf.quantizer.reconstruct_n(0, nlist)
    near = ivf.quantizer.search(centroids, min(nprobe, nlist))[1]
    # bounded: a list is decoded again when a later list has it for a neighbour (all of them decoded at
    # once would be 2 GB at 1M vectors)
    decoded = functools.lru_cache(maxsize=256)(lambda lst: decode_list(ivf, invl, lst, centroids[lst]))

    pairs: list = []
    for lst in range(nlist):
        ids, x = decoded(lst)
        if len(ids):
            blocks = [decoded(int(m)) for m in near[lst] if m >= 0]
            cid = np.concatenate([b[0] for b in blocks])
            cx = np.concatenate([b[1] for b in blocks])
            a, b = np.nonzero(x @ cx.T >= threshold)
            qa, qb = ids[a], cid[b]
            keep = qa < qb  # each pair once, and not a vector with itself
            pairs.extend(zip(qa[keep].tolist(), qb[keep].tolist()))
        if progress and (lst % 64 == 63 or lst == nlist - 1):
            progress(lst + 1, nlist, stage="dupes")
    return sorted(set(pairs))


def self_joinable(index) -> bool:
    """An IVF whose codes decode within SCORE_MARGIN of the vectors (flat or 8-bit scalar codes); product
    codes (the 10M tier's) are too lossy for that margin, and range-search every vector as before."""
    import faiss

    ivf = faiss.downcast_index(faiss.extract_index_ivf(index.index))
    return isinstance(ivf, faiss.IndexIVFFlat) or (isinstance(ivf, faiss.IndexIVFScalarQuantizer)
                                                   and ivf.sq.qtype == faiss.ScalarQuantizer.QT_8bit)


def decode_list(ivf, invl, lst: int, centroid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, float32 vectors) of one list of a self_joinable IVF, decoded from its codes (plus the centroid
    when the codes are residuals)."""
    import faiss

    n = invl.list_size(lst)
    d = ivf.d
    if n == 0:
        return np.zeros(0, np.int64), np.zeros((0, d), np.float32)
    ids = faiss.rev_swig_ptr(invl.get_ids(lst), n).copy()
    codes = faiss.rev_swig_ptr(invl.get_codes(lst), n * invl.code_size).copy().reshape(n, invl.code_size)
    if isinstance(ivf, faiss.IndexIVFFlat):
        return ids, codes.view(np.float32).reshape(n, d).copy()
    x = ivf.sq.decode(codes)  # 8-bit scalar codes (self_joinable)
    if ivf.by_residual:
        x = x + centroid
    return ids, np.ascontiguousarray(x, np.float32)


def exact_scores(store, pairs, threshold: float, chunk: int = 50_000) -> list[tuple[int, int, float]]:
    """The candidate pairs scored on the catalog's exact embeddings, kept at >= threshold."""
    out = []
    for s in range(0, len(pairs), chunk):
        part = pairs[s:s + chunk]
        ids, vecs = store.catalog.embeddings(store.dim, ids={x for p in part for x in p})
        row = {int(i): n for n, i in enumerate(ids.tolist())}
        for a, b in part:
            if a in row and b in row:
                sc = float(vecs[row[a]] @ vecs[row[b]])
                if sc >= threshold:
                    out.append((a, b, sc))
    return out


def find_duplicates(store, threshold: float = DEFAULT_THRESHOLD, nprobe: Optional[int] = DUPES_NPROBE,
                    progress: Optional[Callable[..., None]] = None) -> list[dict]:
    """Groups of near-duplicate images: [{'ids', 'paths', 'min_score'}] largest first."""
    threshold = number("threshold", threshold, -1.0, 1.0, optional=False)
    nprobe = count("nprobe", nprobe)
    index = store.image_vectors()
    if index.nlist and self_joinable(index):
        pairs = exact_scores(store, ivf_pairs(index, threshold - SCORE_MARGIN, max(1, nprobe or DUPES_NPROBE),
                                              progress=progress), threshold)
    else:
        pairs = find_pairs(index, store.catalog.iter_embeddings(store.dim), threshold,
                           total=index.ntotal, progress=progress)
    # two shots of one video (a long still scene stored as segments) are not duplicate files
    times = store.catalog.shot_times({x for a, b, _ in pairs for x in (a, b)})
    pairs = [(a, b, sc) for a, b, sc in pairs
             if not (a in times and b in times and times[a]["video_id"] == times[b]["video_id"])]
    groups = groups_from_pairs((a, b) for a, b, _ in pairs)
    members = {x for g in groups for x in g}
    rows = store.catalog.rows(members)
    low: dict[int, float] = {}
    where = {x: n for n, g in enumerate(groups) for x in g}
    for a, b, sc in pairs:
        g = where[a]
        low[g] = min(low.get(g, 1.0), sc)
    return [{"group": n + 1, "size": len(g), "min_score": round(low.get(n, 1.0), 4), "ids": g,
             "paths": [rows[i]["path"] for i in g if i in rows]} for n, g in enumerate(groups)]


def brute_force_groups(ids: np.ndarray, vectors: np.ndarray, threshold: float) -> list[list[int]]:
    """The naive reference: all pairs by a full similarity matrix (small sets only)."""
    sims = vectors @ vectors.T
    a, b = np.nonzero(np.triu(sims >= threshold, k=1))
    return groups_from_pairs(zip(ids[a], ids[b]))
