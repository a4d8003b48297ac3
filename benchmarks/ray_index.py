"""Indexing on Ray vs locally: the same folder indexed by `mmsearch index` and on a local 2-node Ray
cluster, then again on the cluster with one worker node killed part-way.

    python benchmarks/ray_index.py [--n 2000] [--size 640x480] [--model mmsearch-tiny] [--kill-at 0.3]

The cluster is started by the script (a head without CPUs, like a real head, and two worker nodes of
--node-cpus each) on this one machine, so Ray cannot be faster here: what it measures is Ray's
overhead (target ≤ 20 %) and what a node loss costs. Both paths include loading the model; cluster
start-up is reported apart. Random weights: speed does not depend on them. Prints a Markdown table
and writes benchmarks/results/ray_index.json; the cluster is always shut down.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import load_average, machine, machine_line, make_photos, write_results

HERE = Path(__file__).parent
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `mmsearch index` does


def _run(folder: Path, spec, executor=None, on_progress=None) -> dict:
    from mmsearch.indexing.pipeline import index_folders
    from mmsearch.storage.store import IndexStore

    marks: list = []

    def progress(done, total, **kw):
        marks.append((time.perf_counter(), done))
        if on_progress:
            on_progress(done, total)

    idx = Path(tempfile.mkdtemp(prefix="mmsearch-raybench-"))
    try:
        t = time.perf_counter()
        s = index_folders(idx, [folder], spec=spec, executor=executor, progress=progress)
        total = time.perf_counter() - t
        first = next((t_ for t_, d in marks if d > 0), t + total) - t
        store = IndexStore.open(idx)
        rows, vectors = store.catalog.count_images(), store.image_vectors().ntotal
        dupes = store.catalog.conn.execute("SELECT count(*) - count(DISTINCT path) FROM images").fetchone()[0]
    finally:
        shutil.rmtree(idx, ignore_errors=True)
    # embed phase: local = decode + encode; Ray = connecting, starting the actors (model load) and the work
    return {"embedded": s.embedded, "failed": s.failed, "rows": rows, "vectors": vectors, "duplicates": dupes,
            "end_to_end_s": round(total, 2), "images_per_s": round(s.embedded / total, 2),
            "embed_phase_s": round(s.embed_seconds, 2), "first_commit_s": round(first, 2),
            "after_first_commit_images_per_s": round(s.embedded / (total - first), 2) if total > first else None,
            "marks": [(t_, d) for t_, d in marks if d > 0]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="number of photos")
    ap.add_argument("--size", default="640x480", help="photo size WxH")
    ap.add_argument("--model", default="mmsearch-tiny")
    ap.add_argument("--node-cpus", type=int, default=2, help="CPUs each worker node advertises")
    ap.add_argument("--kill-at", type=float, default=0.3, help="kill a worker node after this share is committed")
    ap.add_argument("--cache", type=Path, default=HERE / ".cache" / "photos_ray")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "ray_index.json")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE.parent))
    from mmsearch.config import ModelSpec
    from mmsearch.distributed import RayExecutor

    w, h = (int(v) for v in args.size.split("x"))
    folder = args.cache / f"{args.n}x{args.size}"
    make_photos(folder, args.n, (w, h))
    spec = ModelSpec(model=args.model, pretrained=None)
    # a private tower cache, warmed by a one-image index: both paths then start as a user's second index
    # does (the local path runs the exported ONNX tower on the CPU; Ray workers run torch)
    os.environ["MMSEARCH_CACHE_DIR"] = tempfile.mkdtemp(prefix="mmsearch-raybench-cache-")
    warm = Path(tempfile.mkdtemp(prefix="mmsearch-raybench-warm-"))
    shutil.copy(sorted(folder.glob("*.jpg"))[0], warm / "one.jpg")
    _run(warm, spec)
    load_before = load_average()

    local = _run(folder, spec)

    import ray
    from ray.cluster_utils import Cluster

    t = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0))
    try:
        nodes = [cluster.add_node(num_cpus=args.node_cpus) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level=logging.ERROR, log_to_driver=False)
        start_s = time.perf_counter() - t
        executor = RayExecutor("auto")
        dist = _run(folder, spec, executor)
        killed: dict = {}

        def kill(done, total):
            if not killed and done >= args.kill_at * total:
                killed.update(t=time.perf_counter(), done=done)
                cluster.remove_node(nodes[0], allow_graceful=False)

        recover = _run(folder, spec, RayExecutor("auto"), on_progress=kill)
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(warm, ignore_errors=True)
        shutil.rmtree(os.environ["MMSEARCH_CACHE_DIR"], ignore_errors=True)
    load_after = load_average()
    overhead = dist["end_to_end_s"] / local["end_to_end_s"] - 1
    # once the actors run: what Ray costs per image, start-up (actors loading the model) apart
    work_overhead = local["after_first_commit_images_per_s"] / dist["after_first_commit_images_per_s"] - 1
    for r in (local, dist, recover):
        r.pop("marks")
    result = {"photos": args.n, "size": args.size, "model": args.model, "node_cpus": args.node_cpus,
              "actors": executor.stats.get("actors"), "cluster_start_s": round(start_s, 2), "local": local,
              "ray": dist, "ray_node_killed": recover, "killed_after_images": killed.get("done"),
              "overhead_end_to_end": round(overhead, 3), "overhead_after_first_commit": round(work_overhead, 3),
              "recovery_cost_s": round(recover["end_to_end_s"] - dist["end_to_end_s"], 2), "target_overhead": 0.2,
              "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
              "cpu_count": os.cpu_count(), "python": platform.python_version(), "ray_version": ray.__version__,
              "machine": machine()}
    print(f"| {args.n} photos {args.size} JPEG, {args.model} | end to end s | images/s | first commit at s | images/s after it | rows (dupes) |")
    print("|---|---|---|---|---|---|")
    for name, r in (("local `mmsearch index`", local), (f"Ray, 2 nodes × {args.node_cpus} CPUs, "
                                                       f"{result['actors']} actors", dist),
                    (f"Ray, a node killed after {killed.get('done')} images", recover)):
        print(f"| {name} | {r['end_to_end_s']:.1f} | {r['images_per_s']:.1f} | {r['first_commit_s']:.1f} | {r['after_first_commit_images_per_s']} | "
              f"{r['rows']} ({r['duplicates']}) |")
    print(f"Ray overhead: {overhead:+.1%} end to end, {work_overhead:+.1%} after the first commit (target ≤ 20%); "
          f"node kill costs {result['recovery_cost_s']:+.1f} s, "
          f"cluster start {start_s:.1f} s (not counted)")
    print(f"load average before {result['loadavg_before']}, after {result['loadavg_after']} on {os.cpu_count()} cores")
    print(machine_line(result["machine"]))
    write_results(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
