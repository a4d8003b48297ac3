"""`mmsearch eval` on the synthetic test split with the demo model, exact and with an ANN index, plus an
independent recomputation of R@k from the saved embeddings.

    python benchmarks/eval_synth.py [--factory HNSW32 --factory IVF4,Flat ...] [--split test]

Runs the real CLI (`python -m mmsearch eval DATA --checkpoint CKPT --json --out ... --save-embeddings ...`)
in a subprocess, with the demo configuration's checkpoint (benchmarks/.cache/, trained by
benchmarks/train_synth.py or by this script with the same configuration if missing). Then recomputes every
metric from the .npz with a naive full-matrix numpy computation that shares no code with
mmsearch.evaluation.metrics, and checks both agree. Prints Markdown tables and writes benchmarks/results/eval_synth.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import CACHE, data_dir, demo_checkpoint, demo_config, load_average, machine, machine_line, write_results

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))


def run_eval(data: Path, ckpt: Path, split: str, out: Path, extra=()) -> tuple[dict, float, list]:
    """The CLI in a subprocess; returns (report, wall seconds, argv). Checks --json output == --out file."""
    argv = [sys.executable, "-m", "mmsearch", "eval", str(data), "--checkpoint", str(ckpt), "--split", split,
            "--json", "--out", str(out), *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"mmsearch eval failed ({proc.returncode}):\n{proc.stderr}")
    printed = json.loads(proc.stdout)
    written = json.loads(out.read_text())
    assert printed == written, "--json output and --out file differ"
    rel = [os.path.relpath(a, ROOT) if os.path.isabs(a) else a for a in argv[3:]]
    return written, wall, ["mmsearch", *rel]


def naive_ranks(npz: Path) -> tuple[np.ndarray, np.ndarray]:
    """Ranks of the first positive from the full score matrix: a stable descending sort of every row."""
    z = np.load(npz)
    img, txt, owner = z["image_emb"], z["text_emb"], z["caption_image"]
    scores = txt @ img.T  # [captions, images], the whole thing at once
    t2i = np.empty(len(txt), np.int64)
    for q in range(len(txt)):
        order = np.argsort(-scores[q], kind="stable")
        t2i[q] = int(np.nonzero(order == owner[q])[0][0]) + 1
    i2t = np.empty(len(img), np.int64)
    for q in range(len(img)):
        order = np.argsort(-scores[:, q], kind="stable")
        i2t[q] = int(np.nonzero(owner[order] == q)[0][0]) + 1
    return t2i, i2t


def naive_summary(ranks: np.ndarray, ks) -> dict:
    out = {f"R@{k}": float(np.mean(ranks <= k)) for k in ks}
    out.update(mean_rank=float(ranks.mean()), median_rank=float(np.median(ranks)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--factory", action="append", default=None, help="FAISS factory for ANN fidelity "
                    "(repeatable) [default: HNSW32 and IVF4,Flat]")
    ap.add_argument("--split", default="test")
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "eval_synth.json")
    args = ap.parse_args(argv)
    factories = args.factory or ["HNSW32", "IVF4,Flat"]

    demo = demo_config()
    data = data_dir(args.cache, demo["n"], demo["seed"], demo["size"]) / "captions.csv"
    ckpt = demo_checkpoint(args.cache, log=lambda line: print(line, flush=True))
    with tempfile.TemporaryDirectory(prefix="mmsearch-eval-") as tmp:
        tmp = Path(tmp)
        npz = tmp / "emb.npz"
        exact, wall_exact, cmd = run_eval(data, ckpt, args.split, tmp / "exact.json",
                                          ["--save-embeddings", str(npz)])
        ann, ann_walls, ann_cmds = {}, {}, {}
        for f in factories:
            rep, wall, c = run_eval(data, ckpt, args.split, tmp / "ann.json", ["--factory", f])
            for d in ("text_to_image", "image_to_text"):
                assert rep[d] == exact[d], f"metrics changed with --factory {f}"
            ann[f], ann_walls[f], ann_cmds[f] = rep["ann"], round(wall, 2), c
        t = time.perf_counter()
        t2i, i2t = naive_ranks(npz)
        naive_s = time.perf_counter() - t
        z = np.load(npz)
        npz_keys = sorted(z.files)
        assert len(z["image_ids"]) == exact["n_images"] and len(z["caption_ids"]) == exact["n_captions"]
    ks = exact["ks"]
    naive = {"text_to_image": naive_summary(t2i, ks), "image_to_text": naive_summary(i2t, ks)}
    diff = max(abs(naive[d][m] - exact[d][m]) for d in naive for m in naive[d])
    agree = diff == 0.0

    cols = [f"R@{k}" for k in ks] + ["mean_rank", "median_rank"]
    print(f"`{' '.join(cmd[:7])}`: {exact['n_images']} images, {exact['n_captions']} captions, "
          f"wall {wall_exact:.1f} s (model load + embedding + metrics)\n")
    print("| direction | " + " | ".join(cols) + " |")
    print("|" + "---|" * (len(cols) + 1))
    for d in ("text_to_image", "image_to_text"):
        print(f"| {d.replace('_to_', '→')} | " + " | ".join(
            f"{100 * exact[d][c]:.1f}" if c.startswith("R@") else f"{exact[d][c]:.2f}" for c in cols) + " |")
    print(f"\nR@k in %; chance R@1 text→image = {100 / exact['n_images']:.2f}%.\n")
    print("| --factory | k | text→image overlap | image→text overlap | eval wall |")
    print("|---|---|---|---|---|")
    for f, a in ann.items():
        k = a["k"]
        print(f"| {f} | {k} | {a[f'text_to_image_overlap@{k}']:.4f} | {a[f'image_to_text_overlap@{k}']:.4f} | "
              f"{ann_walls[f]:.1f} s |")
    print(f"\nindependent check: naive full-matrix R@k / mean / median rank from the saved .npz "
          f"({', '.join(npz_keys)}) {'AGREE with' if agree else 'DIFFER from'} the `mmsearch eval` report "
          f"(max |diff| = {diff:g}, {naive_s:.1f} s)")

    result = {"command": cmd, "checkpoint": os.path.relpath(ckpt, ROOT), "data": os.path.relpath(data, ROOT), "split": args.split,
              "report": exact, "eval_wall_s": round(wall_exact, 2),
              "ann": ann, "ann_eval_wall_s": ann_walls, "ann_commands": ann_cmds,
              "naive_check": {"agree": agree, "max_abs_diff": diff, "npz_keys": npz_keys, **naive},
              "chance_R@1": 1 / exact["n_images"], "cpu_count": os.cpu_count(),
              "loadavg_1m": round(load_average()[0], 2), "python": platform.python_version(), "machine": machine()}
    print(machine_line(result["machine"]))
    write_results(args.out, result)
    print(f"wrote {args.out}")
    if not agree:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
