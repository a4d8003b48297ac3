"""Caption dataset readers behind one interface: CSV/TSV, JSONL, COCO captions JSON, Karpathy split
JSON, and an image folder with sidecar .txt captions. Bad rows are reported (file:line: reason) and
skipped; an unknown format or a file with no usable rows is a DatasetError."""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from mmsearch.errors import DatasetError
from mmsearch.media import IMAGE_EXTENSIONS

IMAGE_COLUMNS = ("image", "filepath", "file", "filename", "path")
CAPTION_COLUMNS = ("caption", "text", "title", "sentence")


@dataclass
class CaptionDataset:
    images: list[str]
    captions: list[str]
    caption_image: np.ndarray
    negatives: list[Optional[str]]
    skipped: list[str] = field(default_factory=list)
    source: str = ""
    split: Optional[str] = None

    def __len__(self) -> int:
        return len(self.captions)

    def swap_images(self) -> np.ndarray:
        """Per caption, the image its attribute-swapped negative describes in this split, else -1."""
        owner = {c: int(i) for c, i in zip(self.captions, self.caption_image)}
        return np.array([owner.get(n, -1) if n else -1 for n in self.negatives], dtype=np.int64)

    def subset(self, n_images: int) -> "CaptionDataset":
        keep = self.caption_image < n_images
        return CaptionDataset(self.images[:n_images], [c for c, k in zip(self.captions, keep) if k],
                              self.caption_image[keep], [x for x, k in zip(self.negatives, keep) if k],
                              self.skipped, self.source, self.split)


# A row as every reader yields it: (line number, image path as written, caption, split, negative)
Row = tuple


def _check_image(path: str) -> Optional[str]:
    """None if the file looks like a readable image, else a short reason. Cheap: header + verify."""
    from PIL import Image

    if not os.path.isfile(path):
        return "image not found"
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as exc:
        return f"unreadable image ({exc.__class__.__name__})"
    return None


def _split_ok(row_split: Optional[str], wanted: Optional[str]) -> bool:
    if wanted is None or row_split is None:
        return True
    # Karpathy's "restval" images are training images held out of val/test
    return row_split == wanted or (wanted == "train" and row_split == "restval")


def _assemble(rows: Iterable[Row], base: Path, source: str, split: Optional[str], verify: bool) -> CaptionDataset:
    images: list[str] = []
    index: dict[str, int] = {}
    captions, owner, negatives, skipped = [], [], [], []
    bad: dict[str, Optional[str]] = {}
    splits_seen: set = set()
    any_split = False
    for line, image, caption, row_split, negative in rows:
        if row_split:
            any_split = True
            splits_seen.add(row_split)
        if not _split_ok(row_split or None, split):
            continue
        if not image:
            skipped.append(f"{source}:{line}: no image")
            continue
        caption = " ".join(str(caption or "").split())
        if not caption:
            skipped.append(f"{source}:{line}: empty caption")
            continue
        path = os.path.normpath(os.path.join(base, image))
        if path not in index:
            if path not in bad:
                bad[path] = _check_image(path) if verify else None
            if bad[path]:
                skipped.append(f"{source}:{line}: {bad[path]}: {image}")
                continue
            index[path] = len(images)
            images.append(path)
        captions.append(caption)
        owner.append(index[path])
        negatives.append(" ".join(negative.split()) if negative else None)
    if split and any_split and split not in splits_seen and not (split == "train" and "restval" in splits_seen):
        raise DatasetError(f"{source}: no rows in split '{split}' (splits: {', '.join(sorted(splits_seen))})")
    if not captions:
        why = f"; first problem: {skipped[0]}" if skipped else ""
        raise DatasetError(f"{source}: no usable image-caption rows{why}")
    return CaptionDataset(images, captions, np.asarray(owner, dtype=np.int64), negatives, skipped, source, split)


def _pick(names, options, source, what) -> str:
    lower = {n.lower().strip(): n for n in names if n}
    for o in options:
        if o in lower:
            return lower[o]
    raise DatasetError(f"{source}: no {what} column (looked for {', '.join(options)}; found {', '.join(names)})")


