"""Where a watcher's file events come from: native (watchfiles, Rust notify) or a polling walk, with one ignore list.

Both sources return the paths that may have changed (a file added, written, renamed or deleted, a
folder created or removed); the watcher (watch.py) decides what to index. Both skip the same
folders: hidden ones and the system folders that NAS boxes, cameras and operating systems scatter
through photo trees (DEFAULT_IGNORE), plus any the user names; the plan's walk gets the same list.

Native: one non-recursive watch per folder that is not ignored, so a Synology's @eaDir (one folder per
photo) costs no inotify watch. A new folder re-arms the watch: the new watch is live before the old one
closes, so no event falls in between. Polling: stat every image file under the roots each interval and
compare with the previous walk (memory: one entry per image file); other files are never stat'ed.
"""
from __future__ import annotations

import fnmatch
import logging
import os
import threading
import time
from typing import Iterable, Iterator, Optional

from mmsearch.config import IMAGE_EXTENSIONS
from mmsearch.errors import WatchError

log = logging.getLogger("mmsearch.watch")

# Folder (or file) names never indexed or watched. Matched without regard to case against every part of
# a path below a root: Windows writes $Recycle.Bin on one disk and $RECYCLE.BIN on another.
DEFAULT_IGNORE = (
    "@eaDir", "@Recycle", "#recycle", "#snapshot", "@tmp", "@SynoResource", "@__thumb", ".@__thumb",  # NAS boxes
    ".thumbnails", ".Trash-*", ".Trashes", ".Spotlight-V100", ".fseventsd", ".AppleDouble", ".DocumentRevisions-V100",
    "$RECYCLE.BIN", "System Volume Information", "lost+found", "RECYCLER", "Thumbs.db", ".DS_Store",
)


def caseless_glob(pattern: str) -> str:
    """'@eaDir' -> '@[eE][aA][dD][iI][rR]': one pattern that the plan's case-sensitive fnmatch and the
    events' filter read alike. Character classes ([...]) are kept as written."""
    out, depth = [], 0
    for ch in pattern:
        if ch == "[":
            depth += 1
        elif ch == "]" and depth:
            depth -= 1
        out.append(f"[{ch.lower()}{ch.upper()}]" if ch.isalpha() and not depth and ch.lower() != ch.upper() else ch)
    return "".join(out)


class IgnoreList:
    """Names skipped below a watched root: the defaults, the user's, and hidden names unless asked."""

    def __init__(self, extra: Iterable[str] = (), include_hidden: bool = False, defaults: bool = True):
        names = (DEFAULT_IGNORE if defaults else ()) + tuple(n.strip() for n in extra if n and n.strip())
        bad = [n for n in names if "/" in n or "\x00" in n]
        if bad:
            raise WatchError(f"--ignore takes a file or folder name (or a glob of one), not a path: {bad[0]!r}")
        self.names = tuple(dict.fromkeys(names))
        self.globs = tuple(caseless_glob(n) for n in self.names)
        self.include_hidden = include_hidden
        self._seen: dict[str, bool] = {}

    def name(self, name: str) -> bool:
        hit = self._seen.get(name)
        if hit is None:
            hit = (name.startswith(".") and not self.include_hidden) or any(
                fnmatch.fnmatchcase(name, g) for g in self.globs)
            if len(self._seen) < 100_000:
                self._seen[name] = hit
        return hit

    def path(self, path: str, root: str) -> bool:
        """Whether `path` (at or under `root`) lies in an ignored folder or is an ignored name itself."""
        rel = os.path.relpath(path, root)
        return rel != "." and any(self.name(part) for part in rel.split(os.sep))


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def walk(root: str, ignore: IgnoreList) -> Iterator[tuple[str, list]]:
    """(folder, image file DirEntries) for `root` and every folder below it that is not ignored;
    folder symlinks are followed once (loop-safe). Unreadable folders are skipped (the plan reports them)."""
    stack, seen = [root], set()
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:
            continue
        files = []
        for e in entries:
            if ignore.name(e.name):
                continue
            try:
                if e.is_dir():
                    stack.append(e.path)
                elif is_image_name(e.name):
                    files.append(e)
            except OSError:
                continue
        yield folder, files


