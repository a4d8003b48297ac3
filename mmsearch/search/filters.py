"""The one parser of search filters: the CLI, the server and the Python API all go through `Filters.parse`.

A filter names a folder (`under`), extensions (`exts`) and a date range over the photo's date (EXIF
date, else the file's mtime): `after` is the first instant kept, `before` the first one dropped.
Dates are given as YYYY-MM-DD (or an ISO date-time), or as epoch seconds by the Python API. `until`
is the inclusive form of `before` for a day (the page's "To": until 2024-05-31 keeps May 31).
Bad values raise FilterError (a QueryError: a 400 from the server, one line from the CLI).
"""
from __future__ import annotations

import datetime as dt
import math
import os
from dataclasses import dataclass
from typing import Iterable, Optional, Union

from mmsearch.config import MEDIA_EXTENSIONS
from mmsearch.errors import QueryError

DateLike = Union[None, str, float, int]


class FilterError(QueryError):
    """A search filter with a bad value."""


def parse_exts(value: Union[None, str, Iterable[str]]) -> Optional[tuple[str, ...]]:
    """'jpg,PNG' or ['.jpg', 'png'] -> ('.jpg', '.png'); an unknown image or video extension is an error."""
    if not value:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    exts = tuple(dict.fromkeys("." + str(e).strip().lower().lstrip(".") for e in items if str(e).strip()))
    bad = [e for e in exts if e not in MEDIA_EXTENSIONS]
    if bad:
        raise FilterError(f"ext: unknown image extension {bad[0]} (known: "
                          f"{', '.join(sorted(e[1:] for e in MEDIA_EXTENSIONS))})")
    return exts or None


def parse_day(value: DateLike, name: str, end_of_day: bool = False) -> Optional[float]:
    """A date (YYYY-MM-DD, an ISO date-time; UTC unless it says otherwise) or epoch seconds -> epoch
    seconds. `end_of_day` turns a plain day into the start of the next one (an inclusive end)."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise FilterError(f"{name}: {value} is not a time")
        return float(value)
    text = str(value).strip()
    try:
        d = dt.datetime.fromisoformat(text)
    except ValueError:
        raise FilterError(f"{name}: '{value}' is not a date (use YYYY-MM-DD)") from None
    d = d if d.tzinfo else d.replace(tzinfo=dt.timezone.utc)
    if end_of_day and len(text) == 10:  # a plain day: keep all of it
        d += dt.timedelta(days=1)
    return d.timestamp()


@dataclass(frozen=True)
class Filters:
    under: Optional[str] = None  # an absolute, normalised folder
    exts: Optional[tuple[str, ...]] = None  # ('.jpg', ...)
    after: Optional[float] = None  # epoch seconds, kept
    before: Optional[float] = None  # epoch seconds, dropped

    @classmethod
    def parse(cls, under: Optional[str] = None, exts=None, after: DateLike = None, before: DateLike = None,
              until: DateLike = None, require_absolute: bool = False) -> "Filters":
        """Check and normalise every filter once. `require_absolute` (the server): a relative folder is
        an error rather than a folder under the server's working directory."""
        if under is not None and "\x00" in str(under):
            raise FilterError("folder: NUL characters are not allowed")
        if under:
            under = os.fspath(under)
            if require_absolute and not os.path.isabs(under):
                raise FilterError(f"folder: '{under}' is not an absolute folder path")
            under = os.path.normpath(os.path.abspath(under))
        end = parse_day(before, "before")
        inclusive_end = parse_day(until, "until", end_of_day=True)
        if end is not None and inclusive_end is not None:
            raise FilterError("give before or until, not both")
        f = cls(under=under or None, exts=parse_exts(exts), after=parse_day(after, "after"),
                before=end if end is not None else inclusive_end)
        if f.after is not None and f.before is not None and f.after >= f.before:
            raise FilterError("after: must be earlier than before")
        return f

    @property
    def active(self) -> bool:
        return bool(self.under or self.exts or self.after is not None or self.before is not None)

    def to_dict(self) -> dict:
        return {"folder": self.under, "ext": list(self.exts) if self.exts else None, "after": self.after,
                "before": self.before}
