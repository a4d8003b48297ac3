"""Evaluation scores many queries' re-rank candidates in one pass (Reranker.score_pairs); the logits
must be the ones a search computes one query at a time (the naive reference)."""
from types import SimpleNamespace

import numpy as np
import torch

from mmsearch.evaluation.evaluate import LATENCY_QUERIES, rerank_candidates
from mmsearch.rerank.model import FusionModel, Reranker


def test_grouped_scoring_equals_one_query_at_a_time():
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    reranker = Reranker(FusionModel(24, 20, 5, d=32, layers=2, heads=4), "x")
    n_images, n_caps, k = 50, 120, 8
    assert min(n_images, n_caps) > LATENCY_QUERIES  # both directions take the grouped path too
    caption_image = rng.integers(0, n_images, n_caps)
    img = rng.standard_normal((n_images, 16)).astype(np.float32)
    txt = rng.standard_normal((n_caps, 16)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    toks = rng.standard_normal((n_images, 5, 20)).astype(np.float16)
    states = [rng.standard_normal((int(n), 24)).astype(np.float32) for n in rng.integers(3, 12, n_caps)]
    ds = SimpleNamespace(caption_image=caption_image)

    out = rerank_candidates(reranker, ds, img, txt, toks, states, k)
    t2i, i2t = out["text_to_image"], out["image_to_text"]
    ref_t2i = np.stack([reranker.score_text_to_images(states[q], toks[c].astype(np.float32))
                        for q, c in enumerate(t2i["cands"])])
    ref_i2t = np.stack([reranker.score_image_to_texts(toks[q].astype(np.float32), [states[i] for i in c])
                        for q, c in enumerate(i2t["cands"])])
    np.testing.assert_allclose(t2i["logits"], ref_t2i, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(i2t["logits"], ref_i2t, atol=1e-5, rtol=1e-5)
    assert t2i["ms"] > 0 and i2t["ms"] > 0
