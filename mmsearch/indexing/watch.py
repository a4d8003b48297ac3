"""The watcher: another executor of the indexing plan, fed by file events instead of a command.

    events (native or polled) -> pending paths -> ripe -> index_folders(those paths, watched=the folders)

Start-up runs one full plan of every watched folder (whatever changed while nobody watched: a watcher
killed mid-batch loses nothing, since each batch is one transaction and the next plan sees what is
done), then arms the event sources. A path is *ripe* once no event has named it for `debounce` seconds
and its size and mtime are the same at two checks `settle` seconds apart (a file still being written is
indexed once, complete). A run starts when every event has been quiet for `debounce` seconds, or when
ripe paths have waited `max_wait` seconds through a flood, and plans all ripe paths together: a burst
of a thousand files is one run, a rename is a move (the plan matches size + quick hash), a deleted
file leaves. A watched folder that goes away is reported once and its photos stay (plan.root_away);
when it returns it gets a full plan again.

Network and FUSE mounts are polled (mounts.py), as is everything with `poll=SECONDS`. Progress and
errors go to the `mmsearch.watch` logger; `status()` is a snapshot for a server's health check.
"""
from __future__ import annotations

import bisect
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from mmsearch.errors import MmsearchError, WatchError
from mmsearch.indexing import events, mounts
from mmsearch.indexing.events import IgnoreList, log
from mmsearch.indexing.plan import root_away, watched_root_of
from mmsearch.storage.roots import is_under_roots

DEFAULT_POLL_S = 60.0  # a polled mount's interval unless --poll says otherwise (see benchmarks/watch_idle.py)
_UNSEEN = object()


@dataclass
class Pending:
    first_event: float
    last_event: float
    sig: object = _UNSEEN
    sig_at: float = 0.0


@dataclass
class RootState:
    path: str
    mode: str = "native"  # native | poll
    why_poll: Optional[str] = None
    present: bool = False
    away: Optional[str] = None  # why it is away
    was_mount: bool = False

    def to_dict(self) -> dict:
        return {"path": self.path, "mode": self.mode, "why_poll": self.why_poll, "present": self.present,
                "away": self.away}


@dataclass
class Totals:
    runs: int = 0
    added: int = 0
    updated: int = 0
    moved: int = 0
    removed: int = 0
    failed: int = 0
    errors: list = field(default_factory=list)  # the last few (time, message)


def stat_sig(path: str):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_mode >> 12


