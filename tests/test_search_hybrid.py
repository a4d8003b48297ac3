"""Issue 27, without OCR: reciprocal rank fusion against a naive reference, the words side's grammar
(quoted phrases must appear), the FTS5 index in the catalog (kept by triggers, rebuilt when missing), and
where the matched words are (offsets)."""
import random

import numpy as np
import pytest

from mmsearch.search.hybrid import WEIGHTS, fuse, refuse_reranked, rrf, text_ranking
from mmsearch.search.lexical import matches, parse_lexical, strip_quotes
from mmsearch.storage.catalog import Catalog
from mmsearch.storage.words import find_words, fold, name_words, query_words, spaced


def naive_rrf(rankings, k=60, weights=None):
    """The definition, literally: every item of every list, sum of w/(k + its 1-based rank) where it appears."""
    weights = weights or [1.0] * len(rankings)
    items = []
    for r in rankings:
        for i in r:
            if i not in items:
                items.append(i)
    scores = {i: sum(w / (k + r.index(i) + 1) for w, r in zip(weights, rankings) if i in r) for i in items}
    best = {i: min(r.index(i) for r in rankings if i in r) for i in items}
    return sorted(scores.items(), key=lambda t: (-t[1], best[t[0]], t[0]))


def test_rrf_matches_the_naive_reference():
    """Issue 27: fusion against a naive reference implementation."""
    rng = random.Random(0)
    for trial in range(200):
        pool = list(range(rng.randint(1, 60)))
        lists = [rng.sample(pool, rng.randint(0, len(pool))) for _ in range(rng.randint(1, 3))]
        k = rng.choice([1, 10, 60])
        weights = [rng.choice([0.5, 1.0, 2.0]) for _ in lists] if trial % 2 else None
        got, want = rrf(lists, k=k, weights=weights), naive_rrf(lists, k=k, weights=weights)
        assert [i for i, _ in got] == [i for i, _ in want], (trial, lists)
        assert np.allclose([s for _, s in got], [s for _, s in want])


def test_an_image_found_by_its_words_outranks_the_dense_sides_first_pick():
    """The words side weighs twice (hybrid.WEIGHTS): a word query's match comes first even when the
    encoder, which does not read words, ranks it nowhere (benchmarks/ocr.py: hybrid R@1 0.38 -> 0.96)."""
    out = fuse([(1, 0.9), (2, 0.8)], [(7, 3.0)], "hybrid")
    assert [r.id for r in out] == [i for i, _ in naive_rrf([[1, 2], [7]], weights=list(WEIGHTS))] == [7, 1, 2]


def test_fusion_without_word_matches_is_the_dense_ranking_unchanged():
    dense = [(5, 0.9), (2, 0.8), (7, 0.1)]
    out = fuse(dense, [], "hybrid")
    assert [(r.id, r.score, r.similarity) for r in out] == [(5, 0.9, 0.9), (2, 0.8, 0.8), (7, 0.1, 0.1)]


def test_fusion_puts_an_item_both_sides_agree_on_first_and_keeps_word_only_hits():
    dense = [(1, 0.9), (2, 0.8), (3, 0.7)]
    text = [(3, 5.0), (9, 4.0)]  # 9: found by its words only ("a query that only matches text still returns hits")
    out = fuse(dense, text, "hybrid")
    assert out[0].id == 3 and {r.id for r in out} == {1, 2, 3, 9}
    assert next(r for r in out if r.id == 9).similarity is None  # filled later from the stored vector
    assert [r.id for r in fuse(dense, text, "text")] == [3, 9]


def test_reranked_head_is_fused_again_with_the_word_ranks():
    ranked = fuse([(1, 0.9), (2, 0.8), (3, 0.7), (4, 0.6)], [(3, 5.0)], "hybrid")
    top = [r.id for r in ranked[:3]]
    rer = refuse_reranked(ranked, list(reversed(top)), [(3, 5.0)], 3, "hybrid")
    want = [i for i, _ in naive_rrf([list(reversed(top)), [3]], weights=list(WEIGHTS))]
    assert [r.id for r in rer[:3]] == want and [r.id for r in rer[3:]] == [r.id for r in ranked[3:]]


