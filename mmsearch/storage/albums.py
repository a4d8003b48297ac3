"""Saved searches ("albums"): rows of the catalog's `albums` table. A saved search keeps the query and
its filters, never a list of photos: opening it runs the search again, so it includes every photo
indexed since (mmsearch.search.albums runs them)."""
from __future__ import annotations

import json
import sqlite3
import time
import unicodedata
from dataclasses import asdict, dataclass, field

from mmsearch.errors import MmsearchError

MAX_NAME = 100
MAX_QUERY = 2000
SORTS = ("relevance", "date")


class AlbumError(MmsearchError):
    """A saved search that cannot be saved as asked (a bad name or query, a name already taken)."""


class AlbumNotFoundError(AlbumError):
    """No saved search of that name."""


@dataclass
class Album:
    name: str
    query: str
    filters: dict = field(default_factory=dict)  # Filters.to_dict() of the search: folder, ext, after, before
    sort: str = "date"
    good_only: bool = True
    k: int = 200
    created_at: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def check_name(name: str) -> str:
    name = unicodedata.normalize("NFC", (name or "").strip())
    if not name:
        raise AlbumError("an album needs a name")
    if len(name) > MAX_NAME:
        raise AlbumError(f"album names are at most {MAX_NAME} characters")
    if any(unicodedata.category(c).startswith("C") for c in name) or "/" in name:
        raise AlbumError("album names cannot hold '/' or control characters")
    return name


def _row(r) -> Album:
    name, query, filters, sort, good_only, k, created = r
    try:
        filters = json.loads(filters or "{}")
    except ValueError:
        filters = {}
    return Album(name, query, filters if isinstance(filters, dict) else {}, sort if sort in SORTS else "date",
                 bool(good_only), int(k), float(created or 0))


_COLUMNS = "name, query, filters, sort, good_only, k, created_at"


def save(conn: sqlite3.Connection, album: Album, replace: bool = False) -> Album:
    """Store `album` (its name checked); an existing name is an error unless `replace`."""
    album.name = check_name(album.name)
    if not album.query or not album.query.strip():
        raise AlbumError("an album needs a query")
    if len(album.query) > MAX_QUERY or "\x00" in album.query:
        raise AlbumError(f"album queries are at most {MAX_QUERY} characters, without NUL")
    if album.sort not in SORTS:
        raise AlbumError(f"sort: '{album.sort}' is not one of {', '.join(SORTS)}")
    if not 1 <= int(album.k) <= 1000:
        raise AlbumError("an album shows 1 to 1000 photos (-k)")
    album.created_at = album.created_at or time.time()
    verb = "INSERT OR REPLACE" if replace else "INSERT"
    try:
        with conn:
            conn.execute(f"{verb} INTO albums ({_COLUMNS}) VALUES (?,?,?,?,?,?,?)",
                         (album.name, album.query.strip(), json.dumps(album.filters), album.sort, int(album.good_only),
                          int(album.k), album.created_at))
    except sqlite3.IntegrityError:
        raise AlbumError(f"an album named '{album.name}' exists already (--replace to overwrite it)") from None
    return album


def list_all(conn: sqlite3.Connection) -> list[Album]:
    try:
        return [_row(r) for r in conn.execute(f"SELECT {_COLUMNS} FROM albums ORDER BY name")]
    except sqlite3.OperationalError:  # a catalog from before albums, opened read-only: none yet
        return []


def get(conn: sqlite3.Connection, name: str) -> Album:
    try:
        r = conn.execute(f"SELECT {_COLUMNS} FROM albums WHERE name=?", (unicodedata.normalize("NFC", name),)).fetchone()
    except sqlite3.OperationalError:
        r = None
    if r is None:
        known = ", ".join(a.name for a in list_all(conn)[:10])
        raise AlbumNotFoundError(f"no album named '{name}'" + (f" (albums: {known})" if known else " (no albums yet)"))
    return _row(r)


def remove(conn: sqlite3.Connection, name: str) -> None:
    get(conn, name)
    with conn:
        conn.execute("DELETE FROM albums WHERE name=?", (unicodedata.normalize("NFC", name),))
