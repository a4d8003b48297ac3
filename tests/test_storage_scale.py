"""Scaling: auto structure per tier, tuning on text-like queries, rebuild on growth, exact filters,
near-duplicates, export/import. Catalogs are filled with synthetic CLIP-like vectors (no model) except
where a query must be embedded; tier thresholds are lowered so every tier is reached in seconds."""
import json

import numpy as np
import pytest

from mmsearch.storage import ann

from mmsearch.storage import vectors
from mmsearch.storage.catalog import Catalog
from mmsearch.search.dupes import brute_force_groups, find_duplicates
from mmsearch.errors import ModelMismatchError
from mmsearch.storage.store import IndexStore
from mmsearch.datasets.synthvec import exact_topk, image_queries, make_mixture, sample_images, text_queries

DIM = 64


@pytest.fixture
def small_tiers(monkeypatch):
    """Flat up to 1000 vectors, IVF16 up to 3000, IVF64 up to 100k (the real tiers are ~50x larger)."""
    monkeypatch.setattr(ann, "FLAT_MAX", 1000)
    monkeypatch.setattr(ann, "IVF_TIERS", ((3000, 16), (100_000, 64)))


def _catalog_store(tmp_path, vecs, first_id=1, store=None):
    """An IndexStore over a model-less catalog holding `vecs` (paths /img/NNNNN.jpg|png by parity)."""
    if store is None:
        cat = Catalog.create(tmp_path / "idx", {"dim": int(vecs.shape[1]), "fingerprint": "synthetic",
                                                "model": {"model": "synthetic"}, "factory": "auto"})
        store = IndexStore(tmp_path / "idx", cat)
    rows = [dict(path=f"/img/{'a' if i % 2 else 'b'}/{i:05d}.{'jpg' if i % 3 else 'png'}", size=1, mtime_ns=i,
                 ext=".jpg" if i % 3 else ".png") for i in range(first_id, first_id + len(vecs))]
    with store.catalog.transaction():
        store.catalog.upsert_images(rows, vecs)
        store.catalog.bump_generation()
    return store


def _mixture_vectors(n, seed=0):
    mix = make_mixture(n_clusters=40, dim=DIM, seed=seed, topic_size=4)
    return mix, sample_images(mix, n, seed=seed + 1)


def _recall(truth, found):
    return ann.recall_at_k(np.asarray(truth), np.asarray(found))


# ---- auto selection ---------------------------------------------------------------------------
def test_plan_picks_flat_then_ivf_tiers_and_fits_the_memory_budget(small_tiers):
    assert ann.plan(1000, DIM).factory == "Flat"
    assert ann.plan(1001, DIM) == ann.Plan("IVF16,SQ8", 3000, pytest.approx(DIM + 8 + 4 * DIM * 16 / 1001, abs=0.1))
    assert ann.plan(3001, DIM).factory == "IVF64,SQ8"
    # under a budget: the first structure whose estimate fits, never one that does not
    budget = 50 * 5000
    p = ann.plan(5000, DIM, max_memory=budget)
    assert p.bytes_per_vector * 5000 <= budget and p.factory.startswith("IVF64,") and "SQ8" not in p.factory
    with pytest.raises(Exception, match="raise --max-index-memory"):
        ann.plan(5000, DIM, max_memory=5000)
    assert ann.parse_size("600MB") == 600 * 2**20 and ann.parse_size("2g") == 2 * 2**30


def test_auto_build_at_each_tier_and_rebuild_on_growth_keeps_ids_filters_tokens(tmp_path, small_tiers):
    mix, x = _mixture_vectors(4000)
    store = _catalog_store(tmp_path, x[:200])
    with store.catalog.transaction():
        store.catalog.set_tokens(7, np.full((2, 3), 0.5, np.float16))  # a re-ranker token row to keep
    index = store.image_vectors()
    assert store.ann_info()["structure"] == "Flat" and store.ann_info()["tier_max"] == 1000
    seen = []
    for start, end in ((200, 2000), (2000, 4000)):  # grow past Flat, then past the first IVF tier
        pending = store.vectors_for_update()
        _catalog_store(tmp_path, x[start:end], first_id=start + 1, store=store)
        ids, vecs = store.catalog.embeddings(DIM, range(start + 1, end + 1))
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
    mix, x = _mixture_vectors(6000)
    store = _catalog_store(tmp_path, x)
    index, info = ann.build(store.catalog, DIM, "auto")
    assert info["structure"] == "IVF64,SQ8" and info["tuned_on"].startswith("stand-in")
    assert info["recall_tune"] >= 0.95 and info["recall_heldout"] >= 0.95
    # fresh text-like queries the tuner never saw, against brute force in this test
    qt = text_queries(mix, 200, seed=11)
    truth = exact_topk(x, qt, 10) + 1  # catalog ids start at 1
    assert _recall(truth, index.search(qt, 10)[1]) >= 0.95
    # and with a text corpus, tuning uses it
    index2, info2 = ann.build(store.catalog, DIM, "auto", text_vectors=text_queries(mix, 300, seed=5))
    assert info2["tuned_on"].startswith("text corpus") and info2["recall_heldout"] >= 0.95


def test_text_like_queries_are_harder_than_image_queries_at_fixed_nprobe():
    mix, x = _mixture_vectors(6000)
    v = vectors.VectorIndex.build("IVF64,Flat", DIM, np.arange(len(x)), x)
    v.set_params(nprobe=2)
    qi, qt = image_queries(mix, 300, seed=7), text_queries(mix, 300, seed=8)
    r_img = _recall(exact_topk(x, qi, 10), v.search(qi, 10)[1])
    r_txt = _recall(exact_topk(x, qt, 10), v.search(qt, 10)[1])
    assert r_txt < r_img - 0.05


