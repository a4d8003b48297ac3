"""Embedding import/export in clip-retrieval's inference layout, plus our model record.

    OUT/img_emb/img_emb_0.npy          float32 (or float16) [n, d], L2-normalised, row i = metadata row i
    OUT/metadata/metadata_0.parquet    image_path + the catalog's columns (size, mtime_ns, width, ...);
                                       image_path_bytes: the exact name where it is not UTF-8 (else null)
    OUT/mmsearch_model.json            model spec, arch, fingerprint, dim: what import checks

Shards written by clip-retrieval (`clip-retrieval inference`, output_format files or webdataset) import
too: their metadata names an image by `image_path`, else `url`, else `key`. They carry no model record,
so the importer must name the model the index was built with (`expected_model`); the dimension is
always checked. Any mismatch, and any vector holding NaN or infinity, is refused before a single row
is written. A shard's paths are only words: a server reads none of them unless they lie inside a folder
the importer named (`roots`).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from mmsearch.errors import DatasetError, ModelMismatchError
from mmsearch.storage.fsnames import display, from_db, is_exact, to_db
from mmsearch.storage.roots import is_under_roots, normalise_roots, record_roots, recorded_roots
from mmsearch.storage.schema import check_finite

MODEL_RECORD = "mmsearch_model.json"
_RECORD_KEYS = ("model", "arch", "fingerprint", "dim", "image_size", "text_width", "vision_width")
_ROW_COLUMNS = ("size", "mtime_ns", "width", "height", "taken_at", "ext", "quick_hash")
_PATH_COLUMNS = ("image_path", "url", "key")

Progress = Optional[Callable[..., None]]


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError as exc:  # pragma: no cover - CI installs the extra
        raise DatasetError("export/import need pyarrow for the parquet metadata: "
                           "pip install 'mmsearch[exchange]'") from exc
    return pyarrow


def model_record(store) -> dict:
    return dict({k: store.meta.get(k) for k in _RECORD_KEYS}, precision=store.precision)


def export_embeddings(store, out, shard_size: int = 100_000, float16: bool = False,
                      progress: Progress = None) -> dict:
    """Write every image's embedding and catalog row, in id order, as numbered shards."""
    pa = _pyarrow()
    out = Path(out)
    (out / "img_emb").mkdir(parents=True, exist_ok=True)
    (out / "metadata").mkdir(parents=True, exist_ok=True)
    cat, total, shard = store.catalog, store.catalog.count_images(), 0
    done = 0
    for ids, emb in cat.iter_embeddings(store.dim, chunk=shard_size):
        rows = cat.rows(ids)
        paths = [rows[i]["path"] for i in ids.tolist()]
        cols = {"image_path": [display(p) for p in paths], "id": ids}
        if not all(is_exact(p) for p in paths):  # parquet strings are UTF-8: the exact bytes go beside them
            cols["image_path_bytes"] = pa.array([None if is_exact(p) else to_db(p) for p in paths], pa.binary())
        extra = cat.columns(ids, _ROW_COLUMNS)
        for c in _ROW_COLUMNS:
            cols[c] = [extra[i].get(c) for i in ids.tolist()]
        np.save(out / "img_emb" / f"img_emb_{shard}.npy", emb.astype(np.float16 if float16 else np.float32))
        pa.parquet.write_table(pa.table(cols), out / "metadata" / f"metadata_{shard}.parquet")
        shard += 1
        done += len(ids)
        if progress:
            progress(done, total, stage="export")
    (out / MODEL_RECORD).write_text(json.dumps(model_record(store), indent=1))
    return {"images": done, "shards": shard, "dim": store.dim, "dtype": "float16" if float16 else "float32",
            "out": str(out)}


def _shards(src: Path) -> list[tuple[Path, Path]]:
    embs = {int(m.group(1)): p for p in (src / "img_emb").glob("img_emb_*.npy")
            if (m := re.fullmatch(r"img_emb_(\d+)\.npy", p.name))}
    if not embs:
        raise DatasetError(f"{src} holds no img_emb/img_emb_N.npy shards (clip-retrieval's inference layout)")
    pairs = []
    for n in sorted(embs):
        meta = src / "metadata" / f"metadata_{n}.parquet"
        if not meta.is_file():
            raise DatasetError(f"{embs[n]} has no matching {meta}")
        pairs.append((embs[n], meta))
    return pairs


