"""The decode -> encode -> commit stage, shared by every executor of the indexing pipeline.

Local threads (pipeline.py), Ray actors (mmsearch.distributed) and benchmarks call these same
functions: `decode_file` in a worker (open, draft-decode, the model's PIL-side transform),
`batch_pixels` to stack a batch for the encoder, `commit_batch` to write one batch in one SQLite
transaction and then update the vector cache. A bad file becomes a MediaError result, never an
exception that stops the run. A video decodes to a `DecodedVideo`: one picture per shot, each of
which the encoder embeds like a photo, and the commit writes as one row per shot.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional


from mmsearch import video
from mmsearch.errors import MediaError
from mmsearch.indexing import scan
from mmsearch.indexing.plan import Plan, safe_hash
from mmsearch.storage.catalog import Catalog
from mmsearch.storage.lexical import OCR_NONE
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
    threads: int = 0  # the CPU threads the exported image tower ran on (towers.runtime.threads), 0: none ran
    repaired: int = 0  # vectors added to (or dropped from) the FAISS file to match the catalog's rows
    failures: list = field(default_factory=list)  # (path, reason) of this run's new failures
    videos: int = 0  # of the files embedded, videos
    shots: int = 0  # rows those videos got (one per shot)
    skipped_videos: int = 0  # new or changed videos left alone: no video support installed
    created: bool = False  # this run created the index
    precision: str = ""  # the index's precision (part of its model record)
    notes: list = field(default_factory=list)  # one-line notes for the user (e.g. bf16 run as fp32 here)
    ocr_read: int = 0  # images whose words OCR read this run (text found or not)
    ocr_text: int = 0  # of which OCR found text in
    ocr_failures: list = field(default_factory=list)  # (path, reason): indexed images OCR failed on
    away: list = field(default_factory=list)  # watched folders left alone because they are away (plan.root_away)

    @property
    def embedded(self) -> int:
        return self.added + self.updated

    def to_dict(self) -> dict:
        d = asdict(self)
        d["embedded"] = self.embedded
        d["images_per_s"] = round(self.embedded / self.embed_seconds, 2) if self.embed_seconds else None
        return d


@dataclass
class DecodedVideo:
    """A video as decode_file gives it: one model input per shot, and the file's facts."""

    pixels: list  # the model's input for each shot's picture
    shots: list  # (start_s, end_s, frame_s) of each
    size: tuple  # (width, height) as displayed
    duration_s: float
    taken_at: Optional[float]
    quick_hash: Optional[str]


def inputs_of(result) -> list:
    """The encoder inputs of one good decode result: one for a photo, one per shot for a video."""
    return result.pixels if isinstance(result, DecodedVideo) else [result[0]]


def decode_file(info: scan.FileInfo, image_size: int, pil_transform, extractor=None,
                video_frames: int = video.DEFAULT_FRAMES):
    """Runs in a worker thread: open + draft-decode + the model's PIL-side transform (resize, crop), and
    the extractor's words (metadata, OCR: indexing/extract.py) when one is given. Returns (pixels,
    original size, date, quick hash, Extract or None), a DecodedVideo (no OCR: its file name is its
    words), or the MediaError."""
    from mmsearch import media  # PIL: imported by the runs that decode, not by an unchanged re-run

    try:
        if video.is_video(info.path):
            v = video.read_shots(info.path, image_size, frames=video_frames, prepare=pil_transform)
            return DecodedVideo([s.image for s in v.shots], [(s.start_s, s.end_s, s.frame_s) for s in v.shots],
                                (v.width, v.height), v.duration_s, v.taken_at, safe_hash(info.path))
        img = media.load_image(info.path, min_size=image_size)  # what OCR reads never changes the embedding
        orig = img.info.get("original_size", img.size)
        pixels = pil_transform(img)
        words = extractor(info.path, img) if extractor is not None else None
        return pixels, orig, media.image_date(info.path), safe_hash(info.path), words
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


