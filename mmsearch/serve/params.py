"""Search parameters from a query string, checked once, with one-line reasons for bad values."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from fastapi import Query

from mmsearch.search.filters import FilterError, Filters
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
    filters: Filters
    rerank: Optional[bool]
    rerank_k: int
    mode: Optional[str] = None
    good_only: bool = False
    sort: str = "relevance"
    group: bool = True

    def echo(self) -> dict:
        return {"q": self.q, "id": self.ids, "k": self.k, "offset": self.offset, **self.filters.to_dict(),
                "rerank": self.rerank, "rerank_k": self.rerank_k, "mode": self.mode, "good_only": self.good_only,
                "sort": self.sort, "group": self.group}


def search_params(
        q: Optional[str] = Query(None, description="Text or weighted terms: '2:dog + beach - people'."),
        id: list[int] = Query([], description="Indexed image id(s) as query terms (more like this)."),
        k: int = Query(24, ge=1, le=MAX_K, description="Hits per page."),
        offset: int = Query(0, ge=0, le=MAX_OFFSET, description="Hits to skip (paging)."),
        folder: Optional[str] = Query(None, description="Only images under this absolute folder (see /api/info)."),
        ext: Optional[str] = Query(None, description="Only these extensions, comma-separated: jpg,png."),
        after: Optional[str] = Query(None, description="Taken on/after YYYY-MM-DD (EXIF date, else mtime)."),
        before: Optional[str] = Query(None, description="Taken before YYYY-MM-DD."),
        until: Optional[str] = Query(None, description="Taken on/before YYYY-MM-DD (inclusive; instead of before)."),
        rerank: Optional[bool] = Query(None, description="Re-rank with the fusion model [default: when configured]."),
        rerank_k: int = Query(DEFAULT_RERANK_K, ge=1, le=1000, description="Candidates the re-ranker re-scores."),
        mode: Optional[Literal["dense", "text", "hybrid"]] = Query(
            None, description="dense: the image encoder only; text: the words in the images only; hybrid: both "
                              "fused [default: hybrid where the index has words]."),
        good_only: bool = Query(False, description="Only good matches (calibrated score at the index's threshold); "
                                                   "with none, the closest results and no_good_match=true."),
        sort: Literal["relevance", "date"] = Query("relevance", description="date: the good matches, newest first."),
        group: bool = Query(True, description="One hit per video at its best moment (false: one per shot)."),
) -> SearchParams:
    if any(not 0 <= i < MAX_ID for i in id):
        raise ApiError(400, "id: must be a catalog id (a non-negative integer)")
    if "\x00" in (q or ""):
        raise ApiError(400, "q: NUL characters are not allowed")
    try:
        filters = Filters.parse(under=folder or None, exts=ext, after=after, before=before, until=until,
                                require_absolute=True)
    except FilterError as exc:
        raise ApiError(400, f"{exc} (folders: see /api/info)" if str(exc).startswith("folder") else str(exc)) from None
    return SearchParams(q=q if q and q.strip() else None, ids=list(id), k=k, offset=offset, filters=filters,
                        rerank=rerank, rerank_k=rerank_k, mode=mode, good_only=good_only, sort=sort,
                        group=group)
