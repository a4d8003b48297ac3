"""Training throughput and memory: `mmsearch train` (streaming DataLoader) against a plain open_clip
training loop that decodes in the main process (same architecture, batch, data, optimiser), peak RSS
on 2k and 20k images, the overhead of two torchrun processes on the same global batch, and what bf16
autocast buys on this CPU (`--precisions`; the like-for-like rows are fp32, as the plain loop is).

    python benchmarks/train_throughput.py [--steps 30] [--batch-size 64] [--sizes 2000,20000] [--threads 1]
                                          [--precisions fp32,bf16]

Every run is a fresh subprocess (so its peak RSS is its own), trains mmsearch-tiny from random weights
on the synthetic set (cached under benchmarks/.cache/), without validation; steps/s counts the
steps after the first `--warmup` ones. Prints a Markdown table and writes
benchmarks/results/train_throughput.json. The 1-minute load average is recorded with every run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import CACHE, data_dir, load_average, machine, machine_line, write_results

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

PLAIN = r'''
import csv, json, os, resource, sys, time
import open_clip, torch
from PIL import Image
from mmsearch.towers.models import register_model_configs
data, steps, bs, warm = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
register_model_configs()
torch.manual_seed(0)
model, train_tf, _ = open_clip.create_model_and_transforms("mmsearch-tiny", pretrained=None)
tok = open_clip.get_tokenizer("mmsearch-tiny")
root = os.path.dirname(data)
rows = [r for r in csv.DictReader(open(data)) if r["split"] == "train"]
by_image = {}
for r in rows:
    by_image.setdefault(r["image"], r["caption"])
items = sorted(by_image.items())
loss_fn = open_clip.ClipLoss()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
g = torch.Generator().manual_seed(0)
model.train()
for step in range(steps):
    if step == warm:
        t0 = time.perf_counter()
    idx = torch.randint(len(items), (bs,), generator=g).tolist()
    images = torch.stack([train_tf(Image.open(os.path.join(root, items[i][0])).convert("RGB")) for i in idx])
    texts = tok([items[i][1] for i in idx])
    image_features, text_features, logit_scale = model(images, texts)[:3]
    loss = loss_fn(image_features, text_features, logit_scale)
    opt.zero_grad(); loss.backward(); opt.step()
wall = time.perf_counter() - t0
print(json.dumps({"timed_steps": steps - warm, "timed_s": wall,
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''

MMSEARCH = r'''
import json, resource, sys, time
import torch
from mmsearch.config import ModelSpec
from mmsearch.train import train_encoder
data, out, workers, precision = sys.argv[1], sys.argv[2], sys.argv[6], sys.argv[7]
steps, bs, warm = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
marks = {}
def progress(done, total, **kw):
    marks[done] = time.perf_counter()
res = train_encoder(data, ModelSpec(model="mmsearch-tiny", pretrained=None), out, steps=steps, batch_size=bs,
                    lr=1e-3, val_split="none", workers=None if workers == "auto" else int(workers), progress=progress,
                    device="cpu", precision=precision)
if int(__import__("os").environ.get("RANK", 0)) == 0:
    print(json.dumps({"timed_steps": steps - warm, "timed_s": marks[steps] - marks[warm],
                      "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "workers_maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
'''


def _run(cmd: list, env=None) -> dict:
    load = load_average()[0]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(cmd[:6])}...\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("{\"timed_steps\"")][-1]
    res = json.loads(line)
    res.update(wall_s=round(time.perf_counter() - t, 1), loadavg_1m=[round(load, 2), round(load_average()[0], 2)])
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--sizes", default="2000,20000", help="dataset sizes (synthetic images)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per process (the same for every run; 2 processes x 1 thread use 2 cores)")
    ap.add_argument("--precisions", default="fp32,bf16",
                    help="of the 'workers 0' run; the other mmsearch runs are fp32, like the plain loop")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "train_throughput.json")
    args = ap.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(args.threads))
    py = sys.executable
    scripts = {}
    for name, text in (("plain", PLAIN), ("mmsearch", MMSEARCH)):  # files: torchrun runs a script, not -c
        scripts[name] = CACHE / f"throughput_{name}.py"
        scripts[name].parent.mkdir(parents=True, exist_ok=True)
        scripts[name].write_text(text)
    runs = []
    for n in [int(s) for s in args.sizes.split(",")]:
        data = data_dir(CACHE, n, 0, 64) / "captions.csv"
        common = [str(args.steps), str(args.batch_size), str(args.warmup)]
        ckpt = str(CACHE / f"throughput-{os.getpid()}.pt")
        configs = [("plain open_clip loop (main-process decode)", 1, [py, str(scripts["plain"]), str(data), *common])]
        configs += [(f"mmsearch train, workers 0, {p}", 1,
                     [py, str(scripts["mmsearch"]), str(data), ckpt, *common, "0", p])
                    for p in args.precisions.split(",")]
        configs += [
            ("mmsearch train, workers 1, fp32", 1,
             [py, str(scripts["mmsearch"]), str(data), ckpt, *common, "1", "fp32"]),
            ("mmsearch train, torchrun 2 processes, fp32", 2,
             [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(scripts["mmsearch"]),
              str(data), ckpt, *common, "0", "fp32"]),
        ]
        for name, procs, cmd in configs:
            if procs == 2 and n != int(args.sizes.split(",")[0]):
                continue  # the 2-process overhead does not depend on the dataset size
            print(f"== {n} images: {name}", flush=True)
            r = _run(cmd, env)
            r.update(name=name, images=n, processes=procs, batch_size=args.batch_size,
                     steps_per_s=round(r["timed_steps"] / r["timed_s"], 3),
                     images_per_s=round(r["timed_steps"] * args.batch_size / r["timed_s"], 1))
            runs.append(r)
            print(json.dumps(r), flush=True)
        Path(ckpt).unlink(missing_ok=True)
    import torch

    result = {"model": "mmsearch-tiny", "runs": runs, "cpu_count": os.cpu_count(), "torch": torch.__version__,
              "python": platform.python_version(), "steps": args.steps, "warmup": args.warmup,
              "threads_per_process": args.threads, "machine": machine()}
    print()
    print(render(result))
    print(machine_line(result["machine"]))
    write_results(args.out, result)
    print(f"wrote {args.out}")


def render(result: dict) -> str:
    head = "| images | run | processes | steps/s | images/s | peak RSS (MB) | 1-min load avg |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["runs"]:
        rss = f"{r['maxrss_mb']:.0f}" + (f" (+ workers {r['workers_maxrss_mb']:.0f})"
                                         if r.get("workers_maxrss_mb") and "workers 0" not in r["name"]
                                         and r["processes"] == 1 else "")
        lines.append(f"| {r['images']} | {r['name']} | {r['processes']} | {r['steps_per_s']:.2f} | "
                     f"{r['images_per_s']:.0f} | {rss} | {r['loadavg_1m'][0]} → {r['loadavg_1m'][1]} |")
    lines.append(f"\nbatch {result['runs'][0]['batch_size']}, {result['steps']} steps ({result['warmup']} untimed), "
                 f"mmsearch-tiny from random weights, {result['threads_per_process']} torch thread(s) per process, "
                 f"{result['cpu_count']} CPU cores; peak RSS of rank 0 for torchrun.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
