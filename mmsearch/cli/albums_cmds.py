"""`mmsearch albums`: saved searches that fill themselves as photos are indexed."""
from __future__ import annotations

import datetime as dt

import click

from mmsearch.cli.app import cli
from mmsearch.cli.options import emit_json, index_dir_of, index_option, output_options, render_hits


def _searcher(index_dir, readonly=False):
    from mmsearch.search.query import Searcher
    from mmsearch.storage.store import IndexStore

    return Searcher(IndexStore.open(index_dir_of(index_dir), readonly=readonly), allow_paths=False)


def _describe(a) -> str:
    f = {k: v for k, v in a.filters.items() if v}
    for key in ("after", "before"):
        if key in f:
            f[key] = dt.datetime.fromtimestamp(f[key], dt.timezone.utc).strftime("%Y-%m-%d")
    extra = "".join(f" {k}={','.join(v) if isinstance(v, list) else v}" for k, v in f.items())
    return f'"{a.query}"{extra} (sort {a.sort}, {"good matches" if a.good_only else "all results"}, up to {a.k})'


@cli.group()
def albums():
    """Saved searches ("smart albums"): each shows the photos that match it now, new ones included."""


@albums.command("add")
@click.argument("name")
@click.argument("query")
@index_option
@click.option("--under", type=click.Path(file_okay=False), help="Only images under this folder.")
@click.option("--ext", "exts", help="Only these extensions, comma-separated, e.g. jpg,png.")
@click.option("--after", help="Only images taken on/after DATE.")
@click.option("--before", help="Only images taken before DATE.")
@click.option("--sort", type=click.Choice(["relevance", "date"]), default="date", show_default=True,
              help="Order of the album's photos (date: newest first).")
@click.option("--all", "show_all", is_flag=True, help="Every result, not only the good matches.")
@click.option("-k", "k", default=200, show_default=True, type=click.IntRange(1, 1000), help="Most photos shown.")
@click.option("--replace", is_flag=True, help="Overwrite an album of the same name.")
def albums_add(name, query, index_dir, under, exts, after, before, sort, show_all, k, replace):
    """Save QUERY (text or weighted terms) with its filters as album NAME."""
    from mmsearch.search import albums as live
    from mmsearch.search.filters import Filters

    filters = Filters.parse(under=under, exts=exts, after=after, before=before)
    album = live.create(_searcher(index_dir), name, query, filters, sort=sort, good_only=not show_all, k=k,
                        replace=replace)
    click.echo(f"saved album '{album.name}': {_describe(album)}")


@albums.command("list")
@index_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def albums_list(index_dir, as_json):
    """List the saved searches."""
    from mmsearch.storage import albums as rows

    found = rows.list_all(_searcher(index_dir, readonly=True).store.catalog.conn)
    for a in found:
        emit_json(a.to_dict()) if as_json else click.echo(f"{a.name}\t{_describe(a)}")
    if not found and not as_json:
        click.echo("no albums (mmsearch albums add NAME \"QUERY\")", err=True)


@albums.command("show")
@click.argument("name")
@index_option
@click.option("-k", "k", default=None, type=click.IntRange(1, 1000), help="Most photos [default: the album's].")
@output_options
def albums_show(name, index_dir, k, as_json, as_paths):
    """Run album NAME now: its photos, including those indexed since it was saved."""
    from mmsearch.search import albums as live

    album, hits = live.open_album(_searcher(index_dir, readonly=True), name, k=k)
    new = live.added_since(album, hits)
    render_hits([h.to_dict() for h in hits], as_json, as_paths, key="path", good_only=album.good_only)
    if not as_json and not as_paths:
        click.echo(f"album '{album.name}': {len(hits)} photos, {new} indexed since it was saved", err=True)


@albums.command("rm")
@click.argument("name")
@index_option
def albums_rm(name, index_dir):
    """Delete album NAME (the photos stay; it is only a saved search)."""
    from mmsearch.storage import albums as rows

    rows.remove(_searcher(index_dir).store.catalog.conn, name)
    click.echo(f"removed album '{name}'")
