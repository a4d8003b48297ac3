"""Sharded layouts: make one (from an index's record), split an index into one, index folders into one.

A shard is an ordinary index folder; the layout is N of them and a shard map (storage/shardmap.py).
Splitting copies each row with its embedding and re-ranker tokens (no re-embedding) to the shard its
path routes to, keeping its id, the text corpus to every shard, and then builds each shard's vectors
from its own catalog. Indexing into a layout runs the one pipeline (pipeline.index_folders) once per
shard, each planning against its own catalog with only the files that route to it (`keep`), with
the same local or Ray executor; nothing here decodes or encodes.
"""
from __future__ import annotations

import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path
from typing import Optional

from mmsearch.errors import EmptyIndexError, ModelMismatchError, ShardMapError
from mmsearch.indexing.stage import IndexSummary, Progress
from mmsearch.storage.catalog import Catalog
from mmsearch.storage.shardmap import ShardMap, describe_record, model_record, shard_name, shard_of
from mmsearch.storage.store import IndexStore

# what a new shard takes from the index (or the first shard) it is made from: the model record and
# how the index is built; not its counters (generation), its tuning (ann) or its creation time
COPIED_META = ("model", "arch", "fingerprint", "dim", "image_size", "text_width", "vision_width", "factory",
               "precision", "max_index_memory", "mmsearch_version", "reranker", "text_path", "roots")
_ROW_COLUMNS = ("id", "path", "size", "mtime_ns", "quick_hash", "width", "height", "taken_at", "ext", "embedding",
                "tokens", "indexed_at")


def tower_dirs() -> tuple[str, ...]:
    """The exported torch-free towers an index folder may hold: each shard gets them (hard links)."""
    from mmsearch.towers.imagetower import DIR_NAME as IMAGE
    from mmsearch.towers.textnp import DIR_NAME as TEXT

    return TEXT, IMAGE


def _copy_towers(src: Path, dest: Path) -> None:
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:  # another filesystem, or no hard links: a copy
            shutil.copy2(a, b)

    for name in tower_dirs():
        if (src / name).is_dir() and not (dest / name).exists():
            shutil.copytree(src / name, dest / name, copy_function=link)


def create_layout(root, n: int, template: IndexStore, existing: tuple = ()) -> ShardMap:
    """Shard folders shard-0 .. shard-(n-1) under `root` with `template`'s model record and exported
    towers, and the map. `existing`: shard names already created (indexing makes shard-0 itself)."""
    root = Path(root)
    if n < 1:
        raise ShardMapError("--shards must be at least 1")
    if ShardMap.exists(root):
        raise ShardMapError(f"{root} already holds a shard map; nothing was changed")
    meta = template.catalog.meta()
    names = [shard_name(i) for i in range(n)]
    clash = [nm for nm in names if nm not in existing and (root / nm).exists()]
    if clash:
        raise ShardMapError(f"{root / clash[0]} already exists and is not a shard of this layout; choose an "
                            f"empty --out folder")
    for nm in names:
        if nm in existing:
            continue
        Catalog.create(root / nm, {k: meta[k] for k in COPIED_META if k in meta}).close()
        _copy_towers(template.dir, root / nm)
    smap = ShardMap(root, model_record(meta), [{"name": nm, "folder": nm} for nm in names])
    smap.save()
    return smap


# ---- split ---------------------------------------------------------------------------------------
def split_index(index_dir, n: int, out, chunk: int = 20_000, progress: Progress = None) -> dict:
    """Split the index at `index_dir` into `n` shards under `out`. The source is only read."""
    src = IndexStore.open(index_dir, readonly=True)
    total = src.catalog.count_images()
    if total == 0:
        raise EmptyIndexError(f"index {index_dir} has no images to split")
    out = Path(out)
    if out.exists() and any(not p.name.startswith(".") for p in out.iterdir()):
        raise ShardMapError(f"{out} is not empty; split into a new or empty folder")
    smap = create_layout(out, n, src)
    cats = [Catalog.open(smap.folder(nm)) for nm in smap.names]
    counts = [0] * n
    t0 = time.perf_counter()
    try:
        cols = ", ".join(_ROW_COLUMNS)
        last, done = -1, 0
        if progress:
            progress(0, total, stage="split")
        while True:
            rows = src.catalog.conn.execute(f"SELECT {cols} FROM images WHERE id > ? ORDER BY id LIMIT ?",
                                            (last, chunk)).fetchall()
            if not rows:
                break
            last = rows[-1][0]
            per = [[] for _ in range(n)]
            for r in rows:
                per[shard_of(r[1], n)].append(r)
            for i, part in enumerate(per):
                if part:
                    with cats[i].transaction() as conn:
                        conn.executemany(f"INSERT INTO images ({cols}) VALUES ({','.join('?' * len(_ROW_COLUMNS))})",
                                         part)
                    counts[i] += len(part)
            done += len(rows)
            if progress:
                progress(done, total, stage="split")
        _copy_failures_and_texts(src.catalog, cats, n)
        for cat in cats:
            with cat.transaction():
                cat.bump_generation()
    finally:
        for cat in cats:
            cat.close()
    vectors = build_shard_vectors(smap, progress)
    return {"shards": n, "images": counts, "vectors": vectors, "out": str(out.resolve()),
            "seconds": round(time.perf_counter() - t0, 2)}


