"""The optimiser side of training: learning-rate schedule, parameter groups, atomic checkpoint writes."""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch


def save_atomic(obj: dict, path) -> None:
    """Write to a temp file, then rename: a kill mid-write never leaves a half checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to 0 at `total` (open_clip's `cosine_lr`)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # as open_clip does: no decay on gains, biases, embeddings and the temperature
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embedding" in name or "logit_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # betas and eps of CLIP and open_clip's ViT recipes: beta2 0.98 keeps large-batch training stable
    return adamw(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)


def adamw(params, **kwargs) -> torch.optim.Optimizer:
    """AdamW with the fused kernel (one pass over all tensors). torch's CPU default is a Python loop
    per tensor: 0.17 s of a 1.2 s demo step on 2 loaded cores."""
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # a device or dtype the fused kernel lacks
        return torch.optim.AdamW(params, foreach=True, **kwargs)
