"""Back-fills over an existing index: re-ranker image tokens (one read per file, one frame per video shot)
and the text corpus's token states."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from mmsearch.checks import count
from mmsearch.errors import MediaError
from mmsearch.indexing import scan
from mmsearch.indexing.stage import Progress, batch_pixels, decode_file, worker_transform
from mmsearch.storage.store import IndexStore


def enable_reranker(index_dir, reranker_path, batch_size: int = 32, workers: Optional[int] = None,
                    progress: Progress = None) -> dict:
    """Configure a re-ranker on an existing index and back-fill its image tokens (one read per file)
    and the token states of the text corpus. Images that fail to decode are recorded as failures.
    Holds the index's writer lock throughout."""
    batch_size, workers = count("batch_size", batch_size, optional=False), count("workers", workers)
    store = IndexStore.open(index_dir)
    with store.writing():
        return _enable(store, reranker_path, batch_size, workers, progress)


def _enable(store: IndexStore, reranker_path, batch_size: int, workers: Optional[int], progress: Progress) -> dict:
    store.configure_reranker(reranker_path)
    cat = store.catalog
    encoder = store.encoder()
    grid = store.token_grid()
    prep = worker_transform(encoder)
    todo = cat.ids_missing_tokens()
    filled = failed = 0
    with ThreadPoolExecutor(max_workers=workers or max(1, min(4, os.cpu_count() or 1))) as pool:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            rows = cat.rows([i for i, _ in chunk])
            jobs = [(scan.FileInfo(rows[i]["path"] if i in rows else p, 0, 0), rows.get(i, {}).get("frame_s"))
                    for i, p in chunk]
            results = list(pool.map(lambda job: _decode(job, encoder.image_size, prep), jobs))
            good = [(i, r) for (i, _), r in zip(chunk, results) if not isinstance(r, MediaError)]
            if good:
                _, toks = encoder.encode_image_tensor(batch_pixels(encoder, [r[0] for _, r in good]), token_grid=grid)
                with cat.transaction():
                    for (image_id, _), t in zip(good, toks):
                        cat.set_tokens(image_id, t)
                filled += len(good)
            failed += len(chunk) - len(good)
            if progress:
                progress(start + len(chunk), len(todo), stage="tokens")
    texts = backfill_text_states(store)
    return {"images": filled, "failed": failed, "texts": texts, "token_grid": grid}


def _decode(job, image_size: int, prep):
    """A photo as the indexer decodes it, or a video shot's frame (the picture its vector was made from)."""
    info, frame_s = job
    if frame_s is None:
        return decode_file(info, image_size, prep)
    from mmsearch import video

    try:
        return (prep(video.frame_at(info.path, frame_s, image_size)),)
    except MediaError as exc:
        return exc


def backfill_text_states(store: IndexStore, batch_size: int = 256) -> int:
    import numpy as np  # here: an unchanged re-run imports this module and no numpy (~60 ms)

    cat = store.catalog
    missing = cat.texts_missing_states()
    enc = store.text_encoder()
    for start in range(0, len(missing), batch_size):
        chunk = missing[start:start + batch_size]
        _, states = enc.encode_texts([t for _, t in chunk], return_states=True)
        with cat.transaction():
            for (text_id, _), st in zip(chunk, states):
                cat.set_text_states(text_id, np.asarray(st))
    return len(missing)


METADATA_BATCH = 1024  # images per transaction when only metadata is read (no OCR)


def read_missing_words(store: IndexStore, extractor, summary=None, batch_size: int = 16,
                       workers: Optional[int] = None, progress: Progress = None) -> int:
    """The words of images already indexed but not read: OCR switched on for an index built without it, a
    catalog written before words were indexed, imported rows. One transaction per batch; a file that is
    gone or unreadable now keeps its image row (the next `index` run removes or retries it)."""
    from mmsearch.indexing.extract import default_readers
    from mmsearch.indexing.stage import count_words

    cat = store.catalog
    todo = cat.ids_needing_ocr() if extractor.ocr else cat.ids_needing_words()
    if not todo:
        return 0
    if not extractor.ocr:  # metadata only: a file costs microseconds, and a transaction per 16 dominated
        batch_size = max(batch_size, METADATA_BATCH)

    def read(item):  # the extractor decodes the file itself, and never raises
        return extractor(item[1], None)

    with ThreadPoolExecutor(max_workers=workers or default_readers()) as pool:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            results = list(pool.map(read, chunk))
            with cat.transaction():
                for (image_id, path), words in zip(chunk, results):
                    cat.put_words(image_id, path, words.meta, words.lines, words.status, words.error)
                    if summary is not None:
                        count_words(summary, path, words)
            if progress:
                progress(start + len(chunk), len(todo), stage="ocr" if extractor.ocr else "words")
    return len(todo)
