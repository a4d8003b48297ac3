"""Metadata filters over large catalogs: k hits kept at unfiltered recall, the smaller side listed,
a bitmap selector rather than a hash set of every id."""
import numpy as np
import pytest

from mmsearch.storage import vectors
from mmsearch.datasets.synthvec import exact_topk, text_queries
from helpers import mixture_vectors, recall, synthetic_store

# ---- filters ----------------------------------------------------------------------------------
@pytest.mark.parametrize("factory", ["Flat", "IVF64,SQ8"])
def test_filters_keep_k_hits_with_unfiltered_recall(tmp_path, monkeypatch, factory, small_tiers):
    monkeypatch.setattr(vectors, "EXACT_SUBSET_MAX", 50)  # both paths: exact subset and bitmap selector
    mix, x = mixture_vectors(10_000)
    store = synthetic_store(tmp_path, x)
    store.reindex(factory)
    index = store.image_vectors()
    ids = np.arange(1, len(x) + 1)
    qt = text_queries(mix, 60, seed=21)
    from mmsearch.search.query import Searcher

    searcher = Searcher(store)
    rng = np.random.default_rng(0)
    for frac in (0.001, 0.01, 0.1, 0.5, 0.9, 0.999, 1.0):
        allowed = np.sort(rng.choice(ids, int(len(ids) * frac), replace=False))
        truth = allowed[exact_topk(x[allowed - 1], qt, 10)]
        # past half the filter is passed as the ids it removes (Catalog.filter_selection)
        selection = (np.setdiff1d(ids, allowed), True) if frac > 0.5 else (allowed, False)
        found = np.stack([searcher._search_vectors(q, 10, selection)[1][0] for q in qt])
        assert (found >= 0).sum(1).min() == min(10, len(allowed))  # k hits whenever k exist
        assert set(found.ravel().tolist()) <= set(allowed.tolist())
        if factory == "Flat":
            assert np.array_equal(found, truth)
        else:
            assert recall(truth, found) >= 0.95, frac


def test_filter_selection_lists_the_smaller_side(tmp_path):
    mix, x = mixture_vectors(600)
    cat = synthetic_store(tmp_path, x).catalog
    every = set(range(1, 601))
    for kw in (dict(exts=[".jpg"]), dict(under="/img/a"), dict(under="/img/a", exts=[".png"]),
               dict(under="/img/b", exts=[".jpg", ".png"]), dict(after=0.0), dict(before=0.0)):
        kept = set(cat.filtered_ids(**kw))
        ids, excluded = cat.filter_selection(600, **kw)
        assert excluded == (len(kept) > 300), kw
        assert set(ids.tolist()) == (every - kept if excluded else kept), kw
        assert len(ids) <= 300, kw  # never lists more than half


def test_bitmap_selector_not_a_hash_set_of_every_id():
    ids = np.array([3, 9, 1_000_000], np.int64)
    sel = vectors._bitmap_selector(ids)
    assert isinstance(sel, vectors.faiss.IDSelectorBitmap)
    assert [sel.is_member(i) for i in (3, 4, 9, 1_000_000, 1_000_001, 1_000_007, 2**40)] == \
        [True, False, True, True, False, False, False]
