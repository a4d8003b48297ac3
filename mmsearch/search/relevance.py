"""The good-match score: how far a hit's cosine stands above what its query scores against the collection.

A raw cosine means different things for different queries and models (a generic query scores high
against everything; every model has its own scale), so no fixed cut-off fits all. Here each query is
compared with a fixed random sample of the collection's own stored embeddings (at most SAMPLE_SIZE,
drawn by catalog id with a fixed seed, redrawn when the collection has grown by a tenth): their
cosines are that query's background, and a hit's calibrated score is its cosine's z-score against
it, z = (cos - mean) / std. A hit is a good match when z reaches the index's threshold, recorded in
its meta (`relevance`) when it was built; the default was chosen on held-out data by
benchmarks/relevance.py. An index of fewer than MIN_IMAGES images has no calibration: its hits carry
no calibrated score and every result counts.

Costs one [n, d] x [d] product per query (2000 x 512: ~0.1 ms) and, once per opened index, reading
the sample's embeddings from the catalog.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from mmsearch.config import GOOD_MATCH
from mmsearch.storage.store import IndexStore

SAMPLE_SIZE = int(GOOD_MATCH["sample"])
MIN_IMAGES = 50
REDRAW_GROWTH = 1.1  # a sample is redrawn once the collection's largest id has grown by 10 %


@dataclass(frozen=True)
class Standing:
    """One query's background: a hit's calibrated score is (similarity - mean) / std."""

    mean: float
    std: float
    threshold: float

    def score(self, similarity: float) -> float:
        return (similarity - self.mean) / self.std

    @property
    def cutoff(self) -> float:
        """The cosine a good match of this query reaches."""
        return self.mean + self.threshold * self.std

    def good(self, similarity: float) -> bool:
        return similarity >= self.cutoff


class Calibration:
    """The sample of one index and its threshold; `standing(vec)` for each query."""

    def __init__(self, sample: np.ndarray, threshold: float, method: str = GOOD_MATCH["method"]):
        self.sample = np.ascontiguousarray(sample, dtype=np.float32)
        self.threshold = float(threshold)
        self.method = method

    def standing(self, vec: np.ndarray) -> Standing:
        sims = self.sample @ np.asarray(vec, np.float32)
        return Standing(float(sims.mean()), max(float(sims.std()), 1e-6), self.threshold)


def record_of(meta: dict) -> dict:
    """The index's good-match record (method, threshold, sample size), or the defaults for an index
    built before there was one."""
    rec = meta.get("relevance")
    return dict(GOOD_MATCH, **rec) if isinstance(rec, dict) else dict(GOOD_MATCH)


class CalibrationCache:
    """The calibration of a store, drawn once and redrawn as the collection grows (a long-lived searcher)."""

    def __init__(self, store: IndexStore):
        self.store = store
        self._drawn_at: Optional[int] = None
        self._value: Optional[Calibration] = None

    def get(self) -> Optional[Calibration]:
        cat = self.store.catalog
        top = cat.max_image_id()  # O(1); count(*) would walk an index at every query
        drawn = self._drawn_at
        if drawn is not None and drawn <= top <= drawn * REDRAW_GROWTH:
            return self._value
        self._drawn_at, self._value = top, None
        rec = record_of(self.store.meta)
        if rec.get("method") != GOOD_MATCH["method"] or cat.count_images() < MIN_IMAGES:
            return None  # an unknown method (a newer mmsearch wrote it), or too few images to say
        size = min(SAMPLE_SIZE, int(rec.get("sample") or SAMPLE_SIZE))
        _, sample = cat.sample_embeddings(self.store.dim, size, seed=0)
        if len(sample) >= MIN_IMAGES:
            self._value = Calibration(sample[:size], float(rec["threshold"]), rec["method"])
        return self._value


def good_pairs(search: Callable[[int], list], depth: int, cutoff: float, deepen: bool, most: int) -> list:
    """(id, similarity) of the good matches (similarity >= cutoff) among the closest `depth` that
    `search(depth)` returns, best first; `deepen`: search deeper while the last one found is still good,
    up to `most` (the good matches of a query are a prefix of its cosine order)."""
    while True:
        pairs = search(depth)
        if not deepen or len(pairs) < depth or pairs[-1][1] < cutoff or depth >= most:
            return [p for p in pairs if p[1] >= cutoff][:most]
        depth = min(most, depth * 4)


def date_of(row: dict) -> float:
    """A photo's date for sorting: when it was taken (EXIF), else the file's modification time."""
    return row["taken_at"] if row.get("taken_at") is not None else row["mtime_ns"] / 1e9
