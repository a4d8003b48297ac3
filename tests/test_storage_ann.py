"""The automatic ANN choice: the structure per size tier, tuning on text-like queries, rebuild on
growth. Catalogs hold synthetic CLIP-like vectors (no model); tiers are lowered (conftest small_tiers)."""
import numpy as np
import pytest

from mmsearch.storage import ann, vectors
from mmsearch.storage.store import IndexStore
from mmsearch.datasets.synthvec import exact_topk, image_queries, text_queries
from helpers import SYNTH_DIM, mixture_vectors, recall, synthetic_store

# ---- auto selection ---------------------------------------------------------------------------
def test_plan_picks_flat_then_ivf_tiers_and_fits_the_memory_budget(small_tiers):
    assert ann.plan(1000, SYNTH_DIM).factory == "Flat"
    assert ann.plan(1001, SYNTH_DIM) == ann.Plan("IVF16,SQ8", 3000, pytest.approx(SYNTH_DIM + 8 + 4 * SYNTH_DIM * 16 / 1001, abs=0.1))
    assert ann.plan(3001, SYNTH_DIM).factory == "IVF64,SQ8"
    # under a budget: the first structure whose estimate fits, never one that does not
    budget = 50 * 5000
    p = ann.plan(5000, SYNTH_DIM, max_memory=budget)
    assert p.bytes_per_vector * 5000 <= budget and p.factory.startswith("IVF64,") and "SQ8" not in p.factory
    with pytest.raises(Exception, match="raise --max-index-memory"):
        ann.plan(5000, SYNTH_DIM, max_memory=5000)
    assert ann.parse_size("600MB") == 600 * 2**20 and ann.parse_size("2g") == 2 * 2**30


def test_auto_build_at_each_tier_and_rebuild_on_growth_keeps_ids_filters_tokens(tmp_path, small_tiers):
    mix, x = mixture_vectors(4000)
    store = synthetic_store(tmp_path, x[:200])
    with store.catalog.transaction():
        store.catalog.set_tokens(7, np.full((2, 3), 0.5, np.float16))  # a re-ranker token row to keep
    index = store.image_vectors()
    assert store.ann_info()["structure"] == "Flat" and store.ann_info()["tier_max"] == 1000
    seen = []
    for start, end in ((200, 2000), (2000, 4000)):  # grow past Flat, then past the first IVF tier
        pending = store.vectors_for_update()
        synthetic_store(tmp_path, x[start:end], first_id=start + 1, store=store)
        ids, vecs = store.catalog.embeddings(SYNTH_DIM, range(start + 1, end + 1))
        pending.add(ids, vecs)
        store.save_vectors(pending)
        seen.append(store.ann_info()["structure"])
        index = store.image_vectors()
        assert index.ntotal == end == store.catalog.count_images()
    assert seen == ["IVF16,SQ8", "IVF64,SQ8"]
    assert IndexStore.open(tmp_path / "idx").ann_info()["structure"] == "IVF64,SQ8"  # recorded in the meta
    # ids are the catalog's, filters still apply, the token row survived the rebuilds
    q = x[123]
    s, i = index.search(q, 1)
    assert i[0][0] == 124
    allowed = np.array(store.catalog.filtered_ids(under="/img/a"), np.int64)
    _, i = index.search(q, 10, allowed_ids=allowed, stored=store.stored_vectors)
    assert set(i[0].tolist()) <= set(allowed.tolist()) and len(i[0]) == 10
    assert store.catalog.tokens([7], (2, 3))[7][0, 0] == np.float16(0.5)


# ---- tuning -----------------------------------------------------------------------------------
def test_tuning_reaches_recall_target_on_held_out_text_like_queries(tmp_path, small_tiers):
    mix, x = mixture_vectors(6000)
    store = synthetic_store(tmp_path, x)
    index, info = ann.build(store.catalog, SYNTH_DIM, "auto")
    assert info["structure"] == "IVF64,SQ8" and info["tuned_on"].startswith("stand-in")
    assert info["recall_tune"] >= 0.95 and info["recall_heldout"] >= 0.95
    # fresh text-like queries the tuner never saw, against brute force in this test
    qt = text_queries(mix, 200, seed=11)
    truth = exact_topk(x, qt, 10) + 1  # catalog ids start at 1
    assert recall(truth, index.search(qt, 10)[1]) >= 0.95
    # and with a text corpus, tuning uses it
    index2, info2 = ann.build(store.catalog, SYNTH_DIM, "auto", text_vectors=text_queries(mix, 300, seed=5))
    assert info2["tuned_on"].startswith("text corpus") and info2["recall_heldout"] >= 0.95


def test_text_like_queries_are_harder_than_image_queries_at_fixed_nprobe():
    mix, x = mixture_vectors(6000)
    v = vectors.VectorIndex.build("IVF64,Flat", SYNTH_DIM, np.arange(len(x)), x)
    v.set_params(nprobe=2)
    qi, qt = image_queries(mix, 300, seed=7), text_queries(mix, 300, seed=8)
    r_img = recall(exact_topk(x, qi, 10), v.search(qi, 10)[1])
    r_txt = recall(exact_topk(x, qt, 10), v.search(qt, 10)[1])
    assert r_txt < r_img - 0.05
