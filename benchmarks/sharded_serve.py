"""One server process vs the Ray Serve application of the same vectors split into shards (issue 30).

    PYTHONPATH=. python benchmarks/sharded_serve.py [--n 1000000] [--shards 4] [--replicas 1] [--clients 1,8,32]

Synthetic CLIP-like vectors (mmsearch/datasets/synthvec.py, dim 512) in a model-less catalog, indexed
with `--factory auto` (as `mmsearch index` would), then split with `mmsearch shard split` logic into
--shards shards (each tuned by auto for its own size). Both servers answer the same HTTP queries over
keep-alive connections on loopback: `GET /api/search?id=...&k=10` (more like this: an indexed image as
the query, so no model is needed; the sharded router first fetches the query's stored vector from its
owning shard, one extra hop a text query replaces with the local text tower).

Measured for 1, 8 and 32 concurrent clients: p50/p99 latency, queries per second and errors; for the
Ray app, from the answers' own `timing`, where the router's time goes: the owner lookup (embed_ms), the
scatter (the slowest shard's in-replica search vs the time the router waited) and the merge; and for
sizing a cluster, each shard replica's resident memory and CPU per query, the router's, and the single
server's CPU per query.

On a 2-core machine this measures the OVERHEAD of sharding (processes, hops, serialisation), not a
speed-up: every shard and the clients share the same two cores, so QPS can only go down. A real cluster
gives each shard its own cores and memory; the per-shard numbers are what to size it with.

Prints a Markdown table and writes benchmarks/results/sharded_serve.json.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from common import load_average, machine, machine_line, markdown_table, write_results

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))


def build(work: Path, n: int, dim: int, shards: int) -> tuple[Path, Path, dict]:
    """(index, shard layout, timings): n synthetic vectors, auto-indexed, split into shards."""
    from mmsearch.datasets.synthvec import make_mixture, sample_images
    from mmsearch.indexing.sharded import split_index
    from mmsearch.storage.catalog import Catalog
    from mmsearch.storage.store import IndexStore

    t0 = time.perf_counter()
    mix = make_mixture(n_clusters=max(200, n // 500), dim=dim, seed=0)
    idx = work / "idx"
    cat = Catalog.create(idx, {"dim": dim, "fingerprint": "synthetic", "model": {"model": "synthetic"},
                               "factory": "auto", "roots": ["/img"]})
    step = 50_000
    for s in range(0, n, step):
        m = min(step, n - s)
        vecs = sample_images(mix, m, seed=1 + s // step)
        rows = [dict(path=f"/img/{i // 1000:04d}/{i:07d}.jpg", size=1, mtime_ns=i, ext=".jpg")
                for i in range(s, s + m)]
        with cat.transaction():
            cat.upsert_images(rows, vecs)
    with cat.transaction():
        cat.bump_generation()
    cat.close()
    t1 = time.perf_counter()
    store = IndexStore.open(idx)
    store.reindex("auto")
    t2 = time.perf_counter()
    split = split_index(idx, shards, work / "shards")
    t3 = time.perf_counter()
    return idx, work / "shards", {"generate_s": round(t1 - t0, 1), "index_s": round(t2 - t1, 1),
                                  "split_s": round(t3 - t2, 1), "structure": store.ann_info()["structure"],
                                  "shard_images": split["images"]}


def query_ids(idx: Path, root: Path, count: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """(ids in the single index, the same images' global ids in the layout)."""
    from mmsearch.storage.catalog import Catalog
    from mmsearch.storage.shardmap import ShardMap, global_id

    cat = Catalog.open(idx, readonly=True)
    top = cat.max_image_id()
    picks = np.random.default_rng(seed).choice(np.arange(1, top + 1), min(count, top), replace=False)
    paths = dict(cat.rows(picks.tolist()))
    smap = ShardMap.load(root)
    gids = {}
    for i, nm in enumerate(smap.names):
        c = Catalog.open(smap.folder(nm), readonly=True)
        for p in (r["path"] for r in paths.values()):
            lid = c.id_for_path(p)
            if lid is not None:
                gids[p] = global_id(lid, i, smap.n)
        c.close()
    keep = [int(i) for i in picks if paths[int(i)]["path"] in gids]
    return keep, [gids[paths[i]["path"]] for i in keep]


class Http:
    def __init__(self, port: int):
        self.port = port

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)

    @staticmethod
    def get(conn, url: str) -> tuple[int, float, dict]:
        t = time.perf_counter()
        conn.request("GET", url)
        res = conn.getresponse()
        body = res.read()
        ms = (time.perf_counter() - t) * 1000
        return res.status, ms, (json.loads(body) if res.status == 200 else {})


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        return sum(int(v) for v in fh.read().rsplit(")", 1)[1].split()[11:13]) / os.sysconf("SC_CLK_TCK")


