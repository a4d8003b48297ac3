"""Walk folders, stat files, quick-hash them. No image decoding, no ML."""
from __future__ import annotations

import errno
import fnmatch
import hashlib
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

from mmsearch.config import IMAGE_EXTENSIONS
from mmsearch.errors import MediaError
from mmsearch.storage.fsnames import to_db

OnError = Optional[Callable[[str, str], None]]


@dataclass(frozen=True)
class FileInfo:
    path: str  # absolute, normalised; the file's own symlink is not resolved
    size: int
    mtime_ns: int


def _reason(path: str, exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    if exc.errno == errno.ENOENT and os.path.islink(path):
        return "broken symlink"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return f"cannot stat ({exc.strerror or exc})"


def _excluded(rel: str, name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p) for p in patterns)


def normalise_roots(roots) -> list[str]:
    """Absolute, sorted roots with duplicates and roots inside another root dropped: every file is
    reached through one root only, so a walk needs no set of the paths it has yielded."""
    out: list[str] = []
    for root in sorted({os.path.abspath(os.fspath(r)) for r in roots}):
        if not any(root == o or root.startswith(o.rstrip("/") + "/") for o in out):
            out.append(root)
    return out


def scan(roots, exclude: Iterable[str] = (), include_hidden: bool = False, on_error: OnError = None) -> Iterator[FileInfo]:
    """Yield image files under `roots` (files or folders), each root in ascending order of path as
    strings compare (the catalog's ORDER BY path), so the incremental diff can merge the two streams.

    Other extensions are ignored; hidden entries are skipped unless asked; directory symlinks are
    followed with loop detection; a file that cannot be stat'ed is reported through on_error."""
    exclude = tuple(exclude)
    report = on_error or (lambda path, reason: None)
    for root in normalise_roots(roots):
        if not os.path.lexists(root):
            raise MediaError(root, "no such file or folder")
        if not os.path.isdir(root):
            info = _file_info(root, report)
            if info and os.path.splitext(root)[1].lower() in IMAGE_EXTENSIONS:
                yield info
            continue
        yield from _walk(root, root, exclude, include_hidden, report, set())


def _file_info(path: str, report) -> Optional[FileInfo]:
    try:
        st = os.stat(path)
    except OSError as exc:
        report(path, _reason(path, exc))
        return None
    return FileInfo(path, st.st_size, st.st_mtime_ns)


def _path_order(entry) -> bytes:
    """Sort key that walks a folder in full-path order: a folder's children follow its name plus '/',
    so 'b-c/x' comes before 'b/x' ('-' < '/') as 'dir/b-c/x' < 'dir/b/x' do. Names compare as the bytes
    the catalog stores (fsnames.to_db; the same order as the strings for every UTF-8 name), so a name
    that is not UTF-8 sits where the catalog's ORDER BY path puts it."""
    name = to_db(entry.name)
    try:
        return name + b"/" if entry.is_dir() else name
    except OSError:
        return name


def _walk(root, folder, exclude, include_hidden, report, visiting) -> Iterator[FileInfo]:
    try:
        st = os.stat(folder)
        key = (st.st_dev, st.st_ino)
        if key in visiting:
            report(folder, "symlink loop")
            return
        with os.scandir(folder) as it:
            entries = sorted(it, key=_path_order)
    except OSError as exc:
        report(folder, _reason(folder, exc))
        return
    visiting = visiting | {key}
    for entry in entries:
        if entry.name.startswith(".") and not include_hidden:
            continue
        path = os.path.join(folder, entry.name)
        rel = os.path.relpath(path, root)
        if exclude and _excluded(rel, entry.name, exclude):
            continue
        try:
            is_dir = entry.is_dir()  # follows symlinks
        except OSError as exc:
            is_dir = False
            if os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
                report(path, _reason(path, exc))
                continue
        if is_dir:
            yield from _walk(root, path, exclude, include_hidden, report, visiting)
        elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
            info = _file_info(path, report)
            if info:
                yield info


def quick_hash(path, chunk: int = 64 * 1024) -> str:
    """Identity of a file's content for move detection: size + first and last 64 KiB (blake2b).
    A cheap heuristic, not a fingerprint of every byte."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        h.update(str(size).encode())
        h.update(fh.read(chunk))
        if size > 2 * chunk:
            fh.seek(-chunk, os.SEEK_END)
        h.update(fh.read(chunk))
    return h.hexdigest()
