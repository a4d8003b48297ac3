"""A query's terms: parse "2:dog + beach - people" and --image files into weighted terms, check a
search's numeric arguments, and embed the terms into one unit query vector.

A query is a request anyone can send to a server: it is bounded (MAX_TERMS terms, MAX_QUERY_CHARS
characters, |weight| <= MAX_WEIGHT) and every vector it makes is checked finite.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from mmsearch.checks import MAX_K, MAX_RERANK_K, count, number
from mmsearch.config import IMAGE_EXTENSIONS
from mmsearch.errors import NonFiniteVectorError, QueryError
from mmsearch.search.lexical import strip_quotes
from mmsearch.storage.schema import check_finite

MAX_TERMS = 32  # text, image and id terms of one query
MAX_QUERY_CHARS = 2000  # the text tower reads ~77 tokens a term: more characters only cost parsing
MAX_WEIGHT = 100.0  # |weight| of one term: past this a term is not "more important", it is a typo or an attack
_SPLIT = re.compile(r"(?:^|\s+)([+-])(?:\s+|$)")
# anything float() reads as a number counts as a weight, so '1e40:red' or 'nan:red' is refused, not read as text
_WEIGHT = re.compile(r"^\s*([-+]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?|inf(?:inity)?|nan))\s*:\s*(.+?)\s*$",
                     re.IGNORECASE)


@dataclass(frozen=True)
class Term:
    weight: float
    text: Optional[str] = None
    image: Optional[str] = None
    image_id: Optional[int] = None  # an indexed image by catalog id: its stored embedding, no file read
    pixels: Optional[object] = field(default=None, repr=False, compare=False)  # an image decoded by the caller


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
                weight, body = check_weight(m.group(1), m.group(2)), m.group(2)
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


def check_weight(text: str, body: str) -> float:
    """A term's weight: a finite number with |w| <= MAX_WEIGHT (float32 sums overflow far below 1e39)."""
    w = float(text)
    if not (np.isfinite(w) and abs(w) <= MAX_WEIGHT):
        shown = text if len(text) <= 24 else text[:20] + "..."
        raise QueryError(f"the weight of term {body!r} ({shown}) is out of range: a weight is a finite number "
                         f"from -{MAX_WEIGHT:g} to {MAX_WEIGHT:g}")
    return w


def check_depths(k, offset, rerank_k, alpha, min_score):
    """The numeric arguments of a search, refused (ArgumentError) outside what the CLI's options allow."""
    return (count("k", k, 1, MAX_K, optional=False), count("offset", offset, 0, optional=False),
            count("rerank_k", rerank_k, 1, MAX_RERANK_K, optional=False), number("alpha", alpha, 0.0, 1.0),
            number("min_score", min_score))


def combine(weighted) -> np.ndarray:
    """sum(w * e) over (weight, embedding) pairs, L2-normalised, summed in float64 so no weight or
    embedding can overflow it; non-finite input or terms that cancel out are a QueryError."""
    vec = None
    for w, e in weighted:
        e = np.asarray(e, np.float64)
        vec = w * e if vec is None else vec + w * e
    if vec is None:
        raise QueryError("empty query: give text, an image file, or --image FILE")
    finite_query(vec, "the query vector (a term's embedding)")
    norm = float(np.linalg.norm(vec))
    if not np.isfinite(norm) or norm < 1e-8:  # norm overflows only past ~1e154 per component
        raise QueryError("the query terms cancel out; nothing to search for" if norm < 1e-8 else
                         "the query vector is too large to normalise")
    return (vec / norm).astype(np.float32)


def embed_terms(terms: list[Term], text_encoder, want_states: bool, image_vector):
    """The unit query vector of weighted terms, and the token states of a single-text query (None
    otherwise). `text_encoder()` gives the text tower (called only when there is text), `image_vector(term)`
    the embedding of an image term (a file, an indexed id, or an upload's decoded pixels). Quote marks are
    for the words side: the text tower reads the words without them."""
    texts = [t for t in terms if t.text is not None]
    weighted = []
    states = None
    if texts:
        enc = text_encoder()
        plain = [strip_quotes(t.text) or t.text for t in texts]
        if want_states:
            emb, st = enc.encode_texts(plain, return_states=True)
            states = st[0] if len(terms) == 1 else None
        else:
            emb = enc.encode_texts(plain)
        weighted += [(t.weight, e) for t, e in zip(texts, emb)]
    for t in terms:
        if t.text is None:
            weighted.append((t.weight, image_vector(t)))
    return combine(weighted), states


def finite_query(values, what: str) -> None:
    """The shared finite check (mmsearch.storage.schema.check_finite), as a query error: a 400, one line."""
    try:
        check_finite(np.asarray(values, dtype=np.float64), lambda _: what, "value")
    except NonFiniteVectorError as exc:
        raise QueryError(str(exc)) from None
