"""The search filters in SQL (folder, extensions, date taken), as a mixin of the Catalog: one WHERE clause,
each condition on an index of its own, and the selection a filtered vector search takes."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from mmsearch.storage.fsnames import to_db

if TYPE_CHECKING:
    import numpy as np


class FilterRows:
    """Filters over `images` (the Catalog's connection is `self.conn`)."""

    def filtered_ids(self, under: Optional[str] = None, exts: Optional[list[str]] = None,
                     after: Optional[float] = None, before: Optional[float] = None) -> list[int]:
        """Ids passing the metadata filters. The date is EXIF DateTimeOriginal, else the file's mtime."""
        cond, args = filter_sql(under, exts, after, before)
        return [r[0] for r in self.conn.execute("SELECT id FROM images" + (f" WHERE {cond}" if cond else ""), args)]

    def filter_selection(self, total: int, under: Optional[str] = None, exts: Optional[list[str]] = None,
                         after: Optional[float] = None, before: Optional[float] = None) -> tuple[np.ndarray, bool]:
        """(ids, excluded) for a search filter over `total` indexed images: the ids that pass when they
        are at most half, else the ids that fail (excluded=True). Listing the smaller side keeps a filter
        that passes nearly everything as cheap as one that passes nearly nothing (SQLite counts in C)."""
        import numpy as np

        cond, args = filter_sql(under, exts, after, before)
        if not cond:
            return np.empty(0, np.int64), True
        kept = self.conn.execute(f"SELECT count(*) FROM images WHERE {cond}", args).fetchone()[0]
        if kept * 2 <= total:
            sql, excluded = f"SELECT id FROM images WHERE {cond}", False
        else:  # coalesce: a NULL condition fails the filter, so its row belongs to the complement
            sql, excluded = f"SELECT id FROM images WHERE NOT coalesce(({cond}), 0)", True
        ids = np.fromiter((r[0] for r in self.conn.execute(sql, args)), dtype=np.int64)
        return ids, excluded


def filter_sql(under: Optional[str], exts: Optional[list[str]], after: Optional[float],
                before: Optional[float]) -> tuple[str, list]:
    """The WHERE clause of the metadata filters ('' when none), each on an index of its own."""
    where, args = [], []
    if under:  # a range on the path index ('/' + 1 == '0'), not a scan of every row
        prefix = to_db(under.rstrip("/") + "/")
        where.append("((path >= CAST(? AS TEXT) AND path < CAST(? AS TEXT)) OR path = CAST(? AS TEXT))")
        args += [prefix, prefix[:-1] + b"0", to_db(under.rstrip("/"))]
    if exts:
        where.append(f"ext IN ({','.join('?' * len(exts))})")
        args += exts
    date = "coalesce(taken_at, mtime_ns / 1e9)"
    if after is not None:
        where.append(f"{date} >= ?")
        args.append(after)
    if before is not None:
        where.append(f"{date} < ?")
        args.append(before)
    return " AND ".join(where), args