def count_words(summary: IndexSummary, path: str, words) -> None:
    from mmsearch.storage.lexical import OCR_ERROR, OCR_NONE, OCR_OK

    if words.status in (OCR_OK, OCR_NONE):
        summary.ocr_read += 1
        summary.ocr_text += words.status == OCR_OK
    elif words.status == OCR_ERROR:
        summary.ocr_failures.append((path, words.error))


def commit_batch(cat: Catalog, plan: Plan, vectors, good, bad, emb, toks, summary: IndexSummary,
                  also: Optional[Callable[[Catalog], None]] = None) -> None:
    """One transaction per batch; `also` adds an executor's own bookkeeping to the same transaction.
    `emb` (and `toks`) hold the rows of inputs_of(result) of each good result, in order. A file any of whose
    embeddings is not finite becomes a failure like an undecodable one (never a crash)."""
    import numpy as np

    new_ids, removed = [], []
    if good and len(bad_rows := non_finite_rows(emb)):
        counts = [len(inputs_of(r)) if isinstance(r, DecodedVideo) else 1 for _, r in good]
        owner = np.repeat(np.arange(len(good)), counts)  # the good item each embedding row belongs to
        broken = sorted(set(owner[bad_rows].tolist()))
        keep_rows = ~np.isin(owner, broken)
        bad = list(bad) + [(good[j][0], MediaError(good[j][0].path, NON_FINITE)) for j in broken]
        good = [g for j, g in enumerate(good) if j not in set(broken)]
        emb = np.asarray(emb)[keep_rows]
        toks = None if toks is None else np.asarray(toks)[keep_rows]
    offset = 0
    with cat.transaction():
        if also is not None:
            also(cat)
        for f, result in good:
            n = len(inputs_of(result)) if isinstance(result, DecodedVideo) else 1
            e, t = emb[offset:offset + n], None if toks is None else toks[offset:offset + n]
            offset += n
            row = dict(path=f.path, size=f.size, mtime_ns=f.mtime_ns, ext=Path(f.path).suffix.lower())
            if isinstance(result, DecodedVideo):
                row.update(quick_hash=result.quick_hash, width=int(result.size[0]), height=int(result.size[1]),
                           taken_at=result.taken_at, duration_s=float(result.duration_s))
                ids, replaced = cat.insert_video(row, result.shots, e, t)
                new_ids += ids
                removed += replaced
                summary.videos += 1
                summary.shots += len(ids)
                cat.put_words(ids[0], f.path, None, None, OCR_NONE)  # its name's words, on the file's row
            else:
                _, orig, taken_at, qhash = result[:4]
                words = result[4] if len(result) > 4 else None
                row.update(quick_hash=qhash, width=int(orig[0]), height=int(orig[1]), taken_at=taken_at)
                image_id = cat.insert_image(row, e[0], None if t is None else t[0])
                new_ids.append(image_id)
                if words is None:  # no extractor ran: the name words now, the rest in a later back-fill
                    cat.put_words(image_id, f.path, None, None, None)
                else:  # the image's words land in the same transaction as the image
                    cat.put_words(image_id, f.path, words.meta, words.lines, words.status, words.error)
                    count_words(summary, f.path, words)
            if f.path in plan.update_ids:
                summary.updated += 1
                removed.append(plan.update_ids[f.path])
            else:
                summary.added += 1
        cat.clear_failures([f.path for f, _ in good])
        for f, err in bad:
            cat.record_failure(f.path, f.size, f.mtime_ns, err.reason)
            if f.path in plan.update_ids:  # it was indexed, and is now broken: drop the stale rows
                old = plan.update_ids[f.path]
                gone = [old] + cat.video_shot_ids([old])
                cat.delete_images(gone)
                removed += gone
            summary.failures.append((f.path, err.reason))
        cat.bump_generation()
    vectors.remove(removed)
    if new_ids:
        vectors.add(np.array(new_ids, dtype=np.int64), emb)
