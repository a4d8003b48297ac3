"""Contrastive training on the synthetic set: wall time, steps/s and held-out recall@k, for the demo
configuration and for a longer run.

    python benchmarks/train_synth.py [--only demo|long] [--long-n 6000] [--long-steps 1200]

For each run: synthesise the data (cached under benchmarks/.cache/), train mmsearch-tiny from scratch
with `mmsearch.train.train_encoder` (what `mmsearch train` calls), then compute text→image and
image→text R@1/5/10 on the held-out test split with `mmsearch.evaluation.evaluate` (CLIP_benchmark definitions).
The demo-configuration checkpoint is kept under benchmarks/.cache/, where benchmarks/eval_synth.py finds it
(both through benchmarks/common.py).
Prints a Markdown table and writes benchmarks/results/train_synth.json.

Timings: "train wall" is the whole `train_encoder` call (model build, image decoding, the steps,
per-epoch validation, checkpoint writes); steps/s = steps / train wall. "loop" excludes model build
and image decoding; "cpu" is the process's CPU time. The machine's load average is recorded: other
jobs on the two cores slow the wall-clock numbers (CPU time is less affected).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from common import CACHE, demo_config, machine, machine_line, train_run, write_results

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

from mmsearch.config import TINY_MODEL, ModelSpec  # noqa: E402

DEMO = demo_config()  # exactly what `mmsearch demo` trains


def held_out(data: Path, ckpt: Path) -> dict:
    from mmsearch.datasets.readers import load_dataset
    from mmsearch.towers.encoder import load_encoder
    from mmsearch.evaluation.evaluate import evaluate

    ds = load_dataset(data / "captions.csv", split="test")
    t = time.perf_counter()
    report = evaluate(load_encoder(ModelSpec(checkpoint=str(ckpt))), ds, ks=(1, 5, 10))
    report["eval_s"] = round(time.perf_counter() - t, 2)
    return report


def render(runs: list) -> str:
    head = ("| run | images (train / test) | steps × batch | epochs | train wall | train CPU | steps/s | "
            "t→i R@1 | t→i R@5 | t→i R@10 | i→t R@1 | i→t R@5 | i→t R@10 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in runs:
        t, i = r["test"]["text_to_image"], r["test"]["image_to_text"]
        lines.append(f"| {r['name']} | {r['config']['n']} ({r['n_train_images']} / {r['test']['n_images']}) | "
                     f"{r['config']['steps']} × {r['config']['batch_size']} | {r['epochs']} | "
                     f"{r['train_wall_s']:.0f} s | {r['train_cpu_s']:.0f} s | {r['steps_per_s']:.2f} | "
                     + " | ".join(f"{100 * d[k]:.1f}" for d in (t, i) for k in ("R@1", "R@5", "R@10")) + " |")
    lines.append("\nR@k in % on the held-out test split (CLIP_benchmark definitions). "
                 + "; ".join(f"{r['name']}: chance R@1 {100 * r['chance_R@1']:.2f}%, torch threads "
                             f"{r['torch_threads']}, 1-min load avg {r['loadavg_1m'][0]} → {r['loadavg_1m'][1]}"
                             for r in runs) + f"; {os.cpu_count()} CPU cores.")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["demo", "long"], default=None, help="run one configuration")
    ap.add_argument("--long-n", type=int, default=6000, help="synthetic images of the longer run")
    ap.add_argument("--long-steps", type=int, default=1200, help="training steps of the longer run")
    ap.add_argument("--threads", type=int, default=None, help="torch threads [default: torch's choice]")
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "train_synth.json")
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from mmsearch.datasets.readers import load_dataset

    configs = {"demo": DEMO, "long": dict(DEMO, n=args.long_n, steps=args.long_steps)}
    runs = []
    for name, cfg in configs.items():
        if args.only and name != args.only:
            continue
        print(f"== {name}: {cfg['n']} images, {cfg['steps']} steps × batch {cfg['batch_size']}, lr {cfg['lr']:g}",
              flush=True)
        t = time.perf_counter()
        timing = train_run(args.cache, cfg, log=lambda line: print(line, flush=True))
        report = held_out(Path(timing["data"]), Path(timing["checkpoint"]))
        n_train = len(load_dataset(Path(timing["data"]) / "captions.csv", split="train").images)
        runs.append({"name": name, "config": cfg, "n_train_images": n_train,
                     "epochs": round(cfg["steps"] * cfg["batch_size"] / n_train, 1), **timing,
                     "test": {k: report[k] for k in ("text_to_image", "image_to_text", "n_images", "n_captions")},
                     "chance_R@1": round(1 / report["n_images"], 4), "eval_s": report["eval_s"],
                     "total_wall_s": round(time.perf_counter() - t, 2), "torch_threads": torch.get_num_threads()})

    result = {"model": TINY_MODEL, "runs": runs, "cpu_count": os.cpu_count(), "torch": torch.__version__,
              "python": platform.python_version(), "machine": machine()}
    if args.only and args.out.exists():  # keep the other configuration's last result
        old = {r["name"]: r for r in json.loads(args.out.read_text()).get("runs", [])}
        old.update({r["name"]: r for r in runs})
        result["runs"] = [old[k] for k in configs if k in old]
    print()
    print(render(result["runs"]))
    print(machine_line(result["machine"]))
    write_results(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
