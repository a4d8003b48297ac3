"""`mmsearch models`: the architectures and pretrained tags open_clip knows, and what this installation can run."""
from __future__ import annotations

import click

from mmsearch.cli.app import cli
from mmsearch.cli.options import emit_json


def _pct(v):
    return "-" if v is None else f"{v:.1f}"


@cli.command()
@click.option("--filter", "name_filter", default=None, help="Only models whose name contains this text.")
@click.option("--published", is_flag=True, help="Only (model, tag) pairs with published retrieval recall.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per (model, pretrained tag).")
def models(name_filter, published, as_json):
    """Models open_clip knows: family, embedding size, the extra a family needs, text-query path
    (numpy: no torch at query time), whether weights are cached, published Flickr30k/COCO R@1."""
    from mmsearch.towers.models import list_models, recall_source

    rows = [r for r in list_models(name_filter) if not published or r["flickr_t2i_r1"] is not None]
    if as_json:
        return [emit_json(r) for r in rows]
    click.echo(f"{'model':<26} {'pretrained':<26} {'family':<20} {'dim':>4}  {'extra':<13} {'text':<5} "
               f"{'cached':<6} {'F t>i':>5} {'C t>i':>5}")
    for r in rows:
        extra = "-" if not r["extra"] else r["extra"] + ("" if r["extra_installed"] else " (missing)")
        cached = "-" if r["weights_cached"] is None else ("yes" if r["weights_cached"] else "no")
        click.echo(f"{r['model']:<26} {r['pretrained'] or 'none (random)':<26} {r['family']:<20} "
                   f"{r['embed_dim'] or '-':>4}  {extra:<13} {r['text_query_path']:<5} {cached:<6} "
                   f"{_pct(r['flickr_t2i_r1']):>5} {_pct(r['coco_t2i_r1']):>5}")
    click.echo(f"{len(rows)} rows. F/C t>i: text->image R@1 on Flickr30k / MSCOCO (%), from {recall_source()}",
               err=True)
