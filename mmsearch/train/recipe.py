"""Default hyper-parameters for real photographs with human captions, from the literature rather than
tuned on our synthetic shapes (the reasons, with sources, are in the README's "Training on your own
data"):

- from scratch: open_clip's LAION/CC recipes: AdamW lr 5e-4, betas (0.9, 0.98), eps 1e-6, weight decay
  0.2, warm-up then cosine, temperature initialised at 1/0.07 and clamped at 100 (CLIP).
- fine-tuning pretrained weights (--pretrained TAG or --checkpoint): lr 1e-5, weight decay 0.1, as
  FLYP / WiSE-FT fine-tune CLIP; a from-scratch rate would wash out the pretrained features in a few
  hundred steps. With --lock-image (LiT) only the text tower moves: LiT's lr 1e-3 is for a text tower
  trained from scratch at batch 16k; for a pretrained one we keep the fine-tuning rate.
- batch 256: the largest that fits ViT-B/32 at 224 px in bf16 on one 16 GB GPU without accumulation;
  contrastive losses gain from larger batches (CLIP 32k, SigLIP), so use --accum-steps or more GPUs
  to go higher on the same hardware.
- warm-up 10% of the steps, at most 2,000 (open_clip's default warm-up for its LAION runs).
- resolution and augmentation come from the model (open_clip's RandomResizedCrop scale (0.9, 1.0),
  bicubic, the model's input size): the rule that preprocessing belongs to the model.
"""
from __future__ import annotations

from mmsearch.config import ModelSpec

FROM_SCRATCH = dict(lr=5e-4, weight_decay=0.2, batch_size=256, warmup_cap=2000)
FINE_TUNE = dict(lr=1e-5, weight_decay=0.1, batch_size=256, warmup_cap=2000)


def default_hparams(spec: ModelSpec) -> dict:
    """The recipe for a run that starts from `spec`'s weights (random, pretrained or a checkpoint)."""
    return dict(FROM_SCRATCH if spec.is_random else FINE_TUNE)
