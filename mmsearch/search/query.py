"""The query layer: parse a query, embed it, search, hydrate rows, filter, re-rank.

A query is a weighted sum of text and image terms, like rclip's: "2:dog + beach - people". A term that
names an existing image file is an image term; an image already in the index reuses its stored
embedding, so image->image search of an indexed photo needs no model at all.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from mmsearch.rerank.blend import blend
from mmsearch.config import IMAGE_EXTENSIONS
from mmsearch.errors import EmptyIndexError, NonFiniteVectorError, QueryError
from mmsearch.search.filters import Filters
from mmsearch.storage.fsnames import display
from mmsearch.storage.schema import check_finite
from mmsearch.storage.store import IndexStore

DEFAULT_RERANK_K = 32
MAX_TERMS = 32  # text, image and id terms of one query
MAX_QUERY_CHARS = 2000  # the text tower reads ~77 tokens a term: more characters only cost parsing
_SPLIT = re.compile(r"(?:^|\s+)([+-])(?:\s+|$)")
_WEIGHT = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*:\s*(.+?)\s*$")


@dataclass(frozen=True)
class Term:
    weight: float
    text: Optional[str] = None
    image: Optional[str] = None
    image_id: Optional[int] = None  # an indexed image by catalog id: its stored embedding, no file read
    pixels: Optional[object] = field(default=None, repr=False, compare=False)  # an image decoded by the caller


@dataclass
class Hit:
    """One result, an image or a text of the corpus (then `text` is set and `path` is None). `row` is the
    catalog row it was hydrated from, so renderers need not read it again."""

    rank: int
    score: float
    id: int
    similarity: float
    itm: Optional[float] = None
    path: Optional[str] = None
    text: Optional[str] = None
    taken_at: Optional[float] = None
    width: Optional[int] = None
    height: Optional[int] = None
    row: Optional[dict] = field(default=None, repr=False, compare=False)

    def __getitem__(self, key: str):
        """hit["text"], as when search_texts returned dicts: scripts written then keep working."""
        return self.to_dict()[key]

    @property
    def kind(self) -> str:
        return "text" if self.text is not None else "image"

    def to_dict(self) -> dict:
        if self.kind == "text":
            return {"rank": self.rank, "score": self.score, "text": self.text, "id": self.id,
                    "similarity": self.similarity, "itm": self.itm}
        d = {"rank": self.rank, "score": self.score, "path": self.path, "id": self.id,
             "similarity": self.similarity, "itm": self.itm}
        d.update((k, v) for k, v in (("taken_at", self.taken_at), ("width", self.width), ("height", self.height))
                 if v is not None)
        return d


def _is_image_path(s: str) -> bool:
    return os.path.splitext(s)[1].lower() in IMAGE_EXTENSIONS and os.path.isfile(s)


def parse_query(query: Optional[str], images: Sequence = (), ids: Sequence[int] = (),
                paths: bool = True) -> list[Term]:
    """'2:dog + beach - people' -> [Term(2,'dog'), Term(1,'beach'), Term(-1,'people')]; --image files (or
    images the caller decoded: PIL images) and indexed image ids add terms. paths=False reads every term
    as text (a server never opens a named path). At most MAX_TERMS terms and MAX_QUERY_CHARS characters:
    each term is one encoder pass, and a query is a request anyone can send to a server."""
    terms: list[Term] = []
    if query and len(query) > MAX_QUERY_CHARS:
        raise QueryError(f"query too long ({len(query):,} characters; at most {MAX_QUERY_CHARS:,})")
    if query and query.strip():
        parts = _SPLIT.split(" " + query.strip())
        signs = ["+"] + parts[1::2]
        for sign, raw in zip(signs, parts[0::2]):
            raw = raw.strip()
            if not raw:
                if sign != "+" or len(parts) > 1:
                    raise QueryError(f"empty term in query {query!r}")
                continue
            if re.match(r"^[+-](\s|$)", raw):
                raise QueryError(f"empty term in query {query!r}")
            weight, body = 1.0, raw
            m = _WEIGHT.match(raw)
            if m:
                weight, body = float(m.group(1)), m.group(2)
                _finite([weight], f"the weight of term {body!r}")
            if sign == "-":
                weight = -weight
            is_path = paths and _is_image_path(body)
            terms.append(Term(weight, image=os.path.abspath(body)) if is_path else Term(weight, text=body))
    for path in images:
        if not isinstance(path, (str, os.PathLike)):  # already decoded (an upload): embedded as it is
            terms.append(Term(1.0, pixels=path))
            continue
        if not os.path.isfile(path):
            raise QueryError(f"query image not found: {path}")
        terms.append(Term(1.0, image=os.path.abspath(path)))
    terms += [Term(1.0, image_id=int(i)) for i in ids]
    if len(terms) > MAX_TERMS:
        raise QueryError(f"too many query terms ({len(terms):,}; at most {MAX_TERMS})")
    if not terms:
        raise QueryError("empty query: give text, an image file, or --image FILE")
    return terms


class Searcher:
    """Answers queries against one index. Keeps models loaded between queries (API and benchmarks)."""

    def __init__(self, store: IndexStore, allow_paths: bool = True):
        self.store = store
        self.allow_paths = allow_paths  # False: query text never names a file (the web server)

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
        from mmsearch.media import load_image

        # the index's own image tower (ONNX, its precision) unless re-ranker tokens need torch
        enc = self.store.image_embedder() if token_grid is None else self.store.encoder()
        img = pixels if pixels is not None else load_image(path, min_size=enc.image_size)
        out = enc.encode_images([img], token_grid=token_grid)
        vec, toks = (out[0][0], out[1][0]) if token_grid else (out[0], None)
        _finite(vec, f"the embedding of image {display(os.path.basename(path))}" if path else
                "the embedding of the uploaded image")
        return vec, toks

    def embed(self, terms: list[Term], want_states: bool = False):
        """(query vector [d], text token states of a single-text query or None)."""
        return embed_terms(terms, self.store.text_encoder, self.store.dim, want_states,
                           lambda t: self._image_embedding(t.image, image_id=t.image_id, pixels=t.pixels)[0])

    # ---- text -> image, image -> image --------------------------------------------------------
    def search(self, query: Optional[str] = None, images: Sequence[str] = (), k: int = 10,
               under: Optional[str] = None, exts: Optional[Sequence[str]] = None, after: Optional[float] = None,
               before: Optional[float] = None, min_score: Optional[float] = None, rerank: Optional[bool] = None,
               rerank_k: int = DEFAULT_RERANK_K, alpha: Optional[float] = None, ids: Sequence[int] = (),
               offset: int = 0, filters: Optional[Filters] = None) -> list[Hit]:
        """Hits offset+1 .. offset+k, kept by `filters` (or the same filters given one by one: under, exts,
        after, before; mmsearch.search.filters parses them). rerank=None re-ranks when the index has a re-ranker and the query is one
        text; alpha=None blends the re-ranker's score with the similarity as fitted when it was trained.
        Re-ranking always re-scores the same top max(k, rerank_k), so pages of one query never overlap."""
        if filters is None:
            filters = Filters.parse(under=under, exts=exts, after=after, before=before)
        terms = parse_query(query, images, ids, paths=self.allow_paths)
        cat = self.store.catalog
        if not cat.has_images():
            raise EmptyIndexError(f"index {self.store.dir} holds no images yet (run `mmsearch index FOLDER`)")
        single_text = len(terms) == 1 and terms[0].text is not None and terms[0].weight > 0
        if rerank is None:
            rerank = self.store.reranker_info() is not None and single_text
        elif rerank and self.store.reranker_info() is None:
            raise QueryError("no re-ranker configured for this index (`mmsearch rerank enable FILE`)")
        rerank = bool(rerank and single_text)
        vec, states = self.embed(terms, want_states=rerank)
        depth = max(offset + k, rerank_k) if rerank else offset + k
        scores, found = self.nearest(vec, depth, filters)
        pairs = [(int(i), float(s)) for i, s in zip(found, scores) if i >= 0]
        itm = {}
        if rerank and pairs:
            itm = self._rerank_images(states, [i for i, _ in pairs[:max(k, rerank_k)]])
        hits = order_hits(pairs, itm, self._alpha(alpha, "text_to_image") if itm else 0.0)[offset:]
        return build_hits(hits, cat.rows([i for i, *_ in hits[:k]]), k, offset, min_score)

    def nearest(self, vec: np.ndarray, depth: int, filters: Optional[Filters] = None):
        """(scores [n], ids [n]) of the `depth` nearest images kept by `filters`, best first (a shard of a
        sharded index answers a router with this)."""
        selection = None
        if filters is not None and filters.active:
            cat = self.store.catalog
            total = self.store.image_vectors().ntotal
            selection = cat.filter_selection(total, filters.under, list(filters.exts) if filters.exts else None,
                                             filters.after, filters.before)
            ids, excluded = selection
            if (len(ids) >= total) if excluded else (len(ids) == 0):
                return np.zeros(0, np.float32), np.zeros(0, np.int64)
        scores, found = self._search_vectors(vec, depth, selection)
        return scores[0], found[0]

    def _search_vectors(self, vec: np.ndarray, depth: int, selection: Optional[tuple[np.ndarray, bool]]):
        """The ANN search, exact over a filter's subset when it is small (its stored vectors), else
        through a bitmap selector (of the ids kept, or of the ids removed when the filter keeps most)
        with the tuned search widened as the filter narrows: the k allowed neighbours are the ~k/f
        nearest overall (measured in benchmarks/ann_scale.py: 1 + log10(1/f) keeps filtered recall at
        or above unfiltered from f = 50% down to 2%)."""
        index = self.store.image_vectors()
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


def embed_terms(terms: list[Term], text_encoder, dim: int, want_states: bool, image_vector):
    """The unit query vector of weighted terms, and the token states of a single-text query (None
    otherwise). `text_encoder()` gives the text tower (called only when there is text), `image_vector(term)`
    the embedding of an image term (a file or an indexed id)."""
    texts = [t for t in terms if t.text is not None]
    vec = np.zeros(dim, np.float32)
    states = None
    if texts:
        enc = text_encoder()
        if want_states:
            emb, st = enc.encode_texts([t.text for t in texts], return_states=True)
            states = st[0] if len(terms) == 1 else None
        else:
            emb = enc.encode_texts([t.text for t in texts])
        with np.errstate(over="ignore", invalid="ignore"):  # checked below, in one line
            for t, e in zip(texts, emb):
                vec += t.weight * e
    for t in terms:
        if t.text is None:  # a file, an indexed id, or pixels decoded by the caller (an upload)
            with np.errstate(over="ignore", invalid="ignore"):
                vec += t.weight * np.asarray(image_vector(t), np.float32)
    _finite(vec, "the query vector (its weights overflow)")
    norm = float(np.linalg.norm(vec))
    if norm < 1e-8:
        raise QueryError("the query terms cancel out; nothing to search for")
    return vec / norm, states


def order_hits(pairs: list[tuple[int, float]], itm: dict[int, float], alpha: float):
    """[(id, final, similarity, itm)] best first. With a re-ranker the final score is the ITM
    probability blended with the embedding similarity (blend.py)."""
    if not itm:
        return [(i, s, s, None) for i, s in pairs]
    scored = []
    for i, s in pairs:
        if i in itm:
            scored.append((i, float(blend(itm[i], s, alpha)), s, itm[i]))
        else:  # no cached tokens: rank after every re-scored candidate
            scored.append((i, s - 10.0, s, None))
    return sorted(scored, key=lambda t: -t[1])


def build_hits(hits, rows: dict, k: int, offset: int, min_score: Optional[float]) -> list[Hit]:
    """Hits from ordered (id, final, similarity, itm) and their catalog rows: at most k, ranked from
    offset + 1, without those under min_score or whose row is gone."""
    out = []
    for i, final, sim, logit in hits:
        if len(out) == k:
            break
        if min_score is not None and final < min_score:
            continue
        r = rows.get(i)
        if r is None:
            continue  # removed by a concurrent indexing run
        out.append(Hit(rank=offset + len(out) + 1, score=final, id=i, similarity=sim, itm=logit, path=r["path"],
                       taken_at=r["taken_at"], width=r["width"], height=r["height"], row=r))
    return out


def _finite(values, what: str) -> None:
    """The shared finite check (mmsearch.storage.schema.check_finite), as a query error: a 400, one line."""
    try:
        check_finite(np.asarray(values, dtype=np.float64), lambda _: what, "value")
    except NonFiniteVectorError as exc:
        raise QueryError(str(exc)) from None


def timed_search(searcher: Searcher, *args, **kwargs):
    t = time.perf_counter()
    hits = searcher.search(*args, **kwargs)
    return hits, (time.perf_counter() - t) * 1000
