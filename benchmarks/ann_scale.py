"""ANN at scale on synthetic CLIP-like vectors (mmsearch/datasets/synthvec.py): structures, memory, latency, recall.

    PYTHONPATH=. python benchmarks/ann_scale.py --n 100000              # every structure, in process
    PYTHONPATH=. python benchmarks/ann_scale.py --n 1000000 --cli       # + import, fresh-process search, dupes

Per structure: build time, bytes/vector (RSS growth of a fresh process reading the file, and with
IO_FLAG_MMAP), single-query p50/p99 (one thread per query, as a CLI query runs), recall@10 against exact
search for image-like and text-like queries at the tuned search parameters, and at a fixed nprobe (16)
to show text-like queries are the harder ones. Search parameters of every IVF are tuned the way
`--factory auto` tunes them: on stand-in text-like queries made from image vectors only (ann.py), so the
text-like recall column is an honest check of the stand-in. With --cli, the index is built through
`mmsearch export`-format shards and `mmsearch import` (ViT-B-32 with random weights: dim 512, no
download), then `mmsearch search` and `mmsearch dupes` are timed as fresh processes.
Prints a markdown table and writes benchmarks/results/ann_scale.json (merged per n).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import load_average, machine, machine_line, write_json

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmsearch.storage import ann  # noqa: E402
from mmsearch.datasets.synthvec import exact_topk, image_queries, make_mixture, sample_images, text_queries  # noqa: E402
from mmsearch.storage.vectors import VectorIndex  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "ann_scale.json"
K = 10
N_QUERIES = 300
FIXED_NPROBE = 16

_PROBE = r"""
import json, sys, time, resource
import numpy as np, faiss
faiss.omp_set_num_threads(1)
def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096
path, mmap, params = sys.argv[1], sys.argv[2] == '1', json.loads(sys.argv[3])
q = np.load(sys.argv[4])
r0 = rss(); t = time.perf_counter()
idx = faiss.read_index(path, (faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY) if mmap else 0)
load = time.perf_counter() - t; r1 = rss()
inner = faiss.downcast_index(idx.index) if isinstance(idx, faiss.IndexIDMap) else idx
if 'nprobe' in params: faiss.extract_index_ivf(inner).nprobe = params['nprobe']
if 'efSearch' in params: faiss.downcast_index(inner).hnsw.efSearch = params['efSearch']
ts = []
for x in q:
    t = time.perf_counter(); idx.search(x[None], 10); ts.append(time.perf_counter() - t)
print(json.dumps({"load_s": load, "rss_load": r1 - r0, "rss_after_queries": rss() - r0,
                  "p50_ms": 1000 * float(np.median(ts)), "p99_ms": 1000 * float(np.percentile(ts, 99))}))
"""


# A fresh process's own cost on the index side, without the text tower: imports, opening the catalog,
# mapping the vector index, one search (with the filter path's bookkeeping) and hydrating its rows.
_INDEX_SIDE = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from mmsearch.search.query import Searcher
from mmsearch.storage.store import IndexStore
t1 = time.perf_counter()
store = IndexStore.open(sys.argv[1]); store.catalog.has_images()
t2 = time.perf_counter()
index = store.image_vectors()
t3 = time.perf_counter()
q = np.load(sys.argv[2])
searcher = Searcher(store)
_, ids = searcher._search_vectors(q[0], 10, None)
rows = store.catalog.rows(ids[0])
t4 = time.perf_counter()
ts = []
for x in q[1:]:
    t = time.perf_counter(); searcher._search_vectors(x, 10, None); ts.append(time.perf_counter() - t)
print(json.dumps({"imports_s": round(t1 - t0, 3), "open_catalog_s": round(t2 - t1, 3),
                  "map_vectors_s": round(t3 - t2, 3), "first_search_and_rows_s": round(t4 - t3, 3),
                  "next_searches_p50_ms": round(1000 * float(np.median(ts)), 2), "rows": len(rows)}))
"""


def load_avg() -> str:
    return " ".join(f"{v:.2f}" for v in load_average())


def recall(truth, found) -> float:
    return round(ann.recall_at_k(truth, found), 4)