def test_query_grammar():
    q = parse_lexical(['"invoice 2023" beach'])
    assert q.phrases == [["invoice", "2023"]] and q.words == [["beach"]]
    assert q.match() == '("invoice 2023") AND ("invoice 2023" OR "beach")'
    assert q.required_match() == '"invoice 2023"'
    assert strip_quotes('"invoice 2023" beach') == "invoice 2023 beach"
    assert parse_lexical(["a photo of the beach"]).words == [["beach"]]  # common words do not match pages of text
    assert parse_lexical(["the"]).words == [["the"]]  # ... unless they are all there is
    assert parse_lexical(["发票 2023"]).words == [["发", "票"], ["2023"]]  # a CJK run is one unit
    assert parse_lexical(["Beach BEACH"]).words == [["Beach"]]
    assert parse_lexical(["- + ,"]).empty


def test_words_split_and_fold():
    assert name_words("/home/u/Trips 2019/IMG_2023invoiceScan.png") == "u Trips 2019 IMG_2023 invoice Scan.png"
    assert spaced("发票abc") == " 发  票 abc"
    assert query_words("Café_olé 发票") == ["Café", "olé", "发", "票"]
    assert fold("Café ÉTÉ") == "cafe ete" and len(fold("ﬁx")) == len("ﬁx")  # one character per character: offsets carry over
    text = "Le Café, café-crème; CAFÉS"
    spans = list(find_words(text, ["cafe"]))
    assert [text[s:e] for s, e in spans] == ["Café", "café"]  # whole words only, as FTS5 matches them


@pytest.fixture
def catalog(tmp_path):
    """A catalog of six images with known words (no model, no OCR: rows written as the indexer writes them)."""
    cat = Catalog.create(tmp_path / "idx", {"dim": 4})
    docs = {
        "/p/receipts/r1.png": ["Invoice 2023 total 41.50", "Thank you"],
        "/p/receipts/r2.png": ["2023 invoice copy"],
        "/p/beach/b1.jpg": ["Beach cafe menu", "invoice 2023"],
        "/p/beach/b2.jpg": [],
        "/p/cn/c1.png": ["发票 金额 100"],
        "/p/misc/IMG_invoiceScan.png": [],
    }
    ids = {}
    with cat.transaction():
        for n, (path, lines) in enumerate(docs.items()):
            row = dict(path=path, size=1, mtime_ns=1, quick_hash=None, width=10, height=10, taken_at=None,
                       ext="." + path.rsplit(".", 1)[1])
            ids[path] = cat.insert_image(row, np.eye(4, dtype=np.float32)[n % 4])
            cat.put_words(ids[path], path, {"keywords": ["holiday"]} if "beach" in path else None,
                          [(t, 0.99, [[0, 0], [1, 0], [1, 0.1], [0, 0.1]]) for t in lines], "ok" if lines else "none")
    return cat, ids


def _found(cat, query, where="", args=()):
    return [i for i, _ in text_ranking(cat, parse_lexical([query]), where, list(args))]


def test_quoted_phrase_must_appear_in_order(catalog):
    """Issue 27: quoted-phrase semantics."""
    cat, ids = catalog
    assert set(_found(cat, '"invoice 2023"')) == {ids["/p/receipts/r1.png"], ids["/p/beach/b1.jpg"]}
    assert _found(cat, '"2023 invoice"') == [ids["/p/receipts/r2.png"]]
    # the phrase filters, the free word ranks: the beach receipt (phrase + beach) first
    assert _found(cat, '"invoice 2023" beach') == [ids["/p/beach/b1.jpg"], ids["/p/receipts/r1.png"]]
    assert _found(cat, '"invoice 1999"') == []
    assert set(_found(cat, "invoice")) == {ids[p] for p in ("/p/receipts/r1.png", "/p/receipts/r2.png",
                                                          "/p/beach/b1.jpg", "/p/misc/IMG_invoiceScan.png")}
    assert _found(cat, "发票") == [ids["/p/cn/c1.png"]] and _found(cat, "票发") == []
    assert set(_found(cat, "holiday")) == {ids["/p/beach/b1.jpg"], ids["/p/beach/b2.jpg"]}  # typed keywords
    assert set(_found(cat, "receipts")) == {ids["/p/receipts/r1.png"], ids["/p/receipts/r2.png"]}  # folder name


def test_the_one_filter_applies_to_the_words_side(catalog):
    from mmsearch.search.filters import Filters
    from mmsearch.storage.filtersql import filter_sql

    cat, ids = catalog
    f = Filters.parse(exts="jpg")
    where, args = filter_sql(f.under, list(f.exts), f.after, f.before)
    assert _found(cat, "invoice", where, args) == [ids["/p/beach/b1.jpg"]]
    f = Filters.parse(under="/p/receipts")
    where, args = filter_sql(f.under, None, None, None)
    assert set(_found(cat, "invoice", where, args)) == {ids["/p/receipts/r1.png"], ids["/p/receipts/r2.png"]}


