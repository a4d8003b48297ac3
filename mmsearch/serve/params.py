"""Search parameters from a query string, checked once, with one-line reasons for bad values."""
from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from typing import Optional

from fastapi import Query

from mmsearch.config import IMAGE_EXTENSIONS
from mmsearch.search.query import DEFAULT_RERANK_K
from mmsearch.serve.errors import ApiError

MAX_K = 200
MAX_OFFSET = 10_000
MAX_ID = 2 ** 62  # SQLite integers are 64-bit: a bigger id is a bad request, not an overflow


@dataclass
class SearchParams:
    q: Optional[str]
    ids: list[int]
    k: int
    offset: int
    folder: Optional[str]
    exts: Optional[list[str]]
    after: Optional[float]
    before: Optional[float]
    rerank: Optional[bool]
    rerank_k: int

    def echo(self) -> dict:
        return {"q": self.q, "id": self.ids, "k": self.k, "offset": self.offset, "folder": self.folder,
                "ext": self.exts, "after": self.after, "before": self.before, "rerank": self.rerank,
                "rerank_k": self.rerank_k}


def parse_day(value: Optional[str], name: str) -> Optional[float]:
    if value is None or value == "":
        return None
    try:
        d = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ApiError(400, f"{name}: '{value}' is not a date (use YYYY-MM-DD)") from None
    return (d if d.tzinfo else d.replace(tzinfo=dt.timezone.utc)).timestamp()


def parse_exts(value: Optional[str]) -> Optional[list[str]]:
    if not value:
        return None
    exts = ["." + e.strip().lower().lstrip(".") for e in value.split(",") if e.strip()]
    bad = [e for e in exts if e not in IMAGE_EXTENSIONS]
    if bad:
        raise ApiError(400, f"ext: unknown image extension {bad[0]} (known: "
                            f"{', '.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))})")
    return exts or None


def search_params(
        q: Optional[str] = Query(None, description="Text or weighted terms: '2:dog + beach - people'."),
        id: list[int] = Query([], description="Indexed image id(s) as query terms (more like this)."),
        k: int = Query(24, ge=1, le=MAX_K, description="Hits per page."),
        offset: int = Query(0, ge=0, le=MAX_OFFSET, description="Hits to skip (paging)."),
        folder: Optional[str] = Query(None, description="Only images under this absolute folder (see /api/info)."),
        ext: Optional[str] = Query(None, description="Only these extensions, comma-separated: jpg,png."),
        after: Optional[str] = Query(None, description="Taken on/after YYYY-MM-DD (EXIF date, else mtime)."),
        before: Optional[str] = Query(None, description="Taken before YYYY-MM-DD."),
        rerank: Optional[bool] = Query(None, description="Re-rank with the fusion model [default: when configured]."),
        rerank_k: int = Query(DEFAULT_RERANK_K, ge=1, le=1000, description="Candidates the re-ranker re-scores."),
) -> SearchParams:
    if folder is not None and folder != "" and not os.path.isabs(folder):
        raise ApiError(400, f"folder: '{folder}' is not an absolute folder path (choose one from /api/info)")
    if any(not 0 <= i < MAX_ID for i in id):
        raise ApiError(400, "id: must be a catalog id (a non-negative integer)")
    if "\x00" in (q or "") + (folder or ""):
        raise ApiError(400, "q: NUL characters are not allowed")
    p = SearchParams(q=q if q and q.strip() else None, ids=list(id), k=k, offset=offset,
                     folder=os.path.normpath(folder) if folder else None, exts=parse_exts(ext),
                     after=parse_day(after, "after"), before=parse_day(before, "before"), rerank=rerank,
                     rerank_k=rerank_k)
    if p.after is not None and p.before is not None and p.after >= p.before:
        raise ApiError(400, "after: must be earlier than before")
    return p
