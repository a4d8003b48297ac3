"""Fresh-process text-query latency: `mmsearch search "..."` as a user runs it, start to exit.

    python benchmarks/query_latency.py [--model ViT-B-32] [--repeat 7]

Builds (once) an index of the generated 12 MP photos with random weights, then times whole
processes: the numpy text path (default) and the torch path (numpy tower removed), plus
`mmsearch --help`. Prints a Markdown table, writes benchmarks/results/query_latency.json.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import machine, machine_line, make_photos, markdown_table, write_results

HERE = Path(__file__).parent


def timed(cmd: list[str], repeat: int, env=None) -> float:
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env=env)
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "query_latency.json")
    args = ap.parse_args(argv)
    photos = HERE / ".cache" / "photos_12mp" / "4000x3000"
    make_photos(photos, args.n, (4000, 3000))
    idx = HERE / ".cache" / f"index-{args.model}"
    exe = [sys.executable, "-m", "mmsearch"]
    if not (idx / "text_tower" / "weights.f32").exists():  # none yet, or one written by an older mmsearch
        shutil.rmtree(idx, ignore_errors=True)
    if not (idx / "catalog.db").exists():
        subprocess.run(exe + ["index", str(photos), "--index", str(idx), "--model", args.model,
                              "--pretrained", "none"], check=True, capture_output=True)
    query = exe + ["search", "a dog playing on a sunny beach", "--index", str(idx), "-k", "10", "--paths"]
    rows = [("mmsearch --help", timed(exe + ["--help"], args.repeat)),
            ("text query, numpy text tower (default)", timed(query, args.repeat))]
    rows.append(("text query, torch text tower (fallback)",
                 timed(query, max(3, args.repeat // 2), env=dict(os.environ, MMSEARCH_TORCH_TEXT="1"))))
    rows.append(("image query of an indexed photo (stored embedding)",
                 timed(exe + ["search", "--image", str(sorted(photos.glob("*.jpg"))[0]), "--index", str(idx),
                              "--paths"], args.repeat)))
    m = machine()
    print(machine_line(m))
    print(markdown_table([f"fresh process, {args.model}, index of {args.n} photos", "median s"],
                         [(name, f"{s:.3f}") for name, s in rows]
                         + [("target", 0.5), ("rclip (measured separately on this machine)", 1.1)]))
    write_results(args.out, {"model": args.model, "photos": args.n, "repeat": args.repeat,
                             "median_seconds": dict(rows), "target_seconds": 0.5, "rclip_seconds": 1.1, "machine": m})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
