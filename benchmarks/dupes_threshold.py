"""How similar is an edited copy of an image to its original, compared with distinct images?
This is the measurement behind `mmsearch dupes`' default threshold (mmsearch/search/dupes.py).

    PYTHONPATH=. python benchmarks/dupes_threshold.py [--checkpoint tiny.pt] [--n 300]

Synthetic images (mmsearch synth), each with four edited copies (half-size resize, JPEG quality 60,
a 90% centre crop, +15% brightness), embedded by the model; reports per edit the cosine between
original and copy (min, 1st percentile, median), and for distinct images the cosine of each image's
nearest *other* original (median, 99th percentile, max). Without --checkpoint it trains mmsearch-tiny
for 160 steps first (what the test suite uses). Writes benchmarks/results/dupes_threshold.json.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from common import machine, machine_line, markdown_table, write_results

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EDITS = {
    "resize 50%": lambda im: im.resize((im.width // 2, im.height // 2), Image.BILINEAR),
    "jpeg q60": lambda im: Image.open(_jpeg(im, 60)).convert("RGB"),
    "crop 90%": lambda im: im.crop((im.width // 20, im.height // 20, im.width - im.width // 20,
                                    im.height - im.height // 20)),
    "brightness +15%": lambda im: ImageEnhance.Brightness(im).enhance(1.15),
}


def _jpeg(im, q):
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=q)
    buf.seek(0)
    return buf


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--n", type=int, default=300)
    args = ap.parse_args()
    from mmsearch.config import ModelSpec
    from mmsearch.datasets.readers import synthesize
    from mmsearch.towers.encoder import load_encoder

    work = Path(tempfile.mkdtemp(prefix="dupes_threshold_"))
    synthesize(work / "synth", n=max(args.n, 600), seed=0, size=64)
    ckpt = args.checkpoint
    if ckpt is None:
        from mmsearch.train import train_encoder

        ckpt = work / "tiny.pt"
        train_encoder(work / "synth" / "captions.csv", ModelSpec(model="mmsearch-tiny", pretrained=None), ckpt,
                      steps=160, batch_size=48, lr=1e-3)
    enc = load_encoder(ModelSpec(model="mmsearch-tiny", pretrained=None, checkpoint=str(ckpt)))
    paths = sorted((work / "synth" / "images").glob("*.png"))[:args.n]
    originals = [Image.open(p).convert("RGB") for p in paths]
    t = time.perf_counter()
    base = enc.encode_images(originals)
    out = {"n": len(paths), "model": str(ckpt), "edits": {}}
    for name, edit in EDITS.items():
        cop = enc.encode_images([edit(im) for im in originals])
        cos = np.sum(base * cop, axis=1)
        out["edits"][name] = {"min": round(float(cos.min()), 4), "p1": round(float(np.percentile(cos, 1)), 4),
                              "median": round(float(np.median(cos)), 4)}
    sims = base @ base.T
    np.fill_diagonal(sims, -1)
    nearest = sims.max(1)
    out["distinct_nearest"] = {"median": round(float(np.median(nearest)), 4),
                               "p99": round(float(np.percentile(nearest, 99)), 4), "max": round(float(nearest.max()), 4),
                               "share_at_or_above_0.95": round(float((nearest >= 0.95).mean()), 4)}
    out["seconds"] = round(time.perf_counter() - t, 1)
    out["machine"] = machine()
    out["load_avg"] = " ".join(f"{v:.2f}" for v in out["machine"]["load"])
    d = out["distinct_nearest"]
    print(machine_line(out["machine"]))
    print(markdown_table(["pair", "min", "p1", "median"],
                         [(f"original vs {name}", v["min"], v["p1"], v["median"]) for name, v in out["edits"].items()]
                         + [("nearest distinct image", "", f"p99 {d['p99']} (max {d['max']})", d["median"])]))
    print(f"share of images whose nearest distinct image is >= 0.95: {d['share_at_or_above_0.95']}")
    write_results("dupes_threshold", out, indent=1)


if __name__ == "__main__":
    main()
