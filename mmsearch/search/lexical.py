"""The words side of a query: which words it asks for, the FTS5 expression that finds them, how much of
the query an image's words cover, and where in the image's text they were found (offsets, OCR boxes).

Grammar: `"invoice 2023" beach` — a quoted phrase must appear (its words next to each other, in that
order); unquoted words are optional and rank. A run of Chinese or Japanese characters is a phrase of
single characters (the index sets them apart, storage/words.py). Very common English words ("a",
"the", "of") are dropped from the optional words, so a description of a scene does not match every
page of text that contains "a".
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from mmsearch.storage.words import find_phrase, find_words, fold, is_cjk, query_words

QUOTES = re.compile(r'["\u201c\u201d\u201e\u00ab\u00bb]([^"\u201c\u201d\u201e\u00ab\u00bb]*)["\u201c\u201d\u201e\u00ab\u00bb]')
STOPWORDS = frozenset("""a an and are as at be by for from has have in into is it its of on or that the their this to
was were with without photo photos picture image images""".split())
MIN_COVERAGE = 0.5  # an image's words must cover at least half of the optional words of the query


def units(text: str) -> list[list[str]]:
    """The words of unquoted text, CJK runs kept together as one unit (a phrase of characters)."""
    out: list[list[str]] = []
    for w in re.findall(r"[^\W_]+", text):
        run: list[str] = []
        for piece in query_words(w):
            if len(piece) == 1 and is_cjk(piece):
                run.append(piece)
                continue
            if run:
                out.append(run)
                run = []
            out.append([piece])
        if run:
            out.append(run)
    return out


@dataclass
class LexicalQuery:
    phrases: list = field(default_factory=list)  # required: each a list of words
    words: list = field(default_factory=list)  # optional units: each a list of words (one, or a CJK run)

    @property
    def empty(self) -> bool:
        return not (self.phrases or self.words)

    def match(self) -> Optional[str]:
        """The FTS5 MATCH expression; None when there is nothing to match."""
        req = [_phrase(p) for p in self.phrases]
        opt = [_phrase(u) for u in self.words]
        if not req and not opt:
            return None
        if not req:
            return " OR ".join(opt)
        expr = " AND ".join(req)
        # the optional words join an OR that the required phrases already satisfy: they do not filter,
        # but bm25 counts them, so an image with the phrase *and* the words ranks first
        return expr if not opt else f"({expr}) AND ({' OR '.join(req + opt)})"

    def unit_matches(self) -> list[str]:
        """One MATCH expression per optional unit (to count how many of them an image's words cover)."""
        return [_phrase(u) for u in self.words]

    def required_match(self) -> Optional[str]:
        return " AND ".join(_phrase(p) for p in self.phrases) or None

    def spans(self, text: str) -> list[list[int]]:
        """[start, end] offsets in `text` of every phrase and word of the query found there."""
        found = set()
        for p in self.phrases:
            found.update(find_phrase(text, p))
        for u in self.words:
            found.update(find_phrase(text, u) if len(u) > 1 else find_words(text, u))
        return [list(s) for s in sorted(found)]


def _phrase(words: list[str]) -> str:
    return '"' + " ".join(w.replace('"', '""') for w in words) + '"'


def parse_lexical(texts: list[str]) -> LexicalQuery:
    """The words side of the positive text terms of a query."""
    q = LexicalQuery()
    for text in texts:
        rest = QUOTES.sub(lambda m: (q.phrases.append([w for u in units(m.group(1)) for w in u]) or " "), text)
        q.words.extend(units(rest))
    q.phrases = [p for p in q.phrases if p]
    content = [u for u in q.words if not (len(u) == 1 and fold(u[0]) in STOPWORDS)]
    q.words = content if content or q.phrases else q.words
    seen, uniq = set(), []
    for u in q.words:
        key = tuple(fold(w) for w in u)
        if key not in seen:
            seen.add(key)
            uniq.append(u)
    q.words = uniq
    return q


def strip_quotes(text: str) -> str:
    """The text the dense side embeds: the query without its quote marks."""
    return " ".join(QUOTES.sub(lambda m: " " + m.group(1) + " ", text).replace('"', " ").split())


def matches(q: LexicalQuery, path: str, lines: list[dict], meta: dict) -> list[dict]:
    """Where the query's words are in one image: OCR lines (with their box), the file name, metadata."""
    import os

    out = []
    for ln in lines:
        s = q.spans(ln["text"])
        if s:
            out.append({"field": "ocr", "line": ln["line"], "text": ln["text"], "spans": s, "box": ln["box"],
                        "score": ln["score"]})
    name = os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))
    s = q.spans(name)
    if s:
        out.append({"field": "name", "text": name, "spans": s})
    for key, v in (meta or {}).items():
        text = ", ".join(v) if isinstance(v, list) else str(v)
        s = q.spans(text)
        if s:
            out.append({"field": "meta", "key": key, "text": text, "spans": s})
    return out