def test_matches_carry_offsets_into_the_text_as_read(catalog):
    cat, ids = catalog
    i = ids["/p/beach/b1.jpg"]
    found = matches(parse_lexical(['"invoice 2023" cafe']), "/p/beach/b1.jpg", cat.lines_of([i])[i], cat.metas_of([i])[i])
    got = {(m["field"], m["text"][s:e]) for m in found for s, e in m["spans"]}
    assert got == {("ocr", "cafe"), ("ocr", "invoice 2023")}
    assert all(m["box"] for m in found if m["field"] == "ocr")


def test_deleting_an_image_deletes_its_words_and_fts_rebuilds_when_missing(catalog):
    """Issue 27: FTS rebuilt when missing (and kept in step with deletes by triggers)."""
    cat, ids = catalog
    with cat.transaction():
        cat.delete_images([ids["/p/receipts/r2.png"]])
    assert _found(cat, '"2023 invoice"') == [] and cat.lines_of([ids["/p/receipts/r2.png"]]) == {
        ids["/p/receipts/r2.png"]: []}
    before = sorted(_found(cat, "invoice"))
    with cat.transaction():
        cat.conn.executescript("DROP TABLE image_text_fts; DROP TRIGGER image_text_ai;")
    cat.close()
    cat = Catalog.open(cat.dir)  # a writable open repairs it from image_text
    assert cat.lexical_repairs["rebuilt"] and sorted(_found(cat, "invoice")) == before
    cat.conn.execute("INSERT INTO image_text_fts(image_text_fts, rank) VALUES ('integrity-check', 1)")
    ro = Catalog.open(cat.dir, readonly=True)
    assert sorted(_found(ro, "invoice")) == before


def test_imported_rows_get_their_name_words_and_wait_for_ocr(catalog):
    """Rows written by an import (no extractor ran) are searchable by name at once; their OCR and metadata are
    read by the next `mmsearch index` (ids_needing_ocr)."""
    cat, _ = catalog
    with cat.transaction():
        cat.upsert_images([{"path": "/p/imported/sunflower-field.jpg", "size": 3, "mtime_ns": 3}],
                          np.ones((1, 4), np.float32))
    (i,) = _found(cat, "sunflower")
    assert cat.rows([i])[i]["path"] == "/p/imported/sunflower-field.jpg"
    assert (i, "/p/imported/sunflower-field.jpg") in cat.ids_needing_ocr()


def test_coverage_from_the_stored_words_equals_fts5s_own_count(tmp_path):
    """The words side keeps images covering half the query's words; it counts them from the stored
    documents (hybrid.unit_coverage) instead of one FTS5 lookup per word. FTS5's own count
    (Catalog.match_counts) is the reference, over random documents mixing Latin, accents, CJK and names."""
    from mmsearch.search.hybrid import unit_coverage

    rng = random.Random(1)
    vocab = ["red", "Circle", "café", "cafe", "blue", "square", "invoice", "2023", "发票", "密码", "total",
             "naïve", "IMG", "scan", "left"]
    cat = Catalog.create(tmp_path / "idx", {"dim": 4})
    with cat.transaction():
        for n in range(120):
            path = f"/p/{rng.choice(vocab)}/{rng.choice(vocab)}_{n}.png"
            i = cat.insert_image(dict(path=path, size=1, mtime_ns=1, quick_hash=None, width=1, height=1,
                                      taken_at=None, ext=".png"), np.ones(4, np.float32) / 2)
            lines = [(" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 5))), 0.9, None)
                     for _ in range(rng.randint(0, 3))]
            cat.put_words(i, path, {"keywords": [rng.choice(vocab)]} if n % 3 == 0 else None, lines, "ok")
    ids = [i for i, in cat.conn.execute("SELECT id FROM images")]
    for trial in range(40):
        q = parse_lexical([" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 4)))])
        if not q.words:
            continue
        counts = cat.match_counts(q.unit_matches(), ids)  # one FTS5 count for every id (not one per id)
        assert unit_coverage(q, cat.documents(ids)) == {i: counts.get(i, 0) for i in ids}, (trial, q.words)
