"""Commands for data, training and evaluation: synth, train, eval, train-reranker, demo."""
from __future__ import annotations

import json
from pathlib import Path

import click

from mmsearch.config import DEFAULT_MODEL, DEFAULT_PRETRAINED, TINY_MODEL, ModelSpec
from mmsearch.cli.app import cli
from mmsearch.checks import MAX_RERANK_K, MAX_SEED, MAX_WORKERS
from mmsearch.demo import MIN_DEMO_IMAGES
from mmsearch.cli.options import Bar, count, device_option, model_options, model_spec, number, with_bar


# ---- data, training, evaluation ----------------------------------------------------------------
@cli.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--n", default=1000, show_default=True, type=count(1, 10_000_000), help="Number of images.")
@click.option("--seed", default=0, show_default=True, type=count(0, MAX_SEED), help="Random seed (same seed, same bytes).")
@click.option("--size", default=64, show_default=True, type=count(16, 4096), help="Image side in pixels.")
@click.option("--relational", type=number(0, 1), default=0.5, show_default=True,
              help="Share of scenes drawn as colour-swap pairs (what a re-ranker learns from).")
def synth(out, n, seed, size, relational):
    """Write a synthetic captioned dataset: OUT/images/*.png and OUT/captions.csv (train/val/test)."""
    from mmsearch.datasets.readers import synthesize

    summary = synthesize(out, n=n, seed=seed, size=size, relational=relational)
    click.echo(json.dumps(summary, default=str))


@cli.command()
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@model_options(default_model=f"{TINY_MODEL}, from scratch",
               default_pretrained=f"{DEFAULT_PRETRAINED} for {DEFAULT_MODEL}, none for {TINY_MODEL}")
@click.option("--steps", type=count(1), default=None, help="Optimiser steps (or use --epochs).")
@click.option("--epochs", type=count(1), default=None, help="Passes over the training images [default: 1].")
@click.option("--batch-size", type=count(1), default=None,
              help="Global batch: pairs per step, over all processes and micro-batches [default: 256].")
@click.option("--accum-steps", default=1, show_default=True, type=count(1),
              help="Split each process's batch into this many micro-batches (same loss and gradient, less memory).")
@click.option("--lr", type=number(0, 1, low_open=True), default=None,
              help="Peak learning rate, AdamW with warm-up + cosine [default: 5e-4 from scratch, 1e-5 fine-tuning].")
@click.option("--warmup", type=count(0), default=None, help="Warm-up steps [default: 10% of the steps, at most 2000].")
@click.option("--weight-decay", type=number(0, 1), default=None, help="[default: 0.2 from scratch, 0.1 fine-tuning].")
@click.option("--lock-image", is_flag=True, help="Freeze the image tower (LiT).")
@click.option("--lock-text", is_flag=True, help="Freeze the text tower.")
@click.option("--images-root", type=click.Path(file_okay=False), default=None,
              help="Resolve relative image paths against this folder.")
@click.option("--out", type=click.Path(dir_okay=False), default="model.pt", show_default=True,
              help="Checkpoint to write.")
@click.option("--resume", type=click.Path(dir_okay=False), default=None, help="Continue a killed run.")
@click.option("--save-every", type=count(1), default=None,
              help="Steps between resumable checkpoints [default: a tenth of the run, at least 25].")
@device_option
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="auto: bf16 where the device multiplies it natively (recent GPUs; CPUs with AVX512_BF16 or "
                   "AMX), fp16 with loss scaling on older GPUs, else fp32.")
@click.option("--workers", type=count(0, MAX_WORKERS), default=None,
              help="DataLoader processes (0: decode in the training process) decoding images [default: one per spare core, at most 8].")
@click.option("--seed", default=0, show_default=True, type=count(0, MAX_SEED),
              help="Seeds data order, captions and augmentation.")
@click.option("--val-every", type=click.IntRange(min=1), default=1, show_default=True,
              help="Epochs between recall@k validations on the 'val' split (the last step always validates).")
@with_bar("train", unit="step")
def train(data, model, pretrained, checkpoint, steps, epochs, batch_size, accum_steps, lr, warmup, weight_decay,
          lock_image, lock_text, images_root, out, resume, save_every, device, precision, workers, seed, val_every,
          progress):
    """Train or fine-tune the dual encoder contrastively (InfoNCE) on a caption dataset or tar shards.
    Several processes: torchrun --nproc-per-node N -m mmsearch train ..."""
    import os

    from mmsearch.train import train_encoder

    spec = model_spec(model, pretrained, checkpoint, warn_random=False) or ModelSpec(model=TINY_MODEL, pretrained=None)
    res = train_encoder(data, spec, out, steps=steps, epochs=epochs, batch_size=batch_size, lr=lr, warmup=warmup,
                        weight_decay=weight_decay, lock_image=lock_image, lock_text=lock_text, resume=resume,
                        images_root=images_root, seed=seed, save_every=save_every, device=device, precision=precision,
                        accum_steps=accum_steps, workers=workers, val_every=val_every, progress=progress,
                        log=lambda line: (progress.close(), click.echo(line)))
    progress.close()
    if int(os.environ.get("RANK", 0)) == 0:  # under torchrun, one report
        click.echo(json.dumps(res, default=str))


