"""The text tower in numpy, so a text query never imports torch or open_clip (2 s + 4.5 s here).

At index time `export_text_tower` writes the weights of open_clip's CLIP text transformer as
one memory-mapped float32 file (an offset table in meta.json) plus the BPE merges; at query time `NumpyTextTower` tokenises exactly as
open_clip's SimpleTokenizer and runs the same pre-LN causal transformer over the real tokens only.
tests/test_textnp.py proves token ids and embeddings equal open_clip's.
"""
from __future__ import annotations

import functools
import html
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import CheckpointError, UnknownModelError
from .exported import read_export_meta, write_export

DIR_NAME = "text_tower"
FORMAT = "mmsearch-text-tower-2"
WEIGHTS = "weights.f32"


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
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).strip().lower()


class BPETokenizer:
    def __init__(self, merges: Sequence[str], context_length: int):
        import regex

        # Ranks keyed by the merge line itself ("a b"): no 49k tuples to build, so a fresh query
        # process pays ~10 ms here instead of ~120 ms. Byte-level symbols never contain a space.
        merges = [m for m in merges if m]
        vocab = list(_bytes_to_unicode().values())
        vocab = vocab + [v + "</w>" for v in vocab] + [m.replace(" ", "") for m in merges]
        vocab += ["<start_of_text>", "<end_of_text>"]
        self.encoder = dict(zip(vocab, range(len(vocab))))
        self.ranks = dict(zip(merges, range(len(merges))))
        self.sot, self.eot = self.encoder["<start_of_text>"], self.encoder["<end_of_text>"]
        self.context_length = context_length
        self.cache: dict = {}
        self.pat = regex.compile(r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                 regex.IGNORECASE)

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
            if best[0] + " " + best[1] not in self.ranks:
                break
            first, second = best
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

    def encode(self, text: str) -> list[int]:
        """Token ids with SOT/EOT, truncated to the context length (EOT kept last), unpadded."""
        be = _bytes_to_unicode()
        ids = [self.sot]
        for tok in self.pat.findall(_clean(text)):
            ids.extend(self.encoder[p] for p in self._bpe("".join(be[b] for b in tok.encode("utf-8"))))
        ids.append(self.eot)
        if len(ids) > self.context_length:
            ids = ids[: self.context_length]
            ids[-1] = self.eot
        return ids


def _merges_from_open_clip() -> list[str]:
    import gzip

    import open_clip.tokenizer as tk

    lines = gzip.open(tk.default_bpe()).read().decode("utf-8").split("\n")
    return lines[1:49152 - 256 - 2 + 1]


# ---- export ---------------------------------------------------------------------------------------
def export_text_tower(encoder, out_dir) -> Path:
    """Write `out_dir/text_tower/` (weights, merges, meta). Runs at index time (torch loaded)."""
    import torch

    m = encoder.model
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection", "attn_mask")
    if not all(hasattr(m, a) for a in needed) or getattr(m, "text_pool_type", "argmax") != "argmax" \
            or type(encoder.tokenizer).__name__ != "SimpleTokenizer":
        raise UnknownModelError(f"{encoder.arch}: the numpy text path supports CLIP-style text towers only")
    blocks = m.transformer.resblocks
    act = "quick_gelu" if type(blocks[0].mlp.gelu).__name__ == "QuickGELU" else "gelu"
    if act == "gelu" and getattr(blocks[0].mlp.gelu, "approximate", "none") != "none":
        raise UnknownModelError(f"{encoder.arch}: tanh-approximate GELU is not supported by the numpy text path")
    arrays = {"token_embedding": m.token_embedding.weight, "positional_embedding": m.positional_embedding,
              "ln_final_w": m.ln_final.weight, "ln_final_b": m.ln_final.bias}
    proj = m.text_projection
    arrays["text_projection"] = proj.weight.T if isinstance(proj, torch.nn.Linear) else proj
    if isinstance(proj, torch.nn.Linear) and proj.bias is not None:
        arrays["text_projection_b"] = proj.bias
    for i, b in enumerate(blocks):
        if type(b.ls_1).__name__ != "Identity" or type(getattr(b, "ln_attn", torch.nn.Identity())).__name__ != "Identity":
            raise UnknownModelError(f"{encoder.arch}: layer scale / extra norms are not supported by the numpy text path")
        for name, t in (("ln1_w", b.ln_1.weight), ("ln1_b", b.ln_1.bias), ("in_w", b.attn.in_proj_weight),
                        ("in_b", b.attn.in_proj_bias), ("out_w", b.attn.out_proj.weight),
                        ("out_b", b.attn.out_proj.bias), ("ln2_w", b.ln_2.weight), ("ln2_b", b.ln_2.bias),
                        ("fc_w", b.mlp.c_fc.weight), ("fc_b", b.mlp.c_fc.bias), ("proj_w", b.mlp.c_proj.weight),
                        ("proj_b", b.mlp.c_proj.bias)):
            arrays[f"{i}.{name}"] = t.T if name.endswith(("in_w", "out_w", "fc_w", "proj_w")) else t
    def fill(tmp: Path) -> dict:
        # one file, one mmap: a fresh query process opens it once instead of ~150 .npy files
        table, offset = {}, 0
        with open(tmp / WEIGHTS, "wb") as fh:
            for name, t in arrays.items():
                a = np.ascontiguousarray(t.detach().float().numpy())
                fh.write(a.tobytes())
                table[name] = [offset, list(a.shape)]
                offset += a.size
        (tmp / "merges.txt").write_text("\n".join(_merges_from_open_clip()), encoding="utf-8")
        return {"format": FORMAT, "fingerprint": encoder.fingerprint, "layers": len(blocks),
                "heads": blocks[0].attn.num_heads, "act": act, "eps": m.ln_final.eps,
                "context_length": int(m.positional_embedding.shape[0]), "dim": encoder.dim, "arrays": table,
                "floats": offset}

    return write_export(out_dir, DIR_NAME, fill)


