"""Start a server: bind the socket first (so a busy port is a clear error and --port 0 works), then uvicorn."""
from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from typing import Optional, Sequence

from mmsearch.errors import MmsearchError
from mmsearch.serve import create_app
from mmsearch.serve.guard import is_loopback, new_token, token_problem


class ServeError(MmsearchError):
    """The server cannot start as asked (port in use, address not on this machine)."""


@dataclass
class Launch:
    server: object  # uvicorn.Server
    sock: socket.socket
    url: str
    token: Optional[str]
    images: int

    def run(self) -> None:
        self.server.run(sockets=[self.sock])


def prepare(index_dir, host: str = "127.0.0.1", port: int = 8000, token: Optional[str] = None,
            allow_hosts: Sequence[str] = (), cors_origins: Sequence[str] = (), max_upload_mb: int = 20,
            device: str = "cpu", watch: Optional[dict] = None, shards_dir=None) -> Launch:
    """Everything short of serving. Off loopback a token is mandatory: one is generated when none is given.
    `watch` (Watcher options: poll, ignore, debounce): also keep the index current with the folders it
    records, from a thread of this process. shards_dir: serve the sharded layout there (every shard in
    this process) instead of `index_dir`."""
    if device not in (None, "auto", "cpu"):  # a GPU asked for: refuse a missing one now, not at the first upload
        from mmsearch.towers.devices import resolve_device

        resolve_device(device)
    if token is not None and token_problem(token):
        raise ServeError(f"--token: {token_problem(token)} (it travels in a header, a cookie and a URL)")
    if not is_loopback(host) and not token:
        token = new_token()
    watcher = None if watch is None else _watcher(index_dir, watch)
    state = None
    if shards_dir is not None:
        from mmsearch.serve.sharded import local_state

        state = local_state(shards_dir, max_upload_bytes=max_upload_mb * 2**20)
    app = create_app(index_dir, token=token, allowed_hosts=list(allow_hosts), bind=host, cors_origins=cors_origins,
                     max_upload_bytes=max_upload_mb * 2**20, device=device, watcher=watcher, state=state)
    import uvicorn

    sock = _bind(host, port)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    shown = socket.gethostname() if host in ("0.0.0.0", "::") else (f"[{host}]" if ":" in host else host)
    url = f"http://{shown}:{sock.getsockname()[1]}/" + (f"?token={token}" if token else "")
    return Launch(uvicorn.Server(config), sock, url, token, app.state.mm.count_images())


def _watcher(index_dir, options: dict):
    from mmsearch.indexing.watch import Watcher
    from mmsearch.storage.catalog import Catalog

    cat = Catalog.open(index_dir, readonly=True)
    try:
        roots = cat.meta().get("roots") or []
    finally:
        cat.close()
    if not roots:
        raise ServeError(f"--watch: index {index_dir} records no folders to watch (index one first, or run "
                         f"`mmsearch watch FOLDER --index {index_dir}`)")
    return Watcher(index_dir, roots, **options)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say they are TCP;
    # without it every response waited ~40 ms for the client's delayed ACK (measured: 48 ms -> 1 ms)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ServeError(f"cannot listen on {host}:{port}: the port is in use (try another --port, "
                             f"or --port 0 for a free one)") from None
        raise ServeError(f"cannot listen on {host}:{port} ({exc.strerror})") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock
