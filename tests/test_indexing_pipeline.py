"""Indexing a real folder of odd files: incremental rules, failures, crash safety, model mismatch."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import make_photo_folder
from mmsearch.config import ModelSpec
from mmsearch.errors import ModelMismatchError, VectorIndexError
from mmsearch.indexing.pipeline import index_folders
from mmsearch.storage.store import IndexStore

TINY = ModelSpec(model="mmsearch-tiny", pretrained=None)


def _consistent(index_dir):
    """Every catalog row once, and FAISS ids == catalog ids."""
    store = IndexStore.open(index_dir)
    ids, emb = store.catalog.embeddings(store.dim)
    paths = [r[0] for r in store.catalog.conn.execute("SELECT path FROM images")]
    assert len(paths) == len(set(paths))
    v = store.image_vectors()
    assert v.ntotal == len(ids)
    if len(ids):
        _, got = v.search(emb, 1)
        assert list(got[:, 0]) == list(ids)  # each stored vector finds its own row id first
    return store


@pytest.fixture()
def folder(tmp_path):
    return make_photo_folder(tmp_path / "photos")


def test_first_run_indexes_good_files_and_records_bad_ones(folder, tmp_path):
    idx = tmp_path / "idx"
    s = index_folders(idx, [folder.root], spec=TINY, batch_size=4)
    store = _consistent(idx)
    indexed = set(store.catalog.image_states())
    visible_good = {str(p) for name, p in folder.good.items() if "/." not in str(p)}
    assert visible_good <= indexed
    assert not any("/.hidden/" in p for p in indexed)
    assert not any(p.endswith(".txt") for p in indexed)
    failed = {f["path"]: f["reason"] for f in store.catalog.failures()}
    for name, p in folder.bad.items():
        if os.path.isdir(p):
            continue
        if name == "unreadable" and os.geteuid() == 0:
            continue  # root can read a chmod-000 file
        assert str(p) in failed, name
        assert failed[str(p)]
    assert s.added == len(indexed) and s.failed == len(failed)
    assert store.info()["images"] == len(indexed)


def test_rerun_embeds_nothing_and_changes_are_exact(folder, tmp_path):
    idx = tmp_path / "idx"
    index_folders(idx, [folder.root], spec=TINY, batch_size=4)
    first_failed = IndexStore.open(idx).catalog.count_failures()
    s = index_folders(idx, [folder.root])
    assert (s.added, s.updated, s.moved, s.removed) == (0, 0, 0, 0) and s.unchanged > 0
    # known failures (decode errors and walk errors such as broken symlinks) are counted, not re-announced
    assert s.failures == [] and s.failed == first_failed == len(folder.bad) + 1  # + the directory symlink loop

    store = IndexStore.open(idx)
    before = store.catalog.image_states()
    # change one file, move one, delete one
    changed, moved, deleted = folder.good["rgb.jpg"], folder.good["img.bmp"], folder.good["img.webp"]
    Image.new("RGB", (50, 40), (10, 200, 30)).save(changed, quality=90)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    new_place = folder.root / "sub" / "renamed.bmp"
    shutil.move(moved, new_place)
    deleted.unlink()
    s = index_folders(idx, [folder.root])
    assert (s.added, s.updated, s.moved, s.removed) == (0, 1, 1, 1)
    store = _consistent(idx)
    after = store.catalog.image_states()
    assert str(deleted) not in after and str(moved) not in after
    assert after[str(new_place)][0] == before[str(moved)][0]  # same row id, embedding reused
    assert after[str(changed)][0] == before[str(changed)][0]
    assert store.image_vectors().ntotal == len(after)


def test_failed_file_is_retried_when_it_changes(folder, tmp_path):
    idx = tmp_path / "idx"
    index_folders(idx, [folder.root], spec=TINY)
    bad = folder.bad["truncated.jpg"] if "truncated.jpg" in folder.bad else next(iter(folder.bad.values()))
    s = index_folders(idx, [folder.root])
    assert s.added == 0
    Image.new("RGB", (40, 40), (200, 0, 200)).save(bad, format="JPEG")
    s = index_folders(idx, [folder.root])
    assert s.added == 1
    store = IndexStore.open(idx)
    assert str(bad) in store.catalog.image_states()
    assert str(bad) not in {f["path"] for f in store.catalog.failures()}


def test_exif_rotated_photo_embeds_like_the_physically_rotated_one(folder, tmp_path):
    idx = tmp_path / "idx"
    index_folders(idx, [folder.good["rotated_tag.jpg"], folder.good["rotated_real.jpg"]], spec=TINY)
    store = IndexStore.open(idx)
    _, emb = store.catalog.embeddings(store.dim)
    assert float(emb[0] @ emb[1]) > 0.995


def test_conflicting_model_is_refused_and_nothing_changes(folder, tmp_path):
    idx = tmp_path / "idx"
    index_folders(idx, [folder.good["rgb.jpg"]], spec=TINY)
    db = (idx / "catalog.db").read_bytes()
    with pytest.raises(ModelMismatchError) as err:
        index_folders(idx, [folder.root], spec=ModelSpec(model="ViT-B-32", pretrained=None))
    assert "mmsearch-tiny" in str(err.value) and "ViT-B-32" in str(err.value)
    assert IndexStore.open(idx).catalog.count_images() == 1
    with pytest.raises(VectorIndexError, match="reindex"):
        index_folders(idx, [folder.root], factory="HNSW32")


def test_missing_or_stale_faiss_file_is_rebuilt_from_the_catalog(folder, tmp_path):
    idx = tmp_path / "idx"
    index_folders(idx, [folder.root], spec=TINY)
    n = IndexStore.open(idx).catalog.count_images()
    (idx / "vectors.faiss").unlink()
    assert _consistent(idx).image_vectors().ntotal == n
    (idx / "vectors.faiss").write_bytes(b"not faiss")
    assert _consistent(idx).image_vectors().ntotal == n


def test_reindex_changes_structure_without_reembedding(folder, tmp_path):
    idx = tmp_path / "idx"
    index_folders(idx, [folder.root], spec=TINY)
    store = IndexStore.open(idx)
    n = store.catalog.count_images()
    assert store.reindex("HNSW16") == n
    store = IndexStore.open(idx)
    assert store.factory == "HNSW16"
    # HNSW cannot remove in place: a deletion still leaves both stores consistent
    folder.good["gray.jpg"].unlink()
    s = index_folders(idx, [folder.root])
    assert s.removed == 1
    _consistent(idx)


CRASH_SCRIPT = textwrap.dedent("""
    import sys
    from mmsearch.config import ModelSpec
    from mmsearch.indexing.pipeline import index_folders
    def progress(done, total, **kw):
        if done:
            print("BATCH", done, flush=True)
    index_folders(sys.argv[1], [sys.argv[2]], spec=ModelSpec(model="mmsearch-tiny", pretrained=None),
                  batch_size=8, progress=progress)
