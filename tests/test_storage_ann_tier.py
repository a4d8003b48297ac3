"""Issue 30, the ten-million tier: 4-bit PQ fast-scan codes behind an HNSW quantizer, each query's candidates
re-scored with the catalog's own embeddings (no second copy). Tiers are lowered so it is reached at 6000
vectors (dim 64): the plan, the bytes it keeps, recall against exact search on text-like queries, and
that every path (a fresh open, a filter, the server's store, duplicates) re-scores exactly."""
import numpy as np
import pytest

from helpers import SYNTH_DIM, mixture_vectors, recall, synthetic_store
from mmsearch.datasets.synthvec import exact_topk, image_queries, text_queries
from mmsearch.search.filters import Filters
from mmsearch.search.query import Searcher
from mmsearch.storage import ann
from mmsearch.storage.shared import ServingStore
from mmsearch.storage.store import IndexStore
from mmsearch.storage.vectors import VectorIndex, refine_exact


@pytest.fixture
def tier(monkeypatch, small_tiers):
    monkeypatch.setattr(ann, "PQ_FROM", 3000)


def test_the_plan_switches_to_coarse_codes_past_pq_from(tier):
    assert ann.plan(3000, SYNTH_DIM).factory == "IVF16,SQ8"
    p = ann.plan(6000, SYNTH_DIM)
    assert p.factory == "IVF64_HNSW32,PQ16x4fs" and p.refine
    assert p.bytes_per_vector == pytest.approx(SYNTH_DIM / 8 + 8 + 4 * SYNTH_DIM * 64 / 6000 + 2 * 32 * 4 * 64 / 6000,
                                               abs=0.1)
    assert ann.fast_scan(16384, 512) == "IVF16384_HNSW32,PQ128x4fs"  # at 10M: 64 bytes of codes a vector
    assert ann.wants_refine("IVF16384_HNSW32,PQ128x4fs") and not ann.wants_refine("IVF1024,PQ64")


def test_refine_exact_against_a_naive_reference():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((50, 8)).astype(np.float32)
    q = rng.standard_normal((3, 8)).astype(np.float32)
    cand = np.array([[3, 7, 9, 11, -1], [1, 2, 3, 4, 5], [-1, -1, -1, -1, -1]])
    s, i = refine_exact(q, cand, 3, lambda ids: base[ids])
    for row in range(2):
        c = cand[row][cand[row] >= 0]
        want = c[np.argsort(-(base[c] @ q[row]))[:3]]
        assert list(i[row]) == list(want) and np.allclose(s[row], base[want] @ q[row])
    assert list(i[2]) == [-1, -1, -1]


def test_the_tier_keeps_few_bytes_and_text_recall_above_target(tmp_path, tier):
    mix, x = mixture_vectors(6000)
    store = synthetic_store(tmp_path, x)
    store.reindex("auto")
    info = store.ann_info()
    assert info["structure"] == "IVF64_HNSW32,PQ16x4fs" and info["params"]["refine"] in ann.REFINE_FACTORS
    assert info["bytes_per_vector"] < SYNTH_DIM / 2  # far under SQ8's dim + 8 (resident: the codes only)
    qt, qi = text_queries(mix, 200, seed=5), image_queries(mix, 200, seed=6)
    fresh = IndexStore.open(tmp_path / "idx")  # as a new process opens it: the refine source re-attached
    index = fresh.image_vectors()
    assert index.refine_source is not None and index.params == info["params"]
    for queries in (qt, qi):
        scores, found = index.search(queries, 10)
        assert recall(exact_topk(x, queries, 10) + 1, found) >= 0.95
        np.testing.assert_allclose(scores[:, 0], np.sum(x[found[:, 0] - 1] * queries, 1), atol=1e-5)  # exact scores
    coarse = VectorIndex(index.index, index.factory, dict(info["params"], refine=0))
    assert recall(exact_topk(x, qt, 10) + 1, coarse.search(qt, 10)[1]) < recall(exact_topk(x, qt, 10) + 1,
                                                                                 index.search(qt, 10)[1])
    served = ServingStore.open_shared(tmp_path / "idx").image_vectors()
    assert served.refine_source is not None  # the server's (and each shard's) store re-scores too
    hits = Searcher(fresh).search(ids=[11], k=10, filters=Filters.parse(under="/img/a"))
    assert all(h.path.startswith("/img/a/") for h in hits) and len(hits) == 10
    sims = [h.similarity for h in hits]
    assert sims == sorted(sims, reverse=True) and np.isclose(sims[0], 1.0, atol=1e-5)  # itself, exactly
    lims, s, ids = index.range_search(x[:5], 0.9)  # duplicates: cut at exact scores, never coarse ones
    for j in range(5):
        np.testing.assert_allclose(s[lims[j]:lims[j + 1]], x[ids[lims[j]:lims[j + 1]] - 1] @ x[j], atol=1e-5)
        assert j + 1 in ids[lims[j]:lims[j + 1]]
