"""The `mmsearch` command line. Each command parses options, calls one library function, renders.

Only this module prints. Heavy modules (torch, open_clip, faiss) are imported inside commands, so
`mmsearch --help` and a text query stay fast.
"""
from __future__ import annotations

import datetime as _dt
import functools
import json
import sys
from pathlib import Path

import click

from .config import (DEFAULT_MODEL, DEFAULT_PRETRAINED, TINY_MODEL, ModelSpec, default_index_dir,
                     shipped_architectures)
from .errors import MmsearchError


class _Group(click.Group):
    """Turns the library's typed errors into one-line messages and a non-zero exit."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MmsearchError as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mmsearch")
def cli():
    """mmsearch: index image folders, search them by text or image, train and evaluate the models."""


def main():
    cli(prog_name="mmsearch")


# ---- shared option bundles ---------------------------------------------------------------------
def index_option(f):
    return click.option("--index", "index_dir", type=click.Path(file_okay=False, path_type=Path),
                        default=None, help="Index folder [default: $MMSEARCH_INDEX or ./indexes/default].")(f)


def model_options(f=None, *, default_model=DEFAULT_MODEL, default_pretrained=DEFAULT_PRETRAINED):
    """--model/--pretrained/--checkpoint; the defaults only document what the command falls back to."""
    def deco(f):
        f = click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
                         help="Weights trained by `mmsearch train` (architecture read from the file).")(f)
        f = click.option("--pretrained", default=None,
                         help=f"open_clip pretrained tag or local weights file; 'none' = random weights "
                              f"[default: {default_pretrained}].")(f)
        return click.option("--model", default=None, help=f"open_clip architecture [default: {default_model}].")(f)
    return deco(f) if f is not None else deco


def output_options(f):
    f = click.option("--paths", "as_paths", is_flag=True, help="Bare paths, one per line (for pipes).")(f)
    f = click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")(f)
    return f


def _spec(model, pretrained, checkpoint, required=False, warn_random=True):
    """A ModelSpec from CLI options, or None when none were given (reuse the index's model).
    Without --pretrained, an open_clip model gets its default tag and one of ours starts random."""
    if not (model or pretrained or checkpoint):
        return ModelSpec() if required else None
    if checkpoint and pretrained:
        raise click.UsageError("--checkpoint and --pretrained are mutually exclusive")
    model = model or DEFAULT_MODEL
    if pretrained is None and not checkpoint:
        pretrained = None if model in shipped_architectures() else DEFAULT_PRETRAINED
    spec = ModelSpec(model=model, pretrained=None if checkpoint else pretrained, checkpoint=checkpoint)
    if spec.is_random and warn_random:
        click.secho("warning: --pretrained none gives random weights; results are meaningless "
                    "(fine for tests and speed benchmarks)", fg="yellow", err=True)
    return spec


def _index_dir(index_dir):
    return Path(index_dir) if index_dir else default_index_dir()


class _Bar:
    """A tqdm progress callback for the library; silent when stderr is not a terminal."""

    def __init__(self, desc, unit="img"):
        self.desc, self.unit, self.bar, self.stage = desc, unit, None, None

    def __call__(self, done, total=None, stage=None, **info):
        from tqdm import tqdm

        if self.bar is None or (stage and stage != self.stage):
            if self.bar is not None:
                self.bar.close()
            self.stage = stage
            self.bar = tqdm(total=total, desc=stage or self.desc, unit=self.unit, disable=None,
                            dynamic_ncols=True, leave=False)
        if total is not None and self.bar.total != total:
            self.bar.total = total
        self.bar.n = done
        if info:
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in info.items()},
                                 refresh=False)
        self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def with_bar(desc, unit="img"):
    """Pass a `progress` callback into the command and close the bar afterwards."""
    def deco(f):
        @functools.wraps(f)
        def wrapper(*a, **kw):
            bar = _Bar(desc, unit)
            try:
                return f(*a, progress=bar, **kw)
            finally:
                bar.close()
        return wrapper
    return deco


def _date(value):
    if value is None:
        return None
    try:
        d = _dt.datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a date (use YYYY-MM-DD)")
    if d.tzinfo is None:
        d = d.replace(tzinfo=_dt.timezone.utc)
    return d.timestamp()


def _yielding_openmp():
    """Indexing runs decode threads next to torch's OpenMP pool; spinning OpenMP workers starve them.
    Measured on 2 busy cores: 1.6x more images/s with passive waiting. Must precede `import torch`;
    a user's own OMP_WAIT_POLICY wins."""
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _emit_json(obj):
    click.echo(json.dumps(obj, ensure_ascii=False))


# ---- index -------------------------------------------------------------------------------------
@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@index_option
@model_options
@click.option("--batch-size", default=32, show_default=True, help="Images per encoder batch.")
@click.option("--workers", default=None, type=int, help="Decoding threads [default: CPU count, max 4].")
@click.option("--exclude", multiple=True, help="Glob of paths to skip (repeatable), e.g. '*/thumbs/*'.")
@click.option("--hidden", is_flag=True, help="Also index hidden files and folders.")
@click.option("--factory", default=None, help="FAISS factory string for a new index [default: Flat].")
@click.option("--reranker", type=click.Path(dir_okay=False), default=None,
              help="Re-ranker checkpoint: store its image tokens while indexing.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@with_bar("embed")
def index(paths, index_dir, model, pretrained, checkpoint, batch_size, workers, exclude, hidden, factory,
          reranker, as_json, progress):
    """Index image folders (or files): new and changed files are embedded, moved ones reuse their
    embedding, deleted ones are removed. Re-running on an unchanged folder embeds nothing."""
    _yielding_openmp()
    from .indexer import index_folders

    summary = index_folders(_index_dir(index_dir), paths, spec=_spec(model, pretrained, checkpoint),
                            batch_size=batch_size, workers=workers, exclude=exclude, include_hidden=hidden,
                            factory=factory, reranker=reranker, progress=progress)
    progress.close()
    if as_json:
        _emit_json(summary.to_dict())
        return
    for path, reason in summary.failures[:20]:
        click.secho(f"failed: {path}: {reason}", fg="red", err=True)
    if len(summary.failures) > 20:
        click.secho(f"... and {len(summary.failures) - 20} more (see `mmsearch errors`)", fg="red", err=True)
    s = summary
    if s.embedded == 0 and not (s.moved or s.removed):
        click.echo(f"nothing to embed: {s.unchanged} unchanged, {s.failed} failed")
    rate = f" (embedding {s.embedded / s.embed_seconds:.1f} img/s)" if s.embedded and s.embed_seconds else ""
    click.echo(f"added {s.added}, updated {s.updated}, unchanged {s.unchanged}, moved {s.moved}, "
               f"removed {s.removed}, failed {s.failed} in {s.seconds:.1f}s{rate}")


# ---- search ------------------------------------------------------------------------------------
@cli.command()
@click.argument("query", required=False)
@click.option("--image", "images", multiple=True, type=click.Path(dir_okay=False),
              help="Query image (repeatable); inside or outside the index.")
@click.option("--texts", "over_texts", is_flag=True, help="Search the text corpus instead of the images.")
@index_option
@click.option("-k", "k", default=10, show_default=True, help="Number of results.")
@output_options
@click.option("--under", type=click.Path(file_okay=False), help="Only images under this folder.")
@click.option("--ext", "exts", help="Only these extensions, comma-separated, e.g. jpg,png.")
@click.option("--after", help="Only images taken on/after DATE (EXIF date, else file mtime).")
@click.option("--before", help="Only images taken before DATE.")
@click.option("--min-score", type=float, default=None, help="Drop results scoring below X.")
@click.option("--rerank/--no-rerank", default=None, help="Re-rank with the fusion model [default: on when configured].")
@click.option("--rerank-k", default=32, show_default=True, help="Candidates the re-ranker re-scores.")
@click.option("--alpha", type=click.FloatRange(0, 1), default=None,
              help="Re-ranked score = (1-A)*ITM probability + A*similarity  [default: the blend the re-ranker "
                   "was fitted to on validation data].")
def search(query, images, over_texts, index_dir, k, as_json, as_paths, under, exts, after, before, min_score,
           rerank, rerank_k, alpha):
    """Search by text, by image, or both: "dog", --image photo.jpg, "2:dog + beach - people"."""
    from .query import Searcher
    from .store import IndexStore

    searcher = Searcher(IndexStore.open(_index_dir(index_dir)))
    if over_texts:
        hits = searcher.search_texts(query, images, k=k, rerank=rerank, rerank_k=rerank_k, alpha=alpha)
        return _render(hits, as_json, as_paths, key="text")
    hits = searcher.search(query, images, k=k, under=under, exts=exts.split(",") if exts else None,
                           after=_date(after), before=_date(before), min_score=min_score, rerank=rerank,
                           rerank_k=rerank_k, alpha=alpha)
    _render([h.to_dict() for h in hits], as_json, as_paths, key="path")


def _render(hits, as_json, as_paths, key):
    if as_json:
        for h in hits:
            _emit_json(h)
    elif as_paths:
        for h in hits:
            click.echo(h[key])
    elif not hits:
        click.echo("no results", err=True)
    else:
        click.echo(f"{'rank':>4}  {'score':>6}  {key}")
        for h in hits:
            click.echo(f"{h['rank']:>4}  {h['score']:>6.3f}  {h[key]}")


# ---- inspection --------------------------------------------------------------------------------
@cli.command()
@index_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def info(index_dir, as_json):
    """Show what an index holds: images, failures, vectors, model, dim, factory, size on disk."""
    from .store import IndexStore

    data = IndexStore.open(_index_dir(index_dir)).info()
    if as_json:
        return _emit_json(data)
    m = data["model"]
    rows = [("index", data["index"]), ("images", data["images"]), ("failed", data["failed"]),
            ("vectors", data["vectors"]), ("texts", data["texts"]),
            ("model", ModelSpec.from_dict(m).describe()), ("fingerprint", m["fingerprint"]), ("dim", data["dim"]),
            ("factory", data["factory"]),
            ("reranker", data["reranker"]["path"] if data["reranker"] else "none"),
            ("rerank bytes/image", data["rerank_bytes_per_image"]),
            ("bytes on disk", f"{data['bytes_on_disk']:,}")]
    for name, value in rows:
        click.echo(f"{name:<19}{value}")


@cli.command()
@index_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def errors(index_dir, as_json):
    """List files that could not be indexed, with the reason. They are retried when they change."""
    from .store import IndexStore

    rows = IndexStore.open(_index_dir(index_dir)).catalog.failures()
    for r in rows:
        _emit_json(r) if as_json else click.echo(f"{r['path']}\t{r['reason']}")
    if not rows and not as_json:
        click.echo("no failures", err=True)


@cli.command()
@index_option
@click.option("--factory", required=True, help="FAISS factory string, e.g. Flat, HNSW32, 'IVF1024,SQ8'.")
def reindex(index_dir, factory):
    """Rebuild the vector index with another FAISS structure from stored embeddings (no re-embedding)."""
    from .store import IndexStore

    n = IndexStore.open(_index_dir(index_dir)).reindex(factory)
    click.echo(f"rebuilt vector index '{factory}' with {n} vectors")


# ---- texts -------------------------------------------------------------------------------------
@cli.group()
def texts():
    """Manage the text corpus searched by `search --texts` (image->text)."""


@texts.command("add")
@click.argument("file", type=click.Path(dir_okay=False))
@index_option
@click.option("--column", default=None, help="Text column of a CSV/TSV/JSONL file [default: text or caption].")
@with_bar("texts", unit="text")
def texts_add(file, index_dir, column, progress):
    """Embed the texts of FILE (one per line, or a CSV/JSONL text column); duplicates are stored once."""
    from .corpus import add_texts, read_texts
    from .store import IndexStore

    res = add_texts(IndexStore.open(_index_dir(index_dir)), read_texts(file, column), progress=progress)
    progress.close()
    click.echo(f"added {res['added']} texts ({res['skipped']} duplicates or empty); corpus holds {res['texts']}")


@texts.command("list")
@index_option
@click.option("--like", default=None, help="Only texts containing this substring.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def texts_list(index_dir, like, as_json):
    """List the corpus (id and text)."""
    from .store import IndexStore

    for r in IndexStore.open(_index_dir(index_dir)).catalog.text_rows(like=like):
        _emit_json(r) if as_json else click.echo(f"{r['id']}\t{r['text']}")


@texts.command("remove")
@click.argument("ids", nargs=-1, type=int)
@index_option
@click.option("--like", default=None, help="Remove every text containing this substring.")
def texts_remove(ids, index_dir, like):
    """Remove texts by id (see `texts list`) or by substring."""
    from .corpus import remove_texts
    from .store import IndexStore

    if not ids and not like:
        raise click.UsageError("give text ids or --like")
    n = remove_texts(IndexStore.open(_index_dir(index_dir)), ids, like)
    click.echo(f"removed {n} texts")


# ---- data, training, evaluation ----------------------------------------------------------------
@cli.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--n", default=1000, show_default=True, help="Number of images.")
@click.option("--seed", default=0, show_default=True, help="Random seed (same seed, same bytes).")
@click.option("--size", default=64, show_default=True, help="Image side in pixels.")
@click.option("--relational", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Share of scenes drawn as colour-swap pairs (what a re-ranker learns from).")
def synth(out, n, seed, size, relational):
    """Write a synthetic captioned dataset: OUT/images/*.png and OUT/captions.csv (train/val/test)."""
    from .datasets import synthesize

    summary = synthesize(out, n=n, seed=seed, size=size, relational=relational)
    click.echo(json.dumps(summary, default=str))


@cli.command()
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@model_options(default_model=f"{TINY_MODEL}, from scratch",
               default_pretrained=f"{DEFAULT_PRETRAINED} for {DEFAULT_MODEL}, none for {TINY_MODEL}")
@click.option("--steps", type=int, default=None, help="Optimiser steps (or use --epochs).")
@click.option("--epochs", type=int, default=None, help="Passes over the training images.")
@click.option("--batch-size", default=64, show_default=True, help="Image-caption pairs per step.")
@click.option("--lr", default=5e-4, show_default=True, type=float, help="Peak learning rate (AdamW, warmup + cosine).")
@click.option("--lock-image", is_flag=True, help="Freeze the image tower (LiT).")
@click.option("--lock-text", is_flag=True, help="Freeze the text tower.")
@click.option("--images-root", type=click.Path(file_okay=False), default=None,
              help="Resolve relative image paths against this folder.")
@click.option("--out", type=click.Path(dir_okay=False), default="model.pt", show_default=True,
              help="Checkpoint to write.")
@click.option("--resume", type=click.Path(dir_okay=False), default=None, help="Continue a killed run.")
@with_bar("train", unit="step")
def train(data, model, pretrained, checkpoint, steps, epochs, batch_size, lr, lock_image, lock_text, images_root,
          out, resume, progress):
    """Train or fine-tune the dual encoder contrastively (InfoNCE) on a caption dataset."""
    from .train import train_encoder

    spec = _spec(model, pretrained, checkpoint, warn_random=False) or ModelSpec(model=TINY_MODEL, pretrained=None)
    res = train_encoder(data, spec, out, steps=steps, epochs=epochs, batch_size=batch_size, lr=lr,
                        lock_image=lock_image, lock_text=lock_text, resume=resume, images_root=images_root,
                        progress=progress, log=lambda line: (progress.close(), click.echo(line)))
    progress.close()
    click.echo(json.dumps(res, default=str))


@cli.command("eval")
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option("--split", default="test", show_default=True, help="Split to evaluate (Karpathy JSON or split column).")
@model_options
@click.option("-k", "ks", multiple=True, type=int, help="k for R@k (repeatable) [default: 1 5 10].")
@click.option("--images-root", type=click.Path(file_okay=False), default=None,
              help="Resolve relative image paths against this folder.")
@click.option("--rerank", "reranker", type=click.Path(dir_okay=False), default=None,
              help="Re-ranker checkpoint: also report re-ranked metrics.")
@click.option("--rerank-k", default=32, show_default=True, help="Candidates the re-ranker re-scores per query.")
@click.option("--alpha", type=click.FloatRange(0, 1), default=None,
              help="Re-ranked score = (1-A)*ITM probability + A*similarity  [default: the re-ranker's fitted blend].")
@click.option("--factory", default=None, help="Also report ANN fidelity of this FAISS factory vs exact search.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report instead of the table.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None, help="Write the JSON report here.")
@click.option("--save-embeddings", type=click.Path(dir_okay=False), default=None, help="Write embeddings (.npz).")
@with_bar("eval")
def eval_cmd(data, split, model, pretrained, checkpoint, ks, images_root, reranker, rerank_k, alpha, factory, as_json,
             out_path, save_embeddings, progress):
    """Recall@k for text->image and image->text, computed as CLIP_benchmark does."""
    from .datasets import load_dataset
    from .encoder import load_encoder
    from .evaluate import evaluate, render_markdown

    for target in (out_path, save_embeddings):  # before the work, not after it
        if target:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(data, split=split, images_root=images_root)
    for line in ds.skipped[:10]:
        click.secho(f"skipped {line}", fg="yellow", err=True)
    encoder = load_encoder(_spec(model, pretrained, checkpoint, required=True))
    rr = None
    if reranker:
        from .rerank import Reranker

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
@click.option("--steps", default=2000, show_default=True, help="Optimiser steps.")
@click.option("--batch-size", default=64, show_default=True, help="Positive pairs per step.")
@click.option("--lr", default=1e-3, show_default=True, type=float, help="Peak learning rate.")
@click.option("--out", type=click.Path(dir_okay=False), default="reranker.pt", show_default=True,
              help="Re-ranker checkpoint to write.")
@click.option("--resume", type=click.Path(dir_okay=False), default=None, help="Continue a killed run.")
@with_bar("train-reranker", unit="step")
def train_reranker_cmd(data, checkpoint, steps, batch_size, lr, out, resume, progress):
    """Train the fusion re-ranker (cross-attention ITM) over a frozen dual encoder."""
    from .rerank_train import train_reranker

    res = train_reranker(data, checkpoint, out, steps=steps, batch_size=batch_size, lr=lr, resume=resume,
                         progress=progress, log=lambda line: (progress.close(), click.echo(line)))
    progress.close()
    click.echo(json.dumps(res, default=str))


@cli.group()
def rerank():
    """Configure the fusion re-ranker of an index."""


@rerank.command("enable")
@click.argument("file", type=click.Path(dir_okay=False))
@index_option
@with_bar("tokens")
def rerank_enable(file, index_dir, progress):
    """Use re-ranker FILE for this index; back-fills image tokens (one read per image)."""
    _yielding_openmp()
    from .indexer import enable_reranker

    res = enable_reranker(_index_dir(index_dir), file, progress=progress)
    progress.close()
    click.echo(f"re-ranker enabled: tokens for {res['images']} images ({res['failed']} unreadable), "
               f"states for {res['texts']} texts")


@rerank.command("disable")
@index_option
def rerank_disable(index_dir):
    """Stop re-ranking by default (cached tokens are kept)."""
    from .store import IndexStore

    IndexStore.open(_index_dir(index_dir)).disable_reranker()
    click.echo("re-ranker disabled")


@cli.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"), show_default=True,
              help="Folder for the demo's data, model and index.")
@click.option("--n", default=None, type=int, help="Synthetic images [default: the demo's size].")
@click.option("--steps", default=None, type=int, help="Encoder training steps [default: the demo's budget].")
@click.option("--reranker-steps", default=None, type=int, help="Re-ranker training steps [default: the demo's budget].")
def demo(out, n, steps, reranker_steps):
    """Offline end-to-end demo: synthesise data, train mmsearch-tiny and its re-ranker, index, query, recall@k."""
    from .demo import run_demo

    run_demo(out, n=n, steps=steps, reranker_steps=reranker_steps, log=click.echo, progress_factory=_Bar)
