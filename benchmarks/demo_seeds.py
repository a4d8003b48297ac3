"""The demo's training pipeline over several seeds: held-out recall of one demo run moves by several
points with the seed (156 test images, 404 captions), so compare code or settings on the mean.

    python benchmarks/demo_seeds.py [--seeds 0,1,2] [--work benchmarks/.cache/demo_seeds]

For each seed: `mmsearch synth` data (the demo's size), the encoder and the fusion re-ranker with the
demo's settings (mmsearch.demo.DEMO_TRAIN / DEMO_RERANKER, that seed), then held-out R@1 plain and
re-ranked, as the demo's last stage computes it. Prints a Markdown table and writes
benchmarks/results/demo_seeds.json. To compare with other code, run the same script with that
checkout first on PYTHONPATH (the JSON records which mmsearch ran).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))


def run_seed(seed: int, work: Path) -> dict:
    from mmsearch import demo
    from mmsearch.config import ModelSpec, TINY_MODEL
    from mmsearch.datasets import load_dataset, synthesize
    from mmsearch.encoder import load_encoder
    from mmsearch.evaluate import evaluate
    from mmsearch.rerank import Reranker
    from mmsearch.rerank_train import train_reranker
    from mmsearch.train import train_encoder

    out = work / f"seed{seed}"
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    synthesize(out / "data", n=demo.DEMO_IMAGES, seed=seed, size=64)
    data = out / "data" / "captions.csv"
    cfg = dict(demo.DEMO_TRAIN)
    if "val_every" not in inspect.signature(train_encoder).parameters:  # older code
        cfg.pop("val_every", None)
    t1 = time.perf_counter()
    train_encoder(data, ModelSpec(model=TINY_MODEL, pretrained=None), out / "encoder.pt", seed=seed, **cfg)
    t2 = time.perf_counter()
    train_reranker(data, out / "encoder.pt", out / "reranker.pt", seed=seed, **demo.DEMO_RERANKER)
    t3 = time.perf_counter()
    rep = evaluate(load_encoder(ModelSpec(checkpoint=str(out / "encoder.pt"))), load_dataset(data, split="test"),
                   ks=(1,), reranker=Reranker.load(out / "reranker.pt"))

    def r1(block):
        return round(100 * block["R@1"], 1)
    return {"seed": seed, "t2i": r1(rep["text_to_image"]), "i2t": r1(rep["image_to_text"]),
            "t2i_reranked": r1(rep["reranked"]["text_to_image"]),
            "i2t_reranked": r1(rep["reranked"]["image_to_text"]),
            "encoder_s": round(t2 - t1, 1), "reranker_s": round(t3 - t2, 1),
            "total_s": round(time.perf_counter() - t0, 1),
            "loadavg_1m": [round(load, 2), round(os.getloadavg()[0], 2)]}


def render(result: dict) -> str:
    head = "| seed | t→i R@1 | i→t R@1 | t→i re-ranked | i→t re-ranked | encoder s | re-ranker s | load |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    keys = ("t2i", "i2t", "t2i_reranked", "i2t_reranked")
    for r in result["runs"]:
        lines.append(f"| {r['seed']} | " + " | ".join(f"{r[k]:.1f}" for k in keys) + f" | {r['encoder_s']:.0f} | "
                     f"{r['reranker_s']:.0f} | {r['loadavg_1m'][0]} → {r['loadavg_1m'][1]} |")
    mean = {k: sum(r[k] for r in result["runs"]) / len(result["runs"]) for k in keys}
    lines.append("| mean | " + " | ".join(f"{mean[k]:.1f}" for k in keys) + " | | | |")
    lines.append(f"\n{result['code']}; encoder {result['train']}, re-ranker {result['reranker']}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--work", type=Path, default=HERE / ".cache" / "demo_seeds")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "demo_seeds.json")
    args = ap.parse_args(argv)
    from mmsearch import demo

    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        runs.append(run_seed(seed, args.work))
        print(json.dumps(runs[-1]), flush=True)
    result = {"code": os.path.dirname(demo.__file__), "train": demo.DEMO_TRAIN, "reranker": demo.DEMO_RERANKER,
              "images": demo.DEMO_IMAGES, "runs": runs}
    print()
    print(render(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
