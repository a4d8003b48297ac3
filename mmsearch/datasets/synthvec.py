"""Synthetic CLIP-like vectors for ANN benchmarks and tests (deterministic, numpy only).

Image vectors: a mixture of clusters on the unit sphere with uneven (Zipf-like) sizes, inside a shared
cone (CLIP embeddings share a mean direction) and grouped into topics (nearby clusters).
Image-like queries: fresh draws from the same mixture.
Text-like queries: what a caption looks like to an image index: less specific than any one image (the
mean of two related clusters of a topic, not one), off the image manifold (a shared "modality gap"
direction no image has, plus isotropic noise). Their true neighbours straddle several clusters, so at a
fixed nprobe an IVF finds fewer of them than of an image query's, as measured on LAION (VIBE).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmsearch.errors import DatasetError

LOCAL_DIM, IMAGE_LOCAL, IMAGE_NOISE, TEXT_GAP, TEXT_NOISE = 12, 0.6, 0.25, 1.4, 2.5


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@dataclass
class Mixture:
    dim: int
    centers: np.ndarray  # [c, d] unit cluster centres
    topic_of: np.ndarray  # [c] topic of each cluster
    weights: np.ndarray  # [c] cluster probabilities (uneven)
    spread: np.ndarray  # [c] per-cluster noise scale
    basis: np.ndarray  # [c, r, d] each cluster's few directions of variation (images have low intrinsic dim)
    gap: np.ndarray  # [d] the text side's shared direction


def make_mixture(n_clusters: int = 1000, dim: int = 512, seed: int = 0, topic_size: int = 8) -> Mixture:
    rng = np.random.default_rng(seed)
    cone = _unit(rng.standard_normal(dim))
    n_topics = max(1, n_clusters // topic_size)
    topics = _unit(rng.standard_normal((n_topics, dim)) + 1.2 * cone)
    topic_of = rng.integers(0, n_topics, n_clusters)
    centers = _unit(topics[topic_of] + 0.8 * _unit(rng.standard_normal((n_clusters, dim))))
    weights = 1.0 / np.arange(1, n_clusters + 1) ** 0.8  # a few big clusters, a long tail of small ones
    weights = rng.permutation(weights / weights.sum())
    spread = rng.uniform(0.8, 1.3, n_clusters).astype(np.float32)
    gap = rng.standard_normal(dim)
    gap -= gap @ cone * cone  # orthogonal to the image cone: no image leans towards it
    basis = (rng.standard_normal((n_clusters, LOCAL_DIM, dim), dtype=np.float32) / np.sqrt(dim))
    return Mixture(dim, centers, topic_of, weights, spread, basis, _unit(gap))


def sample_images(mix: Mixture, n: int, seed: int = 1, chunk: int = 8192) -> np.ndarray:
    """n image-like unit vectors (generated in chunks so 1M x 512 never needs a float64 copy)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, mix.dim), np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        c = rng.choice(len(mix.centers), m, p=mix.weights)
        z = rng.standard_normal((m, 1, LOCAL_DIM), dtype=np.float32)
        local = (z @ mix.basis[c])[:, 0]  # variation along the cluster's own directions
        noise = rng.standard_normal((m, mix.dim), dtype=np.float32) / np.sqrt(mix.dim)
        out[s:s + m] = _unit(mix.centers[c] + mix.spread[c, None] * (IMAGE_LOCAL * local + IMAGE_NOISE * noise))
    return out


def image_queries(mix: Mixture, n: int, seed: int = 2) -> np.ndarray:
    return sample_images(mix, n, seed=seed)


def text_queries(mix: Mixture, n: int, seed: int = 3) -> np.ndarray:
    """Less specific (two related clusters of one topic) and off the manifold (gap + noise)."""
    rng = np.random.default_rng(seed)
    a = rng.choice(len(mix.centers), n, p=mix.weights)
    b = np.empty(n, np.int64)
    for j, c in enumerate(a):  # a second cluster of the same topic when there is one
        same = np.flatnonzero(mix.topic_of == mix.topic_of[c])
        b[j] = rng.choice(same)
    noise = rng.standard_normal((n, mix.dim)).astype(np.float32) / np.sqrt(mix.dim)
    return _unit(mix.centers[a] + mix.centers[b] + TEXT_GAP * mix.gap + TEXT_NOISE * noise)


def exact_topk(base: np.ndarray, queries: np.ndarray, k: int, chunk: int = 200_000) -> np.ndarray:
    """Ids (positions) of the exact top-k by inner product, streamed over base in chunks."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    for s in range(0, len(base), chunk):
        sc = queries @ base[s:s + chunk].T
        kk = min(k, sc.shape[1])
        part = np.argpartition(-sc, kk - 1, axis=1)[:, :kk]
        cand_s = np.concatenate([best_s, np.take_along_axis(sc, part, 1)], 1)
        cand_i = np.concatenate([best_i, part + s], 1)
        top = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, top, 1), np.take_along_axis(cand_i, top, 1)
    return best_i


def paired_queries(mix: Mixture, images: np.ndarray, targets: np.ndarray, kind: str = "text", seed: int = 4,
                   image_noise: float = 0.5) -> np.ndarray:
    """One query per target image, made from that image: "text" is its caption as a text tower would place
    it (the image's vector, off the manifold by the modality gap and text noise, as text_queries), "image"
    a near copy of it (an edited photo: a little isotropic noise). The relevance benchmark removes some
    targets from the index to ask whether a search can tell that its image is gone."""
    rng = np.random.default_rng(seed)
    base = images[np.asarray(targets)]
    noise = rng.standard_normal(base.shape).astype(np.float32) / np.sqrt(mix.dim)
    if kind == "text":
        return _unit(base + TEXT_GAP * mix.gap + TEXT_NOISE * noise)
    if kind == "image":
        return _unit(base + image_noise * noise)
    raise DatasetError(f"kind must be 'text' or 'image', not {kind!r}")
