"""Soak test of `mmsearch serve` with a writer beside it (issue 31): not part of `make test`.

    python benchmarks/soak_serve.py [--minutes 10] [--clients 8] [--photos 48]

A real `mmsearch serve` (uvicorn) on 127.0.0.1 over an index of photo-like JPEGs (mmsearch-tiny, random
weights: nothing here depends on the model's quality). For --minutes:

- --clients threads (urllib, a connection per request) issue text and weighted-term searches, filtered
  ones, paging, metadata, thumbnail and original-file requests for the ids the searches return;
- one indexer process, in a loop, adds, renames and deletes files in the indexed folder and runs
  `index_folders` over it (the server sees each change without a restart);
- during its second run the indexer starts a second `mmsearch index` of the same index and waits for
  it: with the writer lock (mmsearch/storage/lock.py) it must be refused at once; in a checkout without
  that module the result is recorded as "not refused" and does not fail the run.

Then it checks: no request got a 5xx or a dropped connection (a 404 or 410 for an image deleted
meanwhile is expected; any other 4xx is counted and shown), every catalog row has its embedding and its vector in the FAISS file, no indexer run failed,
and the server's RSS (sampled every second from /proc) stayed bounded: its final value at most 1.5x the
value after warm-up (a fifth of the run) plus 50 MB. Prints a Markdown table and writes
benchmarks/results/soak_serve.json; exits 1 when a check fails.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
from common import machine, machine_line, make_photos, markdown_table, write_results  # noqa: E402

WORDS = ("dog cat beach mountain city night red blue green car tree river snow boat bird flower sunset "
         "street house child bicycle forest table window bridge").split()
PHOTO_SIZE = (640, 480)
GONE = ("404", "410")  # an id or a file deleted by the indexer meanwhile: the expected answers
RSS_SLACK = (1.5, 50)  # final RSS <= 1.5 x warm RSS + 50 MB
ENV = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), MMSEARCH_CACHE_DIR=os.environ.get(
    "MMSEARCH_CACHE_DIR", "off"))


def mmsearch(*args) -> list[str]:
    return [sys.executable, "-m", "mmsearch", *map(str, args)]


def lock_exists() -> bool:
    """Whether this checkout has the writer lock: then the second indexer must be refused."""
    return importlib.util.find_spec("mmsearch.storage.lock") is not None


# ---- the indexer (a child process: `soak_serve.py --indexer ...`) ------------------------------------
def indexer_loop(idx: Path, photos: Path, pool: Path, stop: Path, log: Path, check_at: int = 2) -> None:
    """Add two files, rename one, delete one or two, index; again until `stop` exists. One JSON line per
    run in `log`; during run `check_at` (while this run holds the index) a second indexer is started."""
    from mmsearch.indexing.pipeline import index_folders

    rng, spare = random.Random(1), sorted(pool.glob("*.jpg"))
    target = len(list(photos.glob("*.jpg")))
    run = added = 0
    with open(log, "a") as out:
        while not stop.exists():
            run += 1
            for _ in range(2):
                shutil.copy(spare[added % len(spare)], photos / f"new_{added:05d}.jpg")
                added += 1
            files = sorted(photos.glob("*.jpg"))
            old = rng.choice(files)
            old.rename(photos / f"r{run:05d}__{old.name.split('__')[-1]}")
            files = sorted(photos.glob("*.jpg"))
            for gone in rng.sample(files, 2 if len(files) > target else 1):
                gone.unlink()
            second = {}

            def progress(*_a, **_k):
                if run == check_at and not second:
                    second.update(second_indexer(idx, photos))

            line = {"run": run, "files": len(list(photos.glob("*.jpg")))}
            t = time.perf_counter()
            try:
                s = index_folders(idx, [photos], progress=progress)
                line.update(added=s.added, moved=s.moved, removed=s.removed, failed=s.failed)
            except Exception as exc:  # recorded: the soak fails on it, the loop goes on
                line["error"] = f"{type(exc).__name__}: {exc}"
            line["seconds"] = round(time.perf_counter() - t, 2)
            if second:
                line["second_indexer"] = second
            out.write(json.dumps(line) + "\n")
            out.flush()
            time.sleep(0.5)


def second_indexer(idx: Path, photos: Path) -> dict:
    """`mmsearch index` of the same index while this process is inside an indexing run."""
    t = time.perf_counter()
    res = subprocess.run(mmsearch("index", photos, "--index", idx), capture_output=True, text=True, env=ENV,
                         timeout=600)
    err = res.stderr.strip().splitlines()
    last = err[-1] if err else ""
    refused = res.returncode != 0 and "Traceback" not in res.stderr and bool(
        re.search(r"another|lock|busy", last, re.I))
    return {"returncode": res.returncode, "seconds": round(time.perf_counter() - t, 2), "refused": refused,
            "message": last[:300]}


# ---- the server and its clients ----------------------------------------------------------------------
class Server:
    def __init__(self, idx: Path, log: Path):
        self.log = open(log, "w")
        self.proc = subprocess.Popen(mmsearch("serve", "--index", idx, "--port", 0), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=ENV)
        line = self.proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        if not m:
            raise SystemExit(f"server did not start: {line}{self.proc.stdout.read()}")
        self.base = f"http://127.0.0.1:{m.group(1)}"
        self.log.write(line)
        threading.Thread(target=self._drain, daemon=True).start()  # its log, kept for tracebacks

    def _drain(self):
        for line in self.proc.stdout:
            self.log.write(line)
            self.log.flush()

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as fh:
            kb = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
        return kb / 1024

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class Clients:
    """Threads issuing a mix of requests until `deadline`; status counts and latencies per kind."""

    def __init__(self, base: str, n: int, seed: int = 0):
        self.base, self.n, self.seed = base, n, seed
        self.lock = threading.Lock()
        self.ids: list[int] = []
        self.thumbs: dict[int, str] = {}
        self.status: dict[str, Counter] = defaultdict(Counter)
        self.ms: dict[str, list] = defaultdict(list)
        self.failures: list[str] = []

    def get(self, kind: str, path: str) -> tuple[int, bytes]:
        t = time.perf_counter()
        try:
            with urllib.request.urlopen(self.base + path, timeout=60) as res:
                status, body = res.status, res.read()
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read()
        except Exception as exc:  # reset, refused, timeout: a failure, never a crash of the soak
            status, body = -1, b""
            with self.lock:
                self.failures.append(f"{kind} {path}: {type(exc).__name__}: {exc}"[:300])
        with self.lock:
            self.status[kind][status] += 1
            if status == 200:
                self.ms[kind].append((time.perf_counter() - t) * 1000)
            elif status >= 500:
                self.failures.append(f"{kind} {path}: {status} {body[:200]!r}")
        return status, body

    def search(self, rng: random.Random):
        words = " ".join(rng.sample(WORDS, rng.randint(1, 3)))
        q = rng.choice([words, f"2:{words} + {rng.choice(WORDS)} - {rng.choice(WORDS)}", words])
        params = {"q": q, "k": rng.choice([5, 24, 50]), "offset": rng.choice([0, 0, 0, 24])}
        if rng.random() < 0.2:
            params["ext"] = "jpg"
        status, body = self.get("search", "/api/search?" + urllib.parse.urlencode(params))
        if status == 200:
            hits = json.loads(body)["hits"]
            with self.lock:
                for h in hits:
                    if h["id"] not in self.thumbs:
                        self.ids.append(h["id"])
                    self.thumbs[h["id"]] = h["thumbnail"]
                del self.ids[:-500]

    def work(self, c: int, deadline: float):
        rng = random.Random(self.seed * 1000 + c)
        while time.monotonic() < deadline:
            with self.lock:
                known = rng.choice(self.ids) if self.ids else None
                thumb = self.thumbs.get(known)
            r = rng.random()
            if known is None or r < 0.45:
                self.search(rng)
            elif r < 0.70:
                self.get("thumbnail", thumb)
            elif r < 0.90:
                self.get("file", f"/api/images/{known}/file")
            elif r < 0.97:
                self.get("meta", f"/api/images/{known}")
            else:
                self.get("info", "/api/info")

    def run(self, seconds: float):
        deadline = time.monotonic() + seconds
        threads = [threading.Thread(target=self.work, args=(c, deadline)) for c in range(self.n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()


# ---- the final check ---------------------------------------------------------------------------------
def vectors_check(idx: Path) -> dict:
    """Catalog rows against their stored embeddings and the FAISS file (read as saved, never rebuilt)."""
    import faiss
    import numpy as np

    from mmsearch.storage.store import IMAGE_VECTORS, IndexStore
    from mmsearch.storage.vectors import VectorIndex

    store = IndexStore.open(idx)
    cat = store.catalog
    rows = {int(i) for (i,) in cat.conn.execute("SELECT id FROM images").fetchall()}
    embedded = set()
    for ids, _ in cat.iter_embeddings(store.dim):
        embedded.update(int(i) for i in ids)
    path = idx / IMAGE_VECTORS
    side = VectorIndex.sidecar(path)
    index = faiss.read_index(str(path))
    try:
        in_file = set(faiss.vector_to_array(faiss.downcast_index(index).id_map).astype(np.int64).tolist())
    except AttributeError:  # not an id map: ask for each row
        in_file = set()
        for i in rows:
            try:
                index.reconstruct(i)
                in_file.add(i)
            except RuntimeError:
                pass
    return {"catalog_rows": len(rows), "without_embedding": len(rows - embedded), "faiss_vectors": index.ntotal,
            "missing_in_faiss": len(rows - in_file), "stale_in_faiss": len(in_file - rows),
            "faiss_generation": side.get("generation"), "catalog_generation": cat.generation()}


def rss_summary(samples: list[tuple[float, float]], seconds: float) -> dict:
    if not samples:
        return {"start_mb": None, "warm_mb": None, "max_mb": None, "final_mb": None, "bounded": False}
    warm = next((mb for t, mb in samples if t >= seconds / 5), samples[-1][1])
    final, top = samples[-1][1], max(mb for _, mb in samples)
    limit = RSS_SLACK[0] * warm + RSS_SLACK[1]
    return {"start_mb": round(samples[0][1], 1), "warm_mb": round(warm, 1), "max_mb": round(top, 1),
            "final_mb": round(final, 1), "limit_mb": round(limit, 1), "bounded": final <= limit,
            "samples": len(samples)}


def pct(xs, p):
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(p / 100 * len(xs)))], 1) if xs else None


def soak(args) -> dict:
    work = Path(args.work or tempfile.mkdtemp(prefix="mmsearch-soak-"))
    photos, pool, idx = work / "photos", work / "pool", work / "idx"
    for p in (photos, idx):
        shutil.rmtree(p, ignore_errors=True)
    make_photos(pool, args.photos + 64, PHOTO_SIZE, seed=args.seed)
    photos.mkdir(parents=True)
    spare = sorted(pool.glob("*.jpg"))
    for p in spare[:args.photos]:
        shutil.copy(p, photos / p.name)
    extra = work / "spare"
    shutil.rmtree(extra, ignore_errors=True)
    extra.mkdir()
    for p in spare[args.photos:]:
        shutil.copy(p, extra / p.name)
    subprocess.run(mmsearch("index", photos, "--index", idx, "--model", "mmsearch-tiny", "--pretrained", "none"),
                   check=True, env=ENV, capture_output=True, text=True)

    seconds = args.minutes * 60
    server = Server(idx, work / "server.log")
    stop, log = work / "stop", work / "indexer.jsonl"
    stop.unlink(missing_ok=True)
    log.unlink(missing_ok=True)
    indexer = subprocess.Popen([sys.executable, __file__, "--indexer", str(idx), str(photos), str(extra),
                                str(stop), str(log)], env=ENV)
    samples: list[tuple[float, float]] = []
    started = time.monotonic()
    done = threading.Event()

    def sample():
        while not done.is_set():
            try:
                samples.append((time.monotonic() - started, server.rss_mb()))
            except (OSError, StopIteration):
                pass
            done.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    clients = Clients(server.base, args.clients, args.seed)
    try:
        clients.run(seconds)
    finally:
        stop.touch()
        try:
            indexer.wait(timeout=900)
        except subprocess.TimeoutExpired:
            indexer.kill()
        done.set()
        sampler.join()
        server.stop()
    runs = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    second = next((r["second_indexer"] for r in runs if "second_indexer" in r), None)
    server_log = (work / "server.log").read_text()
    vec = vectors_check(idx)
    result = {
        "minutes": args.minutes, "clients": args.clients, "photos": args.photos, "work": str(work),
        "requests": {k: dict(sorted((str(s), n) for s, n in c.items())) for k, c in sorted(clients.status.items())},
        "latency_ms": {k: {"p50": pct(v, 50), "p99": pct(v, 99)} for k, v in sorted(clients.ms.items())},
        "failures": clients.failures[:50], "server_tracebacks": server_log.count("Traceback"),
        "indexer": {"runs": len(runs), "errors": [r["error"] for r in runs if "error" in r][:20],
                    "added": sum(r.get("added", 0) for r in runs), "moved": sum(r.get("moved", 0) for r in runs),
                    "removed": sum(r.get("removed", 0) for r in runs),
                    "exit_code": indexer.returncode},
        "second_indexer": second, "writer_lock_in_checkout": lock_exists(),
        "vectors": vec, "rss": rss_summary(samples, seconds),
    }
    result["checks"] = checks(result)
    return result


def checks(r: dict) -> dict:
    n5xx = sum(n for c in r["requests"].values() for s, n in c.items() if int(s) >= 500)
    dropped = sum(c.get("-1", 0) for c in r["requests"].values())
    second = r["second_indexer"]
    if second is None:
        refused = "not checked (the indexer never reached its second run)"
    elif second["refused"]:
        refused = "refused"
    else:
        refused = "not refused"
    v = r["vectors"]
    return {
        "no_5xx": n5xx == 0 and dropped == 0 and r["server_tracebacks"] == 0,
        "every_row_has_its_vector": v["without_embedding"] == 0 and v["missing_in_faiss"] == 0
        and v["stale_in_faiss"] == 0,
        "indexer_ok": not r["indexer"]["errors"] and r["indexer"]["runs"] > 0,
        "second_indexer": refused,
        # strict once the lock exists; before it, "not refused" is recorded and does not fail the run
        "second_indexer_ok": refused == "refused" or not r["writer_lock_in_checkout"],
        "rss_bounded": r["rss"]["bounded"],
    }


def render(r: dict) -> str:
    rows = []
    for kind, counts in r["requests"].items():
        lat = r["latency_ms"].get(kind, {})
        rows.append([kind, sum(counts.values()), counts.get("200", 0), counts.get("404", 0) + counts.get("410", 0),
                     sum(n for s, n in counts.items() if 400 <= int(s) < 500 and s not in GONE),
                     sum(n for s, n in counts.items() if int(s) >= 500), counts.get("-1", 0),
                     lat.get("p50"), lat.get("p99")])
    table = markdown_table(["requests", "n", "200", "404/410 (deleted)", "other 4xx", "5xx", "dropped", "p50 ms",
                            "p99 ms"], rows, "lrrrrrrrr")
    v, rss, ix, c = r["vectors"], r["rss"], r["indexer"], r["checks"]
    second = r["second_indexer"] or {}
    lines = [f"soak: {r['minutes']} min, {r['clients']} clients, {r['photos']} photos", "", table, "",
             markdown_table(["check", "result"], [
                 ["no 5xx, no dropped connection, no server traceback", "yes" if c["no_5xx"] else "NO"],
                 [f"catalog rows {v['catalog_rows']}: without embedding {v['without_embedding']}, missing in FAISS "
                  f"{v['missing_in_faiss']}, stale in FAISS {v['stale_in_faiss']}",
                  "yes" if c["every_row_has_its_vector"] else "NO"],
                 [f"indexer: {ix['runs']} runs, +{ix['added']} ~{ix['moved']} -{ix['removed']}, "
                  f"{len(ix['errors'])} errors", "yes" if c["indexer_ok"] else "NO"],
                 [f"second indexer ({second.get('seconds', '-')} s): {second.get('message', '')[:90]}",
                  c["second_indexer"] + ("" if c["second_indexer_ok"] else " (FAIL: the lock exists)")],
                 [f"server RSS MB: start {rss['start_mb']}, warm {rss['warm_mb']}, max {rss['max_mb']}, "
                  f"final {rss['final_mb']} (limit {rss.get('limit_mb')})", "yes" if c["rss_bounded"] else "NO"],
             ], "ll"), "", machine_line(r.get("machine"))]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="How long the clients run [10].")
    ap.add_argument("--clients", type=int, default=8, help="Concurrent client threads [8].")
    ap.add_argument("--photos", type=int, default=48, help="Photos in the indexed folder at the start [48].")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="Work folder [a new temporary one].")
    ap.add_argument("--out", default="soak_serve", help="Result name or .json path [soak_serve].")
    ap.add_argument("--indexer", nargs=5, metavar=("IDX", "PHOTOS", "POOL", "STOP", "LOG"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.indexer:
        indexer_loop(*map(Path, args.indexer))
        return 0
    result = soak(args)
    result["machine"] = machine()
    print(render(result))
    path = write_results(args.out, result)
    print(f"wrote {path}")
    return 0 if all(v is True or k == "second_indexer" for k, v in result["checks"].items()) else 1


if __name__ == "__main__":
    sys.exit(main())
