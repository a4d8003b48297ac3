"""Contrastive training of the dual encoder: the loop (loop.py), streaming data and tar shards
(data.py, shards.py), the accumulated and cross-process loss (step.py), mixed precision
(precision.py), torchrun processes (distributed.py), the default recipe (recipe.py)."""
from mmsearch.train.loop import train_encoder, validate
from mmsearch.train.optim import lr_at, save_atomic

__all__ = ["train_encoder", "validate", "lr_at", "save_atomic"]
