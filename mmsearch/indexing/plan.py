"""Plan an indexing run: the diff between the folders and the catalog.

New files are embedded, changed ones (size or mtime) re-embedded, moved ones (same size + quick hash
as a file that vanished) keep their embedding, deleted ones leave. A video is one file (its shots follow
it: moved, re-embedded or deleted with it); without the `video` extra, new and changed videos are
skipped (counted, not failed) and the ones indexed before stay. Every executor (local threads,
Ray, a watcher) runs the same plan; planning always happens on the driver, against SQLite.

A watcher plans only the paths its events named, inside the folders it watches (`watched`). There a
path that is gone is a deleted (or moved) file or folder, but only while its watched folder is present:
a watched folder that is missing, unreadable, or empty while the catalog holds photos under it is
*away* (an unmounted disk, a NAS that dropped off the network), and nothing under it is planned, so
its photos stay in the index until it returns.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

from mmsearch import video
from mmsearch.errors import MmsearchError
from mmsearch.indexing import scan
from mmsearch.storage.catalog import Catalog
from mmsearch.storage.fsnames import to_db
from mmsearch.storage.roots import is_under_roots


@dataclass
class Plan:
    """What one run changes; executors read `embed` and `update_ids`."""
    embed: list  # FileInfo to (re-)embed
    update_ids: dict  # path -> existing id for changed files
    moves: list  # (id, FileInfo)
    deleted_ids: list
    stale_failures: list  # failure paths under the roots that vanished or will be retried
    scan_failures: list  # (path, reason) from the walk itself
    unchanged: int
    known_failed: int
    away: list = field(default_factory=list)  # watched folders skipped because they are away (root_away)
    deleted_shots: list = field(default_factory=list)  # the other rows of deleted videos (not files)
    skipped_videos: int = 0  # new or changed videos left for a run with video support


def root_away(root: str, cat: Optional[Catalog]) -> Optional[str]:
    """Why a watched folder looks away ('missing', 'unreadable', 'empty'), or None when it is present.
    An empty folder counts as away only while the catalog holds photos under it: an unmounted disk
    leaves its empty mount point behind, and "every photo deleted at once" is rarer than that."""
    if not os.path.isdir(root):
        return "missing"
    try:
        with os.scandir(root) as it:
            empty = next(it, None) is None
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if empty and cat is not None and next(cat.image_states_under(root), None) is not None:
        return "empty (unmounted?)"
    return None


def watched_root_of(path: str, watched: Sequence[str]) -> Optional[str]:
    inside = [w for w in watched if is_under_roots(path, [w])]
    return max(inside, key=len) if inside else None


def plan_changes(cat: Catalog, roots: list[str], exclude, include_hidden: bool,
                 watched: Optional[Sequence[str]] = None, keep: Optional[Callable[[str], bool]] = None) -> Plan:
    """The diff between the folders and the catalog, as a merge of two path-ordered streams (the walk
    and the catalog's covering index): memory grows with the changes, not with the collection.
    `watched`: the folders a watcher watches, each of `roots` inside one (see the module docstring).
    `keep(path)`: only the files it keeps belong to this catalog (a shard of a sharded index); the
    others are neither planned nor reported, and a row it does not keep is planned away."""
    scan_failures: list = []
    failed = cat.failure_states()
    failed_now: dict = {}  # path -> (size, mtime) of files on record as failed, as they are now
    embed, update_ids, new, gone = [], {}, [], {}
    unchanged = known_failed = 0
    away: dict = {}  # watched folder -> whether it is away, decided once per plan
    covered = []  # the roots planned (not under an away folder): only their failures can be stale
    for root in scan.normalise_roots(roots):
        if watched is not None:
            home = watched_root_of(root, watched)
            if home is None:
                raise MmsearchError(f"{root} is outside the watched folders")
            if home not in away:
                away[home] = root_away(home, cat) is not None
            if away[home]:
                continue
            if not os.path.lexists(root):  # gone from a present folder: deleted, or moved (matched below)
                covered.append(root)
                for row in cat.image_states_under(root):
                    gone[row[0]] = row[1:]
                continue
        covered.append(root)
        files = scan.scan([root], exclude=exclude, include_hidden=include_hidden,
                          on_error=lambda p, reason: scan_failures.append((str(p), reason)))
        if keep is not None:
            files = (f for f in files if keep(f.path))
        for f, row in merge_by_path(files, cat.image_states_under(root)):
            if f is None:
                gone[row[0]] = row[1:]
                continue
            if f.path in failed:
                failed_now[f.path] = (f.size, f.mtime_ns)
            if row is not None:
                if (row[2], row[3]) == (f.size, f.mtime_ns):
                    unchanged += 1
                else:
                    update_ids[f.path] = row[1]
                    embed.append(f)
            elif failed.get(f.path) == (f.size, f.mtime_ns):
                known_failed += 1  # failed before and unchanged since: do not retry
            else:
                new.append(f)
    # a new file with the size and quick hash of a vanished one is that file, moved: keep its embedding
    by_hash = {(row[1], row[3]): (p, row[0]) for p, row in gone.items() if row[3]}
    moves = []
    for f in new:
        hit = by_hash.pop((f.size, safe_hash(f.path)), None) if by_hash else None
        if hit is not None:
            moves.append((hit[1], f))
            del gone[hit[0]]
        else:
            embed.append(f)
    if keep is not None:  # a folder that cannot be read is reported by the shard its path routes to
        scan_failures = [(p, r) for p, r in scan_failures if keep(p)]
    # a walk failure already on record (same path, same reason) is not news: count it, don't repeat it
    recorded = cat.failure_reasons()
    known_scan = [(p, r) for p, r in scan_failures if recorded.get(p) == r]
    known_failed += len(known_scan)
    scan_failed = {p for p, _ in scan_failures}
    scan_failures = [f for f in scan_failures if f not in known_scan]
    stale_failures = [p for p in failed if is_under_roots(p, covered) and p not in scan_failed
                      and (p not in failed_now or failed[p] != failed_now[p])]
    deleted = [row[0] for row in gone.values()]
    skipped = 0
    # only a run with a video to read asks whether PyAV imports (~90 ms, most of an unchanged re-run)
    has_video = any(video.is_video(f.path) for f in embed) or any(video.is_video(p) for p in update_ids)
    if has_video and not video.available():
        skipped = sum(1 for f in embed if video.is_video(f.path))
        embed = [f for f in embed if not video.is_video(f.path)]
        for path in [p for p in update_ids if video.is_video(p)]:
            del update_ids[path]  # its old shots stay until it can be read again
    return Plan(embed, update_ids, moves, deleted, stale_failures, scan_failures, unchanged, known_failed,
                away=sorted(w for w, is_away in away.items() if is_away),
                deleted_shots=cat.video_shot_ids(deleted), skipped_videos=skipped)


def merge_by_path(files: Iterator, rows: Iterator) -> Iterator[tuple]:
    """(file, row) pairs from two path-ascending streams: both when the path is in both, else
    (file, None) or (None, row). Rows name their path by its stored bytes (Catalog.image_states_under)
    and files are compared by the same bytes (fsnames.to_db), the order both streams are in, names
    that are not UTF-8 included. A stream out of order would pair wrongly, so it is an error."""
    f, r = next(files, None), next(rows, None)
    fk = None if f is None else to_db(f.path)
    last_f = last_r = b""
    while f is not None or r is not None:
        if f is not None and fk < last_f or r is not None and r[0] < last_r:
            raise MmsearchError("the folder walk and the catalog disagree on the order of paths; nothing was "
                                "changed (please report this with the two paths' names)")
        if r is None or (f is not None and fk < r[0]):
            last_f = fk
            yield f, None
            f = next(files, None)
            fk = None if f is None else to_db(f.path)
        elif f is None or r[0] < fk:
            last_r = r[0]
            yield None, r
            r = next(rows, None)
        else:
            last_f, last_r = fk, r[0]
            yield f, r
            f, r = next(files, None), next(rows, None)
            fk = None if f is None else to_db(f.path)


def safe_hash(path: str) -> Optional[str]:
    try:
        return scan.quick_hash(path)
    except OSError:
        return None
