"""The decode -> encode -> commit stage, shared by every executor of the indexing pipeline.

Local threads (pipeline.py), Ray actors (mmsearch.distributed) and benchmarks call these same
functions: `decode_file` in a worker (open, draft-decode, the model's PIL-side transform),
`batch_pixels` to stack a batch for the encoder, `commit_batch` to write one batch in one SQLite
transaction and then update the vector cache. A bad file becomes a MediaError result, never an
exception that stops the run.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from mmsearch import media
from mmsearch.errors import MediaError
from mmsearch.indexing import scan
from mmsearch.indexing.plan import Plan, safe_hash
from mmsearch.storage.catalog import Catalog
from mmsearch.storage.schema import non_finite_rows

NON_FINITE = "the model gave a non-finite embedding (NaN or infinity) for this image"

Progress = Optional[Callable[..., None]]


@dataclass
class IndexSummary:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    moved: int = 0
    removed: int = 0
    failed: int = 0
    seconds: float = 0.0
    embed_seconds: float = 0.0  # decoding + encoding only, without model loading
    encode_seconds: float = 0.0  # of which the image tower itself ran (the rest: waiting for decodes, commits)
    wait_seconds: float = 0.0  # of which the encoder waited for decode threads
    repaired: int = 0  # vectors added to (or dropped from) the FAISS file to match the catalog's rows
    failures: list = field(default_factory=list)  # (path, reason) of this run's new failures
    created: bool = False  # this run created the index
    precision: str = ""  # the index's precision (part of its model record)

    @property
    def embedded(self) -> int:
        return self.added + self.updated

    def to_dict(self) -> dict:
        d = asdict(self)
        d["embedded"] = self.embedded
        d["images_per_s"] = round(self.embedded / self.embed_seconds, 2) if self.embed_seconds else None
        return d


def decode_file(info: scan.FileInfo, image_size: int, pil_transform):
    """Runs in a worker thread: open + draft-decode + the model's PIL-side transform (resize, crop).
    Returns (pixels, original size, date, quick hash) or the MediaError."""
    try:
        img = media.load_image(info.path, min_size=image_size)
        orig = img.info.get("original_size", img.size)
        return pil_transform(img), orig, media.image_date(info.path), safe_hash(info.path)
    except MediaError as exc:
        return exc
    except Exception as exc:  # one odd file must never stop a run
        return MediaError(info.path, f"cannot decode ({exc.__class__.__name__}: {exc})")


DECODE_NICENESS = int(os.environ.get("MMSEARCH_DECODE_NICE", "10"))


def background_thread() -> None:
    """Decode workers run at a lower CPU priority than the encoder: on a few cores the model's threads
    then keep their cores and decoding fills the gaps, instead of the two taking turns at random."""
    try:
        import threading

        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DECODE_NICENESS)  # Linux: per thread
    except (AttributeError, OSError, ValueError):
        pass  # not Linux, or not allowed: plain threads work too


def worker_transform(encoder):
    """What decode workers apply: the PIL half of the model's transform, or all of it when it cannot split."""
    return encoder.pil_transform or encoder.preprocess


def batch_pixels(encoder, items):
    """The encoder's input batch: a torch tensor, or a numpy array for the ONNX tower (no torch import)."""
    if encoder.pil_transform is not None:
        return encoder.pixels(items)
    import torch

    return torch.stack(items)


def commit_batch(cat: Catalog, plan: Plan, vectors, good, bad, emb, toks, summary: IndexSummary,
                  also: Optional[Callable[[Catalog], None]] = None) -> None:
    """One transaction per batch; `also` adds an executor's own bookkeeping to the same transaction.
    An image whose embedding is not finite becomes a failure like an undecodable one (never a crash)."""
    new_ids, removed = [], []
    if good and len(bad_rows := non_finite_rows(emb)):
        keep = np.ones(len(good), bool)
        keep[bad_rows] = False
        bad = list(bad) + [(good[j][0], MediaError(good[j][0].path, NON_FINITE)) for j in bad_rows.tolist()]
        good = [g for g, k in zip(good, keep) if k]
        emb = np.asarray(emb)[keep]
        toks = None if toks is None else np.asarray(toks)[keep]
    with cat.transaction():
        if also is not None:
            also(cat)
        for j, (f, (_, orig, taken_at, qhash)) in enumerate(good):
            row = dict(path=f.path, size=f.size, mtime_ns=f.mtime_ns, quick_hash=qhash, width=int(orig[0]),
                       height=int(orig[1]), taken_at=taken_at, ext=Path(f.path).suffix.lower())
            new_ids.append(cat.insert_image(row, emb[j], None if toks is None else toks[j]))
            if f.path in plan.update_ids:
                summary.updated += 1
                removed.append(plan.update_ids[f.path])
            else:
                summary.added += 1
        cat.clear_failures([f.path for f, _ in good])
        for f, err in bad:
            cat.record_failure(f.path, f.size, f.mtime_ns, err.reason)
            if f.path in plan.update_ids:  # it was indexed, and is now broken: drop the stale row
                cat.delete_images([plan.update_ids[f.path]])
                removed.append(plan.update_ids[f.path])
            summary.failures.append((f.path, err.reason))
        cat.bump_generation()
    vectors.remove(removed)
    if new_ids:
        vectors.add(np.array(new_ids, dtype=np.int64), emb)
