"""`mmsearch serve`: the web page and the REST API of an index."""
from __future__ import annotations

import click

from mmsearch.cli.app import cli
from mmsearch.cli.options import index_dir_of, index_option


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
def serve(index_dir, host, port, token, allow_hosts, cors_origins, max_upload_mb, device):
    """Serve a search page and a JSON API (schema at /openapi.json) for an index; prints the URL to open."""
    from mmsearch.serve.run import prepare

    launch = prepare(index_dir_of(index_dir), host, port, token, allow_hosts, cors_origins, max_upload_mb, device)
    click.echo(f"mmsearch: serving {launch.images} images at {launch.url}  (API schema: /openapi.json; Ctrl-C stops)")
    if launch.token:
        click.echo(f"token: scripts send 'Authorization: Bearer {launch.token}'")
    launch.run()
