"""The query layer: parse a query, embed it, search, hydrate rows, filter, re-rank.

A query is a weighted sum of text and image terms, like rclip's: "2:dog + beach - people". A term that
names an existing image file is an image term; an image already in the index reuses its stored
embedding, so image->image search of an indexed photo needs no model at all.
"""
from __future__ import annotations

import os
import time
from typing import Optional, Sequence

import numpy as np

from mmsearch.errors import EmptyIndexError, QueryError
from mmsearch.search import moments as video_moments
from mmsearch.search.filters import Filters
from mmsearch.search.hybrid import FUSE_DEPTH, MODES, TEXT_DEPTH, fuse, refuse_reranked, text_ranking
from mmsearch.search.hits import Hit, build_hits, order_hits  # noqa: F401 (build_hits: for callers)
from mmsearch.search.lexical import matches, parse_lexical
from mmsearch.storage.filtersql import filter_sql
from mmsearch.search.relevance import CalibrationCache, date_of, good_pairs  # noqa: F401 (date_of: for callers)
from mmsearch.storage.fsnames import display
from mmsearch.search.terms import (MAX_QUERY_CHARS, MAX_TERMS, MAX_WEIGHT, Term, check_depths,  # noqa: F401
                                   combine, embed_terms, finite_query, parse_query)
from mmsearch.storage.store import IndexStore

DEFAULT_RERANK_K = 32
SORTS = ("relevance", "date")
GOOD_DEPTH = 1000  # the most good matches a date-sorted search orders
DATE_DEPTH = 100  # an index without a calibration orders its closest 100 by date


