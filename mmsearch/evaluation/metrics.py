"""Retrieval metrics, pure numpy, exactly as CLIP_benchmark defines them.

- text->image: each caption is a query; its only positive is its own image.
- image->text: each image is a query; any of its captions is a positive.
- R@k is the fraction of queries with a positive in the top k: a *hit rate*, not IR recall.
  (CLIP_benchmark computes per-query recall over top-k and then averages `recall > 0`.)
- rank = 1-based position of the first positive. Ties are broken by candidate index, as a stable
  descending sort would (`np.argsort(-scores, kind="stable")`), so results are deterministic.

Everything is chunked over queries: memory is O(chunk x candidates), never a dense
n_captions x n_images matrix or one-hot, so COCO 5K (25k x 5k) runs in bounded memory.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _rank_of(scores: np.ndarray, pos_score: np.ndarray, pos_index: np.ndarray) -> np.ndarray:
    """1 + candidates scoring higher + equal-scoring candidates with a lower index."""
    greater = (scores > pos_score[:, None]).sum(1)
    ties = ((scores == pos_score[:, None]) & (np.arange(scores.shape[1])[None, :] < pos_index[:, None])).sum(1)
    return 1 + greater + ties


def text_to_image_ranks(text_emb: np.ndarray, image_emb: np.ndarray, caption_image: np.ndarray,
                        chunk: int = 1024) -> np.ndarray:
    """Rank of each caption's own image among all images. int64 [n_captions]."""
    caption_image = np.asarray(caption_image, dtype=np.int64)
    ranks = np.empty(len(caption_image), dtype=np.int64)
    for s in range(0, len(caption_image), chunk):
        scores = text_emb[s:s + chunk] @ image_emb.T
        pos = caption_image[s:s + chunk]
        ranks[s:s + chunk] = _rank_of(scores, scores[np.arange(len(pos)), pos], pos)
    return ranks


def image_to_text_ranks(image_emb: np.ndarray, text_emb: np.ndarray, caption_image: np.ndarray,
                        chunk: int = 256) -> np.ndarray:
    """Rank of the best-ranked caption of each image among all captions. int64 [n_images].
    Images without captions get rank 0 and must be dropped by the caller (summarize ignores them)."""
    caption_image = np.asarray(caption_image, dtype=np.int64)
    n_img = len(image_emb)
    ranks = np.zeros(n_img, dtype=np.int64)
    for s in range(0, n_img, chunk):
        ids = np.arange(s, min(n_img, s + chunk))
        scores = image_emb[ids] @ text_emb.T
        mask = caption_image[None, :] == ids[:, None]
        has = mask.any(1)
        masked = np.where(mask, scores, -np.inf)
        best = masked.max(1)
        first = np.argmax(mask & (scores == best[:, None]), axis=1)  # lowest index among the best positives
        r = _rank_of(scores, best, first)
        ranks[ids] = np.where(has, r, 0)
    return ranks


def summarize(ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict:
    ranks = np.asarray(ranks)
    ranks = ranks[ranks > 0]
    out = {f"R@{k}": float(np.mean(ranks <= k)) if len(ranks) else 0.0 for k in ks}
    out["mean_rank"] = float(ranks.mean()) if len(ranks) else 0.0
    out["median_rank"] = float(np.median(ranks)) if len(ranks) else 0.0
    return out


def topk(queries: np.ndarray, candidates: np.ndarray, k: int, chunk: int = 1024):
    """Exact top-k by inner product: (ids [n,k], scores [n,k]), best first, ties by lower index."""
    k = min(k, len(candidates))
    ids = np.empty((len(queries), k), dtype=np.int64)
    vals = np.empty((len(queries), k), dtype=np.float32)
    for s in range(0, len(queries), chunk):
        scores = queries[s:s + chunk] @ candidates.T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        ids[s:s + chunk] = order
        vals[s:s + chunk] = np.take_along_axis(scores, order, 1)
    return ids, vals


def reranked_ranks(plain_ranks: np.ndarray, candidate_ids: np.ndarray, new_scores: np.ndarray,
                   is_positive) -> np.ndarray:
    """Ranks after re-ranking each query's top-K candidates by `new_scores` [n,K].

    Re-ranking only reorders the top K: a query whose first positive is inside the top K gets its
    position in the new order (ties by plain order); one whose positive is outside keeps its plain rank.
    `is_positive(q, candidate_id) -> bool`."""
    out = np.array(plain_ranks, copy=True)
    K = candidate_ids.shape[1]
    for q in range(len(out)):
        if not 0 < out[q] <= K:
            continue
        order = np.argsort(-new_scores[q], kind="stable")
        for pos, j in enumerate(order, 1):
            if is_positive(q, int(candidate_ids[q, j])):
                out[q] = pos
                break
    return out


def ann_overlap(exact_ids: np.ndarray, ann_ids: np.ndarray, k: int) -> float:
    """Mean fraction of the exact top-k that the approximate index also returns in its top-k."""
    total = 0.0
    for e, a in zip(exact_ids[:, :k], ann_ids[:, :k]):
        total += len(set(e.tolist()) & set(a.tolist())) / k
    return total / max(1, len(exact_ids))
