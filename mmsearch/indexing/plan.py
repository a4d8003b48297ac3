"""Plan an indexing run: the diff between the folders and the catalog.

New files are embedded, changed ones (size or mtime) re-embedded, moved ones (same size + quick hash
as a file that vanished) keep their embedding, deleted ones leave. Every executor (local threads,
Ray, a watcher) runs the same plan; planning always happens on the driver, against SQLite.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

from mmsearch.errors import MmsearchError
from mmsearch.indexing import scan
from mmsearch.storage.catalog import Catalog
from mmsearch.storage.fsnames import to_db


def is_under(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


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


def plan_changes(cat: Catalog, roots: list[str], exclude, include_hidden: bool,
                 keep: Optional[Callable[[str], bool]] = None) -> Plan:
    """The diff between the folders and the catalog, as a merge of two path-ordered streams (the walk
    and the catalog's covering index): memory grows with the changes, not with the collection.
    `keep(path)`: only the files it keeps belong to this catalog (a shard of a sharded index); the
    others are neither planned nor reported, and a row it does not keep is planned away."""
    scan_failures: list = []
    failed = cat.failure_states()
    failed_now: dict = {}  # path -> (size, mtime) of files on record as failed, as they are now
    embed, update_ids, new, gone = [], {}, [], {}
    unchanged = known_failed = 0
    for root in scan.normalise_roots(roots):
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
    stale_failures = [p for p in failed if is_under(p, roots) and p not in scan_failed
                      and (p not in failed_now or failed[p] != failed_now[p])]
    return Plan(embed, update_ids, moves, [row[0] for row in gone.values()], stale_failures, scan_failures,
                 unchanged, known_failed)


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
