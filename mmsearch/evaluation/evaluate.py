"""Embed a caption dataset, compute recall@k both ways (metrics.py), optionally with the fusion
re-ranker and ANN fidelity, and write the report (JSON shape documented in the README)."""
from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import numpy as np

from mmsearch.checks import count, counts, number
from mmsearch.rerank.blend import blend
from mmsearch.datasets.readers import CaptionDataset
from mmsearch.errors import MediaError
from mmsearch.media import load_image
from mmsearch.evaluation.metrics import ann_overlap, image_to_text_ranks, reranked_ranks, summarize, text_to_image_ranks, topk


def embed_dataset(encoder, ds: CaptionDataset, batch_size: int = 64, token_grid: Optional[int] = None,
                  with_states: bool = False, progress: Optional[Callable] = None):
    """(image_emb, text_emb, image_tokens or None, text_states or None)."""
    embs, toks = [], []
    for s in range(0, len(ds.images), batch_size):
        imgs = []
        for p in ds.images[s:s + batch_size]:
            try:
                imgs.append(load_image(p, min_size=encoder.image_size))
            except MediaError:
                raise
        out = encoder.encode_images(imgs, token_grid=token_grid)
        if token_grid:
            embs.append(out[0])
            toks.append(out[1].astype(np.float16))
        else:
            embs.append(out)
        if progress:
            progress(min(len(ds.images), s + batch_size), len(ds.images), stage="images")
    texts, states = [], []
    for s in range(0, len(ds.captions), 256):
        chunk = ds.captions[s:s + 256]
        if with_states:
            e, st = encoder.encode_texts(chunk, return_states=True)
            states.extend(st)
        else:
            e = encoder.encode_texts(chunk)
        texts.append(e)
        if progress:
            progress(min(len(ds.captions), s + 256), len(ds.captions), stage="texts")
    return (np.concatenate(embs), np.concatenate(texts), np.concatenate(toks) if toks else None,
            states if with_states else None)


LATENCY_QUERIES = 32  # queries re-ranked one at a time, as search does, to time it; the rest in groups
QUERY_GROUP = 16


def rerank_candidates(reranker, ds: CaptionDataset, img, txt, toks, states, k: int,
                      plain: Optional[dict] = None) -> dict:
    """Per direction: plain ranks (`plain` if the caller has them), the top-k candidates by similarity,
    their similarities and ITM logits [n,k], and the re-ranker's ms per query (a search's latency:
    the first LATENCY_QUERIES queries are scored one at a time; the others QUERY_GROUP at a time, the
    same logits in fewer passes). Blending them is cheap, so alpha can be chosen afterwards."""
    cap_img = ds.caption_image
    toks = toks.astype(np.float32)
    plain = plain or {"text_to_image": text_to_image_ranks(txt, img, cap_img),
                      "image_to_text": image_to_text_ranks(img, txt, cap_img)}
    directions = {  # queries, gallery, ITM of query q against candidates c, of queries qs against c [n,k], positive
        "text_to_image": (txt, img, lambda q, c: reranker.score_text_to_images(states[q], toks[c]),
                          lambda qs, c: _grouped(reranker, [states[q] for q in qs], toks, c, query_is_text=True),
                          lambda q, c: cap_img[q] == c),
        "image_to_text": (img, txt, lambda q, c: reranker.score_image_to_texts(toks[q], [states[i] for i in c]),
                          lambda qs, c: _grouped(reranker, states, toks[qs], c, query_is_text=False),
                          lambda q, c: cap_img[c] == q),
    }
    out = {}
    for d, (queries, gallery, score, score_group, is_positive) in directions.items():
        cands, sims = topk(queries, gallery, k)
        logits = np.zeros(cands.shape, np.float32)
        timed = min(len(queries), LATENCY_QUERIES)
        t = time.perf_counter()
        for q in range(timed):
            logits[q] = score(q, cands[q])
        ms = (time.perf_counter() - t) * 1000 / max(1, timed)
        for start in range(timed, len(queries), QUERY_GROUP):
            qs = np.arange(start, min(start + QUERY_GROUP, len(queries)))
            logits[qs] = score_group(qs, cands[qs])
        out[d] = dict(plain=plain[d], cands=cands, sims=sims, logits=logits, ms=ms, is_positive=is_positive)
    return out


def _grouped(reranker, query_side, other_side, cands: np.ndarray, query_is_text: bool) -> np.ndarray:
    """Several queries' candidates [g,k] in one pass: query i's row pairs with each of its candidates;
    a candidate shared by several queries is read once."""
    used, inverse = np.unique(cands, return_inverse=True)
    query_rows = np.repeat(np.arange(len(cands)), cands.shape[1])
    if query_is_text:  # query_side: the queries' text states; other_side: every image's tokens
        logits = reranker.score_pairs(query_side, other_side[used], query_rows, inverse.reshape(-1))
    else:  # query_side: every caption's states; other_side: the queries' image tokens
        logits = reranker.score_pairs([query_side[i] for i in used], other_side, inverse.reshape(-1), query_rows)
    return logits.reshape(cands.shape)


def reranked(c: dict, alpha: float) -> np.ndarray:
    """Ranks after re-ranking one direction's candidates (from rerank_candidates) by the blended score."""
    return reranked_ranks(c["plain"], c["cands"], blend(c["logits"], c["sims"], alpha), c["is_positive"])


