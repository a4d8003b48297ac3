"""Open any image file safely: an RGB PIL image, or a MediaError with a short reason.

Big JPEGs are decoded with `Image.draft` at the smallest DCT scale that keeps the short side at
least the model's input size (179 ms -> 50 ms for 12 MP; a 108 MP photo decodes at 1/8 scale, ~40 MB
instead of 324 MB). EXIF orientation is applied, so a photo rotated by tag and the same photo
physically rotated give the same pixels.

The pixel cap (`max_pixels`, DEFAULT_MAX_PIXELS) is the one that decides: PIL's own decompression-bomb
limit (Image.MAX_IMAGE_PIXELS, ~89 MP, an error past ~179 MP) would refuse a 12000x9000 phone photo
first, so it is lifted while mmsearch opens a file (`own_pixel_cap`) and restored afterwards.
"""
from __future__ import annotations

import calendar
import contextlib
import errno
import os
import threading
import time
from typing import Iterator, Optional

from PIL import Image, ImageOps, UnidentifiedImageError

from mmsearch.config import HEIC_EXTENSIONS, IMAGE_EXTENSIONS  # noqa: F401 (re-exported)
from mmsearch.errors import MediaError

DEFAULT_MAX_PIXELS = 200_000_000
_heif_state: Optional[bool] = None
_cap_lock = threading.Lock()
_cap_users = 0
_pil_limit: Optional[int] = None


@contextlib.contextmanager
def own_pixel_cap() -> Iterator[None]:
    """While inside, PIL's global decompression-bomb limit is off, so that decode_opened's `max_pixels`
    decides (checked on the header, before any pixel is decoded). Reference-counted under a lock: decode
    threads may nest and overlap, and PIL's own limit comes back when the last one leaves."""
    global _cap_users, _pil_limit
    with _cap_lock:
        if _cap_users == 0:
            _pil_limit = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _cap_users += 1
    try:
        yield
    finally:
        with _cap_lock:
            _cap_users -= 1
            if _cap_users == 0:
                Image.MAX_IMAGE_PIXELS = _pil_limit


def _heif_available() -> bool:
    global _heif_state
    if _heif_state is None:
        try:
            import pillow_heif

            pillow_heif.register_heif_opener()
            _heif_state = True
        except ImportError:
            _heif_state = False
    return _heif_state


def os_reason(path: str, exc: OSError) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    if exc.errno == errno.ENOENT:
        return "broken symlink" if os.path.islink(path) else "file not found"
    if exc.errno == errno.EISDIR:
        return "is a directory"
    return f"cannot read ({exc.strerror or exc})"


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / 32-bit grey: scale the real range to 8 bits instead of clipping at 255
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        hi = float(arr.max())
        top = 65535.0 if img.mode.startswith("I;16") or hi > 255 else 255.0
        arr = arr / (top if hi > 255 or img.mode.startswith("I;16") else max(hi, 1.0)) * 255.0
        return Image.fromarray(arr.clip(0, 255).astype("uint8")).convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_image(path, min_size: Optional[int] = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `path` to RGB. `img.info["original_size"]` keeps the stored size (before draft scaling)."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext in HEIC_EXTENSIONS and not _heif_available():
        raise MediaError(path, "HEIC support not installed (pip install 'mmsearch[heic]')")
    try:
        if os.path.getsize(path) == 0:
            raise MediaError(path, "empty file")
        with own_pixel_cap(), Image.open(path) as img:
            w, h = img.size
            out = decode_opened(img, path, min_size, max_pixels)
    except MediaError:
        raise
    except OSError as exc:
        if isinstance(exc, UnidentifiedImageError):
            raise MediaError(path, "not an image (unrecognised format)") from exc
        if exc.errno is not None:
            raise MediaError(path, os_reason(path, exc)) from exc
        raise MediaError(path, f"truncated or corrupt image ({exc})") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaError(path, f"too large (decompression bomb: {exc})") from exc
    except (ValueError, SyntaxError, EOFError, struct_error(), MemoryError) as exc:
        raise MediaError(path, f"truncated or corrupt image ({exc.__class__.__name__}: {exc})") from exc
    out.info["original_size"] = (w, h)
    return out


def decode_opened(img: Image.Image, name: str, min_size: Optional[int] = None,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An opened PIL image -> loaded RGB image, with the safeguards every reader shares: the pixel cap
    (MediaError), JPEG draft decoding to the smallest scale >= min_size, the first frame, EXIF orientation."""
    w, h = img.size
    if w * h > max_pixels:
        raise MediaError(name, f"too large ({w}×{h} pixels, cap {max_pixels:,})")
    if img.format == "JPEG" and min_size:
        scale = min(w, h) / float(min_size)
        if scale >= 2:  # draft picks the largest reduction keeping size >= the request
            img.draft("RGB", (max(1, int(w / scale)), max(1, int(h / scale))))
    img.seek(0)  # first frame of GIF / animated WebP
    img.load()
    img = ImageOps.exif_transpose(img) or img
    out = _to_rgb(img)
    out.load()
    return out


def struct_error():
    import struct

    return struct.error


def image_date(path) -> Optional[float]:
    """EXIF DateTimeOriginal as a unix timestamp, or None. The EXIF clock has no zone: it is read as UTC.
    Reads only the header, never the pixels, and never raises."""
    try:
        with own_pixel_cap(), Image.open(path) as img:
            exif = img.getexif()
            value = exif.get_ifd(0x8769).get(36867) or exif.get(306)  # DateTimeOriginal, else DateTime
        if not value:
            return None
        return float(calendar.timegm(time.strptime(str(value).strip("\x00 ")[:19], "%Y:%m:%d %H:%M:%S")))
    except Exception:
        return None
