"""The text tower in numpy, so a text query never imports torch or open_clip (2 s + 4.5 s here).

At index time `export_text_tower` writes the weights of open_clip's text transformer as one
memory-mapped float32 file (an offset table in meta.json) plus the tokenizer; at query time
`NumpyTextTower` tokenises exactly as open_clip and runs the same pre-LN transformer.

Families: CLIP (causal, EOT pooling: runs over the real tokens only), MobileCLIP (bidirectional, so
the padded context is run as torch does), SigLIP / SigLIP 2 (bidirectional, last-token pooling, a
Hugging Face tokenizer run by the `tokenizers` package, which needs no torch). Hugging Face text
towers (XLM-R, NLLB) are not exported: `text_path_for_config` says so and the store falls back to
torch with a notice. The export checks itself: the numpy embedding of probe texts must equal
torch's, or nothing is written (tests/test_towers_textnp.py, tests/test_towers_families.py).
"""
from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from mmsearch.errors import CheckpointError, UnknownModelError
from mmsearch.towers.exported import read_export_meta, write_export
from mmsearch.towers.texttokens import CLEAN_NAMES, BPETokenizer, HFTokenizer, ids_by_rank_hold, open_clip_merges

DIR_NAME = "text_tower"
FORMAT = "mmsearch-text-tower-2"
WEIGHTS = "weights.f32"


def text_path_for_config(cfg: dict) -> tuple[str, str | None]:
    """('numpy', None) when a text query of this open_clip config can run without torch, else
    ('torch', why). The export's probe check has the last word; this is what `mmsearch models` shows."""
    t = cfg.get("text_cfg", {})
    if t.get("hf_model_name"):
        return "torch", f"Hugging Face text tower ({t['hf_model_name']})"
    if "multimodal_cfg" in cfg or t.get("embed_cls"):
        return "torch", "CoCa text tower"
    if t.get("pool_type", "argmax") not in ("argmax", "last", "first") or t.get("ls_init_value") \
            or t.get("tokenizer_mode") or t.get("block_type") or t.get("use_pad_mask"):
        return "torch", "text tower variant without a numpy port"
    return "numpy", None


# ---- export ---------------------------------------------------------------------------------------
def _text_module(model):
    """CLIP keeps its text tower's parts on the model itself; CustomTextCLIP (SigLIP, MobileCLIP) in .text."""
    text = getattr(model, "text", None)
    return text if text is not None and hasattr(text, "token_embedding") else model


def _tokenizer_meta(encoder) -> dict:
    tok = encoder.tokenizer
    kind = type(tok).__name__
    if kind == "SimpleTokenizer":
        return {"tokenizer": "bpe"}
    backend = getattr(getattr(tok, "tokenizer", None), "backend_tokenizer", None)
    clean = CLEAN_NAMES.get(getattr(getattr(tok, "clean_fn", None), "__name__", ""))
    if kind != "HFTokenizer" or backend is None or clean is None or getattr(tok, "tokenizer_mode", ""):
        raise UnknownModelError(f"{encoder.arch}: its tokenizer ({kind}) has no numpy port")
    hf = tok.tokenizer
    return {"tokenizer": "hf", "clean": clean, "pad_id": int(hf.pad_token_id or 0),
            "strip_sep_id": int(hf.sep_token_id) if tok.strip_sep_token and hf.sep_token_id is not None else None,
            "tokenizer_json": backend.to_str()}


def export_text_tower(encoder, out_dir) -> Path:
    """Write `out_dir/text_tower/` (weights, tokenizer, meta). Runs at index time (torch loaded).
    Raises UnknownModelError (nothing written) for a tower the numpy path cannot run exactly."""
    import torch

    path, why = text_path_for_config(encoder.model_cfg)
    if path != "numpy":
        raise UnknownModelError(f"{encoder.arch}: the numpy text path does not run a {why}")
    m = _text_module(encoder.model)
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection", "attn_mask")
    pool = getattr(m, "text_pool_type", None) or getattr(m, "pool_type", "argmax")
    if not all(hasattr(m, a) for a in needed) or pool not in ("argmax", "last", "first") \
            or getattr(m, "cls_emb", None) is not None or getattr(m, "use_pad_mask", False):
        raise UnknownModelError(f"{encoder.arch}: the numpy text path supports open_clip's own text transformer only")
    tok_meta = _tokenizer_meta(encoder)
    blocks = m.transformer.resblocks
    gelu = blocks[0].mlp.gelu
    act = "quick_gelu" if type(gelu).__name__ == "QuickGELU" else \
        "gelu_tanh" if getattr(gelu, "approximate", "none") == "tanh" else "gelu"
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
                a = np.ascontiguousarray(t.detach().float().cpu().numpy())  # weights may sit on a GPU
                fh.write(a.tobytes())
                table[name] = [offset, list(a.shape)]
                offset += a.size
        tok_json = tok_meta.pop("tokenizer_json", None)
        if tok_json is not None:
            (tmp / "tokenizer.json").write_text(tok_json, encoding="utf-8")
        else:
            merges = open_clip_merges()
            (tmp / "merges.txt").write_text("\n".join(merges), encoding="utf-8")
            tok_meta["ids_by_rank"] = ids_by_rank_hold(merges)
        meta = {"format": FORMAT, "fingerprint": encoder.fingerprint, "layers": len(blocks),
                "heads": blocks[0].attn.num_heads, "act": act, "eps": m.ln_final.eps,
                "context_length": int(m.positional_embedding.shape[0]), "dim": encoder.dim, "arrays": table,
                "floats": offset, "causal": m.attn_mask is not None, "pool": pool, **tok_meta}
        _probe(encoder, NumpyTextTower(tmp, meta))  # raises UnknownModelError: nothing is written
        return meta

    return write_export(out_dir, DIR_NAME, fill)


