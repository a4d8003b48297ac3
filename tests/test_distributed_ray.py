"""Indexing on a Ray cluster started by the test: a head (no CPUs, like a real head) and two worker nodes.

The Ray path must give what the local path gives (catalog, vectors, search results, error rows), and
lose or duplicate nothing when a worker node or the driver is killed mid-run.
"""
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image
from ray.cluster_utils import Cluster

from helpers import make_photo_folder
from mmsearch.config import ModelSpec
from mmsearch.distributed import RayExecutor
from mmsearch.distributed import pending
from mmsearch.indexing.pipeline import index_folders
from mmsearch.search.query import Searcher
from mmsearch.storage.store import IndexStore

pytestmark = [pytest.mark.cluster]
NODE = dict(num_cpus=2, object_store_memory=80 * 1024 ** 2)
TIMEOUT_S = 60  # Ray's no-progress default is 30 min: a hang must fail the test, not the CI job


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, object_store_memory=80 * 1024 ** 2))
    c.workers = [c.add_node(**NODE) for _ in range(2)]
    try:
        c.wait_for_nodes()
        ray.init(address=c.address, logging_level=logging.ERROR, log_to_driver=False)
        yield c
    finally:  # never leave Ray processes behind
        ray.shutdown()
        c.shutdown()


def _images(synth_dir, dest: Path, n: int) -> Path:
    dest.mkdir(parents=True)
    for p in sorted((synth_dir / "images").glob("*.png"))[:n]:
        shutil.copy(p, dest / p.name)
    return dest


def _executor(**kw):
    return RayExecutor("auto", no_progress_timeout_s=TIMEOUT_S, **kw)


def _state(index_dir):
    """path -> (id, size, mtime, width, height, taken_at, hash), failures, vectors by path; checks FAISS == catalog."""
    store = IndexStore.open(index_dir)
    cat = store.catalog
    rows = cat.conn.execute("SELECT path, id, size, mtime_ns, width, height, taken_at, quick_hash FROM images").fetchall()
    paths = [r[0] for r in rows]
    assert len(paths) == len(set(paths)), "a path was stored twice"
    ids, emb = cat.embeddings(store.dim)
    v = store.image_vectors()
    assert v.ntotal == len(ids)
    if len(ids):
        _, got = v.search(emb, 1)
        assert list(got[:, 0]) == list(ids)  # FAISS ids are catalog ids
    by_id = dict(zip(ids.tolist(), emb))
    vectors = {r[0]: by_id[r[1]] for r in rows}
    failures = {f["path"]: f["reason"] for f in cat.failures()}
    assert pending.paths(cat) == set()  # nothing left pending after a finished run
    return store, {r[0]: r[2:] for r in rows}, failures, vectors


def test_ray_gives_the_local_catalog_vectors_errors_and_results(cluster, tiny_checkpoint, synth_dir, tmp_path):
    folder = make_photo_folder(tmp_path / "photos")
    _images(synth_dir, folder.root / "synth", 40)
    spec = ModelSpec(checkpoint=str(tiny_checkpoint))
    local = index_folders(tmp_path / "local", [folder.root], spec=spec, batch_size=8, precision="fp32")
    executor = _executor(batch_size=32)  # 4 encoder slices per actor call
    dist = index_folders(tmp_path / "ray", [folder.root], spec=spec, executor=executor)
    assert executor.stats["actors"] == 2 and executor.stats["nodes"] == 3
    assert executor.stats["tower"] == "onnx fp32"  # CPU workers run the index's ONNX tower, as local CPU runs do
    assert (dist.added, dist.failed) == (local.added, local.failed) and local.added >= 50 and local.failed >= 5
    s_local, rows_local, fail_local, vec_local = _state(tmp_path / "local")
    s_ray, rows_ray, fail_ray, vec_ray = _state(tmp_path / "ray")
    assert rows_ray == rows_local  # same files, sizes, mtimes, dimensions, dates, hashes
    assert fail_ray == fail_local  # every bad file is an error row with the local reason
    for path, v in vec_local.items():  # the local CPU path runs the ONNX tower, Ray workers torch:
        np.testing.assert_allclose(vec_ray[path], v, atol=1e-4)  # the bound test_imagetower.py holds them to
    for query in ("red circle", "blue square on green", "a yellow triangle"):
        a = Searcher(s_local).search(query, k=10)
        b = Searcher(s_ray).search(query, k=10)
        assert [h.path for h in a] == [h.path for h in b]
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-4)
    again = index_folders(tmp_path / "ray", [folder.root], executor=_executor())
    assert again.embedded == 0 and again.unchanged == local.added  # incremental, like the local path


