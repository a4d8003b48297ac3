"""The catalog's record of files that could not be indexed (the `failures` table), keyed by path.

A mixin of Catalog: it uses the catalog's connection (`self.conn`). Paths are stored as the exact bytes
of their names (fsnames.py); a reason is display text, so a name that is not UTF-8 shows readably in it.
"""
from __future__ import annotations

import time
from typing import Iterable, Optional

from mmsearch.storage.fsnames import display, from_db, to_db


class FailureRows:
    def failure_states(self) -> dict[str, tuple]:
        return {from_db(r[0]): (r[1], r[2]) for r in self.conn.execute(
            "SELECT CAST(path AS BLOB), size, mtime_ns FROM failures")}

    def failure_reasons(self) -> dict[str, str]:
        return {from_db(p): r for p, r in self.conn.execute("SELECT CAST(path AS BLOB), reason FROM failures")}

    def record_failure(self, path: str, size: Optional[int], mtime_ns: Optional[int], reason: str) -> None:
        self.conn.execute(
            "INSERT INTO failures (path, size, mtime_ns, reason, failed_at) VALUES (CAST(? AS TEXT),?,?,?,?) "
            "ON CONFLICT(path) DO UPDATE SET size=excluded.size, mtime_ns=excluded.mtime_ns, "
            "reason=excluded.reason, failed_at=excluded.failed_at",
            (to_db(path), size, mtime_ns, display(str(reason)), time.time()))

    def clear_failures(self, paths: Iterable[str]) -> None:
        self.conn.executemany("DELETE FROM failures WHERE path=CAST(? AS TEXT)", [(to_db(p),) for p in paths])

    def failures(self) -> list[dict]:
        cur = self.conn.execute(
            "SELECT CAST(path AS BLOB), reason, size, mtime_ns, failed_at FROM failures ORDER BY path")
        return [dict(zip(("path", "reason", "size", "mtime_ns", "failed_at"), (from_db(r[0]), *r[1:]))) for r in cur]

    def count_failures(self) -> int:
        return self.conn.execute("SELECT count(*) FROM failures").fetchone()[0]