# ---- forward --------------------------------------------------------------------------------------
def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _erf(x):
    # numpy has no erf; Numerical Recipes' erfc approximation has a relative error below 1.2e-7
    z = np.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    r = t * np.exp(-z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))))
    return np.where(x >= 0, 1.0 - r, r - 1.0)


class NumpyTextTower:
    def __init__(self, directory: Path, meta: dict):
        self.dir = directory
        self.meta = meta
        self.fingerprint = meta["fingerprint"]
        self.context_length = meta["context_length"]
        self.dim = meta["dim"]
        self._w: dict = {}
        self._tok = None

    @classmethod
    def load(cls, index_dir) -> "NumpyTextTower":
        d = Path(index_dir) / DIR_NAME
        meta = read_export_meta(index_dir, DIR_NAME, FORMAT)
        return cls(d, meta)

    def w(self, name: str) -> np.ndarray:
        if not self._w:
            try:
                flat = np.memmap(self.dir / WEIGHTS, dtype=np.float32, mode="r")
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"numpy text tower {self.dir} is damaged ({exc})") from exc
            if flat.size != self.meta["floats"]:
                raise CheckpointError(f"numpy text tower {self.dir} is damaged ({WEIGHTS} holds {flat.size} "
                                      f"floats, expected {self.meta['floats']})")
            for key, (offset, shape) in self.meta["arrays"].items():
                self._w[key] = flat[offset: offset + int(np.prod(shape))].reshape(shape)
        return self._w[name]

    @property
    def tokenizer(self) -> BPETokenizer:
        if self._tok is None:
            merges = (self.dir / "merges.txt").read_text(encoding="utf-8").split("\n")
            self._tok = BPETokenizer(merges, self.context_length)
        return self._tok

    def encode(self, texts: Sequence[str]):
        """(L2-normalised embeddings [n,d], token states per text [len_i, width]) like Encoder.encode_texts."""
        from threadpoolctl import threadpool_limits

        # a query is a few tokens: BLAS threads only add hand-off cost, and spin badly when cores are busy
        with threadpool_limits(1, user_api="blas"):
            return self._encode(texts)

    def _encode(self, texts: Sequence[str]):
        ids = [self.tokenizer.encode(t) for t in texts]
        L = max(len(i) for i in ids)
        tokens = np.zeros((len(ids), L), dtype=np.int64)
        for r, i in enumerate(ids):
            tokens[r, : len(i)] = i
        x = np.asarray(self.w("token_embedding"))[tokens] + self.w("positional_embedding")[:L]
        # causal attention: padding after a text's EOT cannot influence its real tokens
        mask = np.triu(np.full((L, L), -np.inf, dtype=np.float32), 1)
        H, eps = self.meta["heads"], self.meta["eps"]
        for i in range(self.meta["layers"]):
            g = lambda n: self.w(f"{i}.{n}")
            h = _layer_norm(x, g("ln1_w"), g("ln1_b"), eps)
            qkv = h @ g("in_w") + g("in_b")
            B, _, W3 = qkv.shape
            q, k, v = np.split(qkv.reshape(B, L, 3, H, W3 // 3 // H).transpose(2, 0, 3, 1, 4), 3)
            att = (q[0] @ k[0].transpose(0, 1, 3, 2)) / np.sqrt(q.shape[-1]) + mask
            att = np.exp(att - att.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            o = (att @ v[0]).transpose(0, 2, 1, 3).reshape(B, L, -1)
            x = x + o @ g("out_w") + g("out_b")
            h = _layer_norm(x, g("ln2_w"), g("ln2_b"), eps) @ g("fc_w") + g("fc_b")
            if self.meta["act"] == "quick_gelu":
                h = h / (1.0 + np.exp(-1.702 * h))
            else:
                h = 0.5 * h * (1.0 + _erf(h / np.sqrt(2.0)))
            x = x + h @ g("proj_w") + g("proj_b")
        states = _layer_norm(x, self.w("ln_final_w"), self.w("ln_final_b"), eps).astype(np.float32)
        eot = [len(i) - 1 for i in ids]
        pooled = states[np.arange(len(ids)), eot] @ self.w("text_projection")
        if "text_projection_b" in self.meta["arrays"]:
            pooled = pooled + self.w("text_projection_b")
        pooled = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
        return pooled.astype(np.float32), [states[r, : len(i)] for r, i in enumerate(ids)]
