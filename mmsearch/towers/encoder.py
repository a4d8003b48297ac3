"""The only module that touches open_clip: build a model and its transforms from a ModelSpec, encode images and texts.

Importing this module imports torch and open_clip (several seconds), so everything else imports it lazily.
"""
from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from mmsearch.config import ModelSpec
from mmsearch.errors import CheckpointError, UnknownModelError
from mmsearch.towers.hub import build_error, build_tokenizer, create_model, hub_access, weights_error
from mmsearch.towers.models import check_requirements, register_model_configs
from mmsearch.towers.safeload import safe_torch_load

CHECKPOINT_FORMAT = "mmsearch-checkpoint"
def load_checkpoint_file(path: str | os.PathLike) -> dict:
    """Read an mmsearch checkpoint (weights + architecture config + training args + metrics).
    Weights-only unpickling (mmsearch.towers.safeload): a file carrying a code payload is refused unrun."""
    path = Path(path)
    ckpt = safe_torch_load(path, "checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an mmsearch checkpoint (made by `mmsearch train`)")
    return ckpt


def _register_checkpoint_arch(ckpt: dict) -> str:
    """Register the checkpoint's architecture config under its own name so open_clip can build it."""
    from open_clip import factory  # the registry dict has no public setter for an in-memory config

    arch = ckpt["arch"]
    known = factory._MODEL_CONFIGS.get(arch)
    if known is not None and known == ckpt["model_cfg"]:
        return arch
    name = f"{arch}@{hashlib.sha1(repr(sorted(ckpt['model_cfg'].items())).encode()).hexdigest()[:8]}"
    factory._MODEL_CONFIGS[name] = ckpt["model_cfg"]
    return name


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A cheap, deterministic digest of the weights: shapes plus the first values of every tensor."""
    h = hashlib.sha1()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        flat = t.detach().reshape(-1)[:1024].to("cpu", torch.float32).contiguous().numpy()
        h.update(flat.tobytes())
    return h.hexdigest()[:16]


@dataclass
class Encoder:
    """A loaded dual encoder with the transforms and tokenizer that belong to it."""

    spec: ModelSpec
    arch: str
    model: torch.nn.Module
    preprocess: object  # eval transform: PIL -> tensor
    preprocess_train: object  # open_clip's training augmentation
    tokenizer: object
    model_cfg: dict
    checkpoint: Optional[dict] = field(default=None, repr=False)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"  # image tower precision (devices.PRECISIONS); an index records the one it used

    @property
    def dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def image_size(self) -> int:
        size = self.model_cfg["vision_cfg"].get("image_size", 224)
        return int(size if isinstance(size, int) else max(size))

    @property
    def text_width(self) -> int:
        t = self.model_cfg["text_cfg"]
        if "width" in t:
            return int(t["width"])
        hf = getattr(getattr(self.model, "text", None), "config", None)  # a Hugging Face text tower
        return int(getattr(hf, "hidden_size", None) or getattr(hf, "d_model", None) or 512)

    @property
    def vision_width(self) -> int:
        v = self.model_cfg["vision_cfg"]
        if "width" in v:
            return int(v["width"])
        trunk = getattr(self.model.visual, "trunk", None)  # a timm image tower
        return int(getattr(trunk, "num_features", None) or 768)

    @property
    def fingerprint(self) -> str:
        if not hasattr(self, "_fingerprint"):
            self._fingerprint = weights_fingerprint(self.model)
        return self._fingerprint

    # ---- images -------------------------------------------------------------------------------
    @property
    def pil_transform(self):
        """The model's eval transform up to (not including) ToTensor: PIL -> PIL. Cheap and thread-safe,
        so decode workers run it; `pixels` finishes the batch. None when the transform cannot be split."""
        return self._split[0]

    @functools.cached_property
    def _split(self):
        return _split_transform(self.preprocess)

    def pixels(self, images: Sequence) -> torch.Tensor:
        """Images that went through `pil_transform` (PIL or HxWx3 uint8 arrays) -> normalised [B,3,H,W].

        ToTensor + Normalize run once on the whole batch in the calling thread: run per image in
        worker threads, each tiny op starts torch's OpenMP pool and they fight the encoder for the
        cores (measured: 70 ms per image instead of 0.4 ms on 2 cores)."""
        split = self._split
        if split[0] is None:
            return torch.stack([self.preprocess(im) for im in images])
        batch = torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images]))
        x = batch.permute(0, 3, 1, 2).float().div_(255.0)
        for t in split[1]:
            x = t(x)
        return x.contiguous()

    def preprocess_images(self, images: Sequence) -> torch.Tensor:
        """PIL images -> the model's input batch; equal to stacking `self.preprocess(im)` (tested)."""
        pil = self.pil_transform
        return self.pixels([pil(im) for im in images]) if pil is not None else \
            torch.stack([self.preprocess(im) for im in images])

    @torch.inference_mode()
    def encode_image_tensor(self, pixels: torch.Tensor, token_grid: Optional[int] = None):
        """pixels [B,3,H,W] -> L2-normalised float32 [B,d]; with token_grid=G also compact image tokens
        [B, 1+G*G, vision_width] float32 (class token + patch tokens average-pooled to a GxG grid)."""
        from mmsearch.towers.devices import autocast

        self.model.eval()
        if self.device.type == "cuda" and pixels.device.type == "cpu":
            pixels = pixels.pin_memory()  # lets the copy overlap with the previous batch's compute
        pixels = pixels.to(self.device, non_blocking=True)
        with autocast(self.device, self.precision):
            return self._encode_image_tensor(pixels, token_grid)

    def _encode_image_tensor(self, pixels: torch.Tensor, token_grid: Optional[int]):
        visual = self.model.visual
        if token_grid is None:
            emb = self.model.encode_image(pixels)
            return F.normalize(emb.float(), dim=-1).cpu().numpy()
        if not all(hasattr(visual, a) for a in ("_embeds", "transformer", "_pool")):
            raise UnknownModelError(f"{self.arch}: the re-ranker's image tokens need open_clip's own ViT image "
                                    f"tower; this model's is {type(visual).__name__}")
        was = getattr(visual, "output_tokens", False)
        visual.output_tokens = True
        try:
            x = visual._embeds(pixels)
            x = visual.transformer(x)
            pooled, tokens = visual._pool(x)
            if visual.proj is not None:
                pooled = pooled @ visual.proj
            # tokens after ln_post; the class token is x[:,0] normalised the same way
            cls = visual.ln_post(x[:, 0]) if hasattr(visual, "ln_post") else x[:, 0]
        finally:
            visual.output_tokens = was
        b, n, w = tokens.shape
        g = int(round(n ** 0.5))
        grid = tokens.transpose(1, 2).reshape(b, w, g, g)
        grid = F.adaptive_avg_pool2d(grid, token_grid).reshape(b, w, -1).transpose(1, 2)
        toks = torch.cat([cls[:, None, :], grid], dim=1)
        return F.normalize(pooled.float(), dim=-1).cpu().numpy(), toks.float().cpu().numpy()

    def encode_images(self, images: Sequence, token_grid: Optional[int] = None):
        """PIL images -> embeddings (and tokens, see encode_image_tensor)."""
        return self.encode_image_tensor(self.preprocess_images(images), token_grid=token_grid)

    # ---- texts --------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts)).to(self.device)

    @functools.cached_property
    def _pad_id(self) -> int:
        hf = getattr(self.tokenizer, "tokenizer", None)  # open_clip's HFTokenizer wraps a transformers one
        return int(getattr(hf, "pad_token_id", None) or 0)

    def _can_truncate(self) -> bool:
        m = self.model
        return all(hasattr(m, a) for a in ("token_embedding", "positional_embedding", "transformer", "ln_final")) \
            and getattr(m, "text_pool_type", "argmax") == "argmax"

    def text_forward(self, tokens: torch.Tensor, truncate: bool = True):
        """tokens [B,C] -> (pooled unnormalised [B,d], token states [B,L,width], lengths [B]).

        With truncate=True the context is cut to the longest real length in the batch before the
        text tower. With a causal mask and argmax pooling on the EOT token this gives the same result
        as the padded forward, 2-3x faster for short queries (tests/test_encoder.py proves equality)."""
        m = self.model
        lengths = (tokens != self._pad_id).sum(dim=1)
        if not self._can_truncate():
            text = getattr(m, "text", None)
            if text is not None and hasattr(text, "output_tokens") and hasattr(text, "token_embedding"):
                # open_clip's TextTransformer in a CustomTextCLIP (MobileCLIP, SigLIP): one padded forward
                # that also returns the token states the re-ranker reads
                was, text.output_tokens = text.output_tokens, True
                try:
                    pooled, states = text(tokens)
                finally:
                    text.output_tokens = was
                return pooled, states, lengths
            return m.encode_text(tokens), None, lengths
        L = int(lengths.max()) if truncate else tokens.shape[1]
        tokens = tokens[:, :L]
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast) + m.positional_embedding[:L].to(cast)
        mask = m.attn_mask[:L, :L] if m.attn_mask is not None else None
        x = m.transformer(x, attn_mask=mask)
        states = m.ln_final(x)
        pooled = states[torch.arange(states.shape[0]), tokens.argmax(dim=-1)]
        proj = m.text_projection
        if proj is not None:
            pooled = proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj
        return pooled, states, lengths

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256, truncate: bool = True,
                     return_states: bool = False):
        """texts -> L2-normalised float32 [n,d]; with return_states also a list of [len_i, width] arrays."""
        self.model.eval()
        outs, states = [], []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenize(texts[i:i + batch_size])
            pooled, st, lengths = self.text_forward(tokens, truncate=truncate)
            outs.append(F.normalize(pooled.float(), dim=-1).cpu().numpy())
            if return_states:
                if st is None:
                    raise UnknownModelError(f"{self.arch}: token states are only available for CLIP-style text towers")
                states.extend(st[j, : int(lengths[j])].float().cpu().numpy() for j in range(len(lengths)))
        emb = np.concatenate(outs) if outs else np.zeros((0, self.dim), np.float32)
        return (emb, states) if return_states else emb