""")


def test_kill_9_mid_index_then_rerun_leaves_each_image_once(tmp_path):
    photos = tmp_path / "many"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(160):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(photos / f"{i:03d}.png")
    idx = tmp_path / "idx"
    proc = subprocess.Popen([sys.executable, "-c", CRASH_SCRIPT, str(idx), str(photos)],
                            stdout=subprocess.PIPE, text=True)
    seen = 0
    for line in proc.stdout:
        if line.startswith("BATCH"):
            seen = int(line.split()[1])
            if seen >= 40:
                break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 0 < seen < 160
    partial = IndexStore.open(idx).catalog.count_images()
    assert 0 < partial < 160
    s = index_folders(idx, [photos])
    assert s.added == 160 - partial
    store = _consistent(idx)
    assert store.catalog.count_images() == 160


@pytest.mark.skipif(not hasattr(os, "getpriority") or sys.platform != "linux", reason="per-thread priority is Linux")
def test_decode_workers_run_below_the_encoder_priority(folder, tmp_path, monkeypatch):
    """Decoders yield the cores to the model's threads (measured: 98 % of model-only instead of 91 %)."""
    import threading

    from mmsearch.indexing import pipeline as indexer  # decode_file is looked up in the pipeline module

    seen = []
    original = indexer.decode_file

    def recording(*args):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return original(*args)

    monkeypatch.setattr(indexer, "decode_file", recording)
    index_folders(tmp_path / "idx", [folder.root], spec=TINY, batch_size=4, workers=2)
    main = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert seen and all(p > main for p in seen)