PROBES = ["a photo of a dog", "A RED Circle, left of a blue square!", "café déjà vu", "x", "word " * 80]


def _probe(encoder, tower) -> None:
    """The numpy tower must give torch's embeddings on probe texts, or it is not written at all."""
    ref = encoder.encode_texts(PROBES)
    emb, _ = tower.encode(PROBES)
    err = float(np.abs(emb - ref).max())
    if not err < 1e-4:
        raise UnknownModelError(f"{encoder.arch}: the numpy text path differs from torch ({err:.2g}); not used")


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
    def tokenizer(self):
        if self._tok is None:
            if self.meta.get("tokenizer", "bpe") == "hf":
                self._tok = HFTokenizer((self.dir / "tokenizer.json").read_text(encoding="utf-8"),
                                        self.context_length, self.meta["clean"], self.meta["pad_id"],
                                        self.meta.get("strip_sep_id"))
            else:
                merges = (self.dir / "merges.txt").read_text(encoding="utf-8").split("\n")
                self._tok = BPETokenizer(merges, self.context_length, bool(self.meta.get("ids_by_rank")))
        return self._tok

    def encode(self, texts: Sequence[str]):
        """(L2-normalised embeddings [n,d], token states per text [len_i, width]) like Encoder.encode_texts."""
        # a causal query runs a few tokens: BLAS threads only add hand-off cost, and spin badly when cores
        # are busy; a bidirectional tower runs its whole context (64-77 tokens), worth the cores
        causal = self.meta.get("causal", True)
        if causal and os.environ.get("OPENBLAS_NUM_THREADS") == "1":  # one thread already (cli: set before numpy)
            return self._encode(texts)
        with _blas_controller().limit(limits=1 if causal else None, user_api="blas"):
            return self._encode(texts)

    def _encode(self, texts: Sequence[str]):
        ids = [self.tokenizer.encode(t) for t in texts]
        causal = self.meta.get("causal", True)
        # causal attention: padding after a text's EOT cannot influence its real tokens, so only the real
        # tokens run; a bidirectional tower attends to the padding, so the whole context runs, as in torch
        L = max(len(i) for i in ids) if causal else self.context_length
        tokens = np.full((len(ids), L), self.meta.get("pad_id", 0), dtype=np.int64)
        for r, i in enumerate(ids):
            tokens[r, : len(i)] = i
        x = np.asarray(self.w("token_embedding"))[tokens] + self.w("positional_embedding")[:L]
        mask = np.triu(np.full((L, L), -np.inf, dtype=np.float32), 1) if causal else np.zeros((L, L), np.float32)
        H, eps = self.meta["heads"], self.meta["eps"]
        for i in range(self.meta["layers"]):
            g = lambda n: self.w(f"{i}.{n}")
            h = _layer_norm(x, g("ln1_w"), g("ln1_b"), eps)
            qkv = h @ g("in_w") + g("in_b")
            B, _, W3 = qkv.shape
            q, k, v = np.split(qkv.reshape(B, L, 3, H, W3 // 3 // H).transpose(2, 0, 3, 1, 4), 3)
            att = (q[0] @ k[0].transpose(0, 1, 3, 2)) / math.sqrt(q.shape[-1]) + mask
            att = np.exp(att - att.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            o = (att @ v[0]).transpose(0, 2, 1, 3).reshape(B, L, -1)
            x = x + o @ g("out_w") + g("out_b")
            h = _layer_norm(x, g("ln2_w"), g("ln2_b"), eps) @ g("fc_w") + g("fc_b")
            if self.meta["act"] == "quick_gelu":
                h = h / (1.0 + np.exp(-1.702 * h))
            elif self.meta["act"] == "gelu_tanh":
                h = 0.5 * h * (1.0 + np.tanh(0.7978845608028654 * (h + 0.044715 * h ** 3)))
            else:
                h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
            x = x + h @ g("proj_w") + g("proj_b")
        # float32 throughout, as torch: a numpy float64 scalar (np.sqrt(2.0)) would promote every later
        # layer to float64 and cast each weight matrix to it (3x slower; tests/test_towers_textnp.py)
        states = _layer_norm(x, self.w("ln_final_w"), self.w("ln_final_b"), eps)
        pool = self.meta.get("pool", "argmax")
        at = tokens.argmax(axis=1) if pool == "argmax" else np.full(len(ids), L - 1 if pool == "last" else 0)
        pooled = states[np.arange(len(ids)), at] @ self.w("text_projection")
        if "text_projection_b" in self.meta["arrays"]:
            pooled = pooled + self.w("text_projection_b")
        pooled = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
        return pooled.astype(np.float32), [states[r, : len(i)] for r, i in enumerate(ids)]


@functools.lru_cache()
def _blas_controller():
    """Found once: threadpool_limits() re-scans every loaded library per call (38 ms per query in a server
    that has faiss and torch loaded)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()