def _count(index_dir) -> int:
    try:
        conn = sqlite3.connect(f"file:{index_dir / 'catalog.db'}?mode=ro", uri=True, timeout=1)
        try:
            return conn.execute("SELECT count(*) FROM images").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def test_driver_killed_and_rerun_indexes_every_image_exactly_once(cluster, tiny_checkpoint, synth_dir, tmp_path):
    folder = _images(synth_dir, tmp_path / "photos", 60)
    # a slow tail (big PNGs sort last): a fast machine cannot finish before the kill lands
    ramp = np.linspace(0, 255, 2400, dtype=np.uint8)
    for i in range(12):
        Image.fromarray(np.stack([np.add.outer(ramp, ramp * i)] * 3, -1)).save(folder / f"z_big_{i:02d}.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    idx = tmp_path / "idx"
    cmd = [sys.executable, "-m", "mmsearch", "index", str(folder), "--index", str(idx), "--checkpoint",
           str(tiny_checkpoint), "--ray", cluster.address, "--batch-size", "4", "--json"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while _count(idx) < 8 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = _count(idx)
    store = IndexStore.open(idx)
    left = pending.paths(store.catalog)
    assert 0 < committed < 72 and len(left) + committed + store.catalog.count_failures() == 73
    store.catalog.close()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["added"] == 72 - committed  # sends only what was still pending
    _, rows, failures, _ = _state(idx)
    assert sorted(rows) == sorted(str(p) for p in folder.glob("*.png"))  # every image, exactly once
    assert list(failures) == [str(folder / "broken.jpg")]


def test_worker_node_killed_mid_run_loses_nothing(cluster, tiny_checkpoint, synth_dir, tmp_path):
    folder = _images(synth_dir, tmp_path / "photos", 80)
    killed = []

    def kill_a_node(done, total, stage=None, **_):
        if done and not killed:  # after the first commit: both actors are busy
            killed.append(done)
            cluster.remove_node(cluster.workers[0], allow_graceful=False)

    try:
        s = index_folders(tmp_path / "idx", [folder], spec=ModelSpec(checkpoint=str(tiny_checkpoint)),
                          executor=_executor(batch_size=4), progress=kill_a_node)
    finally:
        if killed:  # give the module's cluster its second node back
            cluster.workers[0] = cluster.add_node(**NODE)
    assert killed and killed[0] < 80
    assert s.added == 80 and s.failed == 0
    _, rows, _, _ = _state(tmp_path / "idx")
    assert sorted(rows) == sorted(str(p) for p in folder.glob("*.png"))


def test_indexing_into_shards_on_ray_gives_the_local_shards(cluster, tiny_checkpoint, synth_dir, tmp_path):
    """Issue 30: `mmsearch index --shards DIR --ray`: the same executor runs each shard's plan, each against
    its own catalog; every photo lands in the shard its path routes to, as on the local path."""
    from mmsearch.indexing.sharded import index_sharded
    from mmsearch.storage.shardmap import ShardMap, shard_of

    folder = _images(synth_dir, tmp_path / "photos", 24)
    spec = ModelSpec(checkpoint=str(tiny_checkpoint))
    local = index_sharded(tmp_path / "local", [folder], count=2, spec=spec, precision="fp32")
    executor = _executor(batch_size=16)
    dist = index_sharded(tmp_path / "ray", [folder], count=2, spec=spec, executor=executor)
    assert (dist.added, dist.failed) == (local.added, local.failed) == (24, 0)
    assert executor.stats["tower"] == "onnx fp32"
    for i, name in enumerate(ShardMap.load(tmp_path / "ray").names):
        _, rows_ray, _, vec_ray = _state(ShardMap.load(tmp_path / "ray").folder(name))
        _, rows_local, _, vec_local = _state(ShardMap.load(tmp_path / "local").folder(name))
        assert rows_ray == rows_local and all(shard_of(p, 2) == i for p in rows_ray)
        for path, v in vec_local.items():
            np.testing.assert_allclose(vec_ray[path], v, atol=1e-4)
    again = index_sharded(tmp_path / "ray", [folder], executor=_executor())
    assert (again.embedded, again.unchanged) == (0, 24)


# ---- the worker and the driver's commit, without a cluster ----------------------------------------
def _batch(files):
    return {"path": np.array([str(f) for f in files], dtype=object),
            "size": np.array([os.stat(f).st_size if os.path.exists(f) else 0 for f in files]),
            "mtime_ns": np.array([os.stat(f).st_mtime_ns if os.path.exists(f) else 0 for f in files])}


def test_worker_rows_ok_bad_unreachable_and_a_model_it_cannot_load(tiny_checkpoint, synth_dir, tmp_path):
    from mmsearch.distributed.worker import EmbedActor
    from mmsearch.towers.encoder import load_encoder
    from mmsearch.media import load_image

    enc = load_encoder(ModelSpec(checkpoint=str(tiny_checkpoint)))
    good = sorted((synth_dir / "images").glob("*.png"))[:3]
    (tmp_path / "bad.jpg").write_bytes(b"junk")
    files = [*good, tmp_path / "bad.jpg", tmp_path / "not-on-this-node.jpg"]
    actor = EmbedActor(ModelSpec(checkpoint=str(tiny_checkpoint)).to_dict(), enc.fingerprint, enc.dim, device="cpu")
    out = actor(_batch(files))
    assert list(out["kind"]) == ["ok", "ok", "ok", "bad", "unreachable"]
    ref = enc.encode_images([load_image(str(p), min_size=enc.image_size) for p in good])
    np.testing.assert_allclose(out["embedding"][:3], ref, atol=1e-5)
    wrong = EmbedActor(ModelSpec(checkpoint=str(tiny_checkpoint)).to_dict(), "0" * 16, enc.dim, device="cpu")
    out = wrong(_batch(good))
    assert set(out["kind"]) == {"fatal"} and "differ from the index's" in out["error"][0]
    missing = EmbedActor(ModelSpec(checkpoint=str(tmp_path / "gone.pt")).to_dict(), enc.fingerprint, enc.dim)
    assert "readable at the same path on every node" in missing(_batch(good))["error"][0]


def test_commit_drops_a_second_answer_and_refuses_a_path_a_node_cannot_read(tiny_checkpoint, synth_dir, tmp_path):
    from mmsearch.distributed.worker import EmbedActor
    from mmsearch.errors import DistributedError
    from mmsearch.indexing.plan import plan_changes
    from mmsearch.indexing.stage import IndexSummary

    folder = _images(synth_dir, tmp_path / "photos", 6)
    first = sorted((synth_dir / "images").glob("*.png"))[-1]
    index_folders(tmp_path / "idx", [first], spec=ModelSpec(checkpoint=str(tiny_checkpoint)),
                  precision="fp32")  # a real FAISS file, in the precision the actors below run
    store = IndexStore.open(tmp_path / "idx")
    plan = plan_changes(store.catalog, [str(folder)], (), False)
    pending.record(store.catalog, plan.embed)
    actor = EmbedActor(store.spec.to_dict(), store.meta["fingerprint"], store.dim, device="cpu")
    batch = actor(_batch([f.path for f in plan.embed]))
    # CPU workers get the index's ONNX tower as files: same embeddings as the torch model, within 1e-4
    files = {p.name: p.read_bytes() for p in (tmp_path / "idx" / "image_tower").iterdir() if p.is_file()}
    onnx = EmbedActor(store.spec.to_dict(), store.meta["fingerprint"], store.dim, tower=files)(
        _batch([f.path for f in plan.embed]))
    assert list(onnx["kind"]) == ["ok"] * 6
    np.testing.assert_allclose(onnx["embedding"], batch["embedding"], atol=1e-4)
    wrong = EmbedActor(store.spec.to_dict(), "0" * 16, store.dim, tower=files)(_batch([plan.embed[0].path]))
    assert list(wrong["kind"]) == ["fatal"]
    twice = {k: np.concatenate([v, v]) for k, v in batch.items()}  # a retried task answering again
    vectors, summary, left = store.vectors_for_update(), IndexSummary(), {f.path: f for f in plan.embed}
    ex = _executor()
    assert ex._commit(store, plan, vectors, summary, twice, left) == 6
    assert ex._commit(store, plan, vectors, summary, batch, left) == 0
    assert store.catalog.count_images() == 7 == vectors.index.ntotal and summary.added == 6
    assert pending.paths(store.catalog) == set()
    # a worker that cannot see a file the driver sees: the filesystem is not shared, say so and stop
    extra = folder / "only-here.png"
    shutil.copy(next(folder.glob("*.png")), extra)
    plan = plan_changes(store.catalog, [str(folder)], (), False)
    row = {k: v[:1].copy() for k, v in batch.items()}
    row["path"][0], row["kind"][0], row["node"][0] = str(extra), "unreachable", "node-b"
    with pytest.raises(DistributedError, match="node node-b cannot read .*only-here.png.*same path on every node"):
        ex._commit(store, plan, vectors, summary, row, {f.path: f for f in plan.embed})