def _split_transform(preprocess):
    """(PIL stage, tensor stages) of a torchvision Compose ending in ToTensor + Normalize; else (None, None)."""
    from torchvision.transforms import Compose

    steps = list(getattr(preprocess, "transforms", []))
    names = [type(t).__name__ for t in steps]
    for i, name in enumerate(names):
        if name in ("ToTensor", "MaybeToTensor"):
            if all(n == "Normalize" for n in names[i + 1:]):
                return Compose(steps[:i] + [_RGB()]), steps[i + 1:]
            break
    return None, None


class _RGB:
    """Last PIL step of the split transform: ToTensor would make a grey image 1-channel; keep 3."""

    def __call__(self, img):
        return img if img.mode == "RGB" else img.convert("RGB")


def load_encoder(spec: ModelSpec, device="cpu") -> Encoder:
    """Build the model, its transforms and its tokenizer from one spec (so they cannot drift apart).
    `device`: a torch.device or a name for mmsearch.towers.devices.resolve_device ('auto', 'cuda:1', ...);
    the weights' fingerprint and every returned array are the same on any device."""
    from mmsearch.towers.devices import resolve_device

    device = device if isinstance(device, torch.device) else resolve_device(device)
    register_model_configs()
    ckpt = None
    if spec.checkpoint:
        ckpt = load_checkpoint_file(spec.checkpoint)
        check_requirements(ckpt["arch"], ckpt["model_cfg"])
        arch = _register_checkpoint_arch(ckpt)
        with hub_access(ckpt["arch"], ckpt["model_cfg"], None):  # offline: one line at once, not retries
            tokenizer = build_tokenizer(arch, ckpt["model_cfg"])
            try:
                model, preprocess_train, preprocess = create_model(arch, None)
            except Exception as exc:
                raise build_error(ckpt["arch"], ckpt["model_cfg"], exc) from exc
        try:
            model.load_state_dict(ckpt["state_dict"])
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint {spec.checkpoint} does not fit architecture {ckpt['arch']}: {exc}") from exc
        spec = ModelSpec(model=ckpt["arch"], pretrained=None, checkpoint=str(spec.checkpoint))
        model_cfg = ckpt["model_cfg"]
    else:
        arch = spec.model
        if arch not in open_clip.list_models():
            close = [m for m in open_clip.list_models() if arch.lower()[:5] in m.lower()][:8]
            raise UnknownModelError(
                f"unknown model '{arch}'" + (f"; similar: {', '.join(close)}" if close else "")
                + ". `python -c 'import open_clip; print(open_clip.list_models())'` lists them all.")
        model_cfg = open_clip.get_model_config(arch)
        check_requirements(arch, model_cfg)
        with hub_access(arch, model_cfg, spec.pretrained):  # offline: one line at once, not retries
            tokenizer = build_tokenizer(arch, model_cfg)  # before the slow build: a missing tokenizer fails in a second
            try:
                model, preprocess_train, preprocess = create_model(arch, spec.pretrained)
            except Exception as exc:
                if spec.pretrained is None:
                    raise build_error(arch, model_cfg, exc) from exc
                raise weights_error(arch, spec.pretrained, exc) from exc
    model.eval()
    enc = Encoder(spec=spec, arch=arch, model=model, preprocess=preprocess, preprocess_train=preprocess_train,
                  tokenizer=tokenizer, model_cfg=model_cfg, checkpoint=ckpt)
    enc.fingerprint  # computed on the CPU copy, before the move
    enc.device = device
    if device.type != "cpu":
        model.to(device)
    return enc
