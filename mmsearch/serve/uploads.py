"""An uploaded query image: size-capped, decoded under indexing's pixel cap, kept in a private temp file
for the length of one request (the query layer embeds image files), then deleted."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

from mmsearch.config import IMAGE_EXTENSIONS
from mmsearch.errors import MediaError
from mmsearch.serve.errors import ApiError

MIN_SIDE = 256  # decode checks use JPEG draft scaling: a 100 MP upload is not decoded at full size twice


@contextlib.contextmanager
def upload_file(upload, max_bytes: int) -> Iterator[str]:
    """Path of a checked copy of `upload` (a starlette UploadFile); ApiError 400/413 when it is not usable."""
    from mmsearch.media import load_image

    data = upload.file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ApiError(413, f"image too large (limit {max_bytes / 2**20:.0f} MB)")
    if not data:
        raise ApiError(400, "image: the uploaded file is empty")
    folder = tempfile.mkdtemp(prefix="mmsearch-upload-")
    try:
        # only the extension of the client's file name is kept, and only a known one: HEIC needs it to decode
        ext = os.path.splitext(upload.filename or "")[1].lower()
        path = os.path.join(folder, "upload" + (ext if ext in IMAGE_EXTENSIONS else ""))
        with open(path, "wb") as fh:
            fh.write(data)
        try:  # the same checks (pixel cap, corrupt data) as indexing, before any model loads
            load_image(path, min_size=MIN_SIDE)
        except MediaError as exc:
            raise ApiError(400, f"image: {exc.reason}") from None
        except Exception as exc:  # hostile input can raise odd types inside PIL: still the request's fault
            raise ApiError(400, f"image: not a readable image ({exc.__class__.__name__})") from None
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)