def _copy_failures_and_texts(src: Catalog, cats: list, n: int) -> None:
    failures = src.conn.execute("SELECT path, size, mtime_ns, reason, failed_at FROM failures").fetchall()
    texts = src.conn.execute("SELECT id, text, embedding, states, state_len, added_at FROM texts").fetchall()
    text_gen = src.meta().get("text_generation", 0)
    for i, cat in enumerate(cats):
        with cat.transaction() as conn:
            conn.executemany("INSERT INTO failures (path, size, mtime_ns, reason, failed_at) VALUES (?,?,?,?,?)",
                             [f for f in failures if shard_of(f[0], n) == i])
            # the corpus is small (captions): every shard keeps all of it, so any shard answers image -> text
            conn.executemany("INSERT INTO texts (id, text, embedding, states, state_len, added_at) "
                             "VALUES (?,?,?,?,?,?)", texts)
            cat.set_meta(text_generation=text_gen)


def build_shard_vectors(smap: ShardMap, progress: Progress = None) -> list[int]:
    """Each shard's vector index, built (and tuned, for 'auto') from its own catalog's embeddings."""
    out = []
    for nm in smap.names:
        store = IndexStore.open(smap.folder(nm))
        out.append(store.reindex(store.factory, progress=progress) if store.catalog.has_images() else 0)
        store.catalog.close()
    return out


# ---- indexing into a layout ----------------------------------------------------------------------
def index_sharded(root, roots, count: Optional[int] = None, spec=None, executor=None, progress: Progress = None,
                  **options) -> IndexSummary:
    """Index `roots` into the sharded layout at `root` (made with `count` shards when it does not exist
    yet). Every shard runs pipeline.index_folders against its own catalog, keeping only the files
    whose path routes to it; `options` are index_folders' (factory, precision, device, ...)."""
    from mmsearch.indexing.pipeline import index_folders

    root = Path(root)
    if ShardMap.exists(root):
        smap = ShardMap.load(root)
        if count is not None and count != smap.n:
            raise ShardMapError(f"{root} has {smap.n} shards, not {count}: the rule routes each photo by the "
                                f"number of shards, so it cannot change in place (split the index anew)")
        smap.check()
        if spec is not None:
            _check_spec(smap, spec)
        first = None
    else:
        if count is None:
            raise ShardMapError(f"{root} holds no shard map: give --shard-count N to make a layout of N shards")
        if count < 1:
            raise ShardMapError("--shard-count must be at least 1")
        if root.exists() and any(not p.name.startswith(".") for p in root.iterdir()):
            raise ShardMapError(f"{root} is not empty and holds no shard map; index into a new or empty folder")
        # shard-0 is made the way any index is (the model loaded or found in the tower cache), the others from it
        first = index_folders(root / shard_name(0), roots, spec=spec, executor=executor, progress=progress,
                              keep=lambda p: shard_of(p, count) == 0, **options)
        store0 = IndexStore.open(root / shard_name(0))
        smap = create_layout(root, count, store0, existing=(shard_name(0),))
        store0.catalog.close()
    summaries = [first] if first is not None else []
    session = getattr(executor, "session", None)
    with session() if session is not None else nullcontext():  # one cluster connection for every shard
        for i, nm in enumerate(smap.names):
            if first is not None and i == 0:
                continue
            summaries.append(index_folders(smap.folder(nm), roots, executor=executor, progress=progress,
                                           keep=lambda p, i=i, n=smap.n: shard_of(p, n) == i, **options))
    return combine(summaries)


def _check_spec(smap: ShardMap, spec) -> None:
    from mmsearch.config import same_model

    from mmsearch.config import ModelSpec

    stored = ModelSpec.from_dict(smap.record.get("model") or {})
    if not same_model(spec.normalised(), stored):
        raise ModelMismatchError(f"the shards in {smap.root} were built with {describe_record(smap.record)}, not "
                                 f"{spec.normalised().describe()}; nothing was changed. Omit the model options to "
                                 f"reuse the shards' model")


def combine(summaries: list) -> IndexSummary:
    """One summary for a run over every shard: counts and times add up, failures are listed together."""
    out = IndexSummary()
    for s in summaries:
        for f in fields(IndexSummary):
            v = getattr(s, f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                setattr(out, f.name, getattr(out, f.name) + v)
        out.failures.extend(s.failures)
    out.created = any(s.created for s in summaries)
    out.precision = next((s.precision for s in summaries if s.precision), "")
    return out


def layout_info(root) -> dict:
    """The map and each shard's counts, after checking every shard (`mmsearch shard info`)."""
    from mmsearch.storage.store import IMAGE_VECTORS
    from mmsearch.storage.vectors import VectorIndex

    smap = ShardMap.load(root)
    smap.check()
    shards = []
    for nm in smap.names:
        store = IndexStore.open(smap.folder(nm), readonly=True)
        cat = store.catalog
        shards.append({"name": nm, "folder": str(smap.folder(nm)), "images": cat.count_images(),
                       "vectors": VectorIndex.sidecar(store.dir / IMAGE_VECTORS).get("ntotal")
                       if store.vectors_fresh() else None,
                       "failed": cat.count_failures(), "texts": cat.count_texts(), "generation": cat.generation(),
                       "bytes_on_disk": cat.bytes_on_disk()})
        cat.close()
    return {"map": str(Path(root).resolve() / "shards.json"), "version": smap.version, "rule": smap.rule,
            "model": describe_record(smap.record), "record": smap.record, "shards": shards,
            "images": sum(s["images"] for s in shards)}