# ---- filters ----------------------------------------------------------------------------------
@pytest.mark.parametrize("factory", ["Flat", "IVF64,SQ8"])
def test_filters_keep_k_hits_with_unfiltered_recall(tmp_path, monkeypatch, factory, small_tiers):
    monkeypatch.setattr(vectors, "EXACT_SUBSET_MAX", 50)  # both paths: exact subset and bitmap selector
    mix, x = _mixture_vectors(10_000)
    store = _catalog_store(tmp_path, x)
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
            assert _recall(truth, found) >= 0.95, frac


def test_filter_selection_lists_the_smaller_side(tmp_path):
    mix, x = _mixture_vectors(600)
    cat = _catalog_store(tmp_path, x).catalog
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


# ---- near-duplicates --------------------------------------------------------------------------
@pytest.mark.parametrize("factory", ["Flat", "IVF16,SQ8"])
def test_dupes_equal_brute_force(tmp_path, factory):
    rng = np.random.default_rng(3)
    mix, x = _mixture_vectors(1500, seed=3)
    # plant groups: copies with small noise (cosine ~0.99), chains and singles
    src = rng.choice(len(x), 60, replace=False)
    copies = []
    for j, s in enumerate(src):
        for _ in range(1 + j % 3):
            c = x[s] + rng.standard_normal(DIM).astype(np.float32) * 0.01
            copies.append(c / np.linalg.norm(c))
    allv = np.concatenate([x, np.stack(copies)])
    store = _catalog_store(tmp_path, allv)
    store.reindex(factory)
    got = find_duplicates(store, threshold=0.97)
    ref = brute_force_groups(np.arange(1, len(allv) + 1), allv, 0.97)
    assert [g["ids"] for g in got] == ref
    assert len(ref) >= 60 and all(g["min_score"] >= 0.97 for g in got)


# ---- export / import --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_index(tmp_path_factory, synth_dir):
    from mmsearch.config import ModelSpec
    from mmsearch.indexing.pipeline import index_folders

    idx = tmp_path_factory.mktemp("scale") / "idx"
    files = sorted((synth_dir / "images").glob("*.png"))[:150]  # a file list is a valid root list too
    index_folders(idx, files, spec=ModelSpec(model="mmsearch-tiny", pretrained=None))
    return idx


def test_export_import_round_trip_gives_identical_results(small_index, tmp_path):
    from click.testing import CliRunner

    from mmsearch.cli import cli

    r = CliRunner()
    out = r.invoke(cli, ["export", str(tmp_path / "emb"), "--index", str(small_index), "--shard-size", "60"])
    assert out.exit_code == 0, out.output
    assert "exported 150 embeddings (dim" in out.output and "in 3 shards" in out.output
    assert (tmp_path / "emb" / "img_emb" / "img_emb_2.npy").is_file()
    assert (tmp_path / "emb" / "metadata" / "metadata_2.parquet").is_file()
    res = r.invoke(cli, ["import", str(tmp_path / "emb"), "--index", str(tmp_path / "copy")])
    assert res.exit_code == 0, res.output
    assert "imported 150 embeddings from 3 shards; the index holds 150 images (Flat)" in res.output
    for q in (["a red circle"], ["blue square", "--under", str(small_index.parent)], ["green", "--ext", "png"]):
        a = r.invoke(cli, ["search", *q, "--index", str(small_index), "--json", "-k", "8"])
        b = r.invoke(cli, ["search", *q, "--index", str(tmp_path / "copy"), "--json", "-k", "8"])
        assert a.exit_code == 0 and a.output == b.output
    a = [json.loads(line) for line in r.invoke(cli, ["search", "a red circle", "--index", str(small_index),
                                                     "--json"]).output.splitlines()]
    assert len(a) == 10
    # importing again updates rows by path: nothing is duplicated
    res = r.invoke(cli, ["import", str(tmp_path / "emb"), "--index", str(tmp_path / "copy")])
    assert "the index holds 150 images" in res.output


def test_import_with_wrong_model_or_dimension_is_refused_and_changes_nothing(small_index, tmp_path):
    from mmsearch.storage.exchange import export_embeddings, import_embeddings, MODEL_RECORD

    store = IndexStore.open(small_index)
    export_embeddings(store, tmp_path / "emb", shard_size=1000)
    before = (store.catalog.count_images(), store.catalog.generation(),
              (small_index / "vectors.faiss").stat().st_mtime_ns)
    rec_path = tmp_path / "emb" / MODEL_RECORD
    rec = json.loads(rec_path.read_text())
    rec_path.write_text(json.dumps(dict(rec, fingerprint="0123456789abcdef")))
    with pytest.raises(ModelMismatchError, match="nothing was imported"):
        import_embeddings(store, tmp_path / "emb")
    rec_path.write_text(json.dumps(dict(rec, precision="int8")))
    with pytest.raises(ModelMismatchError, match="holds int8 embeddings"):
        import_embeddings(store, tmp_path / "emb")
    rec_path.write_text(json.dumps(rec))
    np.save(tmp_path / "emb" / "img_emb" / "img_emb_0.npy", np.ones((150, 16), np.float32))
    with pytest.raises(ModelMismatchError, match="needs dim"):
        import_embeddings(store, tmp_path / "emb")
    rec_path.unlink()  # a clip-retrieval shard set: no record, and no model named to vouch for it
    with pytest.raises(ModelMismatchError, match="no mmsearch_model.json"):
        import_embeddings(store, tmp_path / "emb")
    after = IndexStore.open(small_index)
    assert (after.catalog.count_images(), after.catalog.generation(),
            (small_index / "vectors.faiss").stat().st_mtime_ns) == before
