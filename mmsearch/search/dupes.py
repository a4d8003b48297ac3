"""Near-duplicate images: pairs with cosine >= threshold found by the image index's range search
(every stored vector queries the index), joined into groups by union-find (connected components).

Near-duplicates are each other's nearest neighbours, far closer than any text query's, so they sit in
the query's own IVF list or the next few: the search runs at DUPES_NPROBE (>= the tuned nprobe is not
needed; the benchmark checks the pairs found against brute force), which is what keeps 1M images
within minutes.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from mmsearch.checks import count, number

# Cosine of an image and its edited copy (resize, JPEG re-encode, small crop, brightness) vs distinct
# images, measured with the test model on synthetic images (benchmarks/dupes_threshold.py, README).
DEFAULT_THRESHOLD = 0.95
DUPES_NPROBE = 8


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


def find_duplicates(store, threshold: float = DEFAULT_THRESHOLD, nprobe: Optional[int] = DUPES_NPROBE,
                    progress: Optional[Callable[..., None]] = None) -> list[dict]:
    """Groups of near-duplicate images: [{'ids', 'paths', 'min_score'}] largest first."""
    threshold = number("threshold", threshold, -1.0, 1.0, optional=False)
    nprobe = count("nprobe", nprobe)
    index = store.image_vectors()
    if nprobe is not None and index.nlist:
        index.set_params(nprobe=max(nprobe, 1))
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
