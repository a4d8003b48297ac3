"""Per model family (smallest member, random weights, offline): indexing images/s and the fresh-process
text-query time, as a user runs `mmsearch index` and `mmsearch search "..."`.

    python benchmarks/families.py [--n 32] [--repeat 3] [--models RN50,ViT-B-16-SigLIP]

Hugging Face tokenizers / text-tower configs come from the offline stand-in cache the tests use too
(benchmarks/common.py's build_hf_cache, shrunk multilingual text towers: their speed is not the real
models'). Prints a Markdown table with the load average, writes benchmarks/results/families.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import build_hf_cache, load_average, machine, machine_line, markdown_table, write_results

HERE = Path(__file__).parent
ROOT = HERE.parent
FAMILIES = ["ViT-B-32", "RN50", "MobileCLIP-S1", "MobileCLIP2-S0", "ViT-B-16-SigLIP", "ViT-B-32-SigLIP2-256",
            "xlm-roberta-base-ViT-B-32", "nllb-clip-base"]


def run(args: list[str], env) -> tuple[float, str]:
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "mmsearch", *args], capture_output=True, text=True, env=env)
    if res.returncode:
        raise SystemExit(f"mmsearch {' '.join(args)} failed:\n{res.stderr[-2000:]}")
    return time.perf_counter() - t, res.stdout


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32, help="images to index")
    ap.add_argument("--repeat", type=int, default=3, help="fresh-process queries per family (median)")
    ap.add_argument("--models", default=",".join(FAMILIES))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "families.json")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mmsearch-families-"))
    env = dict(os.environ, HF_HUB_CACHE=str(build_hf_cache(work / "hub")), HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run(["synth", str(work / "data"), "--n", str(args.n), "--size", "256"], env)
    load_before = load_average()
    rows = []
    for model in args.models.split(","):
        idx = work / f"idx-{model}"
        wall, out = run(["index", str(work / "data" / "images"), "--index", str(idx), "--model", model,
                         "--pretrained", "none", "--json"], env)
        summary = json.loads(out)
        sys.path.insert(0, str(ROOT))
        from mmsearch.storage.store import IndexStore

        meta = IndexStore.open(idx, readonly=True).meta
        times = [run(["search", "a red circle left of a blue square", "--index", str(idx), "-k", "5", "--json"],
                     env)[0] for _ in range(args.repeat)]
        rows.append({"model": model, "dim": meta["dim"], "text_path": meta.get("text_path", {}).get("path"),
                     "images_per_s": round(summary["embedded"] / summary["embed_seconds"], 2),
                     "index_wall_s": round(wall, 1), "query_s_median": round(statistics.median(times), 2),
                     "query_s_all": [round(t, 2) for t in times]})
        print(json.dumps(rows[-1]), flush=True)
    load_after = load_average()
    m = machine()
    print(f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min); {os.cpu_count()} cores; "
          f"{args.n} images of 256x256; random weights")
    print(machine_line(m) + "\n")
    print(markdown_table(["model", "dim", "text query path", "fresh-process text query (s, median)", "indexing (img/s)"],
                         [(r["model"], r["dim"], r["text_path"], r["query_s_median"], r["images_per_s"]) for r in rows],
                         align="lrlrr"))
    write_results(args.out, {"rows": rows, "load_before": load_before, "load_after": load_after,
                             "n_images": args.n, "machine": m}, indent=1)


if __name__ == "__main__":
    main()
