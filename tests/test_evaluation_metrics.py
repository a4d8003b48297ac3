"""metrics.py against a naive full-matrix reference (stable argsort), with ties and uneven captions; the
re-ranked score blend and its fitting against a by-hand reference."""
import numpy as np
import pytest

from mmsearch.rerank.blend import blend
from mmsearch.evaluation.evaluate import ALPHA_GRID, fit_alpha, reranked
from mmsearch.evaluation.metrics import (ann_overlap, image_to_text_ranks, reranked_ranks, summarize, text_to_image_ranks,
                              topk)


def naive_ranks(scores, positives):
    """rank of the first positive in a stable descending sort of each row."""
    out = []
    for row, pos in zip(scores, positives):
        order = np.argsort(-row, kind="stable")
        out.append(1 + min(int(np.where(order == p)[0][0]) for p in pos))
    return np.array(out)


def naive_recall(ranks, k):
    return float(np.mean(np.asarray(ranks) <= k))


@pytest.mark.parametrize("seed,quantise", [(0, False), (1, True), (2, True)])
def test_against_naive_reference(seed, quantise):
    rng = np.random.default_rng(seed)
    n_img, d = 37, 8
    counts = rng.integers(1, 6, n_img)  # different numbers of captions per image
    cap_img = np.repeat(np.arange(n_img), counts)
    img = rng.standard_normal((n_img, d)).astype(np.float32)
    txt = rng.standard_normal((len(cap_img), d)).astype(np.float32)
    if quantise:  # coarse values create many exact ties
        img, txt = np.round(img), np.round(txt)
    scores = txt @ img.T
    t2i = text_to_image_ranks(txt, img, cap_img, chunk=7)
    assert list(t2i) == list(naive_ranks(scores, [[c] for c in cap_img]))
    i2t = image_to_text_ranks(img, txt, cap_img, chunk=5)
    assert list(i2t) == list(naive_ranks(scores.T, [np.where(cap_img == i)[0] for i in range(n_img)]))
    for k in (1, 5, 10):
        assert summarize(t2i, [k])[f"R@{k}"] == naive_recall(naive_ranks(scores, [[c] for c in cap_img]), k)


def test_chunk_size_does_not_change_results():
    rng = np.random.default_rng(3)
    img = rng.standard_normal((300, 16)).astype(np.float32)
    txt = rng.standard_normal((1500, 16)).astype(np.float32)
    cap_img = rng.integers(0, 300, 1500)
    a = text_to_image_ranks(txt, img, cap_img, chunk=1)
    b = text_to_image_ranks(txt, img, cap_img, chunk=4096)
    assert (a == b).all()
    assert (image_to_text_ranks(img, txt, cap_img, chunk=1) == image_to_text_ranks(img, txt, cap_img, chunk=999)).all()


def test_hand_computed_values():
    # 3 images, 5 captions; rows = captions, columns = images
    scores = np.array([[0.9, 0.1, 0.0],   # cap0 -> img0: rank 1
                       [0.2, 0.8, 0.5],   # cap1 -> img0: rank 3
                       [0.1, 0.7, 0.3],   # cap2 -> img1: rank 1
                       [0.4, 0.4, 0.9],   # cap3 -> img1: tie with img0 (lower index first): rank 3
                       [0.5, 0.6, 0.2]], dtype=np.float32)  # cap4 -> img2: rank 3
    cap_img = np.array([0, 0, 1, 1, 2])
    # embeddings that reproduce the score matrix exactly: text = rows, image = identity
    t2i = text_to_image_ranks(scores, np.eye(3, dtype=np.float32), cap_img)
    assert list(t2i) == [1, 3, 1, 3, 3]
    s = summarize(t2i, [1, 2, 3])
    assert s == {"R@1": 0.4, "R@2": 0.4, "R@3": 1.0, "mean_rank": 2.2, "median_rank": 3.0}
    # image->text, columns: img0 [.9 .2 .1 .4 .5] best own caption cap0 -> rank 1;
    # img1 [.1 .8 .7 .4 .6] best own caption cap2 (.7) below cap1 (.8) -> rank 2;
    # img2 [0 .5 .3 .9 .2] own caption cap4 (.2) below .9, .5, .3 -> rank 4
    i2t = image_to_text_ranks(np.eye(3, dtype=np.float32), scores, cap_img)
    assert list(i2t) == [1, 2, 4]
    assert summarize(i2t, [1, 2])["R@2"] == pytest.approx(2 / 3)


