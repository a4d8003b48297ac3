"""The text corpus of an index, for image->text (and text->text) search: read, dedupe, embed, store."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from mmsearch.datasets.readers import iter_jsonl
from mmsearch.errors import DatasetError
from mmsearch.storage.store import IndexStore

TEXT_COLUMNS = ("text", "caption", "sentence", "title")


def read_texts(path, column: Optional[str] = None) -> list[str]:
    """One text per line (.txt and anything unknown), or the text column of a CSV/TSV/JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"text file not found: {path}")
    suffix = path.suffix.lower()
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        if suffix in (".csv", ".tsv"):
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            col = _pick_column(reader.fieldnames or [], column, path)
            return [row.get(col) or "" for row in reader]
        if suffix in (".jsonl", ".ndjson"):
            out = []
            for n, obj in iter_jsonl(fh, path):
                if isinstance(obj, str):
                    out.append(obj)
                    continue
                col = _pick_column(list(obj), column, path, line=n)
                out.append(str(obj.get(col, "")))
            return out
        return fh.read().splitlines()


def _pick_column(names, column, path, line=None) -> str:
    where = f"{path}:{line}" if line else str(path)
    if column:
        if column not in names:
            raise DatasetError(f"{where}: no column '{column}' (columns: {', '.join(names)})")
        return column
    for c in TEXT_COLUMNS:
        if c in names:
            return c
    raise DatasetError(f"{where}: no text column (looked for {', '.join(TEXT_COLUMNS)}; use --column)")


def add_texts(store: IndexStore, texts: Iterable[str], batch_size: int = 256,
              progress: Optional[Callable[..., None]] = None) -> dict:
    """Embed and store the texts not already in the corpus (exact duplicates are stored once), holding the
    index's writer lock."""
    with store.writing():
        return _add_texts(store, texts, batch_size, progress)


def _add_texts(store: IndexStore, texts: Iterable[str], batch_size: int, progress) -> dict:
    cat = store.catalog
    known = cat.known_texts()
    fresh, seen = [], set()
    total = 0
    for t in texts:
        total += 1
        t = " ".join(t.split())
        if t and t not in known and t not in seen:
            seen.add(t)
            fresh.append(t)
    keep_states = store.reranker_info() is not None
    enc = store.text_encoder()
    for start in range(0, len(fresh), batch_size):
        chunk = fresh[start:start + batch_size]
        if keep_states:
            emb, states = enc.encode_texts(chunk, return_states=True)
        else:
            emb, states = enc.encode_texts(chunk), [None] * len(chunk)
        with cat.transaction():
            for t, e, s in zip(chunk, emb, states):
                cat.insert_text(t, np.asarray(e), None if s is None else np.asarray(s))
            store.bump_text_generation()
        if progress:
            progress(start + len(chunk), len(fresh), stage="texts")
    return {"read": total, "added": len(fresh), "skipped": total - len(fresh), "texts": cat.count_texts()}


def remove_texts(store: IndexStore, ids: Iterable[int] = (), matching: Optional[str] = None) -> int:
    cat = store.catalog
    ids = list(ids)
    if matching:
        ids += [r["id"] for r in cat.text_rows(like=matching)]
    with store.writing(), cat.transaction():
        removed = cat.delete_texts(ids)
        store.bump_text_generation()
    return removed
