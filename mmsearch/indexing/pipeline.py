"""The local executor of the indexing pipeline: plan -> decode (threads) -> encode -> commit -> FAISS.

Incremental and exact (plan.py has the rules). Every batch is one SQLite transaction, so a kill at
any point loses at most the batch in flight; the FAISS file is a cache rebuilt from the catalog when
it is stale, and repaired from the stored embeddings when it lacks rows the catalog has. A run holds
the index's writer lock throughout (mmsearch.storage.lock): a second writer is refused at once.
"""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Iterable, Optional, Sequence

from mmsearch.checks import MAX_BATCH, MAX_WORKERS, count
from mmsearch.config import DEFAULT_FACTORY, GOOD_MATCH, ModelSpec
from mmsearch.errors import MediaError, MmsearchError, VectorIndexError
from mmsearch.indexing.backfill import read_missing_words
from mmsearch.indexing.extract import Extractor, check_ocr_request, resolve_ocr
from mmsearch.indexing.plan import Plan, plan_changes
from mmsearch.indexing.stage import (IndexSummary, Progress, background_thread, batch_pixels, commit_batch,
                                     decode_file, inputs_of, worker_transform)
from mmsearch import video
from mmsearch.towers import cpu
from mmsearch.storage.catalog import Catalog
from mmsearch.storage.roots import normalise_roots, record_roots, recorded_roots
from mmsearch.storage.lock import writer_lock
from mmsearch.storage.store import IndexStore

__all__ = ["index_folders", "IndexSummary"]


def index_folders(index_dir, roots: Iterable, spec: Optional[ModelSpec] = None, batch_size: Optional[int] = None,
                  workers: Optional[int] = None, exclude: Sequence[str] = (), include_hidden: bool = False,
                  factory: Optional[str] = None, reranker: Optional[str] = None, device="cpu",
                  precision: Optional[str] = None, executor=None, progress: Progress = None,
                  max_index_memory=None, ocr: Optional[bool] = None, watched: Optional[Sequence] = None,
                  store: Optional[IndexStore] = None, video_frames: int = video.DEFAULT_FRAMES,
                  keep=None) -> IndexSummary:
    """Index `roots` (folders or files) into `index_dir`. See the module docstring for the rules.

    `device` runs the encoder (batch size and decode workers default to what suits it); `precision`
    (None: the index's own, devices.default_precision for a new one) is recorded in the index. `executor` replaces the local
    decode -> encode stage (mmsearch.distributed: Ray) for photos; planning, committing and videos (one file,
    many rows) stay here either way. `video_frames`: the frames sampled per video at most.
    `ocr` (None: the index's own setting; a new index reads words when rapidocr is installed) switches
    OCR for this index; the words of new and changed files are read with their pixels, and images OCR
    has not read yet (indexed while it was off, or before it existed) are read after them.
    `watched` (a watcher's run): the watched folders that `roots` lie in; a root that is gone is then a
    deleted or moved path rather than an error, nothing under a watched folder that is away is touched
    (plan.root_away), and the watched folders are what the index records as its roots. `store`: an
    IndexStore of `index_dir` kept open between runs, so a watcher loads its image tower once.
    `keep(path)`: the files that belong to this index (one shard of a sharded index: indexing/sharded.py).
    The whole run holds the index's writer lock: IndexBusyError at once when another writer has it."""
    batch_size = count("batch_size", batch_size, 1, MAX_BATCH)  # before anything is opened or created
    workers = count("workers", workers, 1, MAX_WORKERS)
    if max_index_memory is not None:
        from mmsearch.storage.ann import parse_size

        parse_size(max_index_memory)  # a bad budget fails before a model loads, not after
    t0 = time.perf_counter()
    cpu.start_watch()  # what other processes use is measured while this run plans, not by waiting later
    roots = [os.path.abspath(os.fspath(r)) for r in roots]
    watched = None if watched is None else [os.path.abspath(os.fspath(w)) for w in watched]
    for r in roots:
        if watched is None and not os.path.exists(r):
            raise MediaError(r, "no such file or folder")
    with writer_lock(index_dir):
        return _index_locked(index_dir, roots, t0, spec, batch_size, workers, exclude, include_hidden, factory,
                             reranker, device, precision, executor, progress, max_index_memory, ocr, watched, store,
                             video_frames, keep)


