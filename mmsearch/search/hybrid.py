"""One ranked list from two: the dense side (the dual encoder's ANN search) and the words side (FTS5 over
OCR text, file and folder names and typed metadata), fused by reciprocal rank fusion.

RRF (Cormack et al., 2009) scores an item sum_i w_i / (k + rank_i): it needs no calibration between a
cosine similarity and a bm25 score, and an item ranked high by one side and absent from the other
still ranks high. When the words side finds nothing the dense ranking is returned unchanged (fusion
must not hurt a query with no words in the images). The re-ranker re-scores the fused top K: its
order replaces the dense side's inside those K and the two are fused again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

RRF_K = 60  # the constant of the paper; results are insensitive to it in 20..100
FUSE_DEPTH = 100  # candidates each side contributes to the fusion at least
TEXT_DEPTH = 200  # bm25 candidates checked for coverage
MODES = ("dense", "text", "hybrid")
# the words side counts twice: an image whose words match the query outranks the dense side's first pick
# unless the dense side ranks it too (with equal weights the two first picks tied, and a word query's
# R@1 fell from 0.96 text-only to 0.38 hybrid in benchmarks/ocr.py); a query whose words match nothing
# keeps the dense ranking unchanged
WEIGHTS = (1.0, 2.0)


def rrf(rankings: Sequence[Sequence[int]], k: int = RRF_K, weights: Optional[Sequence[float]] = None) -> list[tuple[int, float]]:
    """[(id, fused score)] best first. Ties go to the id ranked best on any side, then the smaller id."""
    weights = weights or [1.0] * len(rankings)
    score: dict[int, float] = {}
    best: dict[int, int] = {}
    for w, ranking in zip(weights, rankings):
        for r, i in enumerate(ranking, 1):
            score[i] = score.get(i, 0.0) + w / (k + r)
            best[i] = min(best.get(i, r), r)
    return sorted(score.items(), key=lambda t: (-t[1], best[t[0]], t[0]))


@dataclass
class Ranked:
    """One fused candidate: its final score, dense similarity (None until known), ITM, words score."""
    id: int
    score: float
    similarity: Optional[float] = None
    itm: Optional[float] = None
    text_score: Optional[float] = None


def text_ranking(cat, q, where: str, args: list, depth: int = TEXT_DEPTH) -> list[tuple[int, float]]:
    """(id, bm25) of the images whose words match the query, best first, keeping only those that cover
    enough of its optional words. With a quoted phrase every match qualifies: the phrase is in the FTS5
    expression, and the optional words only rank."""
    from mmsearch.search.lexical import MIN_COVERAGE

    expr = q.match()
    if expr is None:
        return []
    found = cat.lexical_search(expr, depth, where, args)
    if not found or not q.words or q.phrases:
        return found
    need = MIN_COVERAGE if len(q.words) > 1 else 1.0
    counts = unit_coverage(q, cat.documents([i for i, _ in found]))
    return [(i, s) for i, s in found if counts.get(i, 0) >= need * len(q.words)]


def unit_coverage(q, documents: dict[int, str]) -> dict[int, int]:
    """{id: how many of the query's optional units its indexed words hold}, by the matcher FTS5 agrees
    with (storage/words.py) over the stored documents: one read of the candidates' rows instead of an FTS5
    lookup per unit, which walked each unit's whole doclist (18 ms of a 29 ms hybrid query at 100k)."""
    from mmsearch.storage.words import fold, phrase_pattern, word_pattern

    pats = [p for p in (phrase_pattern(u) if len(u) > 1 else word_pattern(u[0]) for u in q.words) if p is not None]
    out = {}
    for i, text in documents.items():
        folded = fold(text)
        out[i] = sum(1 for p in pats if p.search(folded))
    return out


def fuse(dense: list[tuple[int, float]], text: list[tuple[int, float]], mode: str) -> list[Ranked]:
    """The fused ranking of the two sides ((id, score) best first each)."""
    sims = dict(dense)
    tscore = dict(text)
    if mode == "text":
        return [Ranked(i, s, sims.get(i), None, s) for i, s in text]
    if mode == "dense" or not text:
        return [Ranked(i, s, s) for i, s in dense]
    return [Ranked(i, s, sims.get(i), None, tscore.get(i))
            for i, s in rrf([[i for i, _ in dense], [i for i, _ in text]], weights=WEIGHTS)]


def refuse_reranked(ranked: list[Ranked], reranked: list[int], text: list[tuple[int, float]], top: int,
                    mode: str) -> list[Ranked]:
    """After the re-ranker scored the fused top `top`: its order replaces the dense side's there, fused
    again with the words side's ranks of the same items; the rest keeps its place after them."""
    head, tail = ranked[:top], ranked[top:]
    if mode != "hybrid" or not text:
        by_id = {r.id: r for r in head}
        return [by_id[i] for i in reranked] + tail
    in_head = {r.id for r in head}
    text_ids = [i for i, _ in text if i in in_head]
    by_id = {r.id: r for r in head}
    out = []
    for i, s in rrf([reranked, text_ids], weights=WEIGHTS):
        r = by_id[i]
        out.append(Ranked(i, s, r.similarity, r.itm, r.text_score))
    return out + tail
