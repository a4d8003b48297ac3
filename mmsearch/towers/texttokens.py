"""Tokenizers for the numpy text tower, equal to open_clip's: its SimpleTokenizer (byte-level BPE,
clean='lower') in plain Python, and Hugging Face tokenizers run by the `tokenizers` package; neither
imports torch. tests/test_towers_textnp.py checks their ids against open_clip's.
"""
from __future__ import annotations

import functools
from typing import Sequence

# ---- tokenizer: a faithful copy of open_clip's SimpleTokenizer (clean='lower') --------------------
@functools.lru_cache()
def _bytes_to_unicode() -> dict:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _clean(text: str) -> str:
    if not text.isascii() or "&" in text or not text.isprintable():
        import ftfy  # only needed for text ASCII-clean would not leave unchanged

        text = ftfy.fix_text(text)
    if "&" in text:  # html.entities is a 2,000-entry table: imported only for text that may hold one
        import html

        text = html.unescape(html.unescape(text))
    return " ".join(text.strip().split()).strip().lower()


class BPETokenizer:
    # open_clip's pattern needs `regex` (\p{L}, \p{N}); on printable ASCII they are [a-z], [0-9] and \s the
    # space, so `re` finds the same words and a query skips importing `regex` (tests/test_towers_textnp.py)
    PATTERN = r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    ASCII_PATTERN = r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+"""

    def __init__(self, merges: Sequence[str], context_length: int, ids_by_rank: bool = False):
        import re

        # Ranks keyed by the merge line itself ("a b"): no 49k tuples to build. The vocabulary is the 256
        # byte symbols, the same with "</w>", then each merge's joined result in rank order, then SOT and
        # EOT. Where those joined results are all distinct (checked at export: `ids_by_rank`), a merged
        # symbol's id is 512 + the rank of the merge that made it, so the 49k-entry encoder dict that
        # open_clip builds (~15 ms of a fresh query process) is never built.
        merges = [m for m in merges if m]
        self.ranks = dict(zip(merges, range(len(merges))))
        self._byte_id = {c: i for i, c in enumerate(_bytes_to_unicode().values())}
        self.sot, self.eot = 512 + len(merges), 513 + len(merges)
        self._specials = {"<start_of_text>": self.sot, "<end_of_text>": self.eot}
        self._merged_id: dict = {}  # merged symbol -> id, filled as merges are applied (ids_by_rank)
        self.encoder = None if ids_by_rank else _vocab_ids(merges)
        self.context_length = context_length
        self.cache: dict = {}
        self.ascii_pat = re.compile(self.ASCII_PATTERN, re.IGNORECASE | re.ASCII)
        self._pat = None

    def words(self, cleaned: str) -> list[str]:
        """The pre-tokenised words of cleaned text: `re` on printable ASCII, open_clip's `regex` otherwise."""
        if cleaned.isascii() and cleaned.isprintable():
            return self.ascii_pat.findall(cleaned)
        if self._pat is None:
            import regex

            self._pat = regex.compile(self.PATTERN, regex.IGNORECASE)
        return self._pat.findall(cleaned)

    def _bpe(self, token: str) -> list[str]:
        if token in self.cache:
            return self.cache[token]
        if token in ("<start_of_text>", "<end_of_text>"):
            return [token]
        word = list(token[:-1]) + [token[-1] + "</w>"]
        inf = len(self.ranks)
        while len(word) > 1:
            # the lowest-ranked adjacent pair is merged everywhere it occurs, as open_clip does
            best = min(zip(word, word[1:]), key=lambda p: self.ranks.get(p[0] + " " + p[1], inf))
            rank = self.ranks.get(best[0] + " " + best[1])
            if rank is None:
                break
            first, second = best
            if self.encoder is None:
                self._merged_id.setdefault(first + second, 512 + rank)
            new, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    new.append(first + second)
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = new
        self.cache[token] = word
        return word

    def _id(self, symbol: str) -> int:
        if self.encoder is not None:
            return self.encoder[symbol]
        if len(symbol) == 1:
            return self._byte_id[symbol]
        if len(symbol) == 5 and symbol.endswith("</w>"):  # a merged symbol with "</w>" has 6 or more
            return 256 + self._byte_id[symbol[0]]
        return self._specials.get(symbol) or self._merged_id[symbol]

    def encode(self, text: str) -> list[int]:
        """Token ids with SOT/EOT, truncated to the context length (EOT kept last), unpadded."""
        be = _bytes_to_unicode()
        ids = [self.sot]
        for tok in self.words(_clean(text)):
            ids.extend(map(self._id, self._bpe("".join(be[b] for b in tok.encode("utf-8")))))
        ids.append(self.eot)
        if len(ids) > self.context_length:
            ids = ids[: self.context_length]
            ids[-1] = self.eot
        return ids


def _vocab_ids(merges: Sequence[str]) -> dict:
    """open_clip's encoder dict: symbol -> id (a repeated symbol keeps its last id, as a dict does)."""
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + [m.replace(" ", "") for m in merges]
    vocab += ["<start_of_text>", "<end_of_text>"]
    return dict(zip(vocab, range(len(vocab))))


def ids_by_rank_hold(merges: Sequence[str]) -> bool:
    """Whether every symbol of the vocabulary is distinct, so an id follows from a merge's rank."""
    merges = [m for m in merges if m]
    return len(_vocab_ids(merges)) == 514 + len(merges)


def _canonicalize(text: str) -> str:
    # open_clip's canonicalize_text (from big_vision): no punctuation, lower case, single spaces
    import string

    text = text.replace("_", " ").translate(str.maketrans("", "", string.punctuation)).lower()
    return " ".join(text.split()).strip()


def _hf_clean(text: str, mode: str) -> str:
    """open_clip's HFTokenizer cleaning: ftfy + html unescape + strip, then whitespace/lower/canonicalize."""
    import ftfy

    import html

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    if mode == "canonicalize":
        return _canonicalize(text)
    text = " ".join(text.split()).strip()
    return text.lower() if mode == "lower" else text


class HFTokenizer:
    """open_clip's HFTokenizer (standard mode) on the `tokenizers` package: same ids, no torch, no transformers."""

    def __init__(self, tokenizer_json: str, context_length: int, clean: str, pad_id: int,
                 strip_sep_id: int | None):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_str(tokenizer_json)
        self.tok.no_padding()
        self.tok.enable_truncation(max_length=context_length)
        self.context_length, self.clean, self.pad_id, self.strip_sep_id = context_length, clean, pad_id, strip_sep_id

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(_hf_clean(text, self.clean)).ids
        if self.strip_sep_id is not None:
            ids = [0 if i == self.strip_sep_id else i for i in ids]
        return ids


CLEAN_NAMES = {"_clean_canonicalize": "canonicalize", "_clean_lower": "lower", "_clean_whitespace": "whitespace"}


def open_clip_merges() -> list[str]:
    """The merges open_clip's SimpleTokenizer uses (its bundled BPE file, cut as it cuts it)."""
    import gzip

    import open_clip.tokenizer as tk

    lines = gzip.open(tk.default_bpe()).read().decode("utf-8").split("\n")
    return lines[1:49152 - 256 - 2 + 1]