class Searcher:
    """Answers queries against one index. Keeps models loaded between queries (API and benchmarks)."""

    def __init__(self, store: IndexStore, allow_paths: bool = True):
        self.store = store
        self.allow_paths = allow_paths  # False: query text never names a file (the web server)
        self.calibration = CalibrationCache(store)

    # ---- embedding a query --------------------------------------------------------------------
    def _image_embedding(self, path: Optional[str], token_grid: Optional[int] = None, image_id: Optional[int] = None,
                         pixels=None):
        cat = self.store.catalog
        if pixels is not None:
            image_id = None
        elif image_id is None:
            image_id = cat.id_for_path(path)
        else:
            row = cat.rows([image_id]).get(image_id)
            if row is None:
                raise QueryError(f"no image with id {image_id} in the index")
            path = row["path"]
        if image_id is not None and token_grid is None:
            return cat.embeddings(self.store.dim, [image_id])[1][0], None
        if image_id is not None:
            toks = cat.tokens([image_id], self.store.token_shape()).get(image_id)
            if toks is not None:
                return cat.embeddings(self.store.dim, [image_id])[1][0], toks.astype(np.float32)
        # the index's own image tower (ONNX, its precision) unless re-ranker tokens need torch
        enc = self.store.image_embedder() if token_grid is None else self.store.encoder()
        frame_s = cat.rows([image_id]).get(image_id, {}).get("frame_s") if image_id is not None else None
        if pixels is not None:
            img = pixels
        elif frame_s is not None:  # a video's shot: its frame
            from mmsearch.video import frame_at

            img = frame_at(path, frame_s, enc.image_size)
        else:
            from mmsearch.media import load_image

            img = load_image(path, min_size=enc.image_size)
        out = enc.encode_images([img], token_grid=token_grid)
        vec, toks = (out[0][0], out[1][0]) if token_grid else (out[0], None)
        finite_query(vec, f"the embedding of image {display(os.path.basename(path))}" if path else
                "the embedding of the uploaded image")
        return vec, toks

    def embed(self, terms: list[Term], want_states: bool = False):
        """(query vector [d], text token states of a single-text query or None)."""
        return embed_terms(terms, self.store.text_encoder, want_states,
                           lambda t: self._image_embedding(t.image, image_id=t.image_id, pixels=t.pixels)[0])

    # ---- text -> image, image -> image --------------------------------------------------------
    def search(self, query: Optional[str] = None, images: Sequence[str] = (), k: int = 10,
               under: Optional[str] = None, exts: Optional[Sequence[str]] = None, after: Optional[float] = None,
               before: Optional[float] = None, min_score: Optional[float] = None, rerank: Optional[bool] = None,
               rerank_k: int = DEFAULT_RERANK_K, alpha: Optional[float] = None, ids: Sequence[int] = (),
               offset: int = 0, filters: Optional[Filters] = None, until=None, mode: Optional[str] = None,
               good_only: bool = False, sort: str = "relevance", group: bool = True) -> list[Hit]:
        """Hits offset+1 .. offset+k, kept by `filters` (or the same filters given one by one: under, exts,
        after, before or until (inclusive); mmsearch.search.filters parses them). rerank=None re-ranks when
        the index has a re-ranker and the query is one text; alpha=None blends the re-ranker's score with the
        similarity as fitted when it was trained. Re-ranking always re-scores the same top max(k, rerank_k),
        so pages of one query never overlap.

        mode: dense (the encoder only), text (the images' words only) or hybrid (both, fused: hybrid.py);
        None: hybrid when the index has words and the query has some, else dense. A quoted phrase must
        appear in every hit of text and hybrid searches; min_score drops hits whose words did not match.

        Every hit carries its calibrated score and whether it is a good match (relevance.py; None when the
        index is too small to say); a hit whose words matched the query is a good match too. good_only
        keeps the good matches; when there is none at all, the closest results come back all the same,
        each marked not good, for the caller to say so. sort="date" orders the good matches (at most
        GOOD_DEPTH) by date, newest first: EXIF date, else the file's; without a calibration it orders the
        closest DATE_DEPTH.

        A video's shots are ranked as photos; `group` folds them into one hit per video (search/moments.py),
        at the rank of its best moment, and pages count those hits."""
        k, offset, rerank_k, alpha, min_score = check_depths(k, offset, rerank_k, alpha, min_score)
        if sort not in SORTS:
            raise QueryError(f"sort: '{sort}' is not one of {', '.join(SORTS)}")
        if filters is None:
            filters = Filters.parse(under=under, exts=exts, after=after, before=before, until=until)
        elif any(v is not None for v in (under, exts, after, before, until)):
            raise QueryError("give filters either as Filters or one by one (under, exts, after, before, until)")
        terms = parse_query(query, images, ids, paths=self.allow_paths)
        cat = self.store.catalog
        if not cat.has_images():
            raise EmptyIndexError(f"index {self.store.dir} holds no images yet (run `mmsearch index FOLDER`)")
        lexq = parse_lexical([t.text for t in terms if t.text is not None and t.weight > 0])
        mode = self._mode(mode, lexq)
        single_text = len(terms) == 1 and terms[0].text is not None and terms[0].weight > 0
        if rerank is None:
            rerank = self.store.reranker_info() is not None and single_text
        elif rerank and self.store.reranker_info() is None:
            raise QueryError("no re-ranker configured for this index (`mmsearch rerank enable FILE`)")
        rerank = bool(rerank and single_text and sort == "relevance")  # a date order needs no re-scoring
        vec, states = self.embed(terms, want_states=rerank)
        selection = None
        where, args = filter_sql(filters.under, list(filters.exts) if filters.exts else None, filters.after,
                                 filters.before)
        if filters.active:
            total = self.store.query_vectors().ntotal
            selection = cat.filter_selection(total, filters.under, list(filters.exts) if filters.exts else None,
                                             filters.after, filters.before)
            sel_ids, excluded = selection
            if (len(sel_ids) >= total) if excluded else (len(sel_ids) == 0):
                return []
        if mode != "dense" and lexq.phrases:  # quoted words must appear: both sides search only those images
            required = cat.lexical_search(lexq.required_match(), None, where, args)
            if not required:
                return []
            selection = (np.array(sorted(i for i, _ in required), dtype=np.int64), False)
        calibration = self.calibration.get()
        standing = calibration.standing(vec) if calibration is not None else None
        depth = max(offset + k, rerank_k) if rerank else offset + k
        videos = group and cat.has_videos()
        if videos:
            depth = max(depth, (offset + k) * video_moments.GROUP_DEPTH)
        dense, text, narrowed = [], [], False
        if mode != "text":
            dense, narrowed = self._dense(vec, depth, selection, standing, good_only, sort, mode == "hybrid",
                                          offset + k if videos else None)
        if standing is not None and dense:
            standing = standing.with_best(dense[0][1])  # the query's best hit: the score's second reference
        if mode != "dense":
            text = text_ranking(cat, lexq, where, args, max(TEXT_DEPTH, offset + k))
        ranked = fuse(dense, text, mode)
        if rerank and ranked:
            top = max(k, rerank_k)
            self._similarities(vec, ranked[:top])
            itm = self._rerank_images(states, [r.id for r in ranked[:top]])
            order = order_hits([(r.id, r.similarity) for r in ranked[:top]], itm,
                           self._alpha(alpha, "text_to_image") if itm else 0.0)
            by_id = {r.id: r for r in ranked[:top]}
            for i, final, _, logit in order:
                by_id[i].itm = logit
                if mode != "hybrid" or not text:  # no fusion: the blended score is the score
                    by_id[i].score = final
            ranked = refuse_reranked(ranked, [i for i, *_ in order], text, top, mode)
        if min_score is not None:  # after a fusion: by the similarity of the hits whose words did not match
            fused = mode == "hybrid" and bool(text)
            self._similarities(vec, ranked)
            ranked = [r for r in ranked if r.text_score is not None
                      or (r.similarity if fused else r.score) >= min_score]
        rows = None
        if sort == "date" and (narrowed or standing is None or mode == "text"):
            rows = cat.rows([r.id for r in ranked])
            ranked = sorted((r for r in ranked if r.id in rows), key=lambda r: -date_of(rows[r.id]))
        moments: dict = {}
        if videos:
            ranked, moments = self._group(ranked, offset + k)
        return self._hits(ranked[offset:offset + k], vec, offset, lexq, standing, rows, moments)

    def _dense(self, vec: np.ndarray, depth: int, selection, standing, good_only: bool, sort: str,
               hybrid: bool, page_end: Optional[int]) -> tuple[list[tuple[int, float]], bool]:
        """The dense side's (id, similarity) best first, and whether they are the good matches only (asked
        for by good_only or a date order, and there are some). `page_end` (an index with videos): search
        deeper while the shots found fold into fewer hits than the page needs."""
        if standing is not None and (good_only or sort == "date"):
            good = good_pairs(lambda d: self._pairs(vec, d, selection), max(depth, DATE_DEPTH) if sort == "date"
                              else depth, standing, deepen=sort == "date", most=GOOD_DEPTH)
            if good:
                return good, True
        if sort == "date" and standing is None:
            depth = max(depth, DATE_DEPTH)
        depth = max(depth, FUSE_DEPTH) if hybrid else depth
        total = self.store.query_vectors().ntotal
        while True:
            pairs = self._pairs(vec, depth, selection)
            if page_end is None or len(pairs) < depth or depth >= total:
                return pairs, False
            times = self.store.catalog.shot_times([i for i, _ in pairs])
            if video_moments.count_groups([i for i, _ in pairs], times) >= page_end:
                return pairs, False
            depth *= 4  # many shots of few videos: look deeper until the page fills

    def _group(self, ranked: list, page_end: int) -> tuple[list, dict]:
        """One entry per video, at its best moment (search/moments.py), and {id: that video's moments}."""
        times = self.store.catalog.shot_times([r.id for r in ranked])
        if not times:
            return ranked, {}
        by_id = {r.id: r for r in ranked}
        grouped = video_moments.group([(r.id, r.score, r.similarity, r.itm) for r in ranked], times, page_end)
        return [by_id[g[0]] for g in grouped], {g[0]: g[4] for g in grouped if g[4] is not None}

    def _mode(self, mode: Optional[str], lexq) -> str:
        if mode is not None and mode not in MODES:
            raise QueryError(f"unknown search mode '{mode}' (choose from {', '.join(MODES)})")
        if mode == "dense" or lexq.empty:
            if mode == "text":
                raise QueryError("a search by words needs words: give text (an image query is dense only)")
            return "dense"
        if not self.store.catalog.has_lexical():
            if mode is None:
                return "dense"
            raise QueryError(f"index {self.store.dir} has no word index yet: run `mmsearch index` on it once "
                             f"(it builds the index from the catalog)")
        return mode or ("hybrid" if self.store.catalog.has_words() else "dense")

    def _similarities(self, vec: np.ndarray, ranked: list) -> None:
        """The dense similarity of candidates found by their words only (from their stored vectors)."""
        missing = [r for r in ranked if r.similarity is None]
        if missing:
            sims = self.store.stored_vectors([r.id for r in missing]) @ vec
            for r, s in zip(missing, sims):
                r.similarity = float(s)

    def _hits(self, page: list, vec: np.ndarray, offset: int, lexq, standing, rows: Optional[dict],
              moments: dict) -> list[Hit]:
        """The page's hits, with why their words matched and their good-match standing."""
        cat = self.store.catalog
        self._similarities(vec, page)
        rows = rows if rows is not None else cat.rows([r.id for r in page])
        worded = [r.id for r in page if r.text_score is not None]
        lines, metas = (cat.lines_of(worded), cat.metas_of(worded)) if worded else ({}, {})
        out = []
        for r in page:
            row = rows.get(r.id)
            if row is None:
                continue  # removed by a concurrent indexing run
            found = matches(lexq, row["path"], lines[r.id], metas.get(r.id, {})) if r.id in lines else None
            out.append(Hit(rank=offset + len(out) + 1, score=r.score, id=r.id, similarity=r.similarity, itm=r.itm,
                           path=row["path"], taken_at=row["taken_at"], width=row["width"], height=row["height"],
                           row=row, matches=found, text_score=r.text_score,
                           calibrated=None if standing is None else round(standing.score(r.similarity), 3),
                           good=None if standing is None else (standing.good(r.similarity)
                                                               or r.text_score is not None),
                           video_id=row.get("video_id"), start_s=row.get("start_s"), end_s=row.get("end_s"),
                           frame_s=row.get("frame_s"), duration_s=row.get("duration_s"), moments=moments.get(r.id)))
        return out

    def nearest(self, vec: np.ndarray, depth: int, filters: Optional[Filters] = None):
        """(scores [n], ids [n]) of the `depth` nearest images kept by `filters`, best first (a shard of a
        sharded index answers a router with this)."""
        selection = None
        if filters is not None and filters.active:
            cat = self.store.catalog
            total = self.store.query_vectors().ntotal
            selection = cat.filter_selection(total, filters.under, list(filters.exts) if filters.exts else None,
                                             filters.after, filters.before)
            ids, excluded = selection
            if (len(ids) >= total) if excluded else (len(ids) == 0):
                return np.zeros(0, np.float32), np.zeros(0, np.int64)
        scores, found = self._search_vectors(vec, depth, selection)
        return scores[0], found[0]

    def _pairs(self, vec: np.ndarray, depth: int, selection) -> list[tuple[int, float]]:
        scores, found = self._search_vectors(vec, depth, selection)
        return [(int(i), float(s)) for i, s in zip(found[0], scores[0]) if i >= 0]

    def _search_vectors(self, vec: np.ndarray, depth: int, selection: Optional[tuple[np.ndarray, bool]]):
        """The ANN search, exact over a filter's subset when it is small (its stored vectors), else
        through a bitmap selector (of the ids kept, or of the ids removed when the filter keeps most)
        with the tuned search widened as the filter narrows: the k allowed neighbours are the ~k/f
        nearest overall (measured in benchmarks/ann_scale.py: 1 + log10(1/f) keeps filtered recall at
        or above unfiltered from f = 50% down to 2%)."""
        index = self.store.query_vectors()
        if selection is None:
            return index.search(vec[None, :], depth)
        ids, excluded = selection
        kept = index.ntotal - len(ids) if excluded else len(ids)
        widen = 1.0 + float(np.log10(max(1.0, index.ntotal / max(1, kept)))) if index.ntotal else 1.0
        if excluded:
            return index.search(vec[None, :], depth, excluded_ids=ids, widen=widen)
        return index.search(vec[None, :], depth, allowed_ids=ids, stored=self.store.stored_vectors, widen=widen)

    def _rerank_images(self, states: np.ndarray, ids: list[int]) -> dict[int, float]:
        toks = self.store.catalog.tokens(ids, self.store.token_shape())
        have = [i for i in ids if toks.get(i) is not None]
        if not have:
            return {}
        scores = self.store.reranker().score_text_to_images(states, np.stack([toks[i] for i in have]))
        return dict(zip(have, map(float, scores)))

    # ---- image -> text, text -> text ----------------------------------------------------------
    def search_texts(self, query: Optional[str] = None, images: Sequence[str] = (), k: int = 10,
                     rerank: Optional[bool] = None, rerank_k: int = DEFAULT_RERANK_K,
                     alpha: Optional[float] = None, ids: Sequence[int] = ()) -> list[Hit]:
        k, _, rerank_k, alpha, _ = check_depths(k, 0, rerank_k, alpha, None)
        terms = parse_query(query, images, ids, paths=self.allow_paths)
        cat = self.store.catalog
        if cat.count_texts() == 0:
            raise EmptyIndexError(f"index {self.store.dir} holds no texts (run `mmsearch texts add FILE`)")
        single_image = len(terms) == 1 and terms[0].text is None
        if rerank is None:
            rerank = self.store.reranker_info() is not None and single_image
        rerank = bool(rerank and single_image and self.store.reranker_info() is not None)
        if rerank:
            vec, qtoks = self._image_embedding(terms[0].image, self.store.token_grid(), terms[0].image_id,
                                               terms[0].pixels)
        else:
            vec, qtoks = self.embed(terms)[0], None
        depth = max(k, rerank_k) if rerank else k
        scores, ids = self.store.text_vectors().search(np.asarray(vec, np.float32)[None, :], depth)
        pairs = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
        itm = self._rerank_texts(qtoks, [i for i, _ in pairs]) if rerank and pairs else {}
        hits = order_hits(pairs, itm, self._alpha(alpha, "image_to_text") if itm else 0.0)[:k]
        rows = {r["id"]: r for r in cat.text_rows([i for i, *_ in hits])}
        return [Hit(rank=n + 1, score=final, id=i, similarity=sim, itm=logit, text=rows[i]["text"], row=rows[i])
                for n, (i, final, sim, logit) in enumerate(hits) if i in rows]

    def _alpha(self, alpha: Optional[float], direction: str) -> float:
        return self.store.reranker().alpha[direction] if alpha is None else alpha

    def _rerank_texts(self, image_tokens: np.ndarray, ids: list[int]) -> dict[int, float]:
        states = self.store.catalog.text_states(ids, int(self.store.meta["text_width"]))
        missing = [i for i in ids if states.get(i) is None]
        if missing:  # texts added before the re-ranker was enabled: compute their states now
            rows = {r["id"]: r["text"] for r in self.store.catalog.text_rows(missing)}
            _, st = self.store.text_encoder().encode_texts([rows[i] for i in missing], return_states=True)
            states.update(zip(missing, st))
        scores = self.store.reranker().score_image_to_texts(image_tokens, [states[i] for i in ids])
        return dict(zip(ids, map(float, scores)))


def timed_search(searcher: Searcher, *args, **kwargs):
    t = time.perf_counter()
    hits = searcher.search(*args, **kwargs)
    return hits, (time.perf_counter() - t) * 1000