ALPHA_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 1.0)


def fit_alpha(cands: dict) -> dict:
    """Per direction, the blend with the best R@1 (then mean rank; then less similarity) on these
    candidates, normally the validation split's. alpha 1 is the dual encoder's own order, so a fitted
    blend is never worse than the dual encoder on the data it was fitted on: a weak re-ranker leans on
    the similarity instead of overriding it."""
    out = {}
    for d, c in cands.items():
        def key(a):
            m = summarize(reranked(c, a), (1,))
            return (-m["R@1"], m["mean_rank"], a)
        out[d] = min(ALPHA_GRID, key=key)
    return out


def _rerank_block(reranker, ds, img, txt, toks, states, plain: dict, ks, k, alpha: Optional[float]) -> dict:
    cands = rerank_candidates(reranker, ds, img, txt, toks, states, k, plain)
    alpha_of = {d: reranker.alpha[d] if alpha is None else alpha for d in cands}
    return {**{d: summarize(reranked(c, alpha_of[d]), ks) for d, c in cands.items()}, "rerank_k": k,
            "alpha": alpha_of, "ms_per_query": {d: round(c["ms"], 3) for d, c in cands.items()}}


def evaluate(encoder, ds: CaptionDataset, ks: Sequence[int] = (1, 5, 10), reranker=None, rerank_k: int = 32,
             alpha: Optional[float] = None, factory: Optional[str] = None, save_embeddings=None, batch_size: int = 64,
             progress: Optional[Callable] = None) -> dict:
    ks = tuple(counts("ks", ks))
    rerank_k, batch_size = count("rerank_k", rerank_k, optional=False), count("batch_size", batch_size, optional=False)
    alpha = number("alpha", alpha, 0.0, 1.0)
    grid = reranker.token_grid if reranker is not None else None
    img, txt, toks, states = embed_dataset(encoder, ds, batch_size, token_grid=grid,
                                           with_states=reranker is not None, progress=progress)
    t2i = text_to_image_ranks(txt, img, ds.caption_image)
    i2t = image_to_text_ranks(img, txt, ds.caption_image)
    report = {"text_to_image": summarize(t2i, ks), "image_to_text": summarize(i2t, ks),
              "n_images": len(ds.images), "n_captions": len(ds.captions),
              "model": dict(encoder.spec.to_dict(), arch=encoder.arch.split("@")[0], fingerprint=encoder.fingerprint),
              "dataset": ds.source, "split": ds.split, "ks": list(ks)}
    if reranker is not None:
        report["reranked"] = _rerank_block(reranker, ds, img, txt, toks, states,
                                           {"text_to_image": t2i, "image_to_text": i2t}, ks, rerank_k, alpha)
    if factory:
        report["ann"] = _ann_fidelity(factory, img, txt, max(ks))
    if save_embeddings:
        np.savez(save_embeddings, image_ids=np.array(ds.images), caption_ids=np.arange(len(ds.captions)),
                 captions=np.array(ds.captions), caption_image=ds.caption_image, image_emb=img, text_emb=txt)
    return report


def _ann_fidelity(factory: str, img: np.ndarray, txt: np.ndarray, k: int) -> dict:
    from mmsearch.storage.vectors import VectorIndex

    out = {"factory": factory, "k": k}
    for name, queries, base in (("text_to_image", txt, img), ("image_to_text", img, txt)):
        kk = min(k, len(base))  # k beyond the candidate count: compare all of them (Flat stays 1.0)
        exact, _ = topk(queries, base, kk)
        index = VectorIndex.build(factory, base.shape[1], np.arange(len(base)), base)
        _, approx = index.search(queries, kk)
        out[f"{name}_overlap@{k}"] = ann_overlap(exact, approx, kk)
    return out


def render_markdown(report: dict) -> str:
    ks = report.get("ks", [1, 5, 10])
    cols = [f"R@{k}" for k in ks] + ["mean_rank", "median_rank"]
    lines = [f"{report['n_images']} images, {report['n_captions']} captions"
             + (f" ({report['split']} split)" if report.get("split") else ""),
             "", "| direction | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    blocks = [("", report)] + ([(" re-ranked", report["reranked"])] if "reranked" in report else [])
    for label, block in blocks:
        for d in ("text_to_image", "image_to_text"):
            vals = [f"{100 * block[d][c]:.1f}" if c.startswith("R@") else f"{block[d][c]:.2f}" for c in cols]
            lines.append(f"| {d.replace('_to_', '→')}{label} | " + " | ".join(vals) + " |")
    if "reranked" in report:
        ms = report["reranked"]["ms_per_query"]
        a = report["reranked"]["alpha"]
        lines.append(f"\nre-ranking top {report['reranked']['rerank_k']}: {ms['text_to_image']:.1f} ms/query "
                     f"text→image, {ms['image_to_text']:.1f} ms/query image→text; score blend alpha "
                     f"{a['text_to_image']:g} / {a['image_to_text']:g}")
    if "ann" in report:
        a = report["ann"]
        lines.append("\nANN fidelity of '{}': ".format(a["factory"]) + ", ".join(
            f"{k} {v:.3f}" for k, v in a.items() if "overlap" in k))
    return "\n".join(lines)
