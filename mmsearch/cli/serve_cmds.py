"""`mmsearch serve`: the web page and the REST API of an index."""
from __future__ import annotations

from pathlib import Path

import click

from mmsearch.cli.app import cli
from mmsearch.cli.options import EchoLog, index_dir_of, index_option, number
from mmsearch.cli.watch_cmds import watch_options


@cli.command()
@index_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback requires a token (generated if not given).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0 picks a free port.")
@click.option("--token", envvar="MMSEARCH_TOKEN", default=None,
              help="Secret required on every API call [env MMSEARCH_TOKEN; generated off loopback].")
@click.option("--allow-host", "allow_hosts", multiple=True,
              help="Extra Host header to accept (repeatable), e.g. photos.lan; '*' disables the check.")
@click.option("--cors", "cors_origins", multiple=True, help="Origin allowed to call the API from a browser (repeatable).")
@click.option("--max-upload-mb", default=20, show_default=True, type=click.IntRange(1, 1024), help="Upload size cap.")
@click.option("--device", default="auto", show_default=True,
              help="Where uploads are embedded: auto or cpu = the CPU (the index's ONNX image tower, no torch); "
                   "cuda, cuda:N or mps = torch on that device.")
@click.option("--watch", "watch", is_flag=True,
              help="Also keep the index current with the folders it was built from (see `mmsearch watch`).")
@watch_options
@click.option("--shards", "shards_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Serve the sharded layout in this folder (`mmsearch shard split`) instead of --index: the same "
                   "API and page, answers marked partial when a shard does not answer.")
@click.option("--ray", "ray_address", default=None, metavar="auto|ADDRESS",
              help="With --shards: run it as a Ray Serve application on this cluster (pip install "
                   "'mmsearch[cluster]'): one deployment per shard, a router deployment with the API.")
@click.option("--replicas", default=2, show_default=True, type=click.IntRange(1, 1024),
              help="With --ray: replicas of each shard (a killed one is replaced while the others answer).")
@click.option("--router-replicas", default=1, show_default=True, type=click.IntRange(1, 1024),
              help="With --ray: replicas of the router (the API).")
@click.option("--replica-cpus", default=0.5, show_default=True, type=number(0.01, 64),
              help="With --ray: CPUs Ray reserves for each replica (fractions are fine).")
@click.option("--pin-shards", is_flag=True,
              help="With --ray: a shard's replicas run only on nodes declaring the resource mmsearch-shard-N "
                   "(`ray start --resources '{\"mmsearch-shard-2\": 1}'`): nodes holding a copy of that folder; the router "
                   "then needs mmsearch-router (declare it where a shard folder is, e.g. the head).")
@click.option("--proxy", type=click.Choice(["HeadOnly", "EveryNode"]), default="HeadOnly", show_default=True,
              help="With --ray: where Ray Serve's HTTP proxy listens on --host/--port.")
def serve(index_dir, host, port, token, allow_hosts, cors_origins, max_upload_mb, device, watch, poll, ignore,
          debounce, shards_dir, ray_address, replicas, router_replicas, replica_cpus, pin_shards, proxy):
    """Serve a search page and a JSON API (schema at /openapi.json) for an index; prints the URL to open."""
    from mmsearch.serve.run import prepare

    if not watch and (poll is not None or ignore):
        raise click.UsageError("--poll and --ignore need --watch")
    if watch and shards_dir is not None:
        raise click.UsageError("--watch keeps one index current; a sharded layout is updated with "
                               "`mmsearch index --shards DIR FOLDERS`")
    if ray_address is not None:
        if shards_dir is None:
            raise click.UsageError("--ray needs --shards DIR (a sharded layout)")
        return _serve_ray(ray_address, shards_dir, host, port, token, allow_hosts, cors_origins, max_upload_mb,
                          replicas, router_replicas, replica_cpus, pin_shards, proxy)
    if shards_dir is not None and index_dir is not None:
        raise click.UsageError("give --index or --shards, not both")
    options = dict(poll=poll, ignore=ignore, debounce=debounce) if watch else None
    launch = prepare(index_dir_of(index_dir), host, port, token, allow_hosts, cors_origins, max_upload_mb, device,
                     watch=options, shards_dir=shards_dir)
    click.echo(f"mmsearch: serving {launch.images} images at {launch.url}  (API schema: /openapi.json; Ctrl-C stops)")
    if launch.token:
        click.echo(f"token: scripts send 'Authorization: Bearer {launch.token}'")
    echo = EchoLog("mmsearch.watch") if watch else None
    try:
        launch.run()
    finally:
        if echo is not None:
            echo.close()


def _serve_ray(address, shards_dir, host, port, token, allow_hosts, cors_origins, max_upload_mb, replicas,
               router_replicas, replica_cpus, pin, proxy):
    import time

    from mmsearch.distributed.serving import deploy, stop
    from mmsearch.serve.guard import is_loopback, new_token, token_problem

    if token and token_problem(token):
        raise click.UsageError(f"--token: {token_problem(token)} (it travels in a header, a cookie and a URL)")
    if not is_loopback(host) and not token:
        token = new_token()
    options = dict(token=token, allowed_hosts=list(allow_hosts), cors_origins=list(cors_origins),
                   max_upload_bytes=max_upload_mb * 2**20)
    url = deploy(address, shards_dir, host=host, port=port, proxy=proxy, replicas=replicas,
                 router_replicas=router_replicas, pin=pin, replica_cpus=replica_cpus, options=options)
    click.echo(f"mmsearch: serving {shards_dir} on Ray Serve at {url}" + (f"?token={token}" if token else "")
               + f"  ({replicas} replicas per shard; Ctrl-C stops the application)")
    if token:
        click.echo(f"token: scripts send 'Authorization: Bearer {token}'")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stop()