def _csv_rows(path: Path):
    with open(path, newline="", encoding="utf-8-sig") as fh:
        head = fh.read(4096)
        fh.seek(0)
        delim = "\t" if path.suffix.lower() == ".tsv" or ("\t" in head and "," not in head.splitlines()[0]) else ","
        reader = csv.DictReader(fh, delimiter=delim)
        names = reader.fieldnames or []
        img = _pick(names, IMAGE_COLUMNS, path, "image")
        cap = _pick(names, CAPTION_COLUMNS, path, "caption")
        spl = next((n for n in names if n.lower() == "split"), None)
        neg = next((n for n in names if n.lower() == "negative"), None)
        for row in reader:
            yield (reader.line_num, row.get(img), row.get(cap), (row.get(spl) or "").strip() or None if spl else None,
                   row.get(neg) if neg else None)


def iter_jsonl(fh, path) -> Iterable[tuple[int, object]]:
    """(line number, parsed value) for each non-blank line; a bad line is a DatasetError naming it."""
    for n, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc


def _jsonl_rows(path: Path):
    with open(path, encoding="utf-8") as fh:
        for n, obj in iter_jsonl(fh, path):
            if not isinstance(obj, dict):
                raise DatasetError(f"{path}:{n}: expected a JSON object")
            image = next((obj[k] for k in IMAGE_COLUMNS if k in obj), None)
            caps = obj.get("captions")
            if caps is None:
                caps = [next((obj[k] for k in CAPTION_COLUMNS if k in obj), None)]
            for c in caps if isinstance(caps, list) else [caps]:
                yield (n, image, c, obj.get("split"), obj.get("negative"))


def _json_rows(path: Path, data):
    if isinstance(data, dict) and "annotations" in data and "images" in data:  # COCO captions
        files = {im["id"]: im.get("file_name") for im in data["images"] if "id" in im}
        for n, ann in enumerate(data["annotations"], 1):
            yield (n, files.get(ann.get("image_id")), ann.get("caption"), None, None)
    elif isinstance(data, dict) and isinstance(data.get("images"), list) and data["images"] \
            and "sentences" in data["images"][0]:  # Karpathy split
        for n, im in enumerate(data["images"], 1):
            rel = os.path.join(im.get("filepath", ""), im.get("filename", ""))
            for s in im.get("sentences", []):
                yield (n, rel if im.get("filename") else None, s.get("raw"), im.get("split"), None)
    else:
        raise DatasetError(f"{path}: JSON is neither COCO captions (images + annotations) nor a Karpathy split "
                           f"(images[].sentences)")


def _folder_rows(folder: Path):
    n = 0
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            side = p.with_suffix(".txt")
            if side.is_file():
                for line in side.read_text(encoding="utf-8", errors="replace").splitlines():
                    n += 1
                    if line.strip():
                        yield (n, str(p.relative_to(folder)), line, None, None)


def load_dataset(path, split: Optional[str] = None, images_root=None, verify_images: bool = True) -> CaptionDataset:
    """Read any supported caption dataset. `split` keeps one split when the data has split info
    (Karpathy JSON, a `split` column); data without split info is used whole."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset not found: {path}")
    base = Path(images_root) if images_root else (path if path.is_dir() else path.parent)
    if path.is_dir():
        rows = _folder_rows(path)
    else:
        suffix = path.suffix.lower()
        if suffix in (".csv", ".tsv"):
            rows = _csv_rows(path)
        elif suffix in (".jsonl", ".ndjson"):
            rows = _jsonl_rows(path)
        elif suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
            rows = _json_rows(path, data)
        else:
            raise DatasetError(f"{path}: unknown dataset format '{suffix}' (CSV/TSV, JSONL, COCO or Karpathy JSON, "
                               f"or a folder of images with .txt captions)")
    try:
        return _assemble(rows, base, str(path), split, verify_images)
    except (KeyError, TypeError, AttributeError) as exc:
        raise DatasetError(f"{path}: malformed dataset ({exc.__class__.__name__}: {exc})") from exc


def synthesize(out, n: int = 1000, seed: int = 0, size: int = 64, relational: float = 0.5, progress=None) -> dict:
    from mmsearch.datasets.synth import synthesize as _synth

    return _synth(out, n=n, seed=seed, size=size, relational=relational, progress=progress)