def read_record(src) -> Optional[dict]:
    path = Path(src) / MODEL_RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise DatasetError(f"{path} is not a model record ({exc})") from exc


def check_compatible(store, src, expected_model=None) -> list[tuple[Path, Path, int]]:
    """Every shard's (embedding file, metadata file, rows), after checking dimension and model against
    the index and that every vector is finite. Reads the shards memory-mapped and writes nothing, so a
    refused import has touched nothing."""
    pa = _pyarrow()
    src = Path(src)
    record = read_record(src)
    where = f"index {store.dir} ({store.spec.describe()}, dim {store.dim}, fingerprint {store.meta['fingerprint']})"
    if record is not None:
        if int(record.get("dim") or -1) != store.dim or record.get("fingerprint") != store.meta["fingerprint"]:
            raise ModelMismatchError(
                f"{src} was embedded with {record.get('model')} (dim {record.get('dim')}, fingerprint "
                f"{record.get('fingerprint')}), not the model of {where}; nothing was imported")
        if record.get("precision", "fp32") != store.precision:  # int8 and fp32 embeddings do not mix
            raise ModelMismatchError(f"{src} holds {record.get('precision', 'fp32')} embeddings, {where} is "
                                     f"{store.precision}; nothing was imported")
    elif expected_model is None or not _names_model(expected_model, store):
        raise ModelMismatchError(
            f"{src} has no {MODEL_RECORD} (shards from clip-retrieval?): confirm they were computed with the "
            f"model of {where} by passing the same --model/--pretrained; nothing was imported")
    out = []
    for emb_path, meta_path in _shards(src):
        arr = np.load(emb_path, mmap_mode="r")
        if arr.ndim != 2 or arr.shape[1] != store.dim:
            raise ModelMismatchError(f"{emb_path} holds vectors of shape {arr.shape}, {where} needs dim "
                                     f"{store.dim}; nothing was imported")
        rows = pa.parquet.ParquetFile(meta_path).metadata.num_rows
        if rows != arr.shape[0]:
            raise DatasetError(f"{meta_path} has {rows} rows for {arr.shape[0]} vectors; nothing was imported")
        for s in range(0, len(arr), 50_000):
            check_finite(arr[s:s + 50_000], lambda j, s=s: f"{emb_path} row {s + j} ({_shard_path(meta_path, s + j)})",
                         "embedding")
        out.append((emb_path, meta_path, rows))
    return out


def _shard_path(meta_path: Path, row: int) -> str:
    """The image a shard's row names, for a message."""
    table = _pyarrow().parquet.read_table(meta_path)
    col = next((c for c in _PATH_COLUMNS if c in table.column_names), None)
    return "no path" if col is None else display(str(table.column(col)[row].as_py()))


def _names_model(spec, store) -> bool:
    from mmsearch.config import same_model

    return same_model(spec.normalised(), store.spec)


def import_embeddings(store, src, expected_model=None, batch: int = 50_000, progress: Progress = None,
                      roots: Sequence = ()) -> dict:
    """Upsert every shard row into the catalog (by path: a re-import updates, never duplicates), then
    rebuild the vector index from the stored embeddings. Refused, changing nothing, on a model mismatch
    or a vector that is not finite. Holds the index's writer lock.

    `roots`: folders of this machine the imported files may be served from (storage/roots.py), added to
    the index's recorded roots. A shard's paths are anyone's words: with no root, a server serves none of
    them. `unservable` in the result counts imported rows outside every recorded root."""
    with store.writing():
        return _import(store, src, expected_model, batch, progress, roots)


