"""The catalog's SQLite file: opening it (writable, read-only, or from a read-only folder), checking
its integrity, and turning SQLite's errors into the library's typed ones.

A read-only folder (a NAS copy, a CD, an index owned by someone else) cannot hold WAL's -shm file, so
SQLite's `mode=ro` fails there; such a catalog is opened `immutable=1` (read without locks: nobody can
be writing it). A damaged file (`database disk image is malformed`, `file is not a database`) raises
CatalogCorruptError saying what to do, from opening, from any read and from any write.
"""
from __future__ import annotations

import functools
import inspect
import os
import sqlite3
from pathlib import Path
from typing import Optional
from urllib.parse import quote

from mmsearch.errors import CatalogCorruptError, IndexReadOnlyError
from mmsearch.storage.lock import read_only_message

_CORRUPT = ("SQLITE_CORRUPT", "SQLITE_NOTADB")
_READONLY_OPEN = ("SQLITE_CANTOPEN", "SQLITE_READONLY", "SQLITE_PERM", "SQLITE_AUTH")


def corrupt_message(path, detail: str) -> str:
    path = Path(path)
    return (f"catalog {path} is damaged ({' '.join(str(detail).split())}): restore the index folder from a backup, or "
            f"re-index into a new folder (`mmsearch export OUT --index {path.parent}` may still save its embeddings)")


def typed(exc: sqlite3.Error, path) -> Optional[Exception]:
    """The typed error for a SQLite error on the catalog at `path`, or None when it is none of ours
    (a busy database, a bug)."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc)
    if name.startswith(_CORRUPT) or "malformed" in text or "not a database" in text:
        return CatalogCorruptError(corrupt_message(path, text))
    if name.startswith("SQLITE_READONLY") or "readonly database" in text:
        return IndexReadOnlyError(read_only_message(Path(path).parent))
    return None


def raise_typed(exc: sqlite3.Error, path) -> None:
    err = typed(exc, path)
    if err is not None:
        raise err from exc
    raise exc


def typed_errors(cls):
    """Class decorator: every public method of `cls` (and its mixins) raises typed errors for SQLite's
    corruption and read-only errors, generators included. Needs `self.path` (the catalog file)."""
    for klass in reversed(cls.__mro__[:-1]):
        for name, fn in list(vars(klass).items()):
            if name.startswith("_") or not inspect.isfunction(fn):
                continue
            setattr(cls, name, _wrap(fn))
    return cls


def _wrap(fn):
    if getattr(fn, "_typed", False):
        return fn
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(self, *a, **kw):
            try:
                yield from fn(self, *a, **kw)
            except sqlite3.DatabaseError as exc:
                raise_typed(exc, self.path)
        gen._typed = True
        return gen

    @functools.wraps(fn)
    def call(self, *a, **kw):
        try:
            return fn(self, *a, **kw)
        except sqlite3.DatabaseError as exc:
            raise_typed(exc, self.path)
    call._typed = True
    return call


def writable(path: Path) -> bool:
    """Whether this process may write the catalog file and its folder (WAL needs both)."""
    return os.access(path.parent, os.W_OK | os.X_OK) and os.access(path, os.W_OK)


def connect(path: Path, readonly: bool, threads: bool = False, page_size: Optional[int] = None):
    """(connection, read_only). A writable catalog in a folder this process cannot write is opened read-only;
    a read-only catalog whose WAL index cannot be made (a read-only folder) is opened immutable."""
    path = Path(path)
    if not readonly and (not path.exists() or writable(path)):
        conn = sqlite3.connect(str(path), timeout=30)
        if page_size:  # only takes effect on a new, empty file
            conn.execute(f"PRAGMA page_size={int(page_size)}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn, False
    # threads: one read-only connection shared by a server's worker threads (SQLite serialises)
    uri = "file:" + quote(os.fsencode(os.path.abspath(path)))
    conn = sqlite3.connect(uri + "?mode=ro", uri=True, timeout=30, check_same_thread=not threads)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.OperationalError as exc:
        name = getattr(exc, "sqlite_errorname", "") or ""
        if writable(path) or not (name.startswith(_READONLY_OPEN) or "unable to open" in str(exc)):
            raise
        conn.close()  # no -shm can be made beside it: read the file as it is, without locks
        conn = sqlite3.connect(uri + "?mode=ro&immutable=1", uri=True, timeout=30, check_same_thread=not threads)
    return conn, True


def quick_check(conn: sqlite3.Connection, path) -> None:
    """PRAGMA quick_check (every page read once, no index cross-check): CatalogCorruptError if damaged.
    Run when an index is opened for writing, so a damaged catalog is never written further."""
    try:
        rows = [r[0] for r in conn.execute("PRAGMA quick_check(3)")]
    except sqlite3.DatabaseError as exc:
        raise_typed(exc, path)
    if rows != ["ok"]:
        raise CatalogCorruptError(corrupt_message(path, "; ".join(rows)))
