"""Contrastive training of the dual encoder: open_clip's model, transforms and ClipLoss (symmetric
InfoNCE with a learnable temperature), AdamW with warmup + cosine and gradient clipping.

Resume is exact: the data order, caption choice and augmentation of step s depend only on
(seed, s), and the in-progress checkpoint holds the optimiser state, so a killed run continues
where it stopped and ends with the same steps and learning-rate schedule as an uninterrupted one.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from .config import ModelSpec
from .datasets import CaptionDataset, load_dataset
from .encoder import CHECKPOINT_FORMAT, Encoder, load_checkpoint_file, load_encoder, weights_fingerprint
from .errors import CheckpointError, DatasetError
from .media import load_image
from .metrics import image_to_text_ranks, summarize, text_to_image_ranks


def save_atomic(obj: dict, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _param_groups(model: torch.nn.Module, weight_decay: float):
    # as open_clip does: no decay on gains, biases, embeddings and the temperature
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embedding" in name or "logit_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _load_images(ds: CaptionDataset, size: int) -> list:
    return [load_image(p, min_size=size) for p in ds.images]


def validate(encoder: Encoder, ds: CaptionDataset, images: Optional[list] = None, ks=(1, 5, 10)) -> dict:
    """R@k both ways on a (small) split with the encoder in eval mode."""
    images = images if images is not None else _load_images(ds, encoder.image_size)
    img = np.concatenate([encoder.encode_images(images[i:i + 128]) for i in range(0, len(images), 128)])
    txt = encoder.encode_texts(ds.captions)
    return {"text_to_image": summarize(text_to_image_ranks(txt, img, ds.caption_image), ks),
            "image_to_text": summarize(image_to_text_ranks(img, txt, ds.caption_image), ks)}


def _captions_by_image(ds: CaptionDataset) -> list[list[str]]:
    out: list[list[str]] = [[] for _ in ds.images]
    for c, i in zip(ds.captions, ds.caption_image):
        out[int(i)].append(c)
    return out


def _batch_indices(step: int, n: int, batch_size: int, seed: int) -> np.ndarray:
    """Images of step `step`: epochs are seeded permutations; a batch never repeats an image."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[k * batch_size:(k + 1) * batch_size]


def train_encoder(data, spec: ModelSpec, out, steps: Optional[int] = None, epochs: Optional[int] = None,
                  batch_size: int = 64, lr: float = 5e-4, warmup: Optional[int] = None, weight_decay: float = 0.1,
                  lock_image: bool = False, lock_text: bool = False, resume=None, train_split: str = "train",
                  val_split: str = "val", images_root=None, seed: int = 0, save_every: Optional[int] = None,
                  progress: Optional[Callable] = None, log: Optional[Callable[[str], None]] = None) -> dict:
    """Train (or fine-tune) and write a single-file checkpoint to `out`. Returns the final metrics."""
    log = log or (lambda line: None)
    state = None
    if resume:
        state = load_checkpoint_file(resume)
        if "resume" not in state:
            raise CheckpointError(f"{resume} is a finished checkpoint, not an interrupted run")
        args = dict(state["train_args"])
        spec = ModelSpec(checkpoint=str(resume))
    train_ds = load_dataset(data, split=train_split, images_root=images_root)
    try:
        val_ds = load_dataset(data, split=val_split, images_root=images_root)
        if val_ds.images == train_ds.images:
            val_ds = None  # no split information: nothing held out
    except DatasetError:
        val_ds = None
    if state is None:
        n_steps = steps or max(1, (epochs or 1) * max(1, len(train_ds.images) // batch_size))
        args = dict(data=str(data), spec=spec.to_dict(), steps=n_steps, batch_size=batch_size, lr=lr,
                    warmup=warmup if warmup is not None else max(1, n_steps // 10), weight_decay=weight_decay,
                    lock_image=lock_image, lock_text=lock_text, seed=seed, train_split=train_split,
                    val_split=val_split, images_root=str(images_root) if images_root else None)
    n_steps, batch_size = args["steps"], args["batch_size"]
    bs = min(batch_size, len(train_ds.images))
    encoder = load_encoder(spec)
    model = encoder.model
    if args["lock_image"]:
        model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=True)
    if args["lock_text"]:
        model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    opt = torch.optim.AdamW(_param_groups(model, args["weight_decay"]), lr=args["lr"], betas=(0.9, 0.98), eps=1e-6)
    start, history = 0, []
    if state is not None:
        opt.load_state_dict(state["resume"]["optimizer"])
        start, history = state["resume"]["step"], state["resume"]["history"]
        log(f"resuming at step {start}/{n_steps}")
    images = _load_images(train_ds, encoder.image_size)
    val_images = _load_images(val_ds, encoder.image_size) if val_ds else None
    caps = _captions_by_image(train_ds)
    loss_fn = open_clip.ClipLoss()
    save_every = save_every or max(25, n_steps // 10)
    per_epoch = max(1, len(images) // bs)
    t0, losses = time.perf_counter(), []
    metrics: dict = {}

    def checkpoint(step: int, final: bool) -> None:
        obj = {"format": CHECKPOINT_FORMAT, "arch": encoder.arch.split("@")[0], "model_cfg": encoder.model_cfg,
               "state_dict": model.state_dict(), "train_args": args, "metrics": metrics,
               "fingerprint": weights_fingerprint(model)}
        if not final:
            obj["resume"] = {"step": step, "optimizer": opt.state_dict(), "history": history}
        save_atomic(obj, out)

    model.train()
    for step in range(start, n_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, n_steps, args["lr"], args["warmup"])
        idx = _batch_indices(step, len(images), bs, args["seed"])
        rng = np.random.default_rng([args["seed"], step, 1])
        torch.manual_seed(args["seed"] * 1_000_003 + step)
        pixels = torch.stack([encoder.preprocess_train(images[i]) for i in idx])
        texts = [caps[i][rng.integers(len(caps[i]))] for i in idx]
        img_f = F.normalize(model.encode_image(pixels), dim=-1)
        txt_f = F.normalize(encoder.text_forward(encoder.tokenize(texts))[0], dim=-1)
        loss = loss_fn(img_f, txt_f, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.detach()))
        done = step + 1
        if progress:
            progress(done, n_steps, stage="train", loss=float(np.mean(losses[-20:])))
        if done % per_epoch == 0 or done == n_steps:
            entry = {"step": done, "epoch": done / per_epoch, "loss": float(np.mean(losses[-per_epoch:]))}
            if val_ds is not None:
                model.eval()
                entry["val"] = validate(encoder, val_ds, val_images)
                model.train()
            history.append(entry)
            log(_format(entry, n_steps))
        if done % save_every == 0 and done < n_steps:
            checkpoint(done, final=False)
    model.eval()
    metrics = {"steps": n_steps, "train_seconds": round(time.perf_counter() - t0, 2),
               "final_loss": history[-1]["loss"] if history else None,
               "first_loss": losses[0] if losses and start == 0 else None,
               "val": history[-1].get("val") if history else None, "history": history}
    checkpoint(n_steps, final=True)
    return {"checkpoint": str(out), **{k: v for k, v in metrics.items() if k != "history"}}


def _format(entry: dict, total: int) -> str:
    line = f"step {entry['step']}/{total} epoch {entry['epoch']:.1f} loss {entry['loss']:.3f}"
    if "val" in entry:
        t, i = entry["val"]["text_to_image"], entry["val"]["image_to_text"]
        line += f" | val t->i R@1 {t['R@1']:.3f} R@5 {t['R@5']:.3f} | i->t R@1 {i['R@1']:.3f} R@5 {i['R@5']:.3f}"
    return line
