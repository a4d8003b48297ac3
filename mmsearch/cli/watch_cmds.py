"""`mmsearch watch`: keep an index in step with its folders, from file events (or polling on network mounts)."""
from __future__ import annotations

from pathlib import Path

import click

from mmsearch.checks import MAX_BATCH, MAX_WORKERS
from mmsearch.cli.app import cli
from mmsearch.cli.options import EchoLog, count, device_option, number, index_dir_of, index_option, model_options, model_spec


def watch_options(f):
    """--poll, --ignore, --debounce: shared by `watch` and `serve --watch`."""
    f = click.option("--debounce", type=number(0.01, 3600), default=1.0, show_default=True,
                     help="Seconds a path must be quiet, and its size and mtime still, before it is indexed.")(f)
    f = click.option("--ignore", "ignore", multiple=True, metavar="NAME",
                     help="Also ignore files or folders of this name or glob (repeatable), besides the defaults "
                          "(@eaDir, #recycle, .thumbnails, $RECYCLE.BIN, lost+found, ...).")(f)
    return click.option("--poll", type=number(0.1, 86400), default=None, metavar="SECONDS",
                        help="Poll every SECONDS instead of using file events [default: events, except on network "
                             "and FUSE mounts, which are polled every 60 s].")(f)


def watcher_for(index_dir, roots, poll, ignore, debounce, hidden=False, **index_options):
    from mmsearch.indexing.watch import Watcher

    return Watcher(index_dir, roots, poll=poll, ignore=ignore, debounce=debounce, include_hidden=hidden,
                   index_options=index_options)


@cli.command()
@click.argument("folders", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@index_option
@model_options
@device_option
@watch_options
@click.option("--hidden", is_flag=True, help="Also index hidden files and folders.")
@click.option("--batch-size", default=None, type=count(1, MAX_BATCH),
              help="Images per encoder batch [default: 32, 256 on CUDA].")
@click.option("--workers", default=None, type=count(1, MAX_WORKERS), help="Decoding threads [default: CPU count, max 4].")
def watch(folders, index_dir, model, pretrained, checkpoint, device, poll, ignore, debounce, hidden, batch_size,
          workers):
    """Index FOLDERS, then keep the index current as files are added, changed, renamed or deleted.
    A folder that goes away (an unmounted disk) keeps its photos and is watched for its return."""
    from mmsearch.cli.options import yielding_openmp

    yielding_openmp()
    options = dict(spec=model_spec(model, pretrained, checkpoint), device=device, batch_size=batch_size,
                   workers=workers)
    watcher = watcher_for(index_dir_of(index_dir), folders, poll, ignore, debounce, hidden, **options)
    echo = EchoLog("mmsearch.watch")
    click.echo(f"mmsearch: watching {len(watcher.roots)} folder(s) into {index_dir_of(index_dir)} (Ctrl-C stops)",
               err=True)
    try:
        watcher.run()
    except KeyboardInterrupt:
        watcher.stop()
    finally:
        echo.close()
    t = watcher.status()["totals"]
    click.echo(f"stopped: added {t['added']}, updated {t['updated']}, moved {t['moved']}, removed {t['removed']}, "
               f"failed {t['failed']}", err=True)
