"""Byte ranges of an original file (a browser seeking in a video asks for them): one range, bounded.

`parse_range` accepts exactly one `bytes=START-END`, `bytes=START-` or `bytes=-SUFFIX` of at most 19
digits a number, inside the file; anything else (several ranges, another unit, a start past the end,
an end before the start, junk) is a RangeError, which the route answers with 416 and the file's size.
`file_response` sends the whole file (200) or the range (206) from a file the caller already checked and opened.
"""
from __future__ import annotations

import re
from typing import Optional

_RANGE = re.compile(r"bytes=(\d{0,19})-(\d{0,19})")
MAX_HEADER = 100
CHUNK = 256 * 1024


class RangeError(ValueError):
    """A Range header this server will not answer (416)."""


def parse_range(header: Optional[str], size: int) -> Optional[tuple[int, int]]:
    """(first, last) byte, inclusive, of the one range asked for; None when no Range was sent."""
    if header is None:
        return None
    header = header.strip()
    if len(header) > MAX_HEADER:
        raise RangeError("Range header too long")
    m = _RANGE.fullmatch(header.replace(" ", ""))
    if not m:
        raise RangeError("only one range of bytes is served (bytes=START-END, bytes=START- or bytes=-N)")
    first, last = m.group(1), m.group(2)
    if size <= 0:
        raise RangeError("the file is empty")
    if first == "":
        if last == "" or int(last) == 0:
            raise RangeError("an empty suffix range")
        return max(0, size - int(last)), size - 1
    start = int(first)
    if start >= size:
        raise RangeError(f"the range starts at byte {start}, past the end of the file ({size} bytes)")
    if last == "":
        return start, size - 1
    end = int(last)
    if end < start:
        raise RangeError("the range ends before it starts")
    return start, min(end, size - 1)


def _chunks(fh, start: int, length: int):
    with fh:
        fh.seek(start)
        left = length
        while left > 0:
            data = fh.read(min(CHUNK, left))
            if not data:  # the file shrank meanwhile: send what there is, never more than announced
                return
            left -= len(data)
            yield data


def file_response(fh, size: int, range_header: Optional[str], media_type: str, headers: dict):
    """200 with the whole open file `fh` (of `size` bytes), or 206 with the range asked for; RangeError for
    a bad one (the caller closes `fh` and answers 416 with `Content-Range: bytes */SIZE`). The response
    closes `fh` when it has sent it."""
    from fastapi.responses import StreamingResponse

    wanted = parse_range(range_header, size)
    headers = dict(headers, **{"Accept-Ranges": "bytes"})
    start, end = wanted if wanted is not None else (0, size - 1)
    length = max(0, end - start + 1)
    headers["Content-Length"] = str(length)
    if wanted is None:
        return StreamingResponse(_chunks(fh, 0, size), media_type=media_type, headers=headers)
    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return StreamingResponse(_chunks(fh, start, length), status_code=206, media_type=media_type, headers=headers)
