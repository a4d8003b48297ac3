"""Choosing, building and tuning the image vector index (`--factory auto`); vectors.py does the FAISS work.

Measured on synthetic CLIP-like vectors (benchmarks/ann_scale.py, README "Scaling to a million images"):
- Flat is exact and needs no tuning, but costs 2 KB per 512-d vector and its query time grows linearly:
  past FLAT_MAX vectors a single query misses the 10 ms budget on our 2 cores.
- IVF with 8-bit scalar quantisation (SQ8) keeps d + 8 bytes per vector (520 at d=512, inside the
  600-byte target), loses almost nothing to quantisation (recall@10 ~0.99 at a high nprobe), builds a 1M
  index in minutes and is memory-mapped by FAISS (IO_FLAG_MMAP), so a fresh process starts at once.
  HNSW needs 2 x M x 4 bytes of links per vector on top of its codes (HNSW32,SQ8: ~770 bytes) and builds
  far slower; PQ fits any budget but caps recall (its codes are too coarse for 0.95 on text queries),
  so it is only the fallback under a tight --max-index-memory.
- Past PQ_FROM vectors (the 10M tier) SQ8's d + 8 bytes (5.2 GB resident at 10M) give way to 4-bit PQ
  fast-scan codes of d/4 sub-quantizers (d/8 bytes: 64 at d=512) behind an HNSW quantizer, about 80 bytes
  a vector resident, with every query's refine x k candidates re-scored by their exact embeddings read
  from the catalog (no second copy of them). Measured at 200k vectors on text-like queries
  (benchmarks/ann_scale.py): PQ64x4fs codes cap text recall@10 at 0.94 even re-scoring 500 candidates;
  PQ128x4fs reach 0.965 at nprobe 64 re-scoring 200.
- Search parameters are tuned on TEXT-LIKE queries: the modality gap makes text queries harder than
  image queries at the same nprobe (VIBE, LAION: 0.83 vs 0.95 at IVF1024/nprobe 16), so tuning on the
  database's own vectors (autofaiss) over-promises. With a text corpus we tune on its embeddings;
  without one on a stand-in (stand_in_queries), checked against real text-like queries in the benchmark.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from mmsearch.errors import VectorIndexError
from mmsearch.storage.vectors import VectorIndex

AUTO = "auto"
FLAT_MAX = 50_000  # measured: Flat p50 crosses ~10 ms between 50k and 100k vectors on 2 cores
# (tier ceiling, nlist): an IVF is built for the top of its tier (>= 39 training points per list at the
# bottom), and rebuilt with the next tier's nlist once the catalog grows past the ceiling.
IVF_TIERS = ((200_000, 1024), (2_000_000, 4096), (20_000_000, 16_384), (200_000_000, 65_536))
TARGET_RECALL = 0.95
TUNE_MARGIN = 0.01  # tune a little above the target so the held-out half (sampling noise) meets it too
K = 10
TUNE_QUERIES = 1000  # half to tune on, half held out to report (500 each: standard error ~0.005)
TRAIN_PER_LIST = 40  # FAISS warns below 39; k-means cost is linear in it (4096 lists: 164k points)
_NPROBES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048,
            3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768, 49152, 65536)
_EFS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048)

Progress = Optional[Callable[..., None]]


PQ_FROM = 2_000_000  # above this, the coarse-code tier: PQ fast-scan + exact re-scoring from the catalog
REFINE_FACTORS = (20, 40, 80)  # candidates re-scored, as multiples of k, tried in order while tuning


@dataclass(frozen=True)
class Plan:
    factory: str
    tier_max: Optional[int]  # rebuild (re-plan) once the index holds more vectors than this; None: never
    bytes_per_vector: float  # estimate, codes + ids + quantizer share
    refine: bool = False  # coarse codes: re-score candidates with the stored embeddings


def fast_scan(nlist: int, dim: int) -> str:
    """The coarse-code structure of the 10M tier: IVF behind HNSW, 4-bit PQ fast-scan of dim/4 sub-vectors."""
    return f"IVF{nlist}_HNSW32,PQ{max(2, dim // 4)}x4fs"


def wants_refine(factory: str) -> bool:
    """4-bit fast-scan codes rank too coarsely alone (text recall caps below 0.95): they get re-scored."""
    return bool(re.search(r"PQ\d+x4fs", factory))


def parse_size(text) -> Optional[int]:
    """'600MB', '2G', '1.5GiB', '123456' -> bytes (None passes through)."""
    if text is None:
        return None
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text).lower())
        if not m:
            raise VectorIndexError(f"cannot read '{text}' as a size (e.g. 600MB, 2G)")
        size = int(float(m.group(1)) * 1024 ** ("_kmgt".index(m.group(2)) if m.group(2) else 0))
    if size < 1:
        raise VectorIndexError(f"a memory budget of '{text}' holds nothing (e.g. 600MB, 2G)")
    return size


def plan(n: int, dim: int, max_memory: Optional[int] = None) -> Plan:
    """The structure for n vectors of dim: Flat while small, then IVF-SQ8 sized for its tier; under a
    memory budget the first structure whose estimate fits (SQ8, SQ4, then PQ with fewer bytes)."""
    flat = Plan("Flat", FLAT_MAX, 4 * dim + 40)  # codes + IndexIDMap2's id array and reverse map
    if n <= FLAT_MAX and (max_memory is None or flat.bytes_per_vector * max(n, 1) <= max_memory):
        return flat
    tier_max, nlist = next(((t, nl) for t, nl in IVF_TIERS if n <= t), IVF_TIERS[-1])
    nlist = min(nlist, max(1, n // 39))  # a budget can push a small index here: keep lists trainable
    quant = 4 * dim * nlist / max(n, 1)
    if n > PQ_FROM:  # codes, ids, the quantizer's vectors and its HNSW links
        est = dim / 8 + 8 + quant + 2 * 32 * 4 * nlist / n
        if max_memory is None or est * n <= max_memory:
            return Plan(fast_scan(nlist, dim), tier_max, round(est, 1), refine=True)
    candidates = [("SQ8", dim), ("SQ4", dim / 2)]
    m = dim // 8
    while m >= 8:
        if dim % m == 0:
            candidates.append((f"PQ{m}", m))
        m //= 2
    for codec, code_bytes in candidates:
        est = code_bytes + 8 + quant
        if max_memory is None or est * n <= max_memory:
            return Plan(f"IVF{nlist},{codec}", tier_max, round(est, 1))
    raise VectorIndexError(f"no index structure fits {n:,} vectors of dim {dim} in {max_memory:,} bytes "
                           f"(the smallest needs about {int(est * n):,}); raise --max-index-memory")


# CLIP-family models score a caption against its matching image at a cosine of about 0.3 (0.25-0.35 for
# ViT-B/32 on COCO/LAION), while near images score 0.8-0.9 against each other: the modality gap.
TEXT_LIKE_COSINE = 0.30


def stand_in_queries(sample: np.ndarray, n: int, seed: int = 0, noise: Optional[float] = None) -> np.ndarray:
    """Text-like queries from image vectors alone, for an index without a text corpus: the mean of an
    image and one of its 20 nearest neighbours in the sample (a concept, less specific than either
    image) plus isotropic noise (off the image manifold). The noise is calibrated so the query's cosine
    with its anchor image is TEXT_LIKE_COSINE, as a caption's is. Measured (benchmarks/ann_scale.py,
    100k synthetic): with noise of the mean's norm (cosine ~0.65) tuning picked nprobe 12 where
    text-like queries need 48; calibrated to 0.3 it picks what they need."""
    rng = np.random.default_rng(seed)
    sample = np.asarray(sample, np.float32)
    anchors = rng.choice(len(sample), size=min(n, len(sample)), replace=False)
    sims = sample[anchors] @ sample.T
    sims[np.arange(len(anchors)), anchors] = -np.inf
    near = np.argpartition(-sims, min(20, sample.shape[0] - 2), axis=1)[:, :20]
    partner = near[np.arange(len(anchors)), rng.integers(0, near.shape[1], len(anchors))]
    mean = _unit(sample[anchors] + sample[partner])
    if noise is None:  # cos(q, anchor) = cos(mean, anchor) / sqrt(1 + noise^2) for noise orthogonal to it
        c = float(np.median(np.sum(mean * sample[anchors], axis=1)))
        noise = float(np.sqrt(max(0.0, (c / TEXT_LIKE_COSINE) ** 2 - 1)))
    return _unit(mean + noise * _unit(rng.standard_normal(mean.shape).astype(np.float32)))


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


class _TopK:
    """Exact top-k of a fixed query set, updated chunk by chunk while the index is filled."""

    def __init__(self, queries: np.ndarray, k: int):
        self.q, self.k = queries, k
        self.s = np.full((len(queries), k), -np.inf, np.float32)
        self.i = np.full((len(queries), k), -1, np.int64)

    def update(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if not len(self.q) or not len(ids):
            return
        sc = self.q @ vectors.T
        kk = min(self.k, sc.shape[1])
        part = np.argpartition(-sc, kk - 1, axis=1)[:, :kk]
        cs = np.concatenate([self.s, np.take_along_axis(sc, part, 1)], 1)
        ci = np.concatenate([self.i, ids[part]], 1)
        top = np.argsort(-cs, axis=1, kind="stable")[:, :self.k]
        self.s, self.i = np.take_along_axis(cs, top, 1), np.take_along_axis(ci, top, 1)


def recall_at_k(truth: np.ndarray, found: np.ndarray) -> float:
    """Mean |found ∩ truth| / |truth| per query (ANN-vs-exact intersection, as faiss.contrib does)."""
    hits = [len(set(t[t >= 0].tolist()) & set(f[f >= 0].tolist())) / max(1, (t >= 0).sum())
            for t, f in zip(truth, found)]
    return float(np.mean(hits)) if hits else 1.0


def tune(index: VectorIndex, queries: np.ndarray, truth: np.ndarray, target: float = TARGET_RECALL,
         k: int = K) -> dict:
    """The cheapest search parameter reaching `target` recall@k on the first half of the queries,
    and the recall it gets on the held-out second half (what `info` reports). A structure that
    re-scores candidates (refine) is tuned at each refine factor in turn: the first that reaches the
    target with some nprobe wins."""
    half = len(queries) // 2
    tq, tt, hq, ht = queries[:half], truth[:half], queries[half:], truth[half:]
    inner = index.nlist
    if inner:
        name, grid = "nprobe", [p for p in _NPROBES if p < inner] + [inner]
    elif "HNSW" in index.factory:
        name, grid = "efSearch", list(_EFS)
    else:
        return {"params": {}, "recall_tune": 1.0 if index.factory == "Flat" else None,
                "recall_heldout": _recall(index, hq, ht, k)}
    refines = REFINE_FACTORS if index.params.get("refine") else (None,)
    for refine in refines:
        if refine is not None:
            index.set_params(refine=refine)
        chosen, reached = grid[-1], None
        for value in grid:
            index.set_params(**{name: value})
            r = _recall(index, tq, tt, k)
            if r >= min(1.0, target + TUNE_MARGIN):
                chosen, reached = value, r
                break
        if reached is not None:
            break
    index.set_params(**{name: chosen})
    if reached is None:
        reached = _recall(index, tq, tt, k)
    return {"params": dict(index.params), "recall_tune": round(reached, 4),
            "recall_heldout": round(_recall(index, hq, ht, k), 4)}


def _recall(index: VectorIndex, queries: np.ndarray, truth: np.ndarray, k: int) -> Optional[float]:
    if not len(queries):
        return None
    return recall_at_k(truth, index.search(queries, k)[1])


def build(catalog, dim: int, factory: str = AUTO, max_memory: Optional[int] = None,
          text_vectors: Optional[np.ndarray] = None, target: float = TARGET_RECALL, seed: int = 0,
          progress: Progress = None) -> tuple[VectorIndex, dict]:
    """Build (and tune) the image index from the catalog's stored embeddings, streamed in chunks so a
    1M-image catalog never sits in memory twice. Returns the index and what to record about it."""
    t0 = time.perf_counter()
    n = catalog.count_images()
    p = plan(n, dim, max_memory) if factory == AUTO else Plan(factory, None, float("nan"))
    trains = _needs_training(p.factory)
    want = max(10_000, TRAIN_PER_LIST * _nlist_of(p.factory)) if trains else 10_000
    _, sample = catalog.sample_embeddings(dim, min(n, want), seed=seed)
    if progress:
        progress(0, n, stage="train")
    index = VectorIndex.create(p.factory, dim, sample if trains else None)
    if p.refine or wants_refine(p.factory):  # re-scored from the catalog: tuned with the re-scoring
        index.set_params(refine=REFINE_FACTORS[0])
        index.refine_source = stored_in(catalog, dim)
    if text_vectors is not None and len(text_vectors) >= 100:
        rng = np.random.default_rng(seed)
        pick = rng.permutation(len(text_vectors))[:TUNE_QUERIES]
        queries, source = np.asarray(text_vectors, np.float32)[pick], f"text corpus ({len(pick)} texts)"
    else:
        queries = stand_in_queries(sample, TUNE_QUERIES, seed=seed) if len(sample) > 21 else sample[:0]
        source = f"stand-in text-like queries ({len(queries)})"
    truth = _TopK(queries, K)
    done = 0
    for ids, vecs in catalog.iter_embeddings(dim):
        index.add(ids, vecs)
        truth.update(ids, vecs)
        done += len(ids)
        if progress:
            progress(done, n, stage="add")
    if progress:
        progress(0, 1, stage="tune")
    tuned = tune(index, queries, truth.i, target) if len(queries) >= 2 else \
        {"params": {}, "recall_tune": None, "recall_heldout": None}
    info = {"factory": factory, "structure": p.factory, "vectors": index.ntotal, "tier_max": p.tier_max,
            "max_index_memory": max_memory, "target_recall": target, "k": K, "tuned_on": source, **tuned,
            "build_seconds": round(time.perf_counter() - t0, 2)}
    return index, info


def stored_in(catalog, dim: int):
    """ids -> their stored embeddings, in the order given (the refine source of a catalog)."""
    def fetch(ids):
        got, emb = catalog.embeddings(dim, ids)
        if len(got) == len(ids) and np.array_equal(got, ids):
            return emb
        pos = {int(i): j for j, i in enumerate(got)}
        return np.stack([emb[pos[int(i)]] if int(i) in pos else np.zeros(dim, np.float32) for i in ids])
    return fetch


def needs_rebuild(info: Optional[dict], ntotal: int) -> bool:
    """An auto index that grew past its tier is re-planned (rebuilt from stored embeddings)."""
    return bool(info and info.get("factory") == AUTO and info.get("tier_max") and ntotal > info["tier_max"])


def _nlist_of(factory: str) -> int:
    m = re.search(r"IVF(\d+)", factory)
    return int(m.group(1)) if m else 0


def _needs_training(factory: str) -> bool:
    return factory != "Flat" and not re.fullmatch(r"HNSW\d+(,Flat)?", factory)


def describe(info: dict) -> dict:
    """The summary `info` shows: structure, params, tuned recall."""
    return {k: info.get(k) for k in ("structure", "params", "recall_heldout", "tuned_on", "vectors", "tier_max")}


