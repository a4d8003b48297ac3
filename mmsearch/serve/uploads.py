"""An uploaded query image: size-capped, pixel-capped from its header before any decoding, decoded once
(for the query layer to embed as it is) while holding one of a few upload slots, so concurrent uploads
cost at most UPLOAD_SLOTS decoded images of memory, whatever their number.

The bytes go to a private temp file for the length of one request (HEIC is recognised by its file
extension), then the file is deleted.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from typing import Iterator

from mmsearch.config import IMAGE_EXTENSIONS
from mmsearch.errors import MediaError
from mmsearch.serve.errors import ApiError

MAX_UPLOAD_PIXELS = 40_000_000  # 40 MP: any phone photo; an 88 MP PNG of 300 KB would cost ~750 MB to decode
UPLOAD_SLOTS = 2  # uploads decoded and embedded at once; the others wait
SLOT_WAIT_S = 60.0
_CHUNK = 1 << 20


class UploadSlots:
    """A bounded semaphore around decode + embed of an upload (the decoded image lives that long)."""

    def __init__(self, slots: int = UPLOAD_SLOTS):
        self.slots = slots
        self._sem = threading.BoundedSemaphore(slots)

    @contextlib.contextmanager
    def hold(self, wait_s: float = SLOT_WAIT_S):
        if not self._sem.acquire(timeout=wait_s):
            raise ApiError(503, f"the server is busy with {self.slots} other uploads; try again in a moment")
        try:
            yield
        finally:
            self._sem.release()


@contextlib.contextmanager
def upload_image(upload, max_bytes: int, slots: UploadSlots, min_size: int,
                 max_pixels: int = MAX_UPLOAD_PIXELS) -> Iterator[object]:
    """The decoded RGB image of `upload` (a starlette UploadFile), inside one upload slot; ApiError
    400/413 when it is not usable. Decoded as indexing decodes (media.load_image: JPEG draft scale for
    `min_size`, EXIF orientation), so the query layer embeds it without reading it again."""
    from mmsearch.media import load_image

    folder = tempfile.mkdtemp(prefix="mmsearch-upload-")
    try:
        # only the extension of the client's file name is kept, and only a known one: HEIC needs it to decode
        ext = os.path.splitext(upload.filename or "")[1].lower()
        path = os.path.join(folder, "upload" + (ext if ext in IMAGE_EXTENSIONS else ""))
        size = _copy_capped(upload.file, path, max_bytes)
        if size > max_bytes:
            raise ApiError(413, f"image too large (limit {max_bytes / 2**20:.0f} MB)")
        if not size:
            raise ApiError(400, "image: the uploaded file is empty")
        with slots.hold():
            try:  # the pixel cap is checked on the header, before a single pixel is decoded
                img = load_image(path, min_size=min_size, max_pixels=max_pixels)
            except MediaError as exc:
                raise ApiError(400, f"image: {exc.reason}") from None
            except Exception as exc:  # hostile input can raise odd types inside PIL: still the request's fault
                raise ApiError(400, f"image: not a readable image ({exc.__class__.__name__})") from None
            try:
                yield img
            finally:
                img.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _copy_capped(src, path: str, max_bytes: int) -> int:
    """Copy at most max_bytes + 1 bytes of `src` to `path`, in chunks; the number copied."""
    total = 0
    with open(path, "wb") as fh:
        while total <= max_bytes:
            chunk = src.read(min(_CHUNK, max_bytes + 1 - total))
            if not chunk:
                break
            fh.write(chunk)
            total += len(chunk)
    return total
