"""The words in an image: `mmsearch text PATH` prints what OCR read (from the index, else read now)."""
from __future__ import annotations

import click

from mmsearch.cli.app import cli
from mmsearch.cli.options import emit_json, index_dir_of, index_option


@cli.command("text")
@click.argument("path", type=click.Path(dir_okay=False))
@index_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object: lines with confidence and box, metadata.")
@click.option("--boxes", is_flag=True, help="Also print each line's confidence and box (fractions of the image).")
def text(path, index_dir, as_json, boxes):
    """Print the words OCR read in one image: from the index if PATH is indexed there, else read now."""
    from mmsearch.indexing.extract import words_of
    from mmsearch.storage.catalog import Catalog
    from mmsearch.storage.store import IndexStore

    folder = index_dir_of(index_dir)
    store = IndexStore.open(folder, readonly=True) if Catalog.exists(folder) else None
    res = words_of(path, store)
    if as_json:
        return emit_json(res)
    source = "from the index" if res["source"] == "index" else "read now"
    click.echo(f"{res['path']}: {len(res['lines'])} lines ({source}, OCR {res['status']})", err=True)
    if res.get("error"):
        click.secho(res["error"], fg="yellow", err=True)
    for ln in res["lines"]:
        if boxes:
            corners = " ".join(f"{x:.3f},{y:.3f}" for x, y in (ln["box"] or []))
            click.echo(f"{ln['score']:.3f}\t{corners}\t{ln['text']}")
        else:
            click.echo(ln["text"])
    for key, value in (res.get("meta") or {}).items():
        click.echo(f"{key}: {', '.join(value) if isinstance(value, list) else value}", err=True)