def _index_locked(index_dir, roots, t0, spec, batch_size, workers, exclude, include_hidden, factory, reranker,
                  device, precision, executor, progress, max_index_memory, ocr, watched, store,
                  video_frames, keep=None) -> IndexSummary:
    from mmsearch.towers.devices import check_precision, default_precision, device_type, select_device

    # the driver of a remote executor embeds nothing itself: its workers resolve the device
    dev = select_device(device if executor is None else "cpu")
    created = not Catalog.exists(index_dir)
    check_ocr_request(ocr)
    defaulted = precision is None and executor is None and created
    if defaulted:
        precision = default_precision(dev, reranker=bool(reranker))
    if precision is not None and executor is None:
        check_precision(precision, dev)
    own_store = store is None  # a watcher's store stays open between its runs
    if store is None:
        store = IndexStore.open_or_create(index_dir, spec=spec, factory=factory or DEFAULT_FACTORY, device=dev,
                                          precision=precision, max_index_memory=max_index_memory)
        if not created:
            store.catalog.check_integrity()  # a damaged catalog is refused before anything is written to it
    else:  # a watcher's store, checked when it was opened
        store.meta = store.catalog.meta()  # another run may have changed it since (a re-ranker, the roots)
    if executor is None:  # the index's precision must run here, checked before anything changes
        check_precision(store.precision, dev)
    if factory and factory != store.factory:
        raise VectorIndexError(f"index {index_dir} uses FAISS factory '{store.factory}'; change it with "
                               f"`mmsearch reindex --factory '{factory}'` (no re-embedding needed)")
    if reranker:
        store.configure_reranker(reranker)
    ocr_settings = resolve_ocr(store, ocr)
    extractor = Extractor(ocr=ocr_settings["enabled"], max_side=ocr_settings["max_side"],
                          max_boxes=ocr_settings["max_boxes"])
    cat = store.catalog
    plan = plan_changes(cat, roots, exclude, include_hidden, watched=watched, keep=keep)
    recorded = watched if watched is not None else roots
    if "relevance" not in store.meta or not set(normalise_roots(recorded)) <= set(recorded_roots(store.meta)):
        # the folders ever indexed: a server serves files only from inside them (no write when unchanged)
        with cat.transaction():
            store.meta["roots"] = record_roots(cat, recorded)
            if "relevance" not in store.meta:  # an index built before the good-match score: today's default
                cat.set_meta(relevance=dict(GOOD_MATCH))
    summary = IndexSummary(unchanged=plan.unchanged, moved=len(plan.moves), removed=len(plan.deleted_ids),
                           created=created, precision=store.precision, away=plan.away)
    # nothing that changes the vectors: neither read nor rewrite the FAISS file (530 MB at 1M images),
    # unless it counts fewer or more vectors than the catalog has rows (then it is repaired below)
    unchanged = not (plan.embed or plan.moves or plan.deleted_ids) and store.vectors_fresh() \
        and store.vectors_complete()
    vectors = None if unchanged else store.vectors_for_update()

    if plan.skipped_videos:
        summary.skipped_videos = plan.skipped_videos
        summary.notes.append(f"{plan.skipped_videos} videos skipped: video support is not installed "
                               f"(pip install 'mmsearch[video]')")
    with cat.transaction():
        for image_id, f in plan.moves:
            cat.update_image(image_id, path=f.path, mtime_ns=f.mtime_ns, ext=Path(f.path).suffix.lower())
            cat.rename_words(image_id, f.path)  # what OCR read moves with the file
            cat.rename_video(image_id, f.path)  # a video's shots follow its file (nothing for a photo)
        cat.delete_images(plan.deleted_ids + plan.deleted_shots)
        cat.clear_failures(plan.stale_failures)
        for path, reason in plan.scan_failures:
            cat.record_failure(path, None, None, reason)
        if plan.moves or plan.deleted_ids:
            cat.bump_generation()
    if vectors is not None:
        vectors.remove(plan.deleted_ids + plan.deleted_shots)
    summary.failures.extend(plan.scan_failures)

    videos = [f for f in plan.embed if video.is_video(f.path)] if executor is not None else []
    if plan.embed and executor is not None and len(videos) < len(plan.embed):
        started = time.perf_counter()
        photos = Plan(**dict(vars(plan), embed=[f for f in plan.embed if not video.is_video(f.path)]))
        executor.run(store, photos, vectors, summary, progress)
        summary.embed_seconds = time.perf_counter() - started
        store.export_fast_text()  # loads torch on the driver only when the text tower is missing
    if videos:
        plan = Plan(**dict(vars(plan), embed=videos))  # the executor's rows carry one vector a file: here
    if plan.embed and (executor is None or videos):
        from mmsearch.towers.devices import (bf16_fallback_note, default_batch_size, default_decode_workers,
                                             torch_precision)

        token_grid = store.token_grid()
        try:
            encoder = store.image_encoder(token_grid=token_grid, prefer_torch=device_type(dev) != "cpu")
        except (MmsearchError, ImportError, OSError) as exc:
            if not (defaulted and store.precision == "int8"):
                raise
            # int8 was only this CPU's default, and nothing is embedded yet: the new index becomes fp32
            with store.catalog.transaction():
                store.catalog.set_meta(precision="fp32")
            store.meta["precision"] = summary.precision = "fp32"
            summary.notes.append(f"int8 cannot run this model ({exc}); the new index is fp32")
            encoder = store.image_encoder(token_grid=token_grid, prefer_torch=device_type(dev) != "cpu")
        if store.precision.startswith("amp-") and not hasattr(encoder, "runtime"):
            encoder.precision = torch_precision(store.precision, dev)  # the torch encoder runs under autocast
        if hasattr(encoder, "runtime"):  # the exported tower: its threads were decided when it loaded
            from mmsearch.towers.runtime import threads

            summary.threads = threads()
        note = bf16_fallback_note(store.precision, dev)
        if note:
            summary.notes.append(note)

        started = time.perf_counter()
        on_cpu = device_type(dev) == "cpu"
        # On a CPU, OCR waits for the embed phase (read_missing_words below): inside it, the OCR runtime's
        # threads took cores from the encoder's at every barrier (500 small photos, 2-core AVX2: 127 s inline
        # against 67 s without OCR); after it, OCR has the cores to itself. A GPU run reads them inline.
        embed_all(store, encoder, plan, vectors, summary, batch_size or default_batch_size(dev),
                   workers or default_decode_workers(dev), token_grid, progress, take_turns=on_cpu,
                   extractor=extractor.metadata_only() if on_cpu else extractor, video_frames=video_frames)
        summary.embed_seconds += time.perf_counter() - started
        store.export_fast_text()
        store.share_exports()
    if vectors is not None:
        summary.repaired = store.repair_vectors(vectors)
        if summary.repaired:  # a server holding the damaged vectors at this generation reloads them
            with cat.transaction():
                cat.bump_generation()
        store.save_vectors(vectors, progress=progress)
    read_missing_words(store, extractor, summary, workers=workers, progress=progress)
    summary.failed = len(summary.failures) + plan.known_failed
    summary.seconds = time.perf_counter() - t0
    # closed here, not by the garbage collector: sqlite3's statement cache holds its connection in a
    # cycle, and until the last connection closes the WAL's -wal and -shm files stay beside the catalog
    if own_store:
        cat.close()
    return summary


