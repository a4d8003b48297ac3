"""Thumbnails: EXIF orientation applied, WebP, cached in the index folder under thumbs/.

The cache key is id + size + the file's mtime and size, so an edited file gets a new thumbnail and
the old one is removed. A video shot's thumbnail is its frame (mmsearch.video.frame_at), cached alike. Decoding uses media.load_image: the JPEG draft scale, the pixel cap and the
error reasons of indexing. A read-only index folder still gets thumbnails, just not cached.
"""
from __future__ import annotations

import io
import os
import uuid
from pathlib import Path
from typing import Optional

SIZES = (128, 256, 512)
QUALITY = 80


def snap_size(size: int) -> int:
    """The smallest cached size at least `size` (the cache holds a few sizes, not one per request)."""
    return next((s for s in SIZES if s >= size), SIZES[-1])


class ThumbCache:
    def __init__(self, index_dir: Path):
        self.root = Path(index_dir) / "thumbs"

    def _name(self, image_id: int, size: int, st: os.stat_result) -> Path:
        return self.root / f"{image_id % 256:02x}" / f"{image_id}-{size}-{st.st_mtime_ns}-{st.st_size}.webp"

    def get(self, image_id: int, path: str, size: int, frame_s: Optional[float] = None) -> bytes:
        """WebP bytes of the thumbnail of `path` (already checked by the caller), or of its frame at
        `frame_s` for a video shot; MediaError if undecodable."""
        size = snap_size(size)
        target = self._name(image_id, size, os.stat(path))
        try:
            return target.read_bytes()
        except OSError:
            pass
        data = render(path, size, frame_s)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{uuid.uuid4().hex}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)  # atomic: a concurrent reader sees all of it or none
            for old in target.parent.glob(f"{image_id}-{size}-*.webp"):
                if old != target:
                    old.unlink(missing_ok=True)  # the file changed: its old thumbnail is garbage
        except OSError:
            pass  # read-only index folder: serve without caching
        return data


def render(path: str, size: int, frame_s: Optional[float] = None) -> bytes:
    from PIL import Image

    if frame_s is not None:
        from mmsearch.video import frame_at

        img = frame_at(path, frame_s, size)  # scaled by FFmpeg, turned as displayed
    else:
        from mmsearch.media import load_image

        img = load_image(path, min_size=size)  # draft-decoded, EXIF-transposed, RGB, under the pixel cap
    img.thumbnail((size, size), Image.Resampling.BICUBIC, reducing_gap=2.0)
    buf = io.BytesIO()
    img.save(buf, "WEBP", quality=QUALITY, method=4)
    return buf.getvalue()
