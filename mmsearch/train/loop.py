"""Contrastive training of the dual encoder: open_clip's model, transforms and ClipLoss (symmetric
InfoNCE with a learnable temperature), AdamW with warm-up + cosine and gradient clipping; streaming
data (data.py), accumulation and the cross-process loss (step.py), mixed precision (precision.py) and
torchrun processes (distributed.py).

Resume is exact: the data order, caption choice and augmentation of step s depend only on
(seed, s, position), and the in-progress checkpoint holds the optimiser state, so a killed run continues
where it stopped and ends with the same steps and learning-rate schedule as an uninterrupted one.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

import numpy as np
import torch

from mmsearch.checks import MAX_SEED, count, number
from mmsearch.config import ModelSpec
from mmsearch.datasets.readers import CaptionDataset, load_dataset
from mmsearch.towers.encoder import CHECKPOINT_FORMAT, Encoder, load_checkpoint_file, load_encoder, weights_fingerprint
from mmsearch.errors import CheckpointError, DatasetError, TrainingError
from mmsearch.media import load_image
from mmsearch.evaluation.metrics import image_to_text_ranks, summarize, text_to_image_ranks
from mmsearch.train import distributed as dist_
from mmsearch.train.data import BatchPlan, CaptionTokens, StepBatches, batch_loader, default_workers, open_source
from mmsearch.train.optim import lr_at, make_optimizer, save_atomic
from mmsearch.train.precision import Precision
from mmsearch.train.step import clip_loss, contrastive_backward, tower_features
from mmsearch.train.threads import cpu_threads
from mmsearch.train.recipe import default_hparams

VAL_CACHE_IMAGES = 4096  # validation images kept decoded between validations (beyond: decoded each time)


def validate(encoder: Encoder, ds: CaptionDataset, pixels: Optional[torch.Tensor] = None, ks=(1, 5, 10)) -> dict:
    """R@k both ways on a held-out split, encoder in eval mode (CLIP_benchmark's definitions)."""
    img = np.concatenate([encoder.encode_image_tensor(chunk) for chunk in _val_chunks(encoder, ds, pixels)])
    txt = encoder.encode_texts(ds.captions)
    return {"text_to_image": summarize(text_to_image_ranks(txt, img, ds.caption_image), ks),
            "image_to_text": summarize(image_to_text_ranks(img, txt, ds.caption_image), ks)}


def _val_chunks(encoder: Encoder, ds: CaptionDataset, pixels: Optional[torch.Tensor], size: int = 128):
    if pixels is not None:
        yield from pixels.split(size)
        return
    for i in range(0, len(ds.images), size):
        yield encoder.preprocess_images([load_image(p, min_size=encoder.image_size) for p in ds.images[i:i + size]])


def _held_out(data, val_split: str, train_images, images_root) -> Optional[CaptionDataset]:
    try:
        val_ds = load_dataset(data, split=val_split, images_root=images_root)
    except DatasetError:
        return None
    return None if val_ds.images == train_images else val_ds  # no split information: nothing held out


def _new_args(data, spec, source, steps, epochs, batch_size, lr, warmup, weight_decay, lock_image, lock_text,
              seed, train_split, val_split, images_root, accum_steps) -> dict:
    hp = default_hparams(spec)
    batch_size = batch_size or hp["batch_size"]
    bs = min(batch_size, len(source))
    n_steps = steps or max(1, (epochs or 1) * max(1, len(source) // bs))
    return dict(data=str(data), spec=spec.to_dict(), steps=n_steps, batch_size=bs, lr=lr or hp["lr"],
                warmup=warmup if warmup is not None else max(1, min(hp["warmup_cap"], n_steps // 10)),
                weight_decay=weight_decay if weight_decay is not None else hp["weight_decay"],
                lock_image=lock_image, lock_text=lock_text, seed=seed, train_split=train_split, val_split=val_split,
                images_root=str(images_root) if images_root else None, accum_steps=accum_steps)


def train_encoder(data, spec: ModelSpec, out, steps: Optional[int] = None, epochs: Optional[int] = None,
                  batch_size: Optional[int] = None, lr: Optional[float] = None, warmup: Optional[int] = None,
                  weight_decay: Optional[float] = None, lock_image: bool = False, lock_text: bool = False,
                  resume=None, train_split: str = "train", val_split: str = "val", images_root=None, seed: int = 0,
                  save_every: Optional[int] = None, device="cpu", precision: str = "auto", accum_steps: int = 1,
                  workers: Optional[int] = None, val_every: int = 1, progress: Optional[Callable] = None,
                  log: Optional[Callable[[str], None]] = None) -> dict:
    """Train (or fine-tune) and write a single-file checkpoint to `out`. Returns the final metrics.

    `batch_size` is the global batch (what one step's loss sees), split over torchrun's processes and
    `accum_steps` micro-batches; unset hyper-parameters come from the recipe (recipe.py). Validation
    runs every `val_every` epochs and after the last step (open_clip's --val-frequency)."""
    from mmsearch.towers.devices import resolve_device

    steps, epochs, batch_size = count("steps", steps), count("epochs", epochs), count("batch_size", batch_size)
    accum_steps, val_every = count("accum_steps", accum_steps, optional=False), count("val_every", val_every, optional=False)
    warmup, save_every, workers = count("warmup", warmup, 0), count("save_every", save_every), count("workers", workers, 0)
    lr, weight_decay = number("lr", lr, 0.0, 1.0, low_open=True), number("weight_decay", weight_decay, 0.0, 1.0)
    seed = count("seed", seed, 0, MAX_SEED, optional=False)
    device = device if isinstance(device, torch.device) else resolve_device(device)
    world = dist_.start(device)
    device = dist_.device_for(world.local_rank, device)
    log = (log or (lambda line: None)) if world.is_main else (lambda line: None)
    progress = progress if world.is_main else None
    try:
        with cpu_threads(device.type):  # the idle cores (train/threads.py); restored afterwards
            return _train(data, spec, out, steps, epochs, batch_size, lr, warmup, weight_decay, lock_image,
                          lock_text, resume, train_split, val_split, images_root, seed, save_every, device,
                          precision, accum_steps, workers, world, progress, log, val_every)
    finally:
        dist_.stop(world)


def _train(data, spec, out, steps, epochs, batch_size, lr, warmup, weight_decay, lock_image, lock_text, resume,
           train_split, val_split, images_root, seed, save_every, device, precision, accum_steps, workers, world,
           progress, log, val_every=1) -> dict:
    state = None
    if resume:
        state = load_checkpoint_file(resume)
        if "resume" not in state:
            raise CheckpointError(f"{resume} is a finished checkpoint, not an interrupted run")
        args = dict(state["train_args"])
        was = int(args.get("world_size", 1))
        if was != world.world_size:
            raise TrainingError(f"{resume} was trained by {was} process(es) and this run has {world.world_size}: "
                                f"resume it with the same count (torchrun --nproc-per-node {was})")
        spec = ModelSpec(checkpoint=str(resume))
        images_root = images_root or args.get("images_root")
        train_split, val_split = args["train_split"], args["val_split"]
    source = open_source(data, train_split, images_root)
    for line in source.skipped[:5]:
        log(f"skipped {line}")
    if len(source.skipped) > 5:
        log(f"skipped {len(source.skipped)} rows in all")
    val_ds = _held_out(data, val_split, getattr(source, "paths", None), images_root) if world.is_main else None
    if state is None:
        args = _new_args(data, spec, source, steps, epochs, batch_size, lr, warmup, weight_decay, lock_image,
                         lock_text, seed, train_split, val_split, images_root, accum_steps)
        args["val_every"] = max(1, int(val_every))
    prec = Precision.create(args.get("precision", precision) if state is not None else precision, device)
    args.update(precision=prec.name, device=device.type, world_size=world.world_size,
                accum_steps=int(args.get("accum_steps", 1)))
    n_steps = args["steps"]
    plan = BatchPlan(len(source), args["batch_size"], args["seed"], world.world_size, args["accum_steps"])

    encoder = load_encoder(spec, device=device)
    model = encoder.model
    if args["lock_image"]:
        model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=True)
    if args["lock_text"]:
        model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    dist_.broadcast_params(model, world)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(model, args["lr"], args["weight_decay"])
    start, history, bad_images, n_bad = 0, [], [], 0
    if state is not None:
        opt.load_state_dict(state["resume"]["optimizer"])
        prec.load_state_dict(state["resume"].get("precision"))
        start, history = state["resume"]["step"], state["resume"]["history"]
        bad_images = list(state["resume"].get("bad_images", []))
        n_bad = int(state["resume"].get("skipped_images", len(bad_images)))
        log(f"resuming at step {start}/{n_steps}")
    log(f"{len(source)} training images; global batch {plan.batch_size} = {world.world_size} process(es) × "
        f"{plan.accum_steps} micro-batch(es) of {plan.micro_size}; {prec.name} on {device}"
        + (f", {torch.get_num_threads()} thread(s)" if device.type == "cpu" else ""))
    val_pixels = None
    if val_ds is not None and len(val_ds.images) <= VAL_CACHE_IMAGES:
        val_pixels = torch.cat(list(_val_chunks(encoder, val_ds, None)))
    loss_fn = clip_loss(world.rank, world.world_size)
    features = tower_features(encoder)
    save_every = save_every or max(25, n_steps // 10)
    n_workers = default_workers(device.type) if workers is None else workers
    batches = StepBatches(source, encoder.preprocess_train, plan, world.rank, encoder.image_size)
    caption_tokens = CaptionTokens(encoder.tokenize)
    t0, losses = time.perf_counter(), []
    metrics: dict = {}

    def checkpoint(step: int, final: bool) -> None:
        if not world.is_main:
            return
        obj = {"format": CHECKPOINT_FORMAT, "arch": encoder.arch.split("@")[0], "model_cfg": encoder.model_cfg,
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "train_args": args,
               "metrics": metrics, "fingerprint": weights_fingerprint(model)}
        if not final:
            obj["resume"] = {"step": step, "optimizer": opt.state_dict(), "history": history,
                             "precision": prec.state_dict(), "bad_images": bad_images,
                             "skipped_images": n_bad}
        save_atomic(obj, out)

    model.train()
    with prec.kernels():  # process-wide kernel choices for this precision
        for batch in batch_loader(batches, range(start, n_steps), n_workers, pin=device.type == "cuda"):
            step = batch["step"]
            for g in opt.param_groups:
                g["lr"] = lr_at(step, n_steps, args["lr"], args["warmup"])
            for line in batch["bad"]:
                n_bad += 1
                if n_bad <= 20:  # then only counted (metrics.skipped_images), not one line each
                    bad_images.append(line)
                    log(f"skipped unreadable image {line}" + (" (further ones are counted, not listed)"
                                                               if n_bad == 20 else ""))
            pixels = batch["pixels"].to(device, non_blocking=True)
            tokens = caption_tokens(batch["texts"])
            m = plan.micro_size
            micro = [(pixels[j:j + m], tokens[j:j + m]) for j in range(0, plan.local_size, m)]
            opt.zero_grad(set_to_none=True)
            loss = contrastive_backward(features, micro, model.logit_scale, loss_fn, prec)
            dist_.average_gradients(params, world)
            prec.step(opt, params)
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(loss)
            done = step + 1
            if progress:
                progress(done, n_steps, stage="train", loss=float(np.mean(losses[-20:])))
            if done % plan.per_epoch == 0 or done == n_steps:
                recent = losses[-plan.per_epoch:]
                total, count = dist_.all_sum([float(np.sum(recent)), float(len(recent))], world, device)
                seconds = time.perf_counter() - t0
                entry = {"step": done, "epoch": done / plan.per_epoch, "loss": total / max(1.0, count),
                         "images_per_s": round(len(losses) * plan.batch_size / max(seconds, 1e-9), 1)}
                if val_ds is not None and (done // plan.per_epoch % args.get("val_every", 1) == 0
                                           or done == n_steps):
                    model.eval()
                    entry["val"] = validate(encoder, val_ds, val_pixels)
                    model.train()
                history.append(entry)
                log(_format(entry, n_steps))
            if done % save_every == 0 and done < n_steps:
                checkpoint(done, final=False)
    model.eval()
    metrics = {"steps": n_steps, "train_seconds": round(time.perf_counter() - t0, 2),
               "final_loss": history[-1]["loss"] if history else None,
               "first_loss": losses[0] if losses and start == 0 else None,
               "val": history[-1].get("val") if history else None, "skipped_images": n_bad, "skipped_examples": bad_images,
               "history": history}
    checkpoint(n_steps, final=True)
    dist_.barrier(world)
    return {"checkpoint": str(out), **{k: v for k, v in metrics.items() if k != "history"}}


def _format(entry: dict, total: int) -> str:
    line = (f"step {entry['step']}/{total} epoch {entry['epoch']:.1f} loss {entry['loss']:.3f} "
            f"({entry['images_per_s']:.0f} img/s)")
    if "val" in entry:
        t, i = entry["val"]["text_to_image"], entry["val"]["image_to_text"]
        line += f" | val t->i R@1 {t['R@1']:.3f} R@5 {t['R@5']:.3f} | i->t R@1 {i['R@1']:.3f} R@5 {i['R@5']:.3f}"
    return line
