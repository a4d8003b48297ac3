"""Saved searches, run live: an album is a text query and filters (mmsearch.storage.albums keeps them),
searched again each time it is opened, so photos indexed since it was saved appear in it. Album
queries are read as text (weighted terms), never as file paths: the server runs them too."""
from __future__ import annotations

from typing import Optional

from mmsearch.search.filters import Filters
from mmsearch.search.query import Searcher, parse_query
from mmsearch.storage import albums as rows
from mmsearch.storage.albums import Album


def create(searcher: Searcher, name: str, query: str, filters: Optional[Filters] = None, sort: str = "date",
           good_only: bool = True, k: int = 200, replace: bool = False) -> Album:
    """Check the query and save it (the catalog must be writable)."""
    parse_query(query, paths=False)  # a query that cannot be parsed is refused now, not when opened
    album = Album(name, query, (filters or Filters()).to_dict(), sort, good_only, k)
    return rows.save(searcher.store.catalog.conn, album, replace=replace)


def filters_of(album: Album) -> Filters:
    f = album.filters
    return Filters.parse(under=f.get("folder"), exts=f.get("ext"), after=f.get("after"), before=f.get("before"))


def open_album(searcher: Searcher, name: str, k: Optional[int] = None, offset: int = 0):
    """(album, hits): the saved search run now. A hit indexed after the album was saved has
    `hit.row["indexed_at"] > album.created_at` (see added_since)."""
    album = rows.get(searcher.store.catalog.conn, name)
    hits = searcher.search(album.query, k=k or album.k, offset=offset, filters=filters_of(album),
                           good_only=album.good_only, sort=album.sort)
    return album, hits


def added_since(album: Album, hits) -> int:
    """How many of `hits` were indexed after the album was saved."""
    return sum(1 for h in hits if h.row and (h.row.get("indexed_at") or 0) > album.created_at)