def test_reranking_only_reorders_the_top_k():
    plain = np.array([3, 1, 9])
    cands = np.array([[5, 6, 7], [1, 2, 3], [4, 5, 6]])
    new = np.array([[0.1, 0.2, 0.9], [0.0, 0.5, 0.1], [1, 1, 1]], dtype=np.float32)
    positive = {0: 7, 1: 1, 2: 99}
    out = reranked_ranks(plain, cands, new, lambda q, c: positive[q] == c)
    assert list(out) == [1, 3, 9]


def test_topk_and_ann_overlap():
    rng = np.random.default_rng(4)
    base = rng.standard_normal((50, 8)).astype(np.float32)
    ids, vals = topk(base[:5], base, 3)
    assert (ids[:, 0] == np.arange(5)).all() and (np.diff(vals, axis=1) <= 0).all()
    assert ann_overlap(ids, ids, 3) == 1.0
    assert ann_overlap(ids, np.full_like(ids, -1), 3) == 0.0


def _one_direction(rng, n, k, informative_sims, informative_itm):
    """A text->image candidate block (as evaluate.rerank_candidates makes it) for n queries whose own
    image is candidate 0..k-1 at random; either score can carry the answer or be noise."""
    own = rng.integers(0, k, n)
    cands = np.tile(np.arange(k), (n, 1))
    hit = cands == own[:, None]
    sims = rng.uniform(0.8, 0.9, (n, k)) + (0.05 * hit if informative_sims else 0)
    logits = rng.normal(0, 2, (n, k)) + (6.0 * hit if informative_itm else 0)
    plain = 1 + np.argsort(np.argsort(-sims, axis=1, kind="stable"), axis=1, kind="stable")[hit]
    return dict(plain=plain, cands=cands, sims=sims.astype(np.float32), logits=logits.astype(np.float32), ms=0.0,
                is_positive=lambda q, c: own[q] == c)


def _r1_by_hand(c, alpha):
    """Naive reference: blend, sort each query's candidates, is the positive first?"""
    p = 1 / (1 + np.exp(-c["logits"].astype(np.float64)))
    score = (1 - alpha) * p + alpha * c["sims"].astype(np.float64)
    return np.mean([c["is_positive"](q, int(c["cands"][q, np.argmax(score[q])])) for q in range(len(score))])


@pytest.mark.parametrize("sims_informative, itm_informative", [(True, False), (False, True), (True, True)])
def test_fit_alpha_picks_the_grid_point_with_the_best_r1_and_never_loses_to_either_score(sims_informative,
                                                                                          itm_informative):
    rng = np.random.default_rng(11)
    c = _one_direction(rng, 300, 16, sims_informative, itm_informative)
    alpha = fit_alpha({"text_to_image": c})["text_to_image"]
    assert alpha in ALPHA_GRID
    best = max(_r1_by_hand(c, a) for a in ALPHA_GRID)
    assert _r1_by_hand(c, alpha) == pytest.approx(best)
    assert _r1_by_hand(c, alpha) >= max(_r1_by_hand(c, 0.0), _r1_by_hand(c, 1.0))
    assert (reranked(c, alpha) <= 1).mean() == pytest.approx(best)
    if not itm_informative:  # a useless re-ranker must not override the dual encoder
        assert alpha >= 0.9
    if not sims_informative:  # nor a useless similarity the re-ranker
        assert alpha <= 0.5
    assert blend(c["logits"], c["sims"], 1.0) == pytest.approx(c["sims"].astype(np.float64))
