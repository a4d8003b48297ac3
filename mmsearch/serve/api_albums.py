"""Saved searches: the list, and one album run now (so it includes photos indexed since it was saved)."""
from __future__ import annotations

import time

from fastapi import APIRouter, Path, Query, Request

from mmsearch.search import albums as live
from mmsearch.serve.api_search import hits_reply, state
from mmsearch.serve.params import MAX_OFFSET
from mmsearch.storage import albums as rows
from mmsearch.storage.albums import MAX_NAME

router = APIRouter(prefix="/api/albums", tags=["albums"])


@router.get("")
def list_albums(request: Request):
    """The saved searches (`mmsearch albums add NAME "QUERY"`), by name."""
    return {"albums": [a.to_dict() for a in rows.list_all(state(request).store.catalog.conn)]}


@router.get("/{name}")
def open_album(request: Request, name: str = Path(..., min_length=1, max_length=MAX_NAME),
               k: int = Query(None, ge=1, le=1000, description="Most photos [default: the album's]."),
               offset: int = Query(0, ge=0, le=MAX_OFFSET, description="Photos to skip (paging).")):
    """The album's photos now, how many of them were indexed after it was saved, and the catalog generation
    they were read at (a page keeps an album live by re-opening it when /api/health shows another)."""
    st = state(request)
    started = time.perf_counter()
    generation = st.store.catalog.generation()  # read first: photos committed meanwhile move it past this
    album, hits = live.open_album(st.searcher, name, k=k, offset=offset)
    return hits_reply(st, hits, k or album.k, album.good_only, started, album=album.to_dict(),
                      added_since_saved=live.added_since(album, hits), generation=generation)
