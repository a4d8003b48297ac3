"""One optimiser step of contrastive training, with the loss over the global batch.

With accumulation (K micro-batches) the loss is still the loss of the whole batch, as in open_clip's
`accum_freq`: first embed every micro-batch without gradients, then, per micro-batch, recompute its
features with gradients and take the loss against the cached features of the others. The sum of the
K backward passes is the full batch's gradient (a plain sum of per-micro-batch losses would be a
different loss: each micro-batch would only see its own negatives). Unlike open_clip we let the
temperature take its gradient once, not K times.

Across processes, open_clip's ClipLoss(local_loss, gather_with_grad) all-gathers the features: each
rank's loss covers its rows against the global batch and gradients flow back through the gather;
averaging the ranks' gradients then gives the global batch's gradient.
"""
from __future__ import annotations

from typing import Callable, Sequence

import open_clip
import torch
import torch.nn.functional as F

from mmsearch.train.precision import Precision


def clip_loss(rank: int = 0, world_size: int = 1) -> open_clip.ClipLoss:
    if world_size > 1:
        return open_clip.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
    return open_clip.ClipLoss()


def tower_features(encoder) -> Callable:
    """(pixels, tokens) -> (image features, text features), L2-normalised, with the text context cut
    to the batch's real length (same features as the padded forward, see Encoder.text_forward)."""
    model = encoder.model

    def run(pixels: torch.Tensor, tokens: torch.Tensor):
        img = F.normalize(model.encode_image(pixels), dim=-1)
        txt = F.normalize(encoder.text_forward(tokens)[0], dim=-1)
        return img, txt
    return run


def contrastive_backward(features: Callable, micro: Sequence[tuple], logit_scale: torch.Tensor,
                         loss_fn, precision: Precision) -> float:
    """Backward the loss of the batch made of `micro` (a list of (pixels, tokens)); returns the loss."""
    if len(micro) == 1:
        with precision.autocast():
            img, txt = features(*micro[0])
            loss = loss_fn(img, txt, logit_scale.exp())
        precision.backward(loss)
        return float(loss.detach())
    with torch.no_grad(), precision.autocast():
        cached = [features(p, t) for p, t in micro]
    loss_value = None
    for j, (p, t) in enumerate(micro):
        with precision.autocast():
            img_j, txt_j = features(p, t)
            img = torch.cat([c[0] for c in cached[:j]] + [img_j] + [c[0] for c in cached[j + 1:]])
            txt = torch.cat([c[1] for c in cached[:j]] + [txt_j] + [c[1] for c in cached[j + 1:]])
            # the temperature is not in any micro-batch's features: give it its gradient once
            scale = logit_scale.exp() if j == 0 else logit_scale.exp().detach()
            loss = loss_fn(img, txt, scale)
        precision.backward(loss)
        if loss_value is None:
            loss_value = float(loss.detach())
    return loss_value