def probe(path: Path, params: dict, queries_file: Path, mmap: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, str(path), "1" if mmap else "0", json.dumps(params),
                          str(queries_file)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(name: str, factory: str, x, qi, qt, gi, gt, work: Path, stand_in) -> dict:
    n = len(x)
    t = time.perf_counter()
    if factory.endswith(".faiss"):  # an index `mmsearch import` built (and tuned) in the CLI part
        index = VectorIndex.load(Path(factory), VectorIndex.sidecar(Path(factory))["generation"], mmap=False)
        ann_info = VectorIndex.sidecar(Path(factory))["ann"]
        row = {"structure": name, "factory": ann_info["structure"], "n": n, "build_s": ann_info["build_seconds"],
               "params": index.params, "stand_in_recall": ann_info["recall_heldout"], "built_by": "mmsearch import"}
        return _evaluate(row, index, qi, qt, gi, gt, work, ids_offset=1)
    if factory == "Flat":
        index = VectorIndex.build("Flat", x.shape[1], np.arange(n), x)
    else:
        nlist = ann._nlist_of(factory)
        rng = np.random.default_rng(0)
        train = x[rng.choice(n, min(n, max(10_000, ann.TRAIN_PER_LIST * nlist)), replace=False)] if nlist else x[:20000]
        index = VectorIndex.create(factory, x.shape[1], train)
        for s in range(0, n, 100_000):
            index.add(np.arange(s, min(n, s + 100_000)), x[s:s + 100_000])
    build_s = time.perf_counter() - t
    row = {"structure": name, "factory": factory, "n": n, "build_s": round(build_s, 1)}
    if factory != "Flat":
        t = time.perf_counter()
        tuned = ann.tune(index, stand_in, exact_topk(x, stand_in, K))
        row.update(tune_s=round(time.perf_counter() - t, 1), params=tuned["params"],
                   stand_in_recall=tuned["recall_heldout"])
        if index.nlist:
            keep = dict(index.params)
            index.set_params(nprobe=FIXED_NPROBE)
            row[f"image_recall_nprobe{FIXED_NPROBE}"] = recall(gi, index.search(qi, K)[1])
            row[f"text_recall_nprobe{FIXED_NPROBE}"] = recall(gt, index.search(qt, K)[1])
            index.set_params(**keep)
    return _evaluate(row, index, qi, qt, gi, gt, work)


def _evaluate(row, index, qi, qt, gi, gt, work: Path, ids_offset: int = 0) -> dict:
    """Recall at the tuned params (and at FIXED_NPROBE when not done yet), then memory and latency of
    the saved file read by a fresh process, in RAM and memory-mapped."""
    n, name = index.ntotal, row["structure"]
    if index.nlist and f"text_recall_nprobe{FIXED_NPROBE}" not in row:
        keep = dict(index.params)
        index.set_params(nprobe=FIXED_NPROBE)
        row[f"image_recall_nprobe{FIXED_NPROBE}"] = recall(gi, index.search(qi, K)[1] - ids_offset)
        row[f"text_recall_nprobe{FIXED_NPROBE}"] = recall(gt, index.search(qt, K)[1] - ids_offset)
        index.set_params(**keep)
    row["image_recall"] = recall(gi, index.search(qi, K)[1] - ids_offset)
    row["text_recall"] = recall(gt, index.search(qt, K)[1] - ids_offset)
    path = work / f"{name.replace(' ', '_')}.faiss"
    index.save(path, 0)
    row["file_bytes_per_vector"] = round(path.stat().st_size / n, 1)
    qf = work / "qt.npy"
    np.save(qf, qt[:100] if row["factory"] == "Flat" and n > 200_000 else qt)  # Flat at 1M: ~0.1 s a query
    ram = probe(path, index.params, qf, mmap=False)
    mm = probe(path, index.params, qf, mmap=True)
    row.update(bytes_per_vector_rss=round(ram["rss_load"] / n, 1), p50_ms=round(ram["p50_ms"], 2),
               p99_ms=round(ram["p99_ms"], 2), load_s=round(ram["load_s"], 3),
               mmap_load_s=round(mm["load_s"], 3), mmap_rss_after_300_queries_mb=round(mm["rss_after_queries"] / 2**20, 1),
               mmap_p50_ms=round(mm["p50_ms"], 2))
    row["load_avg"] = load_avg()
    del index
    return row


def structures_for(n: int) -> list[tuple[str, str]]:
    p = ann.plan(n, 512)
    auto = p.factory
    nlist = ann._nlist_of(auto) or 1024
    # past PQ_FROM auto is the coarse-code tier, measured with its catalog by coarse_tier(); Flat at 10M is
    # 20 GB and seconds a query
    out = ([] if n > 2_000_000 else [("Flat", "Flat")]) + ([] if p.refine else [(f"auto = {auto}", auto)])
    if n <= 200_000:  # the alternatives, measured where they are affordable to build
        out += [(f"IVF{nlist},PQ64", f"IVF{nlist},PQ64"), (f"IVF{nlist},SQ4", f"IVF{nlist},SQ4"),
                ("HNSW32", "HNSW32")]
    return out


def cli_part(x, qt, gt, work: Path, out: dict) -> None:
    """Export-format shards -> `mmsearch import` -> fresh-process search and dupes (ViT-B-32, random)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmsearch.config import ModelSpec
    from mmsearch.towers.encoder import load_encoder
    from mmsearch.storage.exchange import MODEL_RECORD

    n = len(x)
    shards = work / "shards"
    (shards / "img_emb").mkdir(parents=True, exist_ok=True)
    (shards / "metadata").mkdir(parents=True, exist_ok=True)
    # a real folder behind the catalog (empty files: `index` only stats them when nothing changed), so
    # an unchanged re-run of `mmsearch index` over 1M files can be timed and its memory measured
    photos = work / "photos"
    step = 250_000
    for j, s in enumerate(range(0, n, step)):
        np.save(shards / "img_emb" / f"img_emb_{j}.npy", x[s:s + step])
        paths = [str(photos / f"{i // 1000:04d}" / f"{i:07d}.jpg") for i in range(s, min(n, s + step))]
        for i, p in zip(range(s, min(n, s + step)), paths):
            if i % 1000 == 0:
                os.makedirs(os.path.dirname(p), exist_ok=True)
            open(p, "wb").close()
        pq.write_table(pa.table({"image_path": paths}), shards / "metadata" / f"metadata_{j}.parquet")
    enc = load_encoder(ModelSpec(model="ViT-B-32", pretrained=None))
    (shards / MODEL_RECORD).write_text(json.dumps({
        "model": enc.spec.to_dict(), "arch": enc.arch, "fingerprint": enc.fingerprint, "dim": enc.dim,
        "image_size": enc.image_size, "text_width": enc.text_width, "vision_width": enc.vision_width}))
    del enc
    idx = work / "idx"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    mm = [sys.executable, "-m", "mmsearch"]

    def run(*args):
        t = time.perf_counter()
        res = subprocess.run([*mm, *args], capture_output=True, text=True, env=env)
        if res.returncode:
            raise RuntimeError(res.stderr)
        return time.perf_counter() - t, res.stdout

    def run_rss(*args):
        """(seconds, peak RSS in MB, stdout) of a fresh `mmsearch` process (GNU time's %M)."""
        rss_file = work / "rss.txt"
        t = time.perf_counter()
        res = subprocess.run(["/usr/bin/time", "-o", str(rss_file), "-f", "%M", *mm, *args], capture_output=True,
                             text=True, env=env)
        if res.returncode:
            raise RuntimeError(res.stderr)
        return round(time.perf_counter() - t, 3), round(int(rss_file.read_text().split()[-1]) / 1024, 1), res.stdout

    out["import_s"], out["import_output"] = run("import", str(shards), "--index", str(idx))
    out["import_s"] = round(out["import_s"], 1)
    meta = json.loads(run("info", "--index", str(idx), "--json")[1])
    out["info"] = run("info", "--index", str(idx))[1]
    out["ann"] = meta["ann"]
    out["catalog_bytes_per_image"] = round((idx / "catalog.db").stat().st_size / n, 1)
    times = []
    for q in ("a red circle on a beach", "two dogs", "a photo of a city at night"):
        times.append(run("search", q, "--index", str(idx), "-k", "10")[0])
    out["fresh_search_s"] = [round(t, 3) for t in times]
    out["fresh_search_output"] = run("search", "a red circle on a beach", "--index", str(idx), "-k", "5")[1]
    # the catalog at 1M: bounded memory for an unchanged re-run, info, errors, and filtered searches
    # --no-ocr: the imported index has no words yet, and OCR (on by default) would back-fill them from
    # the 1M empty files, one failure each: the first AVX2 run measured that (476 s), not a re-run's plan
    t, rss, stdout = run_rss("index", str(photos), "--index", str(idx), "--no-ocr", "--json")
    summary = json.loads(stdout.strip().splitlines()[-1])
    out["unchanged_rerun"] = {"s": t, "peak_rss_mb": rss, "unchanged": summary["unchanged"],
                              "embedded": summary["embedded"], "removed": summary["removed"]}
    for name, args in (("info", ("info", "--index", str(idx))), ("errors", ("errors", "--index", str(idx))),
                       ("search", ("search", "two dogs", "--index", str(idx))),
                       ("search --under (0.1 %)", ("search", "two dogs", "--index", str(idx), "--under",
                                                   str(photos / "0001"))),
                       ("search --ext png (0 %)", ("search", "two dogs", "--index", str(idx), "--ext", "png")),
                       ("search --ext jpg (100 %)", ("search", "two dogs", "--index", str(idx), "--ext", "jpg"))):
        t, rss, stdout = run_rss(*args)
        out.setdefault("fresh_process", {})[name] = {"s": t, "peak_rss_mb": rss, "lines": len(stdout.splitlines())}
    np.save(work / "qt.npy", qt[:20])
    side = subprocess.run([sys.executable, "-c", _INDEX_SIDE, str(idx), str(work / "qt.npy")], capture_output=True,
                          text=True, env=env, check=True)
    out["fresh_index_side"] = json.loads(side.stdout.strip().splitlines()[-1])
    base = subprocess.run([sys.executable, "-c", "import numpy, faiss"], capture_output=True, env=env)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import numpy, faiss"], capture_output=True, env=env, check=base.returncode == 0)
    out["python_numpy_faiss_import_s"] = round(time.perf_counter() - t, 3)
    t, dupes_out = run("dupes", "--index", str(idx), "--json")
    out["dupes_s"] = round(t, 1)
    groups = [json.loads(line) for line in dupes_out.splitlines() if line.strip()]
    out["dupes_groups"] = len(groups)
    out["dupes_images"] = sum(g["size"] for g in groups)
    out["load_avg_cli"] = load_avg()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--cli", action="store_true", help="Also time import, fresh-process search and dupes.")
    ap.add_argument("--only", default=None, help="Comma-separated structure names to run (default: all for n); "
                                                 "'tier' is the 10M tier through a catalog.")
    ap.add_argument("--keep", action="store_true", help="Keep the work folder (index, shards) and say where.")
    ap.add_argument("--dupes", type=float, default=0.01, help="Share of images planted as near-duplicates.")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ann_scale_"))
    t0 = time.perf_counter()
    mix = make_mixture(n_clusters=max(200, args.n // 500), dim=512, seed=0)
    x = sample_images(mix, args.n, seed=1)
    rng = np.random.default_rng(9)  # planted near-duplicates: edited copies of existing images
    m = int(args.n * args.dupes)
    src, dst = rng.choice(args.n, m, replace=False), rng.choice(args.n, m, replace=False)
    x[dst] = x[src] + rng.standard_normal((m, 512)).astype(np.float32) * 0.008
    x[dst] /= np.linalg.norm(x[dst], axis=1, keepdims=True)
    qi, qt = image_queries(mix, N_QUERIES, seed=2), text_queries(mix, N_QUERIES, seed=3)
    gi, gt = exact_topk(x, qi, K), exact_topk(x, qt, K)
    stand_in = ann.stand_in_queries(x[rng.choice(args.n, min(args.n, 200_000), replace=False)], ann.TUNE_QUERIES)
    result = {"n": args.n, "dim": 512, "generate_s": round(time.perf_counter() - t0, 1), "load_avg_start": load_avg(),
              "top1_similarity": {"image_queries": float(np.mean(np.sum(qi * x[gi[:, 0]], 1))),
                                  "text_queries": float(np.mean(np.sum(qt * x[gt[:, 0]], 1)))},
              "rows": []}
    wanted = set(args.only.split(",")) if args.only else None
    structures = structures_for(args.n)
    if args.cli:  # the auto structure is the one `mmsearch import` builds: measure that file, build once
        cli = {}
        cli_part(x, qt, gt, work, cli)
        result["cli"] = cli
        print(json.dumps({k: v for k, v in cli.items() if not k.endswith("output") and k != "info"}), flush=True)
        structures = [(name, str(work / "idx" / "vectors.faiss") if name.startswith("auto") else f)
                      for name, f in structures]
    for name, factory in structures:
        if wanted and factory not in wanted and name not in wanted and not name.startswith("auto"):
            continue
        row = measure(name, factory, x, qi, qt, gi, gt, work, stand_in)
        print(json.dumps(row), flush=True)
        result["rows"].append(row)
    if not wanted or "tier" in wanted:
        result["tier"] = coarse_tier(x, qi, qt, gi, gt, work)
        print(json.dumps(result["tier"]), flush=True)
    result["ten_million_on_paper"] = ten_million()
    result["machine"] = machine()
    print(render(result))
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    data[str(args.n)] = result  # one entry per n, each with the machine it ran on
    write_json(RESULTS, data, indent=1)
    if args.keep:
        print(f"kept {work}")
    else:
        subprocess.run(["rm", "-rf", str(work)])


def ten_million(n: int = 10_000_000, dim: int = 512) -> dict:
    p = ann.plan(n, dim)
    nlist = ann._nlist_of(p.factory)
    return {"structure": p.factory, "codes_gb": round(n * dim / 8 / 1e9, 2), "ids_gb": round(n * 8 / 1e9, 2),
            "quantizer_mb": round(nlist * dim * 4 / 1e6, 1), "bytes_per_vector": p.bytes_per_vector,
            "ram_gb_in_memory": round(n * p.bytes_per_vector / 1e9, 2), "sq8_gb": round(n * (dim + 8) / 1e9, 2),
            "flat_gb": round(n * dim * 4 / 1e9, 1),
            "refine_note": "candidates re-scored from the catalog's float32 embeddings (read per query, "
                           f"refine x 10 rows): a float16 refine file would add {n * dim * 2 / 1e9:.1f} GB"}


_TIER_FRESH = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from mmsearch.storage.store import IndexStore
store = IndexStore.open(sys.argv[1])
index = store.image_vectors()
q = np.load(sys.argv[2])[:1]
scores, ids = index.search(q, 10)
rows = store.catalog.rows(ids[0].tolist())
t1 = time.perf_counter()
print(json.dumps({"first_query_s": round(t1 - t0, 3), "rows": len(rows),
                  "rss_mb": int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20}))
"""

_TIER_RSS = r"""
import json, sys
import faiss
def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096
r0 = rss()
idx = faiss.read_index(sys.argv[1])
print(json.dumps({"rss_load": rss() - r0, "ntotal": idx.ntotal}))
"""


def coarse_tier(x, qi, qt, gi, gt, work: Path) -> dict:
    """The 10M tier through a real catalog (model-less, the vectors as rows), as `auto` builds it past
    PQ_FROM: build, resident bytes per vector (a fresh process reading the FAISS file; the catalog, read
    for re-scoring, is not resident), recall@10 with the catalog re-scoring, warm p50/p99, a fresh
    process's first query, and the disk bytes per image of the whole index."""
    import faiss

    from mmsearch.storage.catalog import Catalog
    from mmsearch.storage.store import IMAGE_VECTORS, IndexStore

    n, dim = x.shape
    nlist = next((nl for t, nl in ann.IVF_TIERS if n <= t), ann.IVF_TIERS[-1][1]) if n > ann.PQ_FROM else \
        min(ann.IVF_TIERS[-2][1], 2 ** int(np.log2(max(64, n // 100))))  # below the tier: ~100 vectors a list
    factory = ann.fast_scan(nlist, dim)
    idx = work / "tier"
    t = time.perf_counter()
    cat = Catalog.create(idx, {"dim": dim, "fingerprint": "synthetic", "model": {"model": "synthetic"},
                               "factory": factory})
    for s in range(0, n, 50_000):
        rows = [dict(path=f"/img/{i // 1000:05d}/{i:08d}.jpg", size=1, mtime_ns=i, ext=".jpg")
                for i in range(s, min(n, s + 50_000))]
        with cat.transaction():
            cat.upsert_images(rows, x[s:s + 50_000])
    with cat.transaction():
        cat.bump_generation()
    cat.close()
    catalog_s = time.perf_counter() - t
    store = IndexStore.open(idx)
    store.reindex(factory)
    info = store.ann_info()
    index = store.image_vectors()
    row = {"structure": f"10M tier = {factory} + catalog re-scoring", "factory": factory, "n": n,
           "catalog_s": round(catalog_s, 1), "build_s": info["build_seconds"], "params": info["params"],
           "stand_in_recall": info["recall_heldout"]}
    row["image_recall"] = recall(gi, index.search(qi, K)[1] - 1)
    row["text_recall"] = recall(gt, index.search(qt, K)[1] - 1)
    faiss.omp_set_num_threads(1)
    ts = []
    for q in qt:
        t = time.perf_counter()
        index.search(q[None], K)
        ts.append(time.perf_counter() - t)
    row.update(p50_ms=round(1000 * float(np.median(ts)), 2), p99_ms=round(1000 * float(np.percentile(ts, 99)), 2))
    res = subprocess.run([sys.executable, "-c", _TIER_RSS, str(idx / IMAGE_VECTORS)], capture_output=True,
                         text=True, check=True)
    row["bytes_per_vector_rss"] = round(json.loads(res.stdout)["rss_load"] / n, 1)
    np.save(work / "tier_q.npy", qt[:1])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    fresh = []
    for _ in range(3):
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", _TIER_FRESH, str(idx), str(work / "tier_q.npy")],
                             capture_output=True, text=True, check=True, env=env)
        fresh.append({"process_s": round(time.perf_counter() - t, 3), **json.loads(out.stdout.strip().splitlines()[-1])})
    row["fresh_process"] = fresh
    files = {p.name: p.stat().st_size for p in idx.iterdir() if p.is_file()}
    row["disk_bytes_per_image"] = round(sum(files.values()) / n, 1)
    row["disk_bytes_per_image_by_file"] = {k: round(v / n, 1) for k, v in sorted(files.items())}
    row["float16_refine_file_would_add_bytes_per_image"] = dim * 2
    row["load_avg"] = load_avg()
    return row


def render(r: dict) -> str:
    lines = [f"n = {r['n']:,}, dim 512, {N_QUERIES} image-like + {N_QUERIES} text-like queries; load average at start "
             f"{r['load_avg_start']}", *([machine_line(r["machine"])] if "machine" in r else []),
             "", "| structure | build s | bytes/vec (RSS) | p50 ms | p99 ms | params | recall@10 image | recall@10 text "
             f"| image / text @nprobe {FIXED_NPROBE} | mmap: load s, RSS after 300 q |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for w in r["rows"]:
        fixed = (f"{w[f'image_recall_nprobe{FIXED_NPROBE}']:.3f} / {w[f'text_recall_nprobe{FIXED_NPROBE}']:.3f}"
                 if f"image_recall_nprobe{FIXED_NPROBE}" in w else "")
        lines.append(f"| {w['structure']} | {w['build_s']} | {w['bytes_per_vector_rss']} | {w['p50_ms']} | "
                     f"{w['p99_ms']} | {w.get('params') or 'exact'} | {w['image_recall']:.3f} | "
                     f"{w['text_recall']:.3f} | {fixed} | {w['mmap_load_s']}, {w['mmap_rss_after_300_queries_mb']} MB |")
    if "tier" in r:
        t = r["tier"]
        f = t["fresh_process"]
        lines += ["", f"**{t['structure']}**: build {t['build_s']} s (catalog rows {t['catalog_s']} s), params {t['params']}; "
                      f"resident {t['bytes_per_vector_rss']} B/vector; recall@10 text {t['text_recall']:.3f}, image "
                      f"{t['image_recall']:.3f}; warm p50 {t['p50_ms']} ms, p99 {t['p99_ms']} ms; fresh-process first "
                      f"query {min(x['first_query_s'] for x in f)} s (whole process {min(x['process_s'] for x in f)} s); "
                      f"disk {t['disk_bytes_per_image']} B/image {t['disk_bytes_per_image_by_file']} "
                      f"(a float16 refine file would add {t['float16_refine_file_would_add_bytes_per_image']}); "
                      f"load {t['load_avg']}"]
    if "cli" in r:
        c = r["cli"]
        lines += ["", f"import: {c['import_s']} s; fresh-process search: {c['fresh_search_s']} s "
                      f"(python + numpy + faiss imports alone: {c['python_numpy_faiss_import_s']} s); dupes: "
                      f"{c['dupes_s']} s, {c['dupes_groups']} groups; catalog {c['catalog_bytes_per_image']} B/image; "
                      f"load average {c['load_avg_cli']}", f"fresh process, index side: {c['fresh_index_side']}"]
        if "unchanged_rerun" in c:
            u = c["unchanged_rerun"]
            lines += ["", "| fresh process at this size | s | peak RSS MB |", "|---|---|---|",
                      f"| `index` of the unchanged {u['unchanged']:,}-file folder | {u['s']} | {u['peak_rss_mb']} |"]
            lines += [f"| `{name}` | {v['s']} | {v['peak_rss_mb']} |" for name, v in c["fresh_process"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