def embed_all(store: IndexStore, encoder, plan: Plan, vectors, summary: IndexSummary, batch_size: int,
               workers: Optional[int], token_grid: Optional[int], progress: Progress, take_turns: bool = False,
               extractor: Optional[Extractor] = None, video_frames: int = video.DEFAULT_FRAMES) -> None:
    """Decode in worker threads, encode in batches. `take_turns` (a CPU encoder, whose threads use every
    core): decoders start no new file while a batch encodes. The encoder's threads meet at a barrier
    after every operator, so one core lent to a decoder stalls them all; taking turns measured
    ~20 % faster on small photos on 2 cores than overlapping. A video holds one picture per shot until
    it is committed, so at most `workers` videos are in flight: memory stays bounded in a folder of films."""
    import numpy as np

    cat = store.catalog
    todo = plan.embed
    prep = worker_transform(encoder)
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    done = 0
    turn = threading.Event()
    turn.set()

    def decode_in_turn(info, image_size, pil_transform):
        turn.wait()
        return decode_file(info, image_size, pil_transform, extractor, video_frames)

    if progress:
        progress(0, len(todo), stage="embed")
    from concurrent.futures import ThreadPoolExecutor  # with its logging import: not for an unchanged re-run

    with ThreadPoolExecutor(max_workers=workers, initializer=background_thread) as pool:
        # keep about two batches of decodes in flight so the encoder never waits
        pending: deque = deque()
        it = iter(todo)
        held: list = []  # the next file, when it is a video that has to wait for a free video slot

        def top_up():
            while len(pending) < 2 * batch_size:
                f = held.pop() if held else next(it, None)
                if f is None:
                    return
                if video.is_video(f.path) and sum(video.is_video(p.path) for p, _ in pending) >= workers:
                    held.append(f)
                    return
                pending.append((f, pool.submit(decode_in_turn, f, encoder.image_size, prep)))

        top_up()
        # a small first batch gets the encoder busy while the decoders fill the queue
        size = min(batch_size, 8)
        while pending:
            batch = []
            while pending and len(batch) < size:
                f, fut = pending.popleft()
                t = time.perf_counter()
                batch.append((f, fut.result()))
                summary.wait_seconds += time.perf_counter() - t
                top_up()
            good = [(f, r) for f, r in batch if not isinstance(r, MediaError)]
            bad = [(f, r) for f, r in batch if isinstance(r, MediaError)]
            emb = toks = None
            inputs = [x for _, r in good for x in inputs_of(r)]
            if inputs:
                t = time.perf_counter()
                if take_turns:
                    turn.clear()
                try:  # a video may bring more pictures than a batch: encode them a batch at a time
                    outs = [encoder.encode_image_tensor(batch_pixels(encoder, inputs[s:s + batch_size]),
                                                        token_grid=token_grid)
                            for s in range(0, len(inputs), batch_size)]
                finally:
                    turn.set()
                summary.encode_seconds += time.perf_counter() - t
                if token_grid:
                    emb, toks = np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])
                else:
                    emb = np.concatenate(outs)
            size = batch_size
            commit_batch(cat, plan, vectors, good, bad, emb, toks, summary)
            done += len(batch)
            if progress:
                progress(done, len(todo), stage="embed")
