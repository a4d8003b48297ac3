"""Training the fusion re-ranker over a frozen dual encoder.

ITM loss (binary cross-entropy) over positives and hard negatives: for every pair in a batch, a
negative image and a negative caption are drawn from the batch with probability rising with the dual
encoder's similarity (ALBEF), and, when the data provides attribute-swapped captions, the swapped
caption and the swapped scene are added as negatives: exactly the pairs a dual encoder confuses.

After training, the blend of ITM probability and similarity is fitted per direction on the validation
split (evaluate.fit_alpha) and stored in the checkpoint as the default for search and eval.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from mmsearch.checks import MAX_SEED, count, number
from mmsearch.config import ModelSpec
from mmsearch.datasets.readers import CaptionDataset, load_dataset
from mmsearch.towers.encoder import load_encoder
from mmsearch.errors import CheckpointError, DatasetError
from mmsearch.evaluation.evaluate import embed_dataset, fit_alpha, rerank_candidates, reranked
from mmsearch.evaluation.metrics import summarize
from mmsearch.search.query import DEFAULT_RERANK_K
from mmsearch.rerank.model import RERANKER_FORMAT, TOKEN_GRID, FusionModel, Reranker, pad_states
from mmsearch.towers.safeload import safe_torch_load
from mmsearch.train import lr_at, save_atomic
from mmsearch.train.lanes import ThreadLanes, length_chunks
from mmsearch.train.optim import adamw
from mmsearch.train.precision import Precision


class _Features:
    """Frozen-tower features of a dataset split, plus the swap structure of its captions."""

    def __init__(self, encoder, ds: CaptionDataset, progress=None):
        self.ds = ds
        self.img, self.txt, toks, self.states = embed_dataset(encoder, ds, token_grid=TOKEN_GRID, with_states=True,
                                                              progress=progress)
        self.toks = torch.as_tensor(toks.astype(np.float32))
        negs = [n for n in ds.negatives if n]
        self.neg_index, self.neg_states = {}, []
        if negs:
            uniq = sorted(set(negs))
            _, st = encoder.encode_texts(uniq, return_states=True)
            self.neg_index = {t: i for i, t in enumerate(uniq)}
            self.neg_states = st
        self.swap_image = ds.swap_images().tolist()  # the swapped scene, when it is in this split
        # one table of text states, padded once, so a batch is a few index operations: the captions, then
        # the swapped negatives (text id n_captions + i), cut to the captions' padded length
        self.texts, self.text_len = pad_states(self.states)
        self.n_captions = len(self.text_len)
        self.cap_neg = torch.tensor([self.neg_index[n] if n else -1 for n in ds.negatives])
        if self.neg_states:
            L = self.texts.shape[1]
            neg_states, neg_len = pad_states(self.neg_states)
            neg = torch.zeros(len(neg_states), L, self.texts.shape[2])
            neg[:, : min(L, neg_states.shape[1])] = neg_states[:, :L]
            self.texts = torch.cat([self.texts, neg])
            self.text_len = torch.cat([self.text_len, neg_len.clamp(max=L)])
        self.swap_image_t = torch.tensor(self.swap_image)
        # captions grouped by image (CSR): a batch draws one caption per image without a Python loop
        cap_image = torch.as_tensor(np.asarray(ds.caption_image), dtype=torch.long)
        self.caps_by_image = torch.argsort(cap_image, stable=True)
        self.n_caps = torch.bincount(cap_image, minlength=len(ds.images))
        self.first_cap = torch.cumsum(self.n_caps, 0) - self.n_caps


def _hard(sim: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """ALBEF: for each row, sample a column != the diagonal with probability softmax(sim)."""
    w = F.softmax(sim.float() * 20.0, dim=1)
    w.fill_diagonal_(0)
    w = w + 1e-8
    return torch.multinomial(w, 1, generator=gen).squeeze(1)


def _batch(f: _Features, step: int, batch_size: int, seed: int):
    """Step `step`'s pairs: (text ids into f.texts, image ids into f.toks, labels)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    n = len(f.ds.images)
    imgs = torch.randperm(n, generator=gen)[:batch_size]
    pick = (torch.rand(len(imgs), generator=gen) * f.n_caps[imgs]).long().clamp(max=f.n_caps[imgs] - 1)
    caps = f.caps_by_image[f.first_cap[imgs] + pick]
    sim = torch.as_tensor(f.txt[caps] @ f.img[imgs].T)
    neg_img = imgs[_hard(sim, gen)]  # for each caption, a confusable other image
    neg_cap = caps[_hard(sim.T, gen)]  # for each image, a confusable other caption
    parts = [(caps, imgs, 1.0), (caps, neg_img, 0.0), (neg_cap, imgs, 0.0)]  # (text ids, image ids, label)
    has_neg = f.cap_neg[caps] >= 0
    if has_neg.any():  # the attribute-swapped caption is a negative for this image ...
        parts.append((f.n_captions + f.cap_neg[caps][has_neg], imgs[has_neg], 0.0))
        swap = f.swap_image_t[caps]
        has_swap = swap >= 0  # ... and the swapped scene a negative for this caption
        if has_swap.any():
            parts.append((caps[has_swap], swap[has_swap], 0.0))
    return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
            torch.cat([torch.full((len(p[1]),), p[2]) for p in parts]))