def test_walk_yields_paths_in_the_catalogs_order(tmp_path):
    """The incremental diff merges the walk with the catalog's ORDER BY path: the walk must be in
    plain string order even where a folder name is a prefix of a sibling's ('b' / 'b-c' / 'b.jpg')."""
    from mmsearch.indexing import scan

    for rel in ("b/x.jpg", "b-c/y.jpg", "b.jpg", "b0.png", "a/b/c.jpg", "a/b.jpg", "a-/z.jpg", "é/1.jpg", "Z.jpg"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    got = [f.path for f in scan.scan([tmp_path, tmp_path / "b", tmp_path / "b.jpg"])]  # nested roots: once
    assert got == sorted(got) and len(got) == len(set(got)) == 9


def test_unchanged_rerun_process_imports_no_numerics(folder, tmp_path):
    """An unchanged re-run is start-up bound: its process loads no numpy, PyAV, importlib.metadata,
    torch or faiss (each was once imported by every run: ~0.2 s of a 0.35 s re-run), and still checks."""
    idx = tmp_path / "idx"
    index_folders(idx, [folder.root], spec=TINY, batch_size=4)
    (folder.root / "clip.mp4").write_bytes(b"")  # a video already known as failed, to ask for no PyAV
    index_folders(idx, [folder.root])
    code = textwrap.dedent(f"""
        import json, sys
        from mmsearch.cli import main
        sys.argv = ["mmsearch", "index", {str(folder.root)!r}, "--index", {str(idx)!r}, "--json"]
        try:
            main()
        finally:
            heavy = sorted(m for m in ("numpy", "av", "importlib.metadata", "torch", "faiss") if m in sys.modules)
            print(json.dumps(heavy))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    summary, heavy = out.stdout.strip().splitlines()[-2:]
    assert json.loads(heavy) == [], out.stdout + out.stderr
    s = json.loads(summary)
    assert (s["added"], s["updated"], s["removed"]) == (0, 0, 0) and s["unchanged"] > 0


def test_unchanged_rerun_plans_without_holding_the_catalog(tmp_path, monkeypatch):
    """The plan of a 20,000-file folder that has not changed, against a naive reference that loads
    every catalog row and every walked file into memory (what the planner did before): same counts, and a
    peak of Python memory that does not grow with the folder."""
    import tracemalloc

    from mmsearch.indexing import scan
    from mmsearch.storage.catalog import Catalog
    from mmsearch.indexing.plan import plan_changes

    root = tmp_path / "photos"
    rows = []
    for i in range(20_000):
        d = root / f"d{i % 50:02d}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"img_{i:05d}.jpg"
        p.write_bytes(b"\xff\xd8" + i.to_bytes(4, "little"))
        st = p.stat()
        rows.append(dict(path=str(p), size=st.st_size, mtime_ns=st.st_mtime_ns, ext=".jpg"))
    cat = Catalog.create(tmp_path / "idx", {"dim": 4, "fingerprint": "x", "model": {"model": "x"}})
    with cat.transaction():
        cat.upsert_images(rows[:-5], np.ones((len(rows) - 5, 4), np.float32))  # 5 files are new
        cat.upsert_images([dict(path=str(root / "gone.jpg"), size=1, mtime_ns=1, ext=".jpg")], np.ones((1, 4), np.float32))

    tracemalloc.start()
    plan = plan_changes(cat, [str(root)], (), False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    known, files = cat.image_states(), list(scan.scan([str(root)]))  # the naive plan's two inputs
    naive_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert plan.unchanged == 19_995 and len(plan.embed) == 5 and len(plan.deleted_ids) == 1
    assert sum(1 for f in files if f.path in known) == plan.unchanged  # the naive diff agrees
    assert peak < naive_peak / 10, (peak, naive_peak)
