"""Back-fills over an existing index: re-ranker image tokens (one read per file) and the text corpus's token states."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np

from mmsearch.errors import MediaError
from mmsearch.indexing import scan
from mmsearch.indexing.stage import Progress, batch_pixels, decode_file, worker_transform
from mmsearch.storage.store import IndexStore


def enable_reranker(index_dir, reranker_path, batch_size: int = 32, workers: Optional[int] = None,
                    progress: Progress = None) -> dict:
    """Configure a re-ranker on an existing index and back-fill its image tokens (one read per file)
    and the token states of the text corpus. Images that fail to decode are recorded as failures.
    Holds the index's writer lock throughout."""
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
            infos = [scan.FileInfo(p, 0, 0) for _, p in chunk]
            results = list(pool.map(lambda f: decode_file(f, encoder.image_size, prep), infos))
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


def backfill_text_states(store: IndexStore, batch_size: int = 256) -> int:
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
