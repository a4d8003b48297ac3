"""The folders an index may serve files from: the one place that decides whether a stored path may be read.

An index records its roots in the catalog's meta (`roots`): every folder given to `mmsearch index`, and
every `--root` given to `mmsearch import` (an imported shard names paths written elsewhere, by anyone:
only the user can say which folders of this machine they may be read from). A stored path is servable
when it is an image file that lies, by its stored path and with symlinks resolved, inside a recorded
root. An index that records no root serves no file; search works all the same.
"""
from __future__ import annotations

import os
from typing import Iterable

from mmsearch.config import IMAGE_EXTENSIONS
from mmsearch.errors import FileGoneError, NotServableError

NO_ROOTS_HINT = ("re-run `mmsearch index FOLDER` on its folders, or `mmsearch import SRC --root FOLDER` "
                 "for imported embeddings")


def recorded_roots(meta: dict) -> list[str]:
    """The roots an index's meta records (absolute, normalised), oldest index formats included."""
    return [os.path.normpath(r) for r in (meta.get("roots") or []) if isinstance(r, str) and os.path.isabs(r)]


def normalise_roots(roots: Iterable) -> list[str]:
    return sorted({os.path.normpath(os.path.abspath(os.fspath(r))) for r in roots})


def record_roots(catalog, roots: Iterable) -> list[str]:
    """Add `roots` to the index's recorded roots (inside the caller's transaction); returns them all."""
    merged = sorted(set(recorded_roots(catalog.meta())) | set(normalise_roots(roots)))
    catalog.set_meta(roots=merged)
    return merged


def inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def is_under_roots(path: str, roots: Iterable[str]) -> bool:
    """Whether a stored path names a file inside one of `roots` (by its normalised path, no file read)."""
    norm = os.path.normpath(path) if os.path.isabs(path) else None
    return norm is not None and any(inside(norm, r) for r in roots)


def servable_path(path: str, roots: list[str], what: str = "the file") -> str:
    """The real path of a stored `path` if a server may read it, else NotServableError (FileGoneError
    when it is no longer a file). Never give it a path taken from a request: only a stored one."""
    if not roots:
        raise NotServableError(f"{what} is not served: this index records no folder to serve files from "
                               f"({NO_ROOTS_HINT})")
    if not is_under_roots(path, roots):
        raise NotServableError(f"{what} is outside the indexed folders")
    if os.path.splitext(path)[1].lower() not in IMAGE_EXTENSIONS:
        raise NotServableError(f"{what} is not served: not an image file name")
    real = os.path.realpath(path)
    if not any(inside(real, os.path.realpath(r)) for r in roots):
        raise NotServableError(f"{what} resolves outside the indexed folders (symlink)")
    if not os.path.isfile(real):
        raise FileGoneError(f"{what} is gone from disk (moved or deleted); re-run `mmsearch index`")
    return real
