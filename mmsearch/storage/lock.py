"""One writer at a time per index: an exclusive lock on `writer.lock` in the index folder.

Every command that changes an index (index, import, reindex, texts add/remove, rerank enable/disable)
holds it for its whole run; a second writer is refused at once with the pid of the first. Readers
(search, serve, info, export) never take it and are never blocked (SQLite's WAL lets them read while a
writer commits); a reader saves a cache file (a rebuilt FAISS or text index) only while no writer holds
the lock (`may_write_caches`, which takes none), so no reader writes beside a writer.

The lock is the operating system's (flock on Linux and macOS, msvcrt.locking on Windows), so it is
released when its process ends, even by kill -9, and a stale file never blocks anyone. It is held per
thread: the same thread may nest writers (index -> rerank enable), another thread of the process is
refused like another process. The standard library is enough for this, so no dependency is added
(the `filelock` package does the same locking but keeps no holder pid for the message).
"""
from __future__ import annotations

import errno
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mmsearch.errors import IndexBusyError, IndexReadOnlyError

LOCK_NAME = "writer.lock"
_WINDOWS_BYTE = 1 << 30  # Windows locks are mandatory: lock a byte far past the pid so others can read it

_guard = threading.Lock()
_held: dict[str, list] = {}  # real path of the index folder -> [fd, owner thread id, depth]


def read_only_message(directory) -> str:
    return (f"index {directory} is read-only (no write permission on the folder or its catalog, or a read-only "
            f"disk): it can be searched and served, not changed; copy it to a writable folder to update it")


def check_writable(directory) -> None:
    """IndexReadOnlyError unless the folder (and its catalog, when there is one) can be written."""
    directory = Path(directory)
    catalog = directory / "catalog.db"
    if not os.access(directory, os.W_OK | os.X_OK) or (catalog.exists() and not os.access(catalog, os.W_OK)):
        raise IndexReadOnlyError(read_only_message(directory))


def holder_pid(directory) -> str:
    try:
        text = (Path(directory) / LOCK_NAME).read_text().strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


@contextmanager
def writer_lock(directory, create: bool = True) -> Iterator[bool]:
    """Hold the index's writer lock; yields True for the outermost hold of this thread. Raises
    IndexBusyError when another process (or thread) holds it, IndexReadOnlyError when the folder cannot
    be written. `create` makes the folder of a new index first."""
    directory = Path(directory)
    made = False
    if create and not directory.is_dir():
        try:
            directory.mkdir(parents=True, exist_ok=True)
            made = True
        except OSError as exc:
            raise IndexReadOnlyError(f"cannot create index folder {directory} ({exc.strerror or exc})") from None
    key = os.path.realpath(directory)
    me = threading.get_ident()
    with _guard:
        held = _held.get(key)
        if held is not None:
            if held[1] != me:
                raise IndexBusyError(_busy_message(directory, str(os.getpid())))
            held[2] += 1
            outer = False
        else:
            _held[key] = [_acquire(directory), me, 1]
            outer = True
    try:
        yield outer
    finally:
        with _guard:
            held = _held[key]
            held[2] -= 1
            if held[2] == 0:
                del _held[key]
                if made:  # a run that failed before creating the index leaves no empty folder behind
                    _remove_if_only_lock(directory)
                _release(held[0])


def may_write_caches(directory) -> bool:
    """Whether a reader may save a cache file (a rebuilt FAISS or text index) now: this thread holds the
    writer lock, or no live writer does. Takes no lock (a writer starting meanwhile is never refused
    because of a reader); the caller labels what it saves with the generation it read before reading
    the rows, so a save that races a writer is at worst stale, never wrong."""
    key = os.path.realpath(directory)
    with _guard:
        held = _held.get(key)
        if held is not None:
            return held[1] == threading.get_ident()
    if not os.access(directory, os.W_OK | os.X_OK):
        return False  # a read-only index: caches live in memory only
    pid = holder_pid(directory)
    if pid == "unknown":
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True  # killed (-9) before it could clear its pid: nobody writes
    except (OSError, ValueError, OverflowError):
        return False  # alive but not ours to signal, or no way to tell
    return False


def _remove_if_only_lock(directory: Path) -> None:
    try:
        if [p.name for p in directory.iterdir()] == [LOCK_NAME]:
            (directory / LOCK_NAME).unlink()
            directory.rmdir()
    except OSError:
        pass


def _busy_message(directory, pid: str) -> str:
    return (f"index {directory} is being written by another mmsearch process (pid {pid}); wait for it or use "
            f"another --index")


def _acquire(directory: Path) -> int:
    check_writable(directory)
    path = directory / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise IndexReadOnlyError(read_only_message(directory)) from None
        raise
    try:
        _lock(fd)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK, errno.EDEADLK):
            raise IndexBusyError(_busy_message(directory, holder_pid(directory))) from None
        raise
    try:  # for the message a second writer shows
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError:
        pass
    return fd


def _release(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)  # no stale pid in the file once nobody holds it
    except OSError:
        pass
    try:
        _unlock(fd)
    finally:
        os.close(fd)


if os.name == "nt":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _lock(fd: int) -> None:
        os.lseek(fd, _WINDOWS_BYTE, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # OSError (EACCES / EDEADLK) when held

    def _unlock(fd: int) -> None:
        os.lseek(fd, _WINDOWS_BYTE, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError (EWOULDBLOCK) when held

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