class PollSource:
    """Every `interval` seconds, walk the roots and compare each image file's (size, mtime) with the last walk."""

    mode = "poll"

    def __init__(self, interval: float, ignore: IgnoreList, stop: threading.Event):
        self.interval, self.ignore, self.stop = float(interval), ignore, stop
        self.snapshots: dict[str, dict] = {}
        self.next_poll = time.monotonic() + self.interval
        self.walks = 0

    def snapshot(self, root: str) -> dict:
        """path -> (size, mtime_ns) of every image file under `root` that is not ignored."""
        snap = {}
        for _, files in walk(root, self.ignore):
            for e in files:
                try:
                    st = e.stat()
                except OSError:
                    continue
                snap[e.path] = (st.st_size, st.st_mtime_ns)
        self.walks += 1
        return snap

    def add_root(self, root: str) -> set:
        self.snapshots[root] = self.snapshot(root)  # the baseline: the watcher's catch-up run covers the rest
        return set()

    def drop_root(self, root: str) -> None:
        self.snapshots.pop(root, None)

    def changes(self, timeout: float) -> set:
        wait = self.next_poll - time.monotonic()
        if wait > 0:
            self.stop.wait(min(timeout, wait))
            return set()
        self.next_poll = time.monotonic() + self.interval
        changed = set()
        for root in list(self.snapshots):
            if not os.path.isdir(root):
                continue  # away: the watcher notices and drops it; never report its files as deleted
            old, new = self.snapshots[root], self.snapshot(root)
            changed.update(p for p, s in new.items() if old.get(p) != s)
            changed.update(old.keys() - new.keys())
            self.snapshots[root] = new
        return changed

    def close(self) -> None:
        self.snapshots.clear()


class NativeSource:
    """watchfiles over every non-ignored folder of the roots (non-recursive watches), re-armed when folders come and go."""

    mode = "native"

    def __init__(self, ignore: IgnoreList, tick: float, stop: threading.Event):
        import watchfiles  # the `watch` extra; ImportError tells the watcher to poll instead

        self._watch = watchfiles.watch
        self._added = watchfiles.Change.added
        self.ignore, self.tick, self.stop = ignore, tick, stop
        self.folders: dict[str, set] = {}  # root -> watched folders
        self.gen = None
        self.rearms = 0

    def _folders_of(self, top: str) -> set:
        return {folder for folder, _ in walk(top, self.ignore)}

    def add_root(self, root: str) -> set:
        self.folders[root] = self._folders_of(root)
        return self._rearm()

    def drop_root(self, root: str) -> None:
        if self.folders.pop(root, None) is not None:
            self._rearm()

    def _open(self):
        ms = max(20, int(self.tick * 1000))
        folders = sorted({f for fs in self.folders.values() for f in fs if os.path.isdir(f)})
        if not folders:
            return None
        gen = self._watch(*folders, recursive=False, stop_event=self.stop, rust_timeout=ms, yield_on_timeout=True,
                          debounce=ms, step=max(20, min(250, ms // 2)), ignore_permission_denied=True)
        return gen, next(gen, set())  # the first answer comes once every watch is in place

    def _rearm(self) -> set:
        """A new watch over the current folders, live before the old one is drained and closed."""
        for attempt in range(3):
            try:
                opened = self._open()
                break
            except FileNotFoundError:  # a folder went away while arming: walk again
                if attempt == 2:
                    raise
                for root in list(self.folders):
                    self.folders[root] = self._folders_of(root) if os.path.isdir(root) else set()
        old, self.gen = self.gen, (opened[0] if opened else None)
        got = set(opened[1]) if opened else set()
        if old is not None:
            got |= set(next(old, set()))  # what the old watch saw until now
            old.close()
        self.rearms += 1
        return {path for _, path in got}

    def changes(self, timeout: float) -> set:
        if self.gen is None:
            self.stop.wait(timeout)
            return set()
        raw = next(self.gen, None)
        if raw is None:  # stopped, or the watch ended on its own: arm a new one
            if self.stop.is_set():
                return set()
            self.gen = None
            return self._rearm()
        paths = {path for _, path in raw}
        new_folders = []
        for change, path in raw:
            if change == self._added and os.path.isdir(path):
                root = self.root_of(path)
                if root is not None and not self.ignore.path(path, root):
                    new_folders.append((root, path))
        if new_folders:
            for root, path in new_folders:
                self.folders[root] |= self._folders_of(path)
            paths |= self._rearm()
        return paths

    def root_of(self, path: str) -> Optional[str]:
        best = None
        for root in self.folders:
            if (path == root or path.startswith(root.rstrip("/") + "/")) and (best is None or len(root) > len(best)):
                best = root
        return best

    def close(self) -> None:
        if self.gen is not None:
            self.gen.close()
            self.gen = None
