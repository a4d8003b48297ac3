"""Commands that build and inspect an index: index, info, errors, reindex, rerank."""
from __future__ import annotations

from pathlib import Path

import click

from mmsearch.config import ModelSpec
from mmsearch.cli.app import cli
from mmsearch.towers.devices import PRECISIONS, select_device
from mmsearch.checks import MAX_BATCH, MAX_WORKERS
from mmsearch.cli.options import (count, device_option, emit_json, index_dir_of, index_option, model_options, model_spec,
                                  shown, with_bar, yielding_openmp)


def ray_options(f):
    f = click.option("--ray-actors", "ray_actors", type=count(1, 100_000), default=None,
                     help="With --ray: encoder actors [default: one per GPU, else one per CPU of the cluster "
                          "less one per node for Ray's own tasks].")(f)
    return click.option("--ray", "ray_address", default=None, metavar="auto|ADDRESS",
                        help="Decode and encode on a Ray cluster (pip install 'mmsearch[ray]'): auto (RAY_ADDRESS, "
                             "a running `ray start` cluster, else a local one) or the head's address. "
                             "Re-running the same command resumes an interrupted run.")(f)


def ray_executor(address, actors, device, precision, batch_size, workers):
    """The Ray executor for --ray, or None for the local path (Ray is imported only here)."""
    if address is None:
        if actors is not None:
            raise click.UsageError("--ray-actors needs --ray")
        return None
    from mmsearch.distributed import RayExecutor

    return RayExecutor(address, actors=actors, device=device, precision=precision, batch_size=batch_size,
                       decode_workers=workers)


# ---- index -------------------------------------------------------------------------------------
@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@index_option
@model_options
@device_option
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="Image tower arithmetic, part of the model record (an index keeps its own) [default: the "
                   "index's; for a new one amp-bf16 on a CPU with bfloat16 arithmetic (AVX512_BF16, AMX) and no "
                   "re-ranker, else fp32]: amp-bf16 is ~2x fp32's speed there, int8 ~3x on CPUs with AVX-512 "
                   "VNNI/AMX; amp-fp16 is for CUDA and MPS.")
@click.option("--batch-size", default=None, type=count(1, MAX_BATCH),
              help="Images per encoder batch [default: 32, 256 on CUDA].")
@click.option("--workers", default=None, type=count(1, MAX_WORKERS),
              help="Decoding threads [default: CPU count, max 4; 16 on a GPU].")
@click.option("--video-frames", default=None, type=click.IntRange(1, 100_000), metavar="N",
              help="Frames sampled per video at most (keyframes, at most one a second): a long film is sampled "
                   "N times, evenly  [default: 300].")
@click.option("--exclude", multiple=True, help="Glob of paths to skip (repeatable), e.g. '*/thumbs/*'.")
@click.option("--hidden", is_flag=True, help="Also index hidden files and folders.")
@click.option("--factory", default=None,
              help="FAISS factory string for a new index, or 'auto': Flat while small, then an IVF tuned to "
                   "recall@10 >= 0.95 on text-like queries [default: auto].")
@click.option("--max-index-memory", default=None, help="Memory budget of a new index's vectors, e.g. 600MB.")
@click.option("--reranker", type=click.Path(dir_okay=False), default=None,
              help="Re-ranker checkpoint: store its image tokens while indexing.")
@click.option("--ocr/--no-ocr", default=None,
              help="Read the words in the images (OCR, pip install 'mmsearch[ocr]') for search by words; recorded in "
                   "the index: --ocr on an index built without it reads its images once [default: the index's "
                   "setting; for a new index on when rapidocr is installed].")
@ray_options
@click.option("--shards", "shards_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Index into the sharded layout in this folder instead of --index: each photo goes to the shard "
                   "its path routes to, each shard is planned against its own catalog.")
