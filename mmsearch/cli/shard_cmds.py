"""`mmsearch shard`: split an index into shards, show a sharded layout, swap a shard in."""
from __future__ import annotations

from pathlib import Path

import click

from mmsearch.cli.app import cli
from mmsearch.cli.options import emit_json, index_dir_of, index_option, with_bar


@cli.group()
def shard():
    """Sharded indexes: N ordinary index folders and a shard map (shards.json), served with --shards."""


@shard.command("split")
@index_option
@click.option("--shards", "count", required=True, type=click.IntRange(1, 4096), help="Number of shards.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="New (or empty) folder for the shards and their map.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@with_bar("split")
def shard_split(index_dir, count, out, as_json, progress):
    """Split an index into shards by a hash of each photo's path, without re-embedding; each shard's
    vectors are built from its own catalog. The index itself is only read."""
    from mmsearch.indexing.sharded import split_index

    res = split_index(index_dir_of(index_dir), count, out, progress=progress)
    progress.close()
    if as_json:
        return emit_json(res)
    click.echo(f"split {sum(res['images'])} images into {res['shards']} shards in {res['out']} "
               f"({', '.join(str(n) for n in res['images'])}) in {res['seconds']:.1f}s")


@shard.command("info")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def shard_info(folder, as_json):
    """Show a sharded layout: the model, the rule, each shard's folder and images; checks every shard."""
    from mmsearch.indexing.sharded import layout_info

    data = layout_info(folder)
    if as_json:
        return emit_json(data)
    click.echo(f"shard map   {data['map']} (version {data['version']}, rule {data['rule']})")
    click.echo(f"model       {data['model']}")
    for s in data["shards"]:
        vectors = "stale" if s["vectors"] is None else s["vectors"]
        click.echo(f"{s['name']:<12}{s['images']:>9} images  {vectors:>9} vectors  {s['folder']}")
    click.echo(f"{'total':<12}{data['images']:>9} images")


@shard.command("swap")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.argument("name")
@click.argument("replacement", type=click.Path(file_okay=False, path_type=Path))
def shard_swap(folder, name, replacement):
    """Point shard NAME of the layout in FOLDER at REPLACEMENT (an index of the same model, e.g. the
    shard re-indexed into a copy). A running `mmsearch serve --shards` switches to it without stopping."""
    from mmsearch.storage.shardmap import ShardMap

    smap = ShardMap.load(folder)
    version = smap.swap(name, replacement)
    click.echo(f"{name} -> {smap.folder(name)} (shard map version {version})")
