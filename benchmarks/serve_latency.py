"""`mmsearch serve` latency against a real server process on loopback.

    python benchmarks/serve_latency.py [--sizes 10000,100000] [--model mmsearch-tiny] [--queries 200]

For each size: an index is made with the model (random weights: speed does not depend on them) over 64
photo-like 1600x1200 JPEGs, then padded with random unit vectors as catalog rows up to the size, so the
FAISS search, the catalog hydration and the text tower are all real. A `mmsearch serve` process is started
on 127.0.0.1, warmed up, and measured over HTTP keep-alive connections:
text-query latency (p50/p99) with 1 and 8 concurrent clients, and thumbnails/s cold (decoded, cached) and
cached. Prints a Markdown table and writes benchmarks/results/serve_latency.json. Targets: warm text p50
<= 15 ms at 100k, cached thumbnail p50 <= 5 ms, no errors under 8 clients.
"""
from __future__ import annotations

import argparse
import http.client
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from common import load_average, machine, machine_line, make_photos, markdown_table, write_results

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

WORDS = ("dog cat beach mountain city night red blue green car tree river snow boat bird flower sunset "
         "street house child bicycle forest table window bridge").split()
N_PHOTOS = 64


def queries(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 5)))) + f" {i}" for i in range(n)]


def build_index(work: Path, size: int, model: str) -> Path:
    from mmsearch.config import ModelSpec
    from mmsearch.indexing.pipeline import index_folders
    from mmsearch.storage.store import IndexStore

    photos = work / "photos"
    make_photos(photos, N_PHOTOS, (1600, 1200))
    idx = work / f"idx-{size}"
    shutil.rmtree(idx, ignore_errors=True)
    index_folders(idx, [photos], spec=ModelSpec(model=model, pretrained=None))
    store = IndexStore.open(idx)
    rng = np.random.default_rng(size)
    cat, dim, pad = store.catalog, store.dim, size - N_PHOTOS
    with cat.transaction():
        for start in range(0, pad, 5000):
            n = min(5000, pad - start)
            vecs = rng.standard_normal((n, dim)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            for j in range(n):
                i = start + j
                cat.insert_image(dict(path=str(photos / f"synthetic/{i // 1000:03d}/v{i:07d}.jpg"), size=1, mtime_ns=i,
                                      quick_hash=None, width=1600, height=1200, taken_at=None, ext=".jpg"), vecs[j])
        cat.bump_generation()
    store.reindex(store.factory)  # saves the FAISS file for this generation, as an indexing run does
    return idx


class Server:
    def __init__(self, idx: Path):
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(HERE.parent))
        self.proc = subprocess.Popen([sys.executable, "-m", "mmsearch", "serve", "--index", str(idx), "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        line = self.proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        if not m:
            raise SystemExit(f"server did not start: {line}{self.proc.stdout.read()}")
        self.port = int(m.group(1))

    def get(self, conn: http.client.HTTPConnection, url: str) -> tuple[int, float]:
        t = time.perf_counter()
        conn.request("GET", url)
        res = conn.getresponse()
        res.read()
        return res.status, (time.perf_counter() - t) * 1000

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def cpu(self) -> float:
        """CPU seconds the server process has used: per-request CPU does not depend on how busy the machine is."""
        with open(f"/proc/{self.proc.pid}/stat") as fh:
            return sum(int(v) for v in fh.read().rsplit(")", 1)[1].split()[11:13]) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


def pct(xs, p):
    return float(np.percentile(xs, p)) if xs else float("nan")


def run_clients(server: Server, urls: list[str], clients: int) -> dict:
    lat, errors = [], []
    lock = threading.Lock()

    def work(part):
        conn = server.connect()
        for u in part:
            try:
                status, ms = server.get(conn, u)
            except Exception as exc:  # a dropped connection is an error, not a crash of the benchmark
                status, ms = repr(exc), 0.0
                conn = server.connect()
            with lock:
                (lat.append(ms) if status == 200 else errors.append(status))
        conn.close()

    threads = [threading.Thread(target=work, args=(urls[c::clients],)) for c in range(clients)]
    cpu, t = server.cpu(), time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall, cpu = time.perf_counter() - t, server.cpu() - cpu
    return {"clients": clients, "requests": len(urls), "server_cpu_ms": round(cpu / len(urls) * 1000, 2),
            "p50_ms": round(pct(lat, 50), 2),
            "p99_ms": round(pct(lat, 99), 2), "per_s": round(len(lat) / wall, 1), "errors": len(errors)}


def thumbnails(server: Server, idx: Path) -> dict:
    from mmsearch.storage.catalog import Catalog

    cat = Catalog.open(idx, readonly=True)
    rows = cat.conn.execute("SELECT id, mtime_ns FROM images WHERE size > 1 ORDER BY id").fetchall()
    urls = [f"/api/images/{i}/thumb?size=256&v={m}" for i, m in rows]
    shutil.rmtree(idx / "thumbs", ignore_errors=True)
    out = {}
    for phase in ("cold", "cached"):
        conn = server.connect()
        lat, cpu, t = [], server.cpu(), time.perf_counter()
        for u in urls:
            status, ms = server.get(conn, u)
            assert status == 200, (status, u)
            lat.append(ms)
        wall, cpu = time.perf_counter() - t, server.cpu() - cpu
        out[phase] = {"n": len(urls), "server_cpu_ms": round(cpu / len(urls) * 1000, 2), "p50_ms": round(pct(lat, 50), 2), "p99_ms": round(pct(lat, 99), 2),
                      "per_s": round(len(urls) / wall, 1)}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000", help="Index sizes (images), comma-separated.")
    ap.add_argument("--model", default="mmsearch-tiny", help="Architecture (random weights).")
    ap.add_argument("--queries", type=int, default=200, help="Text queries per measurement.")
    ap.add_argument("--out", default=str(HERE / "results" / "serve_latency.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mmsearch-serve-bench-"))
    results = []
    try:
        for size in [int(s) for s in args.sizes.split(",")]:
            t = time.perf_counter()
            idx = build_index(work, size, args.model)
            built = time.perf_counter() - t
            server = Server(idx)
            try:
                conn = server.connect()
                for q in queries(20, seed=99):  # warm: vectors loaded, text tower read, caches hot
                    server.get(conn, "/api/search?k=24&q=" + q.replace(" ", "+"))
                conn.close()
                qs = ["/api/search?k=24&q=" + q.replace(" ", "+") for q in queries(args.queries)]
                one = run_clients(server, qs, 1)
                eight = run_clients(server, qs * 2, 8)
                thumbs = thumbnails(server, idx)
            finally:
                server.stop()
            results.append({"images": size, "build_s": round(built, 1), "text_1_client": one,
                            "text_8_clients": eight, "thumbnails": thumbs})
            shutil.rmtree(idx, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = load_average()
    report = {"model": args.model, "cpus": os.cpu_count(), "platform": platform.platform(),
              "loadavg_at_end": [round(x, 2) for x in load], "results": results, "machine": machine()}
    write_results(Path(args.out), report)
    print(f"model {args.model} (random weights), {os.cpu_count()} CPUs, load average at end "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(machine_line(report["machine"]) + "\n")
    rows = []
    for r in results:
        for name, m in (("text query, 1 client", r["text_1_client"]), ("text query, 8 clients", r["text_8_clients"]),
                        ("thumbnail 256 px, cold", r["thumbnails"]["cold"]),
                        ("thumbnail 256 px, cached", r["thumbnails"]["cached"])):
            rows.append((f"{r['images']:,}", name, f"{m['p50_ms']} ms", f"{m['p99_ms']} ms", m["per_s"],
                         f"{m['server_cpu_ms']} ms", m.get("errors", 0)))
    print(markdown_table(["images", "measure", "p50", "p99", "per s", "server CPU / request", "errors"], rows,
                         align="rlrrrrr"))


if __name__ == "__main__":
    main()
