"""The app factory: one index, its routes, the page, and the guard in front of them."""
from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Iterable, Optional

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from mmsearch.config import VERSION
from mmsearch.serve import api_albums, api_images, api_info, api_search
from mmsearch.serve.errors import install_handlers, log
from mmsearch.serve.guard import Guard, default_allowed_hosts
from mmsearch.serve.state import ServeState

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD = 20 * 1024 * 1024


def build_app(index_dir=None, token: Optional[str] = None, allowed_hosts: Optional[Iterable[str]] = None,
              bind: str = "127.0.0.1", cors_origins: Iterable[str] = (), max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
              device: str = "cpu", warm: bool = True, watcher=None, state=None) -> FastAPI:
    """allowed_hosts: added to the loopback names (and this machine's names for a non-loopback `bind`); "*" turns
    the Host check off.
    token: required on every /api call when set. cors_origins: none unless asked for. warm: load the
    vectors and the text tower in the background after start-up, so the first query is fast too.
    watcher: a Watcher of the index's folders, run in a thread while the server runs (/api/health shows it).
    state: what the routes talk to instead of one index (serve/sharded.py: the shards of a sharded index)."""
    st = state if state is not None else ServeState(index_dir, device=device, max_upload_bytes=max_upload_bytes)
    st.watcher = watcher

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if warm:
            threading.Thread(target=_warm, args=(st,), daemon=True).start()
        thread = None
        if watcher is not None:
            thread = threading.Thread(target=_watch, args=(watcher,), name="mmsearch-watch", daemon=True)
            thread.start()
        yield
        if thread is not None:
            watcher.stop()
            thread.join(timeout=10)

    # no /docs or /redoc: FastAPI's pages load unpinned scripts from a CDN into this origin (and are blank
    # offline), and no installed package ships their assets; the schema stays at /openapi.json
    app = FastAPI(title="mmsearch", version=VERSION, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Search an mmsearch index by text, weighted terms, image id or uploaded image.")
    app.state.mm = st
    install_handlers(app)
    for module in (api_search, api_images, api_info, api_albums):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})  # the Guard adds the CSP

    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization"])
    extra = list(allowed_hosts or ())
    hosts = None if "*" in extra else default_allowed_hosts(bind, extra)  # "*": no Host check, explicitly
    app.add_middleware(Guard, allowed_hosts=hosts, token=token, max_upload=max_upload_bytes,
                       cors_origins=list(cors_origins))
    return app


def _warm(st) -> None:
    try:
        st.warm()
    except Exception:  # a broken model shows up on the first real query, with its message
        log.debug("warm-up failed", exc_info=True)


def _watch(watcher) -> None:
    try:
        watcher.run()
    except Exception as exc:  # the server goes on serving what is indexed; /api/health shows the error
        log.exception("the watcher stopped")
        watcher.fail(f"stopped: {exc}")