@click.option("--shard-count", type=click.IntRange(1, 4096), default=None,
              help="With --shards, for a new layout: how many shards to make.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@with_bar("embed")
def index(paths, index_dir, model, pretrained, checkpoint, device, precision, batch_size, workers, video_frames,
          exclude, hidden, factory, max_index_memory, reranker, ocr, ray_address, ray_actors, shards_dir, shard_count,
          as_json, progress):
    """Index image and video folders (or files): new and changed files are embedded (a video as its
    shots), moved ones reuse their embedding, deleted ones are removed. Re-running on an unchanged folder
    embeds nothing."""
    yielding_openmp()
    from mmsearch.indexing.pipeline import index_folders
    from mmsearch.video import DEFAULT_FRAMES

    executor = ray_executor(ray_address, ray_actors, device, precision, batch_size, workers)
    options = dict(batch_size=batch_size, workers=workers, exclude=exclude, include_hidden=hidden, factory=factory,
                   reranker=reranker, device=device, precision=precision, max_index_memory=max_index_memory,
                   ocr=ocr, video_frames=video_frames or DEFAULT_FRAMES)
    spec = model_spec(model, pretrained, checkpoint)
    if shards_dir is not None:
        if index_dir is not None:
            raise click.UsageError("give --index or --shards, not both")
        from mmsearch.indexing.sharded import index_sharded

        summary = index_sharded(shards_dir, paths, count=shard_count, spec=spec, executor=executor,
                                progress=progress, **options)
        index_dir = shards_dir
    elif shard_count is not None:
        raise click.UsageError("--shard-count needs --shards")
    else:
        summary = index_folders(index_dir_of(index_dir), paths, spec=spec, executor=executor, progress=progress,
                                **options)
    progress.close()
    for note in summary.notes:  # on stderr, so --json output stays one object
        click.secho(note, fg="yellow", err=True)
    if as_json:
        emit_json(dict(summary.to_dict(), **({"ray": executor.stats} if executor else {})))
        return
    if executor and executor.stats.get("actors"):
        st = executor.stats
        click.echo(f"ray: {st['nodes']} node(s), {st['actors']} actors on {st['device']} ({st['tower']} tower)"
                   + (f", resumed {st['resumed']} images left pending by an interrupted run" if st["resumed"] else ""))
    if summary.created:  # the precision is part of the model record: say which one a new index got
        why = {"amp-bf16": "" if summary.notes else " (bfloat16 products: this CPU has them; --precision fp32 "
                                                     "for full precision)",
               "int8": " (int8 products, as asked)" if precision else
                       " (int8 products: this CPU's default, AVX2 without bfloat16, ~1.6x fp32's speed here, vectors "
                       "within cosine 0.9994 of fp32's; --precision fp32 for full precision)",
               "fp32": int8_hint() if precision is None and summary.embedded and executor is None
               and not reranker and select_device(device) == "cpu" else ""}.get(summary.precision, "")
        click.echo(f"new {'sharded ' if shards_dir else ''}index {index_dir_of(index_dir)}: precision {summary.precision}{why}", err=True)
    for path, reason in summary.failures[:20]:
        click.secho(f"failed: {shown(path)}: {shown(reason)}", fg="red", err=True)
    if len(summary.failures) > 20:
        click.secho(f"... and {len(summary.failures) - 20} more (see `mmsearch errors`)", fg="red", err=True)
    s = summary
    if s.repaired:
        click.echo(f"repaired the vector index: {s.repaired} vectors added or dropped to match the catalog "
                   f"(from stored embeddings)", err=True)
    if s.embedded == 0 and not (s.moved or s.removed):
        click.echo(f"nothing to embed: {s.unchanged} unchanged, {s.failed} failed")
    rate = f" (embedding {s.embedded / s.embed_seconds:.1f} img/s)" if s.embedded and s.embed_seconds and not s.videos else ""
    if s.videos:
        click.echo(f"videos: {s.videos} embedded as {s.shots} shots")
    click.echo(f"added {s.added}, updated {s.updated}, unchanged {s.unchanged}, moved {s.moved}, "
               f"removed {s.removed}, failed {s.failed} in {s.seconds:.1f}s{rate}")
    if s.ocr_read or s.ocr_failures:
        click.echo(f"OCR read {s.ocr_read} images, text in {s.ocr_text}"
                   + (f"; failed on {len(s.ocr_failures)} (indexed without their words, see `mmsearch errors`)"
                      if s.ocr_failures else ""))



# ---- inspection --------------------------------------------------------------------------------
@cli.command()
@index_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def info(index_dir, as_json):
    """Show what an index holds: images, failures, vectors, model, dim, factory, size on disk."""
    from mmsearch.storage.store import IndexStore

    data = IndexStore.open(index_dir_of(index_dir)).info()
    if as_json:
        return emit_json(data)
    m = data["model"]
    rows = [("index", data["index"]), ("images", data["images"]),
            *([("videos", f"{data['videos']} ({data['shots']} shots, counted in images)")] if data.get("videos") else []),
            ("failed", data["failed"]),
            ("vectors", data["vectors"]), ("texts", data["texts"]),
            ("model", ModelSpec.from_dict(m).describe()), ("fingerprint", m["fingerprint"]),
            ("precision", data["precision"]), ("dim", data["dim"]),
            ("factory", data["factory"]),
            *_ann_rows(data.get("ann")),
            ("reranker", data["reranker"]["path"] if data["reranker"] else "none"),
            ("rerank bytes/image", data["rerank_bytes_per_image"]),
            ("ocr", _ocr_row(data.get("ocr"), data.get("words") or {})),
            ("bytes on disk", f"{data['bytes_on_disk']:,}")]
    for name, value in rows:
        click.echo(f"{name:<19}{value}")


def _ocr_row(ocr, words):
    if not ocr or not ocr.get("enabled"):
        return f"off ({words.get('documents', 0)} images searchable by name and metadata)"
    return (f"on ({ocr.get('reader')} {ocr.get('version')}, {ocr.get('models')}): text in {words.get('with_text', 0)} "
            f"of {words.get('documents', 0)} images, {words.get('lines', 0)} lines, "
            f"{words.get('ocr_failed', 0)} failed")


def _ann_rows(ann):
    """structure, bytes/vector, tuned params and recall of the image vectors (see ann.py)."""
    if not ann:
        return []
    params = ", ".join(f"{k}={v}" for k, v in (ann.get("params") or {}).items()) or "none (exact)"
    recall = ann.get("recall_heldout")
    return [("structure", ann.get("structure")), ("bytes/vector", ann.get("bytes_per_vector")),
            ("search params", params),
            ("tuned recall@10", "n/a" if recall is None else f"{recall:.3f} (held-out {ann.get('tuned_on')}, "
                                                               f"target {ann.get('target_recall')})"),
            ("rebuilt past", f"{ann['tier_max']:,} vectors" if ann.get("tier_max") else "never (fixed factory)")]


@cli.command()
@index_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def errors(index_dir, as_json):
    """List files that could not be indexed, with the reason. They are retried when they change."""
    from mmsearch.storage.store import IndexStore

    cat = IndexStore.open(index_dir_of(index_dir)).catalog
    rows = cat.failures() + cat.ocr_failures()
    for r in rows:
        emit_json(r) if as_json else click.echo(f"{shown(r['path'])}\t{r['reason']}")
    if not rows and not as_json:
        click.echo("no failures", err=True)


@cli.command()
@index_option
@click.option("--factory", required=True,
              help="'auto' or a FAISS factory string, e.g. Flat, HNSW32, 'IVF1024,SQ8'; search parameters are tuned.")
@click.option("--max-index-memory", default=None, help="Memory budget of the vectors for 'auto', e.g. 600MB.")
@with_bar("reindex")
def reindex(index_dir, factory, max_index_memory, progress):
    """Rebuild the vector index with another FAISS structure from stored embeddings (no re-embedding)."""
    from mmsearch.storage.store import IndexStore

    store = IndexStore.open(index_dir_of(index_dir))
    n = store.reindex(factory, max_index_memory=max_index_memory, progress=progress)
    progress.close()
    ann = store.ann_info() or {}
    recall = ann.get("recall_heldout")
    click.echo(f"rebuilt vector index '{factory}' with {n} vectors: {ann.get('structure')}"
               + (f", {ann['params']}" if ann.get("params") else "")
               + ("" if recall is None else f", recall@10 {recall:.3f} on held-out {ann.get('tuned_on')}"))


@cli.group()
def rerank():
    """Configure the fusion re-ranker of an index."""


@rerank.command("enable")
@click.argument("file", type=click.Path(dir_okay=False))
@index_option
@with_bar("tokens")
def rerank_enable(file, index_dir, progress):
    """Use re-ranker FILE for this index; back-fills image tokens (one read per image)."""
    yielding_openmp()
    from mmsearch.indexing.backfill import enable_reranker

    res = enable_reranker(index_dir_of(index_dir), file, progress=progress)
    progress.close()
    click.echo(f"re-ranker enabled: tokens for {res['images']} images ({res['failed']} unreadable), "
               f"states for {res['texts']} texts")


@rerank.command("disable")
@index_option
def rerank_disable(index_dir):
    """Stop re-ranking by default (cached tokens are kept)."""
    from mmsearch.storage.store import IndexStore

    IndexStore.open(index_dir_of(index_dir)).disable_reranker()
    click.echo("re-ranker disabled")


def int8_hint() -> str:
    """What a new fp32 index on a CPU without bfloat16 arithmetic could gain: int8's measured speed-up on a
    CPU of this kind (benchmarks/README.md, vs_rclip.py and tower_precision.py)."""
    from mmsearch.towers import cpu

    if cpu.native_bf16():
        return ""
    # measured: 2.9x with AVX-512 VNNI and AMX, 1.6x on AVX2 alone (no VNNI)
    speed = "~2.9x" if cpu.has("avx512_vnni") or cpu.has("amx_int8") else "~1.6x" if cpu.has("avx2") else None
    if speed is None:
        return ""
    return (f" (this CPU has no bfloat16 arithmetic; --precision int8 embeds {speed} faster on CPUs like it, "
            f"vectors within cosine 0.9998 of fp32's, for a new index)")

