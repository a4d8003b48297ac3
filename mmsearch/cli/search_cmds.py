"""Commands that query an index: search, and the text corpus for image->text."""
from __future__ import annotations

import click

from mmsearch.cli.app import cli
from mmsearch.checks import MAX_K, MAX_RERANK_K
from mmsearch.cli.options import (count, device_option, emit_json, index_dir_of, index_option, number, output_options,
                                  render_hits, single_blas_thread_for_text, with_bar)


# ---- search ------------------------------------------------------------------------------------
@cli.command()
@click.argument("query", required=False)
@click.option("--image", "images", multiple=True, type=click.Path(dir_okay=False),
              help="Query image (repeatable); inside or outside the index.")
@click.option("--texts", "over_texts", is_flag=True, help="Search the text corpus instead of the images.")
@index_option
@click.option("-k", "k", default=10, show_default=True, type=count(1, MAX_K), help="Number of results.")
@output_options
@click.option("--under", type=click.Path(file_okay=False), help="Only images under this folder.")
@click.option("--ext", "exts", help="Only these extensions, comma-separated, e.g. jpg,png (or mp4 for videos).")
@click.option("--after", metavar="DATE", help="Only images taken on/after DATE, YYYY-MM-DD (EXIF date, else file mtime).")
@click.option("--before", metavar="DATE", help="Only images taken before DATE (exclusive).")
@click.option("--until", metavar="DATE", help="Only images taken on/before DATE (inclusive: the whole day; "
                                              "instead of --before).")
@click.option("--min-score", type=number(-1, 1), default=None, help="Drop results scoring below X.")
@click.option("--mode", type=click.Choice(["dense", "text", "hybrid"]), default=None,
              help="dense: the image encoder only; text: the words in the images (OCR, file and folder names, "
                   "EXIF/XMP) only; hybrid: both in one ranked list [default: hybrid where the index has words]. "
                   'Quoted words must appear: \'"invoice 2023" beach\'.')
@click.option("--good-only", is_flag=True,
              help="Only good matches (calibrated score at the index's threshold); with none, the closest results "
                   "under a 'no good match' line.")
@click.option("--sort", type=click.Choice(["relevance", "date"]), default="relevance", show_default=True,
              help="date: the good matches, newest first (EXIF date, else the file's).")
@click.option("--rerank/--no-rerank", default=None, help="Re-rank with the fusion model [default: on when configured].")
@click.option("--rerank-k", default=32, show_default=True, type=count(1, MAX_RERANK_K),
              help="Candidates the re-ranker re-scores.")
@click.option("--alpha", type=number(0, 1), default=None,
              help="Re-ranked score = (1-A)*ITM probability + A*similarity  [default: the blend the re-ranker "
                   "was fitted to on validation data].")
@click.option("--group/--no-group", default=True, show_default=True,
              help="One hit per video at its best moment, its other matching moments beside it; --no-group: "
                   "every matching shot is a hit of its own.")
@device_option
def search(query, images, over_texts, index_dir, k, as_json, as_paths, under, exts, after, before, until, min_score,
           mode, good_only, sort, rerank, rerank_k, alpha, group, device):
    """Search by text, by image, or both: "dog", --image photo.jpg, "2:dog + beach - people"."""
    if query and not images:
        single_blas_thread_for_text(index_dir_of(index_dir))
    from mmsearch.search.filters import Filters
    from mmsearch.search.query import Searcher
    from mmsearch.storage.store import IndexStore

    # before opening: bad input fails fast, with the words the server and the Python API use
    filters = Filters.parse(under=under, exts=exts, after=after, before=before, until=until)
    searcher = Searcher(IndexStore.open(index_dir_of(index_dir), device=device))  # torch only for new images
    if over_texts and (good_only or sort != "relevance"):
        raise click.UsageError("--good-only and --sort apply to image search, not --texts")
    if over_texts:
        hits = searcher.search_texts(query, images, k=k, rerank=rerank, rerank_k=rerank_k, alpha=alpha)
    else:
        hits = searcher.search(query, images, k=k, filters=filters, min_score=min_score, rerank=rerank,
                               rerank_k=rerank_k, alpha=alpha, mode=mode, good_only=good_only, sort=sort,
                               group=group)
    hits = [h.to_dict() for h in hits]
    for note in dict.fromkeys(searcher.store.notices):  # e.g. a family whose text queries need torch
        click.secho(note, fg="yellow", err=True)
    render_hits(hits, as_json, as_paths, key="text" if over_texts else "path", good_only=good_only)



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
    from mmsearch.indexing.corpus import add_texts, read_texts
    from mmsearch.storage.store import IndexStore

    res = add_texts(IndexStore.open(index_dir_of(index_dir)), read_texts(file, column), progress=progress)
    progress.close()
    click.echo(f"added {res['added']} texts ({res['skipped']} duplicates or empty); corpus holds {res['texts']}")


@texts.command("list")
@index_option
@click.option("--like", default=None, help="Only texts containing this substring.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def texts_list(index_dir, like, as_json):
    """List the corpus (id and text)."""
    from mmsearch.storage.store import IndexStore

    for r in IndexStore.open(index_dir_of(index_dir)).catalog.text_rows(like=like):
        emit_json(r) if as_json else click.echo(f"{r['id']}\t{r['text']}")


@texts.command("remove")
@click.argument("ids", nargs=-1, type=count(0, 2 ** 62))
@index_option
@click.option("--like", default=None, help="Remove every text containing this substring.")
def texts_remove(ids, index_dir, like):
    """Remove texts by id (see `texts list`) or by substring."""
    from mmsearch.indexing.corpus import remove_texts
    from mmsearch.storage.store import IndexStore

    if not ids and not like:
        raise click.UsageError("give text ids or --like")
    n = remove_texts(IndexStore.open(index_dir_of(index_dir)), ids, like)
    click.echo(f"removed {n} texts")

