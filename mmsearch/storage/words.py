"""Words for the lexical index: one splitter for what is indexed and what is searched, and the matcher
that finds a query's words in the stored text (offsets into the text as it was read).

SQLite's FTS5 `unicode61` tokenizer splits on anything that is not a letter or digit and folds case and
diacritics; it does not split Chinese or Japanese, which have no spaces. So before text reaches FTS5,
every CJK character is set apart as a word of its own (a query "发票" is then the phrase "发 票": the two
characters next to each other), and file names are split at camelCase and letter/digit boundaries
(`IMG_2023invoiceScan.png` -> img 2023 invoice scan png).
"""
from __future__ import annotations

import re
import unicodedata
from typing import Iterator

# Han, Hiragana, Katakana, Hangul (syllables and jamo), CJK punctuation and full-width forms
_CJK = re.compile(r"([\u3040-\u30ff\u3100-\u312f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
                  r"\u1100-\u11ff\U00020000-\U0002fa1f])")
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Za-z])(?=[0-9])|(?<=[0-9])(?=[A-Za-z])")
_WORD = re.compile(r"[^\W_]+")


def is_cjk(ch: str) -> bool:
    return bool(_CJK.fullmatch(ch))


def spaced(text: str) -> str:
    """Text as FTS5 should see it: every CJK character a word of its own."""
    return _CJK.sub(r" \1 ", text) if text else ""


def name_words(path: str, parts: int = 3) -> str:
    """The words of a file's name and of the folders above it (the last `parts` path components), for
    the lexical index: camelCase and letter/digit runs split, the extension kept as a word."""
    comps = [c for c in re.split(r"[\\/]+", path) if c][-parts:]
    return spaced(" ".join(_CAMEL.sub(" ", c) for c in comps))


def query_words(text: str) -> list[str]:
    """The words a query piece is made of, as the index splits them (CJK characters one by one)."""
    out = []
    for w in _WORD.findall(text):
        out.extend(t for t in _CJK.split(w) if t and not t.isspace())
    return out


def fold(text: str) -> str:
    """Case and diacritics folded, one output character per input character (so offsets carry over)."""
    if text.isascii():
        return text.lower()
    out = []
    for ch in text:
        base = unicodedata.normalize("NFKD", ch)
        base = "".join(c for c in base if not unicodedata.combining(c)) or ch
        out.append(base[0].lower() if len(base) >= 1 else ch)
    return "".join(out)


def word_pattern(word: str) -> "re.Pattern | None":
    """The pattern of one query word in folded text: a whole word (CJK: anywhere), as FTS5 matches it."""
    fw = fold(word)
    if not fw:
        return None
    if all(is_cjk(c) for c in fw):
        return re.compile(re.escape(fw))
    return re.compile(r"(?<![^\W_])" + re.escape(fw) + r"(?![^\W_])")


def phrase_pattern(words: list[str]) -> "re.Pattern | None":
    """The pattern of words that follow one another in folded text (separated by non-word characters
    only, or nothing between CJK characters): a quoted phrase as FTS5 matches it."""
    if not words:
        return None
    parts = []
    for i, w in enumerate(words):
        fw = re.escape(fold(w))
        if i:
            cjk_join = is_cjk(fold(words[i - 1])[-1:] or "a") and is_cjk(fold(w)[:1] or "a")
            parts.append(r"[\W_]*" if cjk_join else r"[\W_]+")
        parts.append(fw)
    if all(is_cjk(c) for w in words for c in fold(w)):
        return re.compile("".join(parts))
    return re.compile(r"(?<![^\W_])" + "".join(parts) + r"(?![^\W_])")


def find_words(text: str, words: list[str]) -> Iterator[tuple[int, int]]:
    """(start, end) offsets in `text` of each query word found there as a whole word (CJK: anywhere),
    case- and diacritic-insensitive, as FTS5 matched it."""
    folded = fold(text)
    seen = set()
    for w in words:
        pat = word_pattern(w)
        if pat is None:
            continue
        for m in pat.finditer(folded):
            if m.span() not in seen:
                seen.add(m.span())
                yield m.span()


def find_phrase(text: str, words: list[str]) -> Iterator[tuple[int, int]]:
    """(start, end) of each place where `words` follow one another: phrase_pattern in `text`."""
    pat = phrase_pattern(words)
    if pat is None:
        return
    for m in pat.finditer(fold(text)):
        yield m.span()
