"""The image tower's precisions and runtimes: embedding cosine to torch fp32, held-out recall@k, speed.

    python benchmarks/tower_precision.py [--checkpoint FILE --data captions.csv] [--n 1500 --steps 300]
                                         [--speed-model ViT-B-32-256] [--repeat 3]

Towers: ONNX Runtime fp32, OpenVINO fp32, OpenVINO amp-bf16 (bf16 products: only on a CPU with
bfloat16 arithmetic), ONNX Runtime int8. Quality: a trained model (yours, or mmsearch-tiny trained
here on the demo's synthetic data with the demo's settings) embeds the held-out split with torch and
with each tower; texts use the torch text tower for all. Speed: the towers of `--speed-model` (random
weights: speed does not depend on them) on a batch of 32, alternating, medians of --repeat. Prints a
Markdown table, writes benchmarks/results/tower_precision.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import load_average, machine, machine_line, write_results

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


TOWERS = (("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "amp-bf16"), ("onnxruntime", "int8"))


def _towers(enc, tag: str) -> dict:
    """name -> opened tower, for every (runtime, precision) this machine runs."""
    from mmsearch.towers.imagetower import OnnxImageTower, export_image_tower
    from mmsearch.towers.runtime import cpu_has_bf16

    out = {}
    for runtime, prec in TOWERS:
        if prec == "amp-bf16" and not cpu_has_bf16():
            continue
        d = tempfile.mkdtemp(prefix=f"towerq-{tag}-{prec}-")
        export_image_tower(enc, d, prec)
        os.environ["MMSEARCH_TOWER_RUNTIME"] = runtime
        try:
            tower = OnnxImageTower.load(d)
            tower.session  # the runtime is chosen when the model opens
        finally:
            del os.environ["MMSEARCH_TOWER_RUNTIME"]
        if tower.runtime == runtime:
            out[f"{runtime} {prec}"] = tower
    return out


def quality(ckpt: Path, data: Path) -> dict:
    from mmsearch.config import ModelSpec
    from mmsearch.datasets.readers import load_dataset
    from mmsearch.towers.encoder import load_encoder
    from mmsearch.media import load_image
    from mmsearch.evaluation.metrics import image_to_text_ranks, summarize, text_to_image_ranks

    enc = load_encoder(ModelSpec(checkpoint=str(ckpt)))
    ds = load_dataset(data, split="test")
    images = [load_image(p, min_size=enc.image_size) for p in ds.images]
    txt = enc.encode_texts(ds.captions)
    embs = {"torch fp32": np.concatenate([enc.encode_images(images[i:i + 64]) for i in range(0, len(images), 64)])}
    for name, tower in _towers(enc, "q").items():
        embs[name] = np.concatenate([tower.encode_images(images[i:i + 64]) for i in range(0, len(images), 64)])
    ref = embs["torch fp32"]
    out = {"images": len(ds.images), "captions": len(ds.captions)}
    for name, e in embs.items():
        cos = (e * ref).sum(1)
        t2i = summarize(text_to_image_ranks(txt, e, ds.caption_image))
        i2t = summarize(image_to_text_ranks(e, txt, ds.caption_image))
        top1 = float(np.mean((txt @ e.T).argmax(1) == (txt @ ref.T).argmax(1)))
        out[name] = {"cos_to_torch_min": float(cos.min()), "cos_to_torch_mean": float(cos.mean()),
                     "t2i": t2i, "i2t": i2t, "text_top1_same_as_torch": top1}
    return out


def speed(model: str, repeat: int, batch: int = 32) -> dict:
    from mmsearch.config import ModelSpec
    from mmsearch.towers.encoder import load_encoder

    enc = load_encoder(ModelSpec(model=model, pretrained=None))
    towers = _towers(enc, "s")
    x = np.random.default_rng(0).standard_normal((batch, 3, enc.image_size, enc.image_size)).astype(np.float32)
    runs = {p: [] for p in towers}
    for t in towers.values():
        t.encode_image_tensor(x[:4])
        t.encode_image_tensor(x)
    for _ in range(repeat):
        for p, t in towers.items():
            s = time.perf_counter()
            t.encode_image_tensor(x)
            runs[p].append(batch / (time.perf_counter() - s))
    ref = towers["onnxruntime fp32"].encode_image_tensor(x)
    cos = {p: float((t.encode_image_tensor(x) * ref).sum(1).min()) for p, t in towers.items()}
    return {"model": model, "batch": batch, "runs": {p: [round(v, 2) for v in r] for p, r in runs.items()},
            "images_per_s": {p: round(statistics.median(r), 2) for p, r in runs.items()},
            "cos_to_onnxruntime_fp32_random_input_min": cos}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--data", type=Path, help="captions.csv with a test split (with --checkpoint)")
    ap.add_argument("--n", type=int, default=1500, help="synthetic images when training here (demo: 1500)")
    ap.add_argument("--steps", type=int, default=300, help="training steps when training here (demo: 300)")
    ap.add_argument("--speed-model", default="ViT-B-32-256")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "tower_precision.json")
    args = ap.parse_args(argv)
    load0 = load_average()
    if args.checkpoint is None:
        from mmsearch.config import ModelSpec
        from mmsearch.datasets.readers import synthesize
        from mmsearch.train import train_encoder

        work = Path(tempfile.mkdtemp(prefix="towerq-"))
        synthesize(work, n=args.n, seed=0, size=64)
        args.checkpoint, args.data = work / "tiny.pt", work / "captions.csv"
        train_encoder(args.data, ModelSpec(model="mmsearch-tiny", pretrained=None), args.checkpoint,
                      steps=args.steps, batch_size=64, lr=1e-3)
    q = quality(args.checkpoint, args.data)
    s = speed(args.speed_model, args.repeat)
    m = machine()
    res = {"quality": q, "speed": s, "cpu_flags": ",".join(m["flags"]) or "none", "load_before": load0,
           "load_after": m["load"], "machine": m,
           "trained_here": {"n": args.n, "steps": args.steps} if args.data.parent.name.startswith("towerq-") else None}
    print(f"held-out: {q['images']} images, {q['captions']} captions; model {args.checkpoint}")
    print("| image tower | min / mean cos to torch | T→I R@1 | R@5 | R@10 | I→T R@1 | R@5 | top-1 = torch's |")
    print("|---|---|---|---|---|---|---|---|")
    for name in [n for n in q if isinstance(q[n], dict)]:
        r = q[name]
        print(f"| {name} | {r['cos_to_torch_min']:.4f} / {r['cos_to_torch_mean']:.4f} | {r['t2i']['R@1']:.3f} | "
              f"{r['t2i']['R@5']:.3f} | {r['t2i']['R@10']:.3f} | {r['i2t']['R@1']:.3f} | {r['i2t']['R@5']:.3f} | "
              f"{r['text_top1_same_as_torch']:.3f} |")
    ips, base = s["images_per_s"], s["images_per_s"]["onnxruntime fp32"]
    print(f"\nspeed, {s['model']} batch {s['batch']}, {os.cpu_count()} CPUs ({res['cpu_flags']}), medians of {args.repeat}:")
    print("| tower | img/s | vs ONNX Runtime fp32 | min cos to ONNX Runtime fp32 (random input) |")
    print("|---|---|---|---|")
    for name, v in ips.items():
        print(f"| {name} | {v} | {v / base:.2f}× | {s['cos_to_onnxruntime_fp32_random_input_min'][name]:.5f} |")
    print(f"load average before {tuple(round(v, 2) for v in load0)}, after {tuple(round(v, 2) for v in res['load_after'])}")
    print(machine_line(m))
    write_results(args.out, res)


if __name__ == "__main__":
    main()
