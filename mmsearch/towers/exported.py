"""Towers exported next to an index (text_tower/, image_tower/): one atomic write, one freshness rule.

An export is a folder `index_dir/<name>/` holding its files and a meta.json with at least the format
tag and the fingerprint of the weights it came from. It is written into `<name>.tmp` and swapped in
whole, so a reader never sees half an export. It is fresh when its format and every recorded key the
caller cares about (fingerprint, precision, ...) match; anything else means "export it again".
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

from mmsearch.errors import CheckpointError

META = "meta.json"


def write_export(index_dir, name: str, fill: Callable[[Path], dict]) -> Path:
    """`fill(tmp_dir)` writes the files and returns the meta dict; the folder then replaces `name`."""
    out = Path(index_dir) / name
    tmp = Path(index_dir) / (name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        meta = fill(tmp)
        (tmp / META).write_text(json.dumps(meta))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_export_meta(index_dir, name: str, fmt: str) -> dict:
    """The meta of `index_dir/name`, or CheckpointError when it is missing, unreadable or of another format."""
    d = Path(index_dir) / name
    try:
        meta = json.loads((d / META).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"no readable {name} in {index_dir} ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{d} was written by another mmsearch version ({got})")
    return meta


def fresh_export_meta(index_dir, name: str, fmt: str, **expected) -> Optional[dict]:
    """The meta when the export exists, has format `fmt` and matches every `expected` key; else None."""
    try:
        meta = read_export_meta(index_dir, name, fmt)
    except CheckpointError:
        return None
    return meta if all(meta.get(k) == v for k, v in expected.items()) else None


def peek_meta(index_dir, name: str) -> dict:
    """An export's meta.json as it is ({} when missing or unreadable), without checking it: for choices
    made before the heavy imports (e.g. BLAS threads before numpy loads)."""
    try:
        meta = json.loads((Path(index_dir) / name / META).read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}
