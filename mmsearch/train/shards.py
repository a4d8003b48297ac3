"""Sharded tar datasets in the webdataset layout (what img2dataset writes and open_clip reads):
`NNNNN.jpg` + `NNNNN.txt` (or `.json` with a "caption"/"text" field) grouped by key inside `.tar` files.

The shards are untrusted: nothing is ever extracted to disk and member paths are never used as paths.
An index of (shard, byte offset, size) per image is built once by reading the tar headers; images are
then read by offset, so a DataLoader worker can fetch any sample in any order (exact resume) and only
the captions are held in memory. Only uncompressed tars allow that random access; `.tar.gz` is refused.
"""
from __future__ import annotations

import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from PIL import Image

from mmsearch.errors import DatasetError, MediaError
from mmsearch.media import DEFAULT_MAX_PIXELS, decode_opened, own_pixel_cap

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
CAPTION_BYTES = 1 << 16  # a caption member larger than this is not a caption
# webdataset's rule: the key is the path up to the first dot of the file name
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


@dataclass
class ShardIndex:
    shards: list[str]
    entries: list[tuple[int, int, int, str]] = field(default_factory=list)  # (shard, offset, size, key)
    captions: list[list[str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.entries)


def find_shards(path) -> Optional[list[Path]]:
    """The shards a path names: a .tar file, or a folder holding .tar files; None if it names neither."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".tar":
        return [path]
    if path.is_file() and path.name.lower().endswith((".tar.gz", ".tgz")):
        raise DatasetError(f"{path}: compressed tar shards cannot be read by offset; store shards as plain .tar "
                           f"(img2dataset's default) or unpack to a folder")
    if path.is_dir():
        shards = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".tar")
        return shards or None
    return None


def _caption(data: bytes, suffix: str) -> Optional[str]:
    text = data.decode("utf-8", errors="replace")
    if suffix == "json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            return None
        text = next((obj[k] for k in ("caption", "text", "title") if isinstance(obj, dict) and
                     isinstance(obj.get(k), str)), "")
    return " ".join(text.split()) or None


def index_shards(shards: list[Path]) -> ShardIndex:
    """Read every shard's headers (and its small caption members) once; no image bytes are read."""
    index = ShardIndex([str(s) for s in shards])
    for si, shard in enumerate(shards):
        samples: dict[str, dict] = {}
        try:
            with tarfile.open(shard, mode="r:") as tf:
                for m in tf:
                    match = _KEY.match(m.name)
                    if not m.isreg() or m.sparse is not None or not match:
                        continue  # links, folders, devices, sparse files: never followed
                    key, suffix = match.group(1), match.group(2).lower()
                    sample = samples.setdefault(key, {})
                    if suffix in IMAGE_SUFFIXES and "image" not in sample:
                        sample["image"] = (m.offset_data, m.size)
                    elif suffix in ("txt", "json") and "caption" not in sample and m.size <= CAPTION_BYTES:
                        fh = tf.extractfile(m)  # a reader over the archive's bytes, not a file on disk
                        cap = _caption(fh.read(), suffix) if fh else None
                        if cap:
                            sample["caption"] = cap
                    tf.members = []  # keep memory flat on big shards (we do not need the member list)
        except (tarfile.TarError, OSError, EOFError) as exc:
            index.skipped.append(f"{shard}: unreadable shard ({exc.__class__.__name__}: {exc})")
            continue
        for key, sample in samples.items():
            if "image" not in sample:
                index.skipped.append(f"{shard}:{key}: no image")
            elif "caption" not in sample:
                index.skipped.append(f"{shard}:{key}: no caption")
            else:
                index.entries.append((si, *sample["image"], key))
                index.captions.append([sample["caption"]])
    if not index.entries:
        why = f"; first problem: {index.skipped[0]}" if index.skipped else ""
        raise DatasetError(f"{shards[0].parent}: no image-caption samples in {len(shards)} shard(s){why}")
    return index


def read_sample(index: ShardIndex, i: int) -> bytes:
    shard, offset, size, _ = index.entries[i]
    with open(index.shards[shard], "rb") as fh:
        fh.seek(offset)
        return fh.read(size)


def decode_image(data: bytes, name: str, min_size: Optional[int] = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> RGB PIL image with media.load_image's safeguards (pixel cap, draft, EXIF), or MediaError."""
    if not data:
        raise MediaError(name, "empty file")
    try:
        with own_pixel_cap(), Image.open(io.BytesIO(data)) as img:
            out = decode_opened(img, name, min_size, max_pixels)
    except MediaError:
        raise
    except Exception as exc:  # PIL raises many kinds for a corrupt file; a bad sample is never fatal
        raise MediaError(name, f"truncated or corrupt image ({exc.__class__.__name__})") from exc
    return out
