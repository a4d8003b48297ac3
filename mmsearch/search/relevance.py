"""The good-match score: how far a hit's cosine stands above what its query scores against the
collection, and how far below the query's best hit it falls.

A raw cosine means different things for different queries and models (a generic query scores high
against everything; every model has its own scale), so no fixed cut-off fits all. Here each query is
compared with a fixed random sample of the collection's own stored embeddings (at most SAMPLE_SIZE,
drawn by catalog id with a fixed seed, redrawn when the collection has grown by a tenth): their
cosines are that query's background, and a hit's z = (cos - mean) / std. Its calibrated score then
subtracts BELOW_BEST times how far its z falls below the z of the query's best hit:
score = z - 2 (z_best - z). The best hit scores its own z; a hit that trails it is a weaker
candidate for the same query, and most false "good" hits are exactly those (the near-twins ranked
under a true match; benchmarks/relevance.py: 1.1-3x fewer false goods than z alone, at the same
recall). The score still rises with the cosine within a query, so the good matches of a query are a
prefix of its cosine order. A hit is a good match when the score reaches the index's threshold,
recorded in its meta (`relevance`) when it was built; the default was chosen on held-out data by
benchmarks/relevance.py. An index recorded with the older method `z-sample-1` keeps z alone and its
threshold. An index of fewer than MIN_IMAGES images has no calibration: its hits carry no calibrated
score and every result counts.

Costs one [n, d] x [d] product per query (2000 x 512: ~0.1 ms) and, once per opened index, reading
the sample: from `calibration-sample.npz` beside the catalog, which the first process to draw it from
the catalog keeps (drawing is ~2,400 point reads, 0.1 s of a fresh query at 1M images).
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from mmsearch.config import GOOD_MATCH
from mmsearch.storage.store import IndexStore

SAMPLE_SIZE = int(GOOD_MATCH["sample"])
SAMPLE_FILE = "calibration-sample.npz"
MIN_IMAGES = 50
REDRAW_GROWTH = 1.1  # a sample is redrawn once the collection's largest id has grown by 10 %
# method -> BELOW_BEST, the weight of a hit's distance below the query's best hit (0: z alone)
METHODS = {"z-sample-1": 0.0, "zbest-sample-1": 2.0}


@dataclass(frozen=True)
class Standing:
    """One query's background, and once its search has run, the similarity of its best hit: a hit's
    calibrated score is z - below_best * (z_best - z), with z = (similarity - mean) / std."""

    mean: float
    std: float
    threshold: float
    below_best: float = 0.0
    best: Optional[float] = None

    def with_best(self, similarity: float) -> "Standing":
        return Standing(self.mean, self.std, self.threshold, self.below_best, float(similarity))

    def score(self, similarity: float) -> float:
        z = (similarity - self.mean) / self.std
        if self.best is None or not self.below_best:
            return z
        return z - self.below_best * ((max(self.best, similarity) - self.mean) / self.std - z)

    @property
    def cutoff(self) -> float:
        """The cosine a good match of this query reaches (score >= threshold, solved for the cosine)."""
        z_best = 0.0 if self.best is None else (self.best - self.mean) / self.std
        w = self.below_best if self.best is not None else 0.0
        # below the best hit the score rises 1 + w times as fast as z (above it when the best falls short)
        return self.mean + (self.threshold + w * z_best) / (1.0 + w) * self.std

    def good(self, similarity: float) -> bool:
        return similarity >= self.cutoff


class Calibration:
    """The sample of one index and its threshold; `standing(vec)` for each query."""

    def __init__(self, sample: np.ndarray, threshold: float, method: str = GOOD_MATCH["method"]):
        self.sample = np.ascontiguousarray(sample, dtype=np.float32)
        self.threshold = float(threshold)
        self.method = method
        self.below_best = METHODS[method]

    def standing(self, vec: np.ndarray) -> Standing:
        sims = self.sample @ np.asarray(vec, np.float32)
        return Standing(float(sims.mean()), max(float(sims.std()), 1e-6), self.threshold, self.below_best)


def record_of(meta: dict) -> dict:
    """The index's good-match record (method, threshold, sample size), or the defaults for an index
    built before there was one."""
    rec = meta.get("relevance")
    return dict(GOOD_MATCH, **rec) if isinstance(rec, dict) else dict(GOOD_MATCH)


def still_fresh(drawn: int, top: int) -> bool:
    """Whether a sample drawn when the largest image id was `drawn` still stands at `top`."""
    return drawn <= top <= drawn * REDRAW_GROWTH


class CalibrationCache:
    """The calibration of a store, drawn once and redrawn as the collection grows (a long-lived searcher)."""

    def __init__(self, store: IndexStore):
        self.store = store
        self._drawn_at: Optional[int] = None
        self._value: Optional[Calibration] = None

    def get(self) -> Optional[Calibration]:
        cat = self.store.catalog
        top = cat.max_image_id()  # O(1); count(*) would walk an index at every query
        if self._drawn_at is not None and still_fresh(self._drawn_at, top):
            return self._value
        self._drawn_at, self._value = top, None
        rec = record_of(self.store.meta)
        if rec.get("method") not in METHODS or cat.count_images() < MIN_IMAGES:
            return None  # an unknown method (a newer mmsearch wrote it), or too few images to say
        size = min(SAMPLE_SIZE, int(rec.get("sample") or SAMPLE_SIZE))
        kept = self._kept(top, size)
        if kept is not None:
            self._drawn_at, sample = kept
        else:
            sample = cat.sample_embeddings(self.store.dim, size, seed=0)[1][:size]
            self._keep(top, sample)
        if len(sample) >= MIN_IMAGES:
            self._value = Calibration(sample, float(rec["threshold"]), rec["method"])
        return self._value

    # The sample, kept beside the catalog for the next process: drawing it is ~2,400 point reads, 0.1 s of
    # a fresh 1M-image query's 0.6 s (2-core AVX2). It is used under the rule a long-lived searcher keeps
    # its own by (drawn at `top` images, valid until the collection grows by a tenth).
    def _kept(self, top: int, size: int) -> Optional[tuple[int, np.ndarray]]:
        try:
            with np.load(self.store.dir / SAMPLE_FILE, allow_pickle=False) as f:
                drawn, sample = int(f["top"]), f["sample"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # none yet, or damaged: drawn again
            return None
        ok = still_fresh(drawn, top) and sample.dtype == np.float32 and sample.ndim == 2 \
            and sample.shape[1] == self.store.dim and MIN_IMAGES <= len(sample) <= size
        return (drawn, sample) if ok else None

    def _keep(self, top: int, sample: np.ndarray) -> None:
        from mmsearch.storage.lock import may_write_caches

        if len(sample) < MIN_IMAGES or not may_write_caches(self.store.dir):
            return
        path = self.store.dir / SAMPLE_FILE
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as fh:
                np.savez(fh, top=np.int64(top), sample=np.ascontiguousarray(sample, np.float32))
            os.replace(tmp, path)
        except OSError:  # a read-only or full disk: the sample stays in memory
            tmp.unlink(missing_ok=True)


def good_pairs(search: Callable[[int], list], depth: int, standing: Standing, deepen: bool, most: int) -> list:
    """(id, similarity) of the good matches among the closest `depth` that `search(depth)` returns,
    best first; `deepen`: search deeper while the last one found is still good, up to `most` (the good
    matches of a query are a prefix of its cosine order)."""
    cutoff = None
    while True:
        pairs = search(depth)
        if not pairs:
            return []
        if cutoff is None:  # the best hit comes first, and stays first however deep the search goes
            cutoff = standing.with_best(pairs[0][1]).cutoff
        if not deepen or len(pairs) < depth or pairs[-1][1] < cutoff or depth >= most:
            return [p for p in pairs if p[1] >= cutoff][:most]
        depth = min(most, depth * 4)


def date_of(row: dict) -> float:
    """A photo's date for sorting: when it was taken (EXIF), else the file's modification time."""
    return row["taken_at"] if row.get("taken_at") is not None else row["mtime_ns"] / 1e9
