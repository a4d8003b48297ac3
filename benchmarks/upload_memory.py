"""What uploads cost a `mmsearch serve` process in memory (issue 31 item 5): peak RSS over a warm server.

    python benchmarks/upload_memory.py [--big-mp 88] [--under-mp 36] [--clients 4] [--code DIR]

An index of 4 small photos is made with mmsearch-tiny (random weights: memory does not depend on them).
For each case a fresh `mmsearch serve --port 0` process is started on 127.0.0.1 and warmed with one small
upload (the image tower loaded); its RSS is read, the case's uploads are sent (in parallel for N clients),
and its peak RSS (VmHWM) is read again. The uploads are flat-colour PNGs: a few hundred KB of file for
tens of megapixels, the cheapest way to ask a server for a big decode. `--code DIR` serves with another
checkout's code (e.g. the previous release, to compare). Prints a Markdown table and writes
benchmarks/results/upload_memory.json.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from common import machine_line, make_photos, markdown_table, write_results

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))


def flat_png(megapixels: float) -> bytes:
    from PIL import Image

    w = int((megapixels * 1e6 * 4 / 3) ** 0.5)
    h = int(megapixels * 1e6 / w)
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (40, 90, 160)).save(buf, "PNG", compress_level=9)
    return buf.getvalue()


def multipart(data: bytes, name: str) -> tuple[bytes, str]:
    boundary = "mmsearchbenchboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def post(url: str, data: bytes) -> tuple[int, str]:
    body, kind = multipart(data, "q.png")
    req = urllib.request.Request(url + "api/search?k=1", data=body, method="POST", headers={"content-type": kind})
    try:
        with urllib.request.urlopen(req, timeout=600) as res:
            return res.status, ""
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}").get("error", "")


def status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return int(next(line.split()[1] for line in fh if line.startswith(key + ":")))


def run_case(index: Path, code: Path, small: bytes, uploads: list[bytes]) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(code))
    proc = subprocess.Popen([sys.executable, "-m", "mmsearch", "serve", "--index", str(index), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=str(code))
    try:
        line = proc.stdout.readline()
        m = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
        if not m:
            raise SystemExit(f"server did not start: {line}{proc.stdout.read() if proc.poll() is not None else ''}")
        url = m.group(1)
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "api/health", timeout=2).read()
                break
            except OSError:
                time.sleep(0.05)
        assert post(url, small)[0] == 200, "warm-up upload failed"
        time.sleep(0.5)
        before = status_kb(proc.pid, "VmRSS")
        results: list = [None] * len(uploads)

        def send(i):
            results[i] = post(url, uploads[i])
        started = time.perf_counter()
        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(uploads))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.perf_counter() - started
        peak = status_kb(proc.pid, "VmHWM")
        return {"rss_before_mb": before / 1024, "peak_mb": peak / 1024, "added_mb": (peak - before) / 1024,
                "seconds": took, "statuses": [s for s, _ in results], "reason": next((r for _, r in results if r), "")}
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--big-mp", type=float, default=88.0, help="Megapixels of the big upload (over the 40 MP cap).")
    ap.add_argument("--under-mp", type=float, default=36.0, help="Megapixels of an upload just under the cap.")
    ap.add_argument("--clients", type=int, default=4, help="Concurrent uploads in the parallel cases.")
    ap.add_argument("--code", type=Path, default=HERE.parent, help="The checkout whose mmsearch serves.")
    ap.add_argument("--out", default="upload_memory", help="Results name (benchmarks/results/NAME.json) or path.")
    args = ap.parse_args(argv)

    from mmsearch.config import ModelSpec
    from mmsearch.indexing.pipeline import index_folders

    with tempfile.TemporaryDirectory(prefix="mmsearch-upmem-") as tmp:
        photos = Path(tmp) / "photos"
        photos.mkdir()
        make_photos(photos, 4, (320, 240))
        index = Path(tmp) / "idx"
        index_folders(index, [photos], spec=ModelSpec(model="mmsearch-tiny", pretrained=None))
        small = (photos / sorted(os.listdir(photos))[0]).read_bytes()
        big, under = flat_png(args.big_mp), flat_png(args.under_mp)
        cases = [(f"1 x {args.big_mp:g} MP PNG ({len(big) // 1024} KB)", [big]),
                 (f"{args.clients} x {args.big_mp:g} MP PNG at once", [big] * args.clients),
                 (f"{args.clients} x {args.under_mp:g} MP PNG at once ({len(under) // 1024} KB each)",
                  [under] * args.clients)]
        rows, out = [], []
        for name, uploads in cases:
            r = run_case(index, args.code.resolve(), small, uploads)
            out.append(dict(r, case=name))
            rows.append([name, f"{r['rss_before_mb']:.0f}", f"{r['peak_mb']:.0f}", f"+{r['added_mb']:.0f}",
                         f"{r['seconds']:.1f}", " ".join(map(str, r["statuses"]))])
    print(markdown_table(["case", "RSS before (MB)", "peak RSS (MB)", "added", "s", "HTTP statuses"], rows,
                         align="lrrrrl"))
    print(machine_line())
    result = {"code": str(args.code.resolve()), "cases": out}
    write_results(args.out, result)
    return result


if __name__ == "__main__":
    main()
