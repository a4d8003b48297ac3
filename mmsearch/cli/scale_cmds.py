"""Commands for large indexes: dupes (near-duplicate groups), export and import of embeddings."""
from __future__ import annotations

from pathlib import Path

import click

from mmsearch.cli.app import cli
from mmsearch.cli.options import (echo_path, emit_json, index_dir_of, index_option, model_options, model_spec,
                                  output_options, shown, with_bar)


@cli.command()
@index_option
@click.option("--threshold", type=click.FloatRange(-1, 1), default=None,
              help="Cosine similarity at or above which two images are near-duplicates [default: 0.95, "
                   "measured on edited copies vs distinct images].")
@output_options
@with_bar("dupes")
def dupes(index_dir, threshold, as_json, as_paths, progress):
    """Groups of near-duplicate images (resized, re-encoded, lightly edited copies), largest first."""
    from mmsearch.search.dupes import DEFAULT_THRESHOLD, find_duplicates
    from mmsearch.storage.store import IndexStore

    groups = find_duplicates(IndexStore.open(index_dir_of(index_dir)),
                             DEFAULT_THRESHOLD if threshold is None else threshold, progress=progress)
    progress.close()
    for g in groups:
        if as_json:
            emit_json(g)
        elif as_paths:  # one group per paragraph, for `xargs` and friends
            for p in g["paths"]:
                echo_path(p)
            click.echo()
        else:
            click.echo(f"group {g['group']}: {g['size']} images, min cosine {g['min_score']:.3f}")
            for p in g["paths"]:
                click.echo(f"  {shown(p)}")
    if not groups and not as_json:
        click.echo("no near-duplicates", err=True)


@cli.command("export")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@index_option
@click.option("--shard-size", default=100_000, show_default=True, help="Images per img_emb_N.npy shard.")
@click.option("--float16", is_flag=True, help="Write float16 vectors (half the size, as clip-retrieval does).")
@with_bar("export")
def export_cmd(out, index_dir, shard_size, float16, progress):
    """Write embeddings + metadata in clip-retrieval's layout (img_emb/, metadata/) plus the model record."""
    from mmsearch.storage.exchange import export_embeddings
    from mmsearch.storage.store import IndexStore

    res = export_embeddings(IndexStore.open(index_dir_of(index_dir)), out, shard_size=shard_size,
                            float16=float16, progress=progress)
    progress.close()
    click.echo(f"exported {res['images']} embeddings (dim {res['dim']}, {res['dtype']}) in {res['shards']} "
               f"shards to {res['out']}")


@cli.command("import")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@index_option
@model_options
@click.option("--max-index-memory", default=None, help="Memory budget of a new index's vectors, e.g. 600MB.")
@click.option("--root", "roots", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder the imported images may be served from by `mmsearch serve` (repeatable); "
                   "without one the server shows no thumbnail or file of them (search still works).")
@with_bar("import")
def import_cmd(src, index_dir, model, pretrained, checkpoint, max_index_memory, roots, progress):
    """Ingest embedding shards (from `mmsearch export` or clip-retrieval inference) without re-embedding.
    The model must match the index's: a mismatch is refused and nothing changes."""
    from mmsearch.storage.exchange import open_for_import, import_embeddings

    spec = model_spec(model, pretrained, checkpoint, warn_random=False)
    store = open_for_import(index_dir_of(index_dir), src, spec, max_index_memory)
    res = import_embeddings(store, src, expected_model=spec, progress=progress, roots=roots)
    progress.close()
    click.echo(f"imported {res['imported']} embeddings from {res['shards']} shards; the index holds "
               f"{res['images']} images ({res['structure']})")
    if res["unservable"]:
        what = (f"{res['unservable']} imported images lie outside the folders the index serves files from"
                if res["roots"] else "no --root given")
        click.echo(f"note: {what}: `mmsearch serve` finds them but shows no thumbnail or file of them "
                   f"(add --root FOLDER)", err=True)