def proc_rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_clients(http: Http, urls: list[str], clients: int) -> dict:
    lat, errors, partial, timings = [], [], 0, []
    lock = threading.Lock()

    def work(part):
        nonlocal partial
        conn = http.connect()
        for u in part:
            try:
                status, ms, body = http.get(conn, u)
            except Exception as exc:  # a dropped connection is an error, not a crash of the benchmark
                status, ms, body = repr(exc), 0.0, {}
                conn = http.connect()
            with lock:
                if status == 200:
                    lat.append(ms)
                    partial += bool(body.get("partial"))
                    if "timing" in body:
                        timings.append(body["timing"])
                else:
                    errors.append(status)
        conn.close()

    threads = [threading.Thread(target=work, args=(urls[c::clients],)) for c in range(clients)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    out = {"clients": clients, "requests": len(urls), "p50_ms": round(pct(lat, 50), 2), "p99_ms": round(pct(lat, 99), 2),
           "qps": round(len(lat) / wall, 1), "errors": len(errors), "partial": partial}
    if timings:
        out["timing_p50"] = {k: round(pct([t[k] for t in timings], 50), 3) for k in timings[0]}
        # the router's own share: everything but the owner lookup and the slowest shard's search itself
        own = [t["total_ms"] - t["embed_ms"] - t["slowest_shard_ms"] for t in timings]
        out["router_added_p50_ms"] = round(pct(own, 50), 3)
    return out


def pct(xs, p):
    return float(np.percentile(xs, p)) if len(xs) else float("nan")


def measure(http: Http, urls: list[str], clients: list[int], pid=None) -> list[dict]:
    conn = http.connect()
    for u in urls[:30]:  # warm: vectors mapped, pages in the cache, connections up
        http.get(conn, u)
    conn.close()
    rows = []
    for c in clients:
        cpu = proc_cpu(pid) if pid else None
        r = run_clients(http, urls * max(1, c // 8), c)
        if pid:
            r["server_cpu_ms_per_query"] = round((proc_cpu(pid) - cpu) / r["requests"] * 1000, 3)
        rows.append(r)
    return rows


def single_server(idx: Path, urls: list[str], clients: list[int]) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "mmsearch", "serve", "--index", str(idx), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line = proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        if not m:
            raise SystemExit(f"server did not start: {line}{proc.stdout.read()}")
        time.sleep(3)  # its warm-up thread (no text tower here: it gives up) is done
        rows = measure(Http(int(m.group(1))), urls, clients, pid=proc.pid)
        return {"rows": rows, "rss_mb": round(proc_rss(proc.pid) / 2**20, 1)}
    finally:
        proc.terminate()
        proc.wait(timeout=20)


SERVE_MODES = {"default": {}, "throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}}


def ray_app(root: Path, urls: list[str], clients: list[int], replicas: int, replica_cpus: float,
            mode: str = "default") -> dict:
    """The Ray app on a local cluster started here; `mode` sets Ray Serve's environment for every process
    of that cluster (they inherit this one's), as `RAY_SERVE_THROUGHPUT_OPTIMIZED=1 ray start` would."""
    import logging

    import ray

    from mmsearch.distributed.serving import deploy, stop

    saved = {k: os.environ.get(k) for k in SERVE_MODES["throughput"]}
    for k in saved:
        os.environ.pop(k, None)
    os.environ.update(SERVE_MODES[mode])

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    os.chdir(ROOT)  # Ray workers import mmsearch from the driver's working directory
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    try:
        t = time.perf_counter()
        url = deploy("auto", root, port=port, replicas=replicas, replica_cpus=replica_cpus)
        started = time.perf_counter() - t
        http = Http(port)
        rows = measure(http, urls, clients)
        conn = http.connect()
        conn.request("GET", "/api/info")
        info = json.loads(conn.getresponse().read())
        conn.close()
        shards = [{k: s.get(k) for k in ("name", "images", "rss_bytes", "cpu_ms_per_query", "queries")}
                  for s in info["shards"]]
        stop()
        return {"mode": mode, "env": SERVE_MODES[mode], "url": url, "deploy_s": round(started, 1), "rows": rows,
                "shards": shards, "router": info.get("router")}
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="Vectors (images).")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--replicas", type=int, default=1, help="Replicas per shard (on 2 cores more only add processes).")
    ap.add_argument("--replica-cpus", type=float, default=0.1, help="CPUs Ray reserves per replica.")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--queries", type=int, default=240, help="Distinct query images (each run sends at least this many).")
    ap.add_argument("--modes", default="default,throughput",
                    help=f"Ray Serve modes to run the app in, of {','.join(SERVE_MODES)} "
                         "(throughput: RAY_SERVE_THROUGHPUT_OPTIMIZED=1 on every Ray process).")
    ap.add_argument("--out", default=str(HERE / "results" / "sharded_serve.json"))
    ap.add_argument("--keep", action="store_true", help="Keep the work folder.")
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    work = Path(tempfile.mkdtemp(prefix="mmsearch-sharded-bench-"))
    try:
        idx, root, built = build(work, args.n, args.dim, args.shards)
        print(json.dumps(built), flush=True)
        single_ids, gids = query_ids(idx, root, args.queries)
        single = single_server(idx, [f"/api/search?k=10&id={i}" for i in single_ids], clients)
        print(json.dumps(single), flush=True)
        sharded = {}
        for mode in args.modes.split(","):
            sharded[mode] = ray_app(root, [f"/api/search?k=10&id={g}" for g in gids], clients, args.replicas,
                                    args.replica_cpus, mode)
            print(json.dumps(sharded[mode]), flush=True)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report = {"n": args.n, "dim": args.dim, "shards": args.shards, "replicas": args.replicas, "built": built,
              "single": single, "ray": sharded, "load_at_end": load_average(), "machine": machine(),
              "note": "2 shared cores: this is sharding's overhead, not a speed-up"}
    write_results(Path(args.out), report)
    print(render(report))


def render(r: dict) -> str:
    rows = []
    apps = r["ray"] if "rows" not in r["ray"] else {"default": r["ray"]}  # older results: one mode
    parts = [(f"one process ({r['built']['structure']})", r["single"])]
    parts += [(f"Ray Serve {mode}, {r['shards']} shards x {r['replicas']}", app) for mode, app in apps.items()]
    for name, part in parts:
        for m in part["rows"]:
            rows.append((name, m["clients"], m["p50_ms"], m["p99_ms"], m["qps"], m["errors"], m["partial"],
                         m.get("router_added_p50_ms", ""), m.get("server_cpu_ms_per_query", "")))
    lines = [f"n = {r['n']:,} vectors of dim {r['dim']}; queries by indexed image (k=10) over HTTP keep-alive on "
             f"loopback; load at end {' '.join(f'{v:.2f}' for v in r['load_at_end'])}",
             machine_line(r["machine"]), "",
             markdown_table(["server", "clients", "p50 ms", "p99 ms", "QPS", "errors", "partial",
                             "router added p50 ms", "server CPU ms/query"], rows, align="lrrrrrrrr"), "",
             "On 2 cores this is the overhead of sharding, not a speed-up: the shards, the router and the clients "
             "share the same cores. Ray Serve throughput: every Ray process started with "
             "RAY_SERVE_THROUGHPUT_OPTIMIZED=1.", "", "Sizing (one replica of each shard):"]
    first = next(iter(apps.values()))
    for s in first["shards"]:
        lines.append(f"- {s['name']}: {s['images']:,} images, resident {s['rss_bytes'] / 2**20:.0f} MB, "
                     f"{s['cpu_ms_per_query']} ms CPU per query")
    for mode, app in apps.items():
        rt = app.get("router") or {}
        if rt:
            lines.append(f"- router ({mode}): resident {rt['rss_bytes'] / 2**20:.0f} MB, {rt['cpu_ms_per_query']} ms "
                         f"CPU per query")
    lines.append(f"- one process: resident {r['single']['rss_mb']} MB for all {r['n']:,} images")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