def pair_logits(model: FusionModel, f: _Features, text_ids: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
    """Logits of pairs (text_ids[b], image_ids[b]); each distinct text and image enters the model once,
    padded to the longest text among them."""
    texts, text_rows = torch.unique(text_ids, return_inverse=True)
    images, image_rows = torch.unique(image_ids, return_inverse=True)
    lengths = f.text_len[texts]
    return model(f.texts[texts, : int(lengths.max())], lengths, f.toks[images], text_rows, image_rows)


def fusion_backward(model: FusionModel, params: list, f: _Features, batch: tuple, precision: Precision,
                    lanes: ThreadLanes) -> float:
    """Set the gradient of the batch's ITM loss (BCE, positives weighted up to balance the negatives);
    returns the loss. The batch is cut by text length and spread over the lanes; the pieces' losses
    are shares of the batch mean, so their gradients sum to the whole batch's."""
    text_ids, image_ids, labels = batch
    pos_weight = (labels == 0).sum() / labels.sum().clamp(min=1)

    def lane_loss(chunks: list) -> torch.Tensor:
        loss = 0.0
        for rows in chunks:
            with precision.autocast():
                logits = pair_logits(model, f, text_ids[rows], image_ids[rows])
            loss = loss + F.binary_cross_entropy_with_logits(logits.float(), labels[rows], pos_weight=pos_weight,
                                                             reduction="sum")
        return loss / len(labels)

    return float(lanes.gradients(params, lane_loss, length_chunks(f.text_len[text_ids], lanes.lanes)))


def _fit_blend(reranker: Reranker, val: _Features, log: Callable[[str], None]) -> dict:
    """Fit the score blend on the validation split and log what it buys over either score alone."""
    cands = rerank_candidates(reranker, val.ds, val.img, val.txt, val.toks.numpy(), val.states, DEFAULT_RERANK_K)
    alpha = fit_alpha(cands)
    for d, c in cands.items():
        r1 = {a: 100 * summarize(reranked(c, a), (1,))["R@1"] for a in (0.0, alpha[d], 1.0)}
        log(f"val {d.replace('_to_', '->')} R@1: dual encoder {r1[1.0]:.1f}, ITM alone {r1[0.0]:.1f}, "
            f"fitted blend alpha {alpha[d]:g} {r1[alpha[d]]:.1f}")
    return alpha


@torch.inference_mode()
def swap_accuracy(reranker_model: FusionModel, f: _Features) -> Optional[float]:
    """Fraction of captions with a swapped scene whose true image outscores the swapped one
    (all pairs in one batched forward pass: the per-pair loop cost as much as 40 training steps)."""
    caps = torch.tensor([c for c in range(len(f.ds.captions)) if f.swap_image[c] >= 0], dtype=torch.long)
    if not len(caps):
        return None
    reranker_model.eval()
    true = torch.as_tensor(f.ds.caption_image)[caps]
    swap = f.swap_image_t[caps]
    logits = pair_logits(reranker_model, f, torch.cat([caps, caps]), torch.cat([true, swap]))
    reranker_model.train()
    return float((logits[: len(caps)] > logits[len(caps):]).float().mean())


def train_reranker(data, encoder_checkpoint, out, steps: int = 2000, batch_size: int = 64, lr: float = 1e-3,
                   d: int = 128, layers: int = 2, heads: int = 4, resume=None, seed: int = 0,
                   images_root=None, device="cpu", precision: str = "auto", lanes: Optional[int] = None,
                   progress: Optional[Callable] = None, log: Optional[Callable[[str], None]] = None) -> dict:
    """`device` runs the frozen encoder's feature extraction (the heavy part); the small fusion model
    trains on the CPU, spread over `lanes` threads (default: one per torch thread; see train/lanes.py).
    `precision` auto is fp32: bf16 autocast made this model's step no faster, even on a CPU with native
    bf16 products (its products are small; 103 vs 94 ms a step at batch 48 on 2 lanes)."""
    steps, batch_size = count("steps", steps, optional=False), count("batch_size", batch_size, optional=False)
    lr, lanes = number("lr", lr, 0.0, 1.0, optional=False, low_open=True), count("lanes", lanes)
    seed = count("seed", seed, 0, MAX_SEED, optional=False)
    log = log or (lambda line: None)
    state = None
    if resume:
        state = safe_torch_load(resume, "re-ranker resume file")
        if not isinstance(state, dict) or state.get("format") != RERANKER_FORMAT or "resume" not in state:
            raise CheckpointError(f"{resume} is not an interrupted re-ranker run")
        args = state["train_args"]
    else:
        args = dict(data=str(data), encoder=str(encoder_checkpoint), steps=steps, batch_size=batch_size, lr=lr,
                    d=d, layers=layers, heads=heads, seed=seed, images_root=str(images_root) if images_root else None,
                    precision="fp32" if precision == "auto" else precision)
    prec = Precision.create(args.get("precision", "fp32"), torch.device("cpu"))  # a resumed run keeps its own
    args["precision"] = prec.name
    encoder = load_encoder(ModelSpec(checkpoint=args["encoder"]), device=device)
    train = _Features(encoder, load_dataset(data, split="train", images_root=images_root), progress)
    try:
        val = _Features(encoder, load_dataset(data, split="val", images_root=images_root))
    except DatasetError:  # no validation split: train without validation metrics or a fitted blend
        val = None
        log("no 'val' split: no validation metrics, and the score blend stays at the ITM score (alpha 0)")
    torch.manual_seed(args["seed"])
    model = FusionModel(encoder.text_width, encoder.vision_width, 1 + TOKEN_GRID ** 2, d=args["d"],
                        layers=args["layers"], heads=args["heads"])
    opt = adamw(list(model.parameters()), lr=args["lr"], weight_decay=0.05)
    start = 0
    if state is not None:
        model.load_state_dict(state["state_dict"])
        opt.load_state_dict(state["resume"]["optimizer"])
        start = state["resume"]["step"]
        log(f"resuming at step {start}/{args['steps']}")
    warmup = max(1, args["steps"] // 20)
    metrics: dict = {}
    alpha: Optional[dict] = None

    def checkpoint(step: int, final: bool) -> None:
        obj = {"format": RERANKER_FORMAT, "config": model.config, "state_dict": model.state_dict(),
               "encoder_fingerprint": encoder.fingerprint, "encoder_arch": encoder.arch.split("@")[0],
               "token_grid": TOKEN_GRID, "train_args": args, "metrics": metrics, "alpha": alpha}
        if not final:
            obj["resume"] = {"step": step, "optimizer": opt.state_dict()}
        save_atomic(obj, out)

    t0, losses = time.perf_counter(), []
    model.train()
    params = list(model.parameters())
    every = max(50, args["steps"] // 5)
    with ThreadLanes(lanes) as pool, prec.kernels():
        log(f"{prec.name} on {pool.lanes} thread lane(s)")
        for step in range(start, args["steps"]):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, args["steps"], args["lr"], warmup)
            batch = pool.run(_batch, train, step, args["batch_size"], args["seed"])
            opt.zero_grad(set_to_none=True)
            losses.append(fusion_backward(model, params, train, batch, prec, pool))
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            done = step + 1
            if progress:
                progress(done, args["steps"], stage="train-reranker", loss=float(np.mean(losses[-20:])))
            if done % every == 0 or done == args["steps"]:
                acc = swap_accuracy(model, val) if val else None
                log(f"step {done}/{args['steps']} loss {np.mean(losses[-every:]):.4f}"
                    + (f" | val true-vs-swap accuracy {acc:.3f}" if acc is not None else ""))
                metrics = {"step": done, "loss": float(np.mean(losses[-every:])), "val_swap_accuracy": acc}
                if done < args["steps"]:
                    checkpoint(done, final=False)
    metrics["train_seconds"] = round(time.perf_counter() - t0, 2)
    if val is not None:
        alpha = _fit_blend(Reranker(model, encoder.fingerprint), val, log)
        metrics["alpha"] = alpha
    checkpoint(args["steps"], final=True)
    return {"checkpoint": str(out), **metrics}