def _import(store, src, expected_model, batch: int, progress: Progress, roots: Sequence) -> dict:
    pa = _pyarrow()
    roots = normalise_roots(roots)
    missing = [r for r in roots if not os.path.isdir(r)]
    if missing:
        raise DatasetError(f"root {missing[0]} is not a folder on this machine; nothing was imported")
    shards = check_compatible(store, src, expected_model)
    total = sum(n for *_, n in shards)
    cat, done, unservable = store.catalog, 0, 0
    if roots:
        with cat.transaction():
            record_roots(cat, roots)
    served = recorded_roots(cat.meta())
    for emb_path, meta_path, _ in shards:
        table = pa.parquet.read_table(meta_path)
        names = table.column_names
        col = next((c for c in _PATH_COLUMNS if c in names), None)
        if col is None:
            raise DatasetError(f"{meta_path} names no image (looked for {', '.join(_PATH_COLUMNS)})")
        paths = [str(p) for p in table.column(col).to_pylist()]
        if "image_path_bytes" in names:  # names that are not UTF-8, exported byte for byte
            paths = [p if b is None else from_db(b) for p, b in zip(paths, table.column("image_path_bytes").to_pylist())]
        extras = {c: table.column(c).to_pylist() for c in _ROW_COLUMNS if c in names}
        emb = np.load(emb_path, mmap_mode="r")
        for s in range(0, len(paths), batch):
            vecs = np.array(emb[s:s + batch], dtype=np.float32)  # a writable copy of the mapped rows
            norms = np.linalg.norm(vecs, axis=1, keepdims=True)
            off = np.abs(norms[:, 0] - 1) > 1e-3  # float16 shards, other tools: re-normalise those rows only
            vecs[off] /= np.maximum(norms[off], 1e-12)
            rows = []
            for j, p in enumerate(paths[s:s + batch]):
                r = {c: extras[c][s + j] for c in extras}
                r.setdefault("ext", os.path.splitext(p)[1].lower())
                rows.append(dict(r, path=p))
                unservable += not is_under_roots(p, served)
            with cat.transaction():
                cat.upsert_images(rows, vecs)
                cat.bump_generation()
            done += len(rows)
            if progress:
                progress(done, total, stage="import")
    store.save_vectors(_Rebuild(), progress=progress)
    return {"imported": done, "shards": len(shards), "images": cat.count_images(),
            "structure": (store.ann_info() or {}).get("structure"), "roots": served, "unservable": unservable}


class _Rebuild:
    """A pending-vectors stand-in that asks store.save_vectors for a rebuild from the catalog."""
    needs_rebuild = True
    index = None


def open_for_import(index_dir, src, spec=None, max_index_memory=None):
    """The index to import into: an existing one, or a new one for the shards' recorded model (or `spec`).
    A new index loads that model once to check its fingerprint against the record."""
    from mmsearch.storage.catalog import Catalog
    from mmsearch.storage.lock import writer_lock
    from mmsearch.storage.store import IndexStore

    if Catalog.exists(index_dir):
        return IndexStore.open(index_dir)
    with writer_lock(index_dir):
        return _create_for_import(index_dir, src, spec, max_index_memory)


def _create_for_import(index_dir, src, spec, max_index_memory):
    from mmsearch.config import ModelSpec
    from mmsearch.storage.store import IndexStore

    record = read_record(src)
    if spec is None and record is None:
        raise ModelMismatchError(f"{src} has no {MODEL_RECORD}: name the model it was computed with "
                                 f"(--model/--pretrained or --checkpoint) to create index {index_dir}")
    from mmsearch.towers.encoder import load_encoder

    spec = spec or ModelSpec.from_dict(record["model"])
    enc = load_encoder(spec)
    if record is not None:
        if enc.fingerprint != record.get("fingerprint") or enc.dim != record.get("dim"):
            raise ModelMismatchError(f"{src} was embedded with weights {record.get('fingerprint')} (dim "
                                     f"{record.get('dim')}), {spec.describe()} has {enc.fingerprint} (dim "
                                     f"{enc.dim}); nothing was imported")
    store = IndexStore.open_or_create(index_dir, spec=spec, max_index_memory=max_index_memory, encoder=enc,
                                      precision=(record or {}).get("precision"))
    store.export_fast_text(store.encoder())  # text queries on the new index skip torch
    return store
