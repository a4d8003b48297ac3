"""The demo's training pipeline over several seeds, measured on more held-out data than one demo has.

One demo run's held-out recall moves by several points with the seed. Two things add up: training
noise (another seed, another model) and test noise (its test split is 156 images and 404 captions,
so one image→text hit is 0.64 points). To compare code or settings, this script trains the demo's
models for each seed and evaluates each pair of models on the demo's own test split and on
`--heldout` more test splits of the same size and distribution (`mmsearch synth` with seeds 10000,
10001, ..., which no training run uses), reporting their mean. That leaves mostly training noise,
which the mean over seeds and the paired comparison (`--compare`) address.

    python benchmarks/demo_seeds.py [--seeds 0,1,2] [--heldout 8] [--work DIR] [--heldout-dir DIR]
                                    [--out JSON] [--reuse] [--train-args JSON] [--reranker-args JSON]
    python benchmarks/demo_seeds.py --compare OLD.json NEW.json

To measure other code (a previous release), run this script with that checkout first on PYTHONPATH;
the JSON records which mmsearch ran. `--reuse` evaluates checkpoints already in the work folder
instead of training them again (their training times are then not reported).
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.append(str(HERE.parent))  # after PYTHONPATH, so another checkout placed there is the one measured

KEYS = ("t2i", "i2t", "t2i_reranked", "i2t_reranked")
HELDOUT_SEED = 10_000


def _r1(rep: dict) -> dict:
    def pct(block):
        return 100 * block["R@1"]
    return {"t2i": pct(rep["text_to_image"]), "i2t": pct(rep["image_to_text"]),
            "t2i_reranked": pct(rep["reranked"]["text_to_image"]),
            "i2t_reranked": pct(rep["reranked"]["image_to_text"])}


def heldout_sets(folder: Path, count: int) -> list:
    """`count` extra test splits of the demo's size; same seed, same bytes, so they are made once
    (and two checkouts compared can share them)."""
    from mmsearch import demo
    from mmsearch.datasets.readers import synthesize

    paths = []
    for i in range(count):
        out = folder / f"seed{HELDOUT_SEED + i}"
        if not (out / "captions.csv").exists():
            synthesize(out, n=demo.DEMO_IMAGES, seed=HELDOUT_SEED + i, size=64)
        paths.append(out / "captions.csv")
    return paths


def run_seed(seed: int, work: Path, heldout: list, reuse: bool, train_args: dict, reranker_args: dict) -> dict:
    from mmsearch import demo
    from mmsearch.config import ModelSpec, TINY_MODEL
    from mmsearch.datasets.readers import load_dataset, synthesize
    from mmsearch.towers.encoder import load_encoder
    from mmsearch.evaluation.evaluate import evaluate
    from mmsearch.rerank.model import Reranker
    from mmsearch.train.reranker import train_reranker
    from mmsearch.train import train_encoder

    out = work / f"seed{seed}"
    data = out / "data" / "captions.csv"
    enc, rr = out / "encoder.pt", out / "reranker.pt"
    load = os.getloadavg()[0]
    run: dict = {"seed": seed}
    if reuse and enc.exists() and rr.exists():
        run["reused"] = True
    else:
        t0 = time.perf_counter()
        synthesize(out / "data", n=demo.DEMO_IMAGES, seed=seed, size=64)
        cfg = {**demo.DEMO_TRAIN, **train_args}
        if "val_every" not in inspect.signature(train_encoder).parameters:  # older code
            cfg.pop("val_every", None)
        t1 = time.perf_counter()
        train_encoder(data, ModelSpec(model=TINY_MODEL, pretrained=None), enc, seed=seed, **cfg)
        t2 = time.perf_counter()
        train_reranker(data, enc, rr, seed=seed, **{**demo.DEMO_RERANKER, **reranker_args})
        t3 = time.perf_counter()
        run.update(encoder_s=round(t2 - t1, 1), reranker_s=round(t3 - t2, 1), train_total_s=round(t3 - t0, 1))
    encoder, reranker = load_encoder(ModelSpec(checkpoint=str(enc))), Reranker.load(rr)

    def held_out_r1(captions) -> dict:
        return _r1(evaluate(encoder, load_dataset(captions, split="test"), ks=(1,), reranker=reranker))

    own = held_out_r1(data)
    extra = [held_out_r1(p) for p in heldout]
    run.update({k: round(own[k], 1) for k in KEYS})
    if extra:
        run["heldout"] = {k: round(sum(e[k] for e in extra) / len(extra), 2) for k in KEYS}
    run["loadavg_1m"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    return run


def _value(run: dict, key: str, block=None) -> float:
    """A run's R@1 for `key` on the demo's own split (block None) or a block such as 'heldout'."""
    return (run[block] if block else run)[key]


def _mean(runs: list, key: str, block=None) -> float:
    vals = [_value(r, key, block) for r in runs]
    return sum(vals) / len(vals)


def render(result: dict) -> str:
    n = result["heldout_sets"]
    head = ("| seed | t→i | i→t | t→i re-ranked | i→t re-ranked |"
            + (f" {n} more held-out sets: t→i, i→t, t→i re-ranked, i→t re-ranked |" if n else "")
            + " train s | load |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["runs"]:
        row = f"| {r['seed']} | " + " | ".join(f"{r[k]:.1f}" for k in KEYS) + " |"
        if n:
            row += " " + ", ".join(f"{r['heldout'][k]:.1f}" for k in KEYS) + " |"
        row += f" {r.get('train_total_s', 'reused')} | {r['loadavg_1m'][0]} → {r['loadavg_1m'][1]} |"
        lines.append(row)
    mean = "| mean | " + " | ".join(f"{_mean(result['runs'], k):.1f}" for k in KEYS) + " |"
    if n:
        mean += " " + ", ".join(f"{_mean(result['runs'], k, 'heldout'):.1f}" for k in KEYS) + " |"
    lines.append(mean + " | |")
    lines.append(f"\n{result['code']}; encoder {result['train']}, re-ranker {result['reranker']}")
    return "\n".join(lines)


def compare(old: dict, new: dict) -> str:
    """Per column, new minus old on the seeds both ran: mean difference ± its standard error over seeds."""
    seeds = sorted({r["seed"] for r in old["runs"]} & {r["seed"] for r in new["runs"]})
    if not seeds:
        raise SystemExit("the two results share no seed")
    by_seed = [{r["seed"]: r for r in res["runs"]} for res in (old, new)]
    lines = [f"seeds {','.join(map(str, seeds))}: {old['code']} → {new['code']}",
             "| measure | held-out data | old | new | new − old (± s.e. over seeds) |", "|---|---|---|---|---|"]
    blocks = [(None, "demo's own test split")]
    if old.get("heldout_sets") and new.get("heldout_sets"):
        blocks.append(("heldout", f"{new['heldout_sets']} more test splits"))
    for block, label in blocks:
        for k in KEYS:
            o = [_value(by_seed[0][s], k, block) for s in seeds]
            v = [_value(by_seed[1][s], k, block) for s in seeds]
            d = [b - a for a, b in zip(o, v)]
            md = sum(d) / len(d)
            se = math.sqrt(sum((x - md) ** 2 for x in d) / (len(d) - 1) / len(d)) if len(d) > 1 else float("nan")
            lines.append(f"| {k} | {label} | {sum(o) / len(o):.1f} | {sum(v) / len(v):.1f} | {md:+.1f} ± {se:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--heldout", type=int, default=8, help="extra held-out test splits of the demo's size")
    ap.add_argument("--work", type=Path, default=HERE / ".cache" / "demo_seeds")
    ap.add_argument("--heldout-dir", type=Path, help="where the extra test splits live (default WORK/heldout)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "demo_seeds.json")
    ap.add_argument("--reuse", action="store_true", help="evaluate checkpoints already in --work")
    ap.add_argument("--train-args", type=json.loads, default={}, metavar="JSON",
                    help='encoder settings over the demo\'s, e.g. \'{"precision": "fp32"}\'')
    ap.add_argument("--reranker-args", type=json.loads, default={}, metavar="JSON",
                    help="re-ranker settings over the demo's")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"))
    args = ap.parse_args(argv)
    # here, not at the top: tests load this file by path (no benchmarks/ on sys.path) and call compare()
    from common import machine, machine_line, write_results

    if args.compare:
        results = [json.loads(p.read_text()) for p in args.compare]
        print(compare(*results))
        for path, res in zip(args.compare, results):
            if "machine" in res:
                print(f"{path.name}: {machine_line(res['machine'])}")
        return
    from mmsearch import demo

    heldout = heldout_sets(args.heldout_dir or args.work / "heldout", args.heldout)
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        runs.append(run_seed(seed, args.work, heldout, args.reuse, args.train_args, args.reranker_args))
        print(json.dumps(runs[-1]), flush=True)
    result = {"code": os.path.dirname(demo.__file__), "train": {**demo.DEMO_TRAIN, **args.train_args},
              "reranker": {**demo.DEMO_RERANKER, **args.reranker_args},
              "images": demo.DEMO_IMAGES, "heldout_sets": len(heldout), "runs": runs, "machine": machine()}
    print()
    print(render(result))
    print(machine_line(result["machine"]))
    write_results(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