class Watcher:
    """Keeps `index_dir` in step with `roots`. `run()` blocks until `stop()` (or the stop event) is set.
    `index_options` go to index_folders (spec, device, precision, batch_size, workers, ...)."""

    def __init__(self, index_dir, roots: Sequence, poll: Optional[float] = None, ignore: Sequence[str] = (),
                 include_hidden: bool = False, debounce: float = 1.0, settle: Optional[float] = None,
                 max_wait: float = 30.0, auto_poll: float = DEFAULT_POLL_S, index_options: Optional[dict] = None,
                 on_run: Optional[Callable] = None, mounts_table: Optional[list] = None):
        if poll is not None and poll <= 0:
            raise WatchError("--poll takes a positive number of seconds")
        if debounce <= 0 or max_wait <= 0:
            raise WatchError("debounce and max_wait must be positive")
        self.index_dir = index_dir
        self.roots = sorted({os.path.abspath(os.fspath(r)) for r in roots})
        if not self.roots:
            raise WatchError("no folder to watch")
        self.poll, self.auto_poll = poll, auto_poll
        self.ignore = IgnoreList(ignore, include_hidden=include_hidden)
        self.include_hidden = include_hidden
        self.debounce = float(debounce)
        self.settle = float(debounce if settle is None else settle)
        self.max_wait = float(max_wait)
        self.tick = min(0.5, self.debounce / 2)
        self.index_options = dict(index_options or {})
        self.on_run = on_run
        self.mounts_table = mounts_table
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.pending: dict[str, Pending] = {}
        self.state = {r: RootState(r) for r in self.roots}
        self.totals = Totals()
        self.phase = "starting"
        self.last_run: Optional[dict] = None
        self.last_event = 0.0
        self.store = None
        self.sources: dict[str, object] = {}
        self._retry_at = 0.0
        self._backoff = 0.0

    # ---- life cycle -----------------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        try:
            self._start()
            self._set_phase("watching")
            while not self._stop.is_set():
                self._step()
        finally:
            for source in self.sources.values():
                source.close()
            if self.store is not None:
                self.store.catalog.close()
            self._set_phase("stopped")

    def _start(self) -> None:
        from mmsearch.storage.catalog import Catalog

        exists = Catalog.exists(self.index_dir)
        for r in self.roots:
            if not os.path.isdir(r) and not (exists and self._known_root(r)):
                raise WatchError(f"{r}: no such folder (a folder the index already holds may be away; a new one must exist)")
        if exists:
            self._open_store()
        for r in self.roots:  # armed before the catch-up: what changes during it raises events too
            self._check_root(self.state[r], first=True)
        self._set_phase("catching up")
        present = [st.path for st in self.state.values() if st.present]
        if present:  # also creates a new index; photos under a folder that is away are kept by the plan's guard
            self._index(present, full=True)
        if self.store is None:
            self._open_store()

    def _known_root(self, root: str) -> bool:
        from mmsearch.storage.catalog import Catalog

        cat = Catalog.open(self.index_dir, readonly=True)
        try:
            return root in (cat.meta().get("roots") or []) or next(cat.image_states_under(root), None) is not None
        finally:
            cat.close()

    def _open_store(self) -> None:
        from mmsearch.storage.store import IndexStore
        from mmsearch.towers.devices import select_device

        self.store = IndexStore.open(self.index_dir, device=select_device(self.index_options.get("device", "cpu")))

    # ---- sources -----------------------------------------------------------------------------------------------
    def _source(self, mode: str):
        if mode not in self.sources:
            if mode == "native":
                self.sources[mode] = events.NativeSource(self.ignore, self.tick, self._stop)
            else:
                self.sources[mode] = events.PollSource(self.poll or self.auto_poll, self.ignore, self._stop)
        return self.sources[mode]

    def _arm(self, st: RootState) -> set:
        if self.poll is not None:
            st.mode, st.why_poll = "poll", f"--poll {self.poll:g}"
        else:
            st.why_poll = mounts.polling_reason(st.path, self.mounts_table)
            st.mode = "poll" if st.why_poll else "native"
        if st.mode == "native":
            try:
                return self._source("native").add_root(st.path)
            except (ImportError, OSError, RuntimeError) as exc:  # no watchfiles, or out of inotify watches
                self._source("native").folders.pop(st.path, None)
                st.mode, st.why_poll = "poll", f"native events unavailable ({type(exc).__name__}: {exc})"
                log.warning("%s: %s; polling every %gs instead", st.path, st.why_poll, self.poll or self.auto_poll)
        return self._source("poll").add_root(st.path)

    # ---- the loop ----------------------------------------------------------------------------------------------
    def _step(self) -> None:
        changed = set()
        blocking = self.sources.get("native") or self.sources.get("poll")
        for source in self.sources.values():
            try:
                changed |= source.changes(self.tick if source is blocking else 0.0)
            except (OSError, RuntimeError) as exc:
                self._error(f"{source.mode} events failed: {exc}")
                self._stop.wait(self.tick)
        if not self.sources:
            self._stop.wait(self.tick)
        for st in self.state.values():
            self._check_root(st)
        now = time.monotonic()
        with self._lock:
            for path in changed:
                if self._accept(path):
                    p = self.pending.get(path)
                    if p is None:
                        self.pending[path] = Pending(now, now)
                    else:
                        p.last_event = now
                    self.last_event = now
        if self.pending and now >= self._retry_at:
            ripe, oldest = self._ripe(now)
            if ripe and (now - self.last_event >= self.debounce or now - oldest >= self.max_wait):
                self._run_batch(ripe)

    def _accept(self, path: str) -> bool:
        root = watched_root_of(path, self.roots)
        if root is None or path == root or not self.state[root].present or self.ignore.path(path, root):
            return False
        if events.is_image_name(path) or os.path.isdir(path):
            return True
        if os.path.lexists(path):
            return False  # another kind of file (a sidecar, a video, a partial download)
        return next(self.store.catalog.image_states_under(path), None) is not None  # a deleted folder of photos

    def _ripe(self, now: float) -> tuple[list, float]:
        """Paths quiet for `debounce` whose size and mtime held still for `settle`; folders only when nothing
        under them is still settling. Also the first-event time of the oldest ripe path."""
        ripe, unripe = [], []
        for path, p in self.pending.items():
            if now - p.last_event >= self.debounce:
                sig = stat_sig(path)
                if p.sig is not _UNSEEN and sig == p.sig and now - p.sig_at >= self.settle:
                    ripe.append(path)
                    continue
                if p.sig is _UNSEEN or sig != p.sig:
                    p.sig, p.sig_at = sig, now
            unripe.append(path)
        unripe.sort()
        keep = []
        for path in ripe:
            i = bisect.bisect_right(unripe, path.rstrip("/") + "/")
            if i < len(unripe) and unripe[i].startswith(path.rstrip("/") + "/"):
                continue  # a folder still filling up
            keep.append(path)
        oldest = min((self.pending[p].first_event for p in keep), default=now)
        return keep, oldest

    def _run_batch(self, paths: list) -> None:
        self._set_phase("indexing")
        try:
            ok = self._index(paths)
        finally:
            self._set_phase("watching")
        with self._lock:
            if ok:
                for path in paths:
                    self.pending.pop(path, None)

    def _index(self, paths: list, full: bool = False) -> bool:
        from mmsearch.indexing.pipeline import index_folders

        started = time.time()
        try:
            summary = index_folders(self.index_dir, paths, watched=self.roots, store=self.store,
                                    exclude=self.ignore.globs, include_hidden=self.include_hidden,
                                    **self.index_options)
        except (MmsearchError, OSError, sqlite3.Error) as exc:  # e.g. another indexer holding the catalog: retry
            self._error(f"indexing {len(paths)} paths failed: {exc}")
            self._backoff = min(300.0, max(5.0, self._backoff * 2))
            self._retry_at = time.monotonic() + self._backoff
            return False
        self._backoff = 0.0
        s = summary
        with self._lock:
            t = self.totals
            t.runs += 1
            t.added, t.updated, t.moved = t.added + s.added, t.updated + s.updated, t.moved + s.moved
            t.removed, t.failed = t.removed + s.removed, t.failed + len(s.failures)
            self.last_run = dict(at=started, paths=len(paths), full=full, seconds=round(s.seconds, 3), added=s.added,
                                 updated=s.updated, moved=s.moved, removed=s.removed, failed=len(s.failures))
        changed = s.added or s.updated or s.moved or s.removed or s.failures
        if changed or full:
            log.info("%s: added %d, updated %d, moved %d, removed %d, failed %d in %.1fs (%d %s)",
                     "catch-up" if full else "indexed", s.added, s.updated, s.moved, s.removed, len(s.failures),
                     s.seconds, len(paths), "folders" if full else "paths")
        for path, reason in s.failures[:20]:
            log.warning("failed: %s: %s", path, reason)
        if self.on_run is not None:
            self.on_run(summary, paths)
        return True

    # ---- folders that come and go ----------------------------------------------------------------------------
    def _check_root(self, st: RootState, first: bool = False) -> None:
        reason = root_away(st.path, self.store.catalog if self.store is not None else None)
        if reason is None and st.present and st.was_mount and not os.path.ismount(st.path):
            reason = "no longer a mount point (unmounted?)"
        if reason is None and not st.present:
            st.present, st.away = True, None
            st.was_mount = os.path.ismount(st.path)
            try:
                self._arm(st)
            except OSError as exc:
                st.present, st.away = False, f"cannot watch ({exc})"
                return
            if not first:
                log.info("%s is back: catching up", st.path)
                now = time.monotonic()
                with self._lock:  # a full plan of the folder, once it holds still
                    self.pending[st.path] = Pending(now, now)
                    self.last_event = now
            log.info("watching %s (%s%s)", st.path, st.mode, f": {st.why_poll}" if st.why_poll else "")
        elif reason is not None and (st.present or first):
            if (st.present or st.away is None) and self.store is not None:
                under = len(self.store.catalog.filtered_ids(under=st.path))
                log.warning("%s is away (%s): its %d photos stay in the index; watching for its return",
                            st.path, reason, under)
            st.present, st.away = False, reason
            for source in self.sources.values():
                source.drop_root(st.path)
            with self._lock:
                for path in [p for p in self.pending if is_under_roots(p, [st.path])]:
                    del self.pending[path]

    # ---- reporting -----------------------------------------------------------------------------------------------
    def _set_phase(self, phase: str) -> None:
        with self._lock:
            self.phase = phase

    def fail(self, message: str) -> None:
        """Record why the watcher stopped (its runner caught an unexpected error)."""
        self._error(message)
        self._set_phase("failed")

    def _error(self, message: str) -> None:
        log.error("%s", message)
        with self._lock:
            self.totals.errors = (self.totals.errors + [(time.time(), message)])[-5:]

    def status(self) -> dict:
        """What the watcher is doing, for /api/health (safe to call from another thread)."""
        with self._lock:
            t = self.totals
            return {"state": self.phase, "roots": [s.to_dict() for s in self.state.values()],
                    "pending": len(self.pending), "runs": t.runs, "last_run": self.last_run,
                    "totals": {"added": t.added, "updated": t.updated, "moved": t.moved, "removed": t.removed,
                               "failed": t.failed},
                    "errors": [{"at": at, "message": m} for at, m in t.errors],
                    "debounce_s": self.debounce, "poll_s": self.poll or self.auto_poll}
