"""Search against a naive reference: text/image queries, algebra, filters that keep k hits, the API."""
import os
import time

import numpy as np
import pytest
from PIL import Image

from mmsearch import Index
from mmsearch.config import ModelSpec
from mmsearch.errors import EmptyIndexError, IndexNotFoundError, QueryError
from mmsearch.indexing.pipeline import index_folders
from helpers import filter_kwargs
from mmsearch.search.query import Searcher
from mmsearch.storage.store import IndexStore

TINY = ModelSpec(model="mmsearch-tiny", pretrained=None)
DAY = 86400


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    photos = root / "photos"
    rng = np.random.default_rng(1)
    base = time.mktime((2020, 1, 1, 0, 0, 0, 0, 0, 0))
    for i in range(60):
        sub = photos / ("a" if i % 3 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        ext = ["png", "jpg", "bmp"][i % 3]
        p = sub / f"img{i:02d}.{ext}"
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(p)
        os.utime(p, (base + i * DAY, base + i * DAY))
    idx = root / "idx"
    index_folders(idx, [photos], spec=TINY)
    return idx, photos


def _reference(store, vec, allowed=None):
    ids, emb = store.catalog.embeddings(store.dim)
    s = emb @ vec
    order = [j for j in np.argsort(-s, kind="stable") if allowed is None or ids[j] in allowed]
    return [int(ids[j]) for j in order], s


def test_text_search_equals_brute_force(indexed):
    idx, _ = indexed
    searcher = Searcher(IndexStore.open(idx))
    hits = searcher.search("a red square", k=7)
    vec, _ = searcher.embed([__import__("mmsearch.search.query", fromlist=["Term"]).Term(1.0, text="a red square")])
    ref, _ = _reference(searcher.store, vec)
    assert [h.id for h in hits] == ref[:7]
    assert [h.rank for h in hits] == list(range(1, 8))
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))


def test_image_query_inside_index_finds_itself_first(indexed):
    idx, photos = indexed
    q = str(photos / "a" / "img01.jpg")
    hits = Index.open(idx).search(image=q, k=3)
    assert hits[0].path == q and hits[0].score == pytest.approx(1.0, abs=1e-4)


def test_image_query_outside_index_uses_the_encoder(indexed, tmp_path):
    idx, photos = indexed
    outside = tmp_path / "copy.bmp"
    Image.open(photos / "a" / "img02.bmp").save(outside)
    hits = Index.open(idx).search(image=str(outside), k=1)
    assert hits[0].path == str(photos / "a" / "img02.bmp")


def test_algebra_is_the_weighted_sum(indexed):
    idx, _ = indexed
    searcher = Searcher(IndexStore.open(idx))
    enc = searcher.store.text_encoder()
    e = enc.encode_texts(["dog", "beach", "people"])
    vec = 2 * e[0] + e[1] - e[2]
    vec /= np.linalg.norm(vec)
    ref, _ = _reference(searcher.store, vec)
    assert [h.id for h in searcher.search("2:dog + beach - people", k=5)] == ref[:5]


@pytest.mark.parametrize("filters", [
    {"under": "b"}, {"exts": ["png"]}, {"exts": ["JPG", ".bmp"]},
    {"after": "2020-01-20", "before": "2020-02-10"}, {"under": "a", "exts": ["jpg"]},
])
def test_filters_keep_k_hits_and_match_brute_force(indexed, filters):
    idx, photos = indexed
    store = IndexStore.open(idx)
    searcher = Searcher(store)
    kw = filter_kwargs(filters, photos, lambda day: time.mktime(time.strptime(day, "%Y-%m-%d")))
    rows = store.catalog.rows(store.catalog.embeddings(store.dim)[0])

    def ok(r):
        date = r["taken_at"] or r["mtime_ns"] / 1e9
        return ((not kw.get("under") or r["path"].startswith(kw["under"] + "/"))
                and (not kw.get("exts") or r["ext"] in {"." + e.lower().lstrip(".") for e in kw["exts"]})
                and (kw.get("after") is None or date >= kw["after"])
                and (kw.get("before") is None or date < kw["before"]))

    allowed = {i for i, r in rows.items() if ok(r)}
    assert 5 <= len(allowed) < len(rows)
    hits = searcher.search("a green circle", k=5, **kw)
    vec, _ = searcher.embed(__import__("mmsearch.search.query", fromlist=["parse_query"]).parse_query("a green circle"))
    ref, _ = _reference(store, vec, allowed)
    assert len(hits) == 5
    assert [h.id for h in hits] == ref[:5]


def test_min_score_cuts(indexed):
    idx, _ = indexed
    hits = Index.open(idx).search("x", k=60)
    cut = hits[10].score
    kept = Index.open(idx).search("x", k=60, min_score=cut)
    assert all(h.score >= cut for h in kept) and len(kept) < 60


def test_errors_are_typed(indexed, tmp_path):
    idx, _ = indexed
    with pytest.raises(QueryError):
        Index.open(idx).search("  ")
    with pytest.raises(IndexNotFoundError):
        Index.open(tmp_path / "nothing")
    empty = tmp_path / "empty"
    (empty / "photos").mkdir(parents=True)
    index_folders(empty / "idx", [empty / "photos"], spec=TINY)
    with pytest.raises(EmptyIndexError):
        Index.open(empty / "idx").search("dog")


def test_missing_numpy_text_tower_falls_back_to_torch_and_is_rebuilt(indexed, tmp_path):
    import shutil

    from mmsearch.towers.choice import FastText as _FastText

    idx, _ = indexed
    copy = tmp_path / "idx"
    shutil.copytree(idx, copy)
    fast_hits = [(h.id, h.score) for h in Searcher(IndexStore.open(copy)).search("a dog", k=5)]
    shutil.rmtree(copy / "text_tower")
    store = IndexStore.open(copy)
    assert not isinstance(store.text_encoder(), _FastText)  # torch answers this time ...
    torch_hits = [(h.id, h.score) for h in Searcher(store).search("a dog", k=5)]
    assert [i for i, _ in torch_hits] == [i for i, _ in fast_hits]  # the same hits, the same scores (float32)
    assert max(abs(a - b) for (_, a), (_, b) in zip(torch_hits, fast_hits)) < 1e-5
    assert isinstance(IndexStore.open(copy).text_encoder(), _FastText)  # ... and the next query is fast again
