"""Exported towers shared by every index of the same weights, so a new index needs no torch either.

What rclip gets from shipping ONNX files, mmsearch gets from its first index of a model: after a run
exported the image tower (per precision) and the numpy text tower, they are kept under
`$MMSEARCH_CACHE_DIR` (default ~/.cache/mmsearch/towers/<key>/) with the model record (arch,
fingerprint, dims). A new index of the same spec takes the record and hard-links the towers instead
of loading torch (~7 s) and exporting (~5 s). The key covers what decides the weights: model name,
pretrained tag, and for local weight files their absolute path, size and mtime; plus the mmsearch and
open_clip versions (random weights and shipped configs can change with them). MMSEARCH_CACHE_DIR=off
disables it. A record that turns out wrong is caught by the fingerprint check whenever torch loads.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

RECORD = "record.json"
RECORD_KEYS = ("model", "arch", "fingerprint", "dim", "image_size", "text_width", "vision_width")


def cache_root() -> Optional[Path]:
    env = os.environ.get("MMSEARCH_CACHE_DIR")
    if env is not None:
        return None if env in ("", "off", "0") else Path(env) / "towers"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mmsearch" / "towers"


def _key(spec) -> str:
    from importlib import metadata

    from mmsearch.config import VERSION

    try:
        oc = metadata.version("open_clip_torch")
    except metadata.PackageNotFoundError:
        oc = "?"
    # a checkpoint names its own architecture: the --model given next to it does not count
    parts = [VERSION, oc] + (["checkpoint"] if spec.checkpoint else [spec.model, str(spec.pretrained)])
    for f in (spec.checkpoint, spec.pretrained):
        if f and os.path.isfile(f):
            st = os.stat(f)
            parts += [os.path.abspath(f), str(st.st_size), str(st.st_mtime_ns)]
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()[:20]


def _entry(spec) -> Optional[Path]:
    root = cache_root()
    return None if root is None else root / _key(spec)


def lookup(spec, precision: str) -> Optional[dict]:
    """The cached model record for `spec` when both towers for `precision` are cached, else None."""
    entry = _entry(spec)
    if entry is None:
        return None
    try:
        record = json.loads((entry / RECORD).read_text())
    except (OSError, ValueError):
        return None
    have = (entry / f"image_tower-{precision}" / "meta.json").is_file() and (entry / "text_tower" / "meta.json").is_file()
    return record if have and all(k in record for k in RECORD_KEYS) else None


def _link_tree(src: Path, dst: Path) -> None:
    """Hard links where the file system allows (the files are never written in place), else copies."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)

    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, tmp, copy_function=link)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def install(spec, precision: str, index_dir) -> None:
    """Put the cached towers of `spec` into a new index (lookup() said they are there)."""
    entry = _entry(spec)
    _link_tree(entry / f"image_tower-{precision}", Path(index_dir) / "image_tower")
    _link_tree(entry / "text_tower", Path(index_dir) / "text_tower")


def save(spec, meta: dict, index_dir) -> None:
    """Keep an index's fresh towers for the next index of `spec` (best effort: a cache never fails a run)."""
    entry = _entry(spec)
    if entry is None:
        return
    precision = meta.get("precision", "fp32")
    try:
        index_dir = Path(index_dir)
        for name, src in ((f"image_tower-{precision}", index_dir / "image_tower"), ("text_tower", index_dir / "text_tower")):
            try:
                theirs = json.loads((src / "meta.json").read_text())
            except (OSError, ValueError):
                continue
            if theirs.get("fingerprint") == meta["fingerprint"] and not (entry / name / "meta.json").is_file():
                entry.mkdir(parents=True, exist_ok=True)
                _link_tree(src, entry / name)
        if (entry / "text_tower").is_dir() and not (entry / RECORD).is_file():
            tmp = entry / (RECORD + ".tmp")
            tmp.write_text(json.dumps({k: meta[k] for k in RECORD_KEYS if k in meta}))
            os.replace(tmp, entry / RECORD)
    except OSError:
        pass