@cli.command("eval")
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option("--split", default="test", show_default=True, help="Split to evaluate (Karpathy JSON or split column).")
@model_options
@click.option("-k", "ks", multiple=True, type=count(1), help="k for R@k (repeatable) [default: 1 5 10].")
@click.option("--images-root", type=click.Path(file_okay=False), default=None,
              help="Resolve relative image paths against this folder.")
@click.option("--rerank", "reranker", type=click.Path(dir_okay=False), default=None,
              help="Re-ranker checkpoint: also report re-ranked metrics.")
@click.option("--rerank-k", default=32, show_default=True, type=count(1, MAX_RERANK_K),
              help="Candidates the re-ranker re-scores per query.")
@click.option("--alpha", type=number(0, 1), default=None,
              help="Re-ranked score = (1-A)*ITM probability + A*similarity  [default: the re-ranker's fitted blend].")
@click.option("--factory", default=None, help="Also report ANN fidelity of this FAISS factory vs exact search.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report instead of the table.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None, help="Write the JSON report here.")
@click.option("--save-embeddings", type=click.Path(dir_okay=False), default=None, help="Write embeddings (.npz).")
@device_option
@with_bar("eval")
def eval_cmd(data, split, model, pretrained, checkpoint, ks, images_root, reranker, rerank_k, alpha, factory, as_json,
             out_path, save_embeddings, device, progress):
    """Recall@k for text->image and image->text, computed as CLIP_benchmark does."""
    from mmsearch.datasets.readers import load_dataset
    from mmsearch.towers.encoder import load_encoder
    from mmsearch.evaluation.evaluate import evaluate, render_markdown

    for target in (out_path, save_embeddings):  # before the work, not after it
        if target:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(data, split=split, images_root=images_root)
    for line in ds.skipped[:10]:
        click.secho(f"skipped {line}", fg="yellow", err=True)
    encoder = load_encoder(model_spec(model, pretrained, checkpoint, required=True), device=device)
    rr = None
    if reranker:
        from mmsearch.rerank.model import Reranker

        rr = Reranker.load(reranker)
    report = evaluate(encoder, ds, ks=tuple(ks) or (1, 5, 10), reranker=rr, rerank_k=rerank_k, alpha=alpha,
                      factory=factory, save_embeddings=save_embeddings, progress=progress)
    progress.close()
    if out_path:
        Path(out_path).write_text(json.dumps(report, indent=2))
    click.echo(json.dumps(report) if as_json else render_markdown(report))


@cli.command("train-reranker")
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False), help="The dual encoder (frozen).")
@click.option("--steps", default=2000, show_default=True, type=count(1), help="Optimiser steps.")
@click.option("--batch-size", default=64, show_default=True, type=count(1), help="Positive pairs per step.")
@click.option("--lr", default=1e-3, show_default=True, type=number(0, 1, low_open=True), help="Peak learning rate.")
@click.option("--out", type=click.Path(dir_okay=False), default="reranker.pt", show_default=True,
              help="Re-ranker checkpoint to write.")
@click.option("--resume", type=click.Path(dir_okay=False), default=None, help="Continue a killed run.")
@device_option
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="Of the fusion model's training, on the CPU. auto is fp32: bf16 made this small model's step "
                   "no faster. A resumed run keeps its own.")
@with_bar("train-reranker", unit="step")
def train_reranker_cmd(data, checkpoint, steps, batch_size, lr, out, resume, device, precision, progress):
    """Train the fusion re-ranker (cross-attention ITM) over a frozen dual encoder."""
    from mmsearch.train.reranker import train_reranker

    res = train_reranker(data, checkpoint, out, steps=steps, batch_size=batch_size, lr=lr, resume=resume,
                         device=device, precision=precision, progress=progress,
                         log=lambda line: (progress.close(), click.echo(line)))
    progress.close()
    click.echo(json.dumps(res, default=str))



@cli.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"), show_default=True,
              help="Folder for the demo's data, model and index.")
@click.option("--n", default=None, type=count(MIN_DEMO_IMAGES, 10_000_000),
              help="Synthetic images [default: the demo's size].")
@click.option("--steps", default=None, type=count(1), help="Encoder training steps [default: the demo's budget].")
@click.option("--reranker-steps", default=None, type=count(1), help="Re-ranker training steps [default: the demo's budget].")
def demo(out, n, steps, reranker_steps):
    """Offline end-to-end demo: synthesise data, train mmsearch-tiny and its re-ranker, index, query, recall@k."""
    from mmsearch.demo import run_demo

    run_demo(out, n=n, steps=steps, reranker_steps=reranker_steps, log=click.echo, progress_factory=Bar)
