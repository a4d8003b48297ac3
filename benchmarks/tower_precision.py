"""The image tower's precisions and runtimes: embedding cosine to torch fp32, held-out recall@k, speed.

    python benchmarks/tower_precision.py [--checkpoint FILE --data captions.csv] [--n 1500 --steps 300]
                                         [--speed-model ViT-B-32-256] [--repeat 3]
                                         [--real-photos /usr/share/datasets/fashion-mnist [--real-steps 800]]

Towers: ONNX Runtime fp32, OpenVINO fp32, OpenVINO amp-bf16 (bf16 products: only on a CPU with
bfloat16 arithmetic), ONNX Runtime int8. Quality: a trained model (yours, or mmsearch-tiny trained
here on the demo's synthetic data with the demo's settings) embeds the held-out split with torch and
with each tower; texts use the torch text tower for all. Speed: the towers of `--speed-model` (random
weights: speed does not depend on them) on a batch of 32, alternating, medians of --repeat. Prints a
Markdown table, writes benchmarks/results/tower_precision.json.

--real-photos: the same comparison on a model trained here on real photographs, the only large set of
them the package registries carry: Fashion-MNIST (Debian's `dataset-fashion-mnist`: 70,000 product
photos, 28 x 28 grey, 10 classes, MIT). mmsearch-tiny is trained on --real-train of its training images
(shown at 64 px in colour mode, each with a caption from templates of its class name) and judged on
--real-test of its test images by what a class-labelled set measures: zero-shot accuracy (the nearest of
the 10 class prompts), same-class precision@10 of image->image search, text->image precision@100 per
class prompt, and how often each tower's zero-shot answer equals torch fp32's.
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


FMNIST_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                  "ankle boot")
TEMPLATES = ("a photo of a {}", "a {}", "a product photo of a {}", "a grey picture of a {}", "{}",
             "a black and white photo of a {}", "a small photo of the {}", "an item of clothing: {}")


def _idx(path: Path) -> np.ndarray:
    """An IDX file (gzip) as an array: the format MNIST-style sets ship in."""
    import gzip

    raw = gzip.open(path).read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_mnist(src: Path, out: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """A captions.csv dataset (train/test splits) of Fashion-MNIST photos, written once under `out`."""
    import csv

    from PIL import Image

    csv_path = out / "captions.csv"
    if csv_path.exists():
        return csv_path
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        ims, labels = _idx(src / f"{prefix}-images-idx3-ubyte.gz"), _idx(src / f"{prefix}-labels-idx1-ubyte.gz")
        for i in rng.choice(len(ims), n, replace=False):
            name = f"images/{split}-{i:05d}.png"
            Image.fromarray(ims[i]).convert("RGB").save(out / name)
            label = FMNIST_CLASSES[labels[i]]
            rows.append((name, TEMPLATES[rng.integers(len(TEMPLATES))].format(label), split, label))
    with open(csv_path.with_suffix(".tmp"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "caption", "split", "label"])
        w.writerows(rows)
    os.replace(csv_path.with_suffix(".tmp"), csv_path)
    return csv_path


def labelled_quality(ckpt: Path, data: Path) -> dict:
    """Every tower against torch fp32 on the test split of a class-labelled set (fashion_mnist)."""
    import csv

    from mmsearch.config import ModelSpec
    from mmsearch.media import load_image
    from mmsearch.towers.encoder import load_encoder

    enc = load_encoder(ModelSpec(checkpoint=str(ckpt)))
    with open(data, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "test"]
    labels = np.array([FMNIST_CLASSES.index(r["label"]) for r in rows])
    images = [load_image(data.parent / r["image"], min_size=enc.image_size) for r in rows]
    prompts = enc.encode_texts([f"a photo of a {c}" for c in FMNIST_CLASSES])
    embs = {"torch fp32": np.concatenate([enc.encode_images(images[i:i + 64]) for i in range(0, len(images), 64)])}
    for name, tower in _towers(enc, "r").items():
        embs[name] = np.concatenate([tower.encode_images(images[i:i + 64]) for i in range(0, len(images), 64)])
    ref = embs["torch fp32"]
    ref_pred = (ref @ prompts.T).argmax(1)
    out = {"images": len(rows), "classes": len(FMNIST_CLASSES)}
    for name, e in embs.items():
        cos = (e * ref).sum(1)
        pred = (e @ prompts.T).argmax(1)
        sims = e @ e.T
        np.fill_diagonal(sims, -np.inf)
        top10 = np.argsort(-sims, 1)[:, :10]
        t2i = np.argsort(-(prompts @ e.T), 1)[:, :100]
        out[name] = {"cos_to_torch_min": float(cos.min()), "cos_to_torch_mean": float(cos.mean()),
                     "zero_shot_accuracy": float((pred == labels).mean()),
                     "i2i_same_class_p_at_10": float((labels[top10] == labels[:, None]).mean()),
                     "t2i_p_at_100": float((labels[t2i] == np.arange(len(FMNIST_CLASSES))[:, None]).mean()),
                     "zero_shot_same_as_torch": float((pred == ref_pred).mean())}
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


def _table(header: str, results: dict, cells) -> None:
    """A Markdown table: one row per tower in `results`, its cosine columns, then `cells(row)`."""
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name in [n for n in results if isinstance(results[n], dict)]:
        r = results[name]
        print(" | ".join([f"| {name}", f"{r['cos_to_torch_min']:.4f} / {r['cos_to_torch_mean']:.4f}", *cells(r)]) + " |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--data", type=Path, help="captions.csv with a test split (with --checkpoint)")
    ap.add_argument("--n", type=int, default=1500, help="synthetic images when training here (demo: 1500)")
    ap.add_argument("--steps", type=int, default=300, help="training steps when training here (demo: 300)")
    ap.add_argument("--speed-model", default="ViT-B-32-256")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--real-photos", type=Path, default=None, metavar="DIR",
                    help="Fashion-MNIST's IDX files (apt-get install dataset-fashion-mnist: "
                         "/usr/share/datasets/fashion-mnist): also judge a model trained on them")
    ap.add_argument("--real-train", type=int, default=12000, help="training photos of --real-photos")
    ap.add_argument("--real-test", type=int, default=2000, help="test photos of --real-photos")
    ap.add_argument("--real-steps", type=int, default=800, help="training steps on --real-photos")
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
    real = None
    if args.real_photos is not None:
        from mmsearch.config import ModelSpec
        from mmsearch.train import train_encoder

        work = HERE / ".cache" / f"fmnist-{args.real_train}-{args.real_test}"
        csv_path = fashion_mnist(args.real_photos, work, args.real_train, args.real_test)
        ckpt = work / f"tiny-s{args.real_steps}.pt"
        train_s = None  # a checkpoint trained by an earlier run is reused
        if not ckpt.exists():
            t = time.perf_counter()
            train_encoder(csv_path, ModelSpec(model="mmsearch-tiny", pretrained=None), ckpt,
                          steps=args.real_steps, batch_size=128, lr=1e-3)
            train_s = round(time.perf_counter() - t, 1)
        real = {"data": "Fashion-MNIST (Debian dataset-fashion-mnist)", "train": args.real_train,
                "steps": args.real_steps, "train_s": train_s,
                **labelled_quality(ckpt, csv_path)}
    s = speed(args.speed_model, args.repeat)
    m = machine()
    res = {"quality": q, "real_photos": real, "speed": s, "cpu_flags": ",".join(m["flags"]) or "none", "load_before": load0,
           "load_after": m["load"], "machine": m,
           "trained_here": {"n": args.n, "steps": args.steps} if args.data.parent.name.startswith("towerq-") else None}
    print(f"held-out: {q['images']} images, {q['captions']} captions; model {args.checkpoint}")
    _table("| image tower | min / mean cos to torch | T→I R@1 | R@5 | R@10 | I→T R@1 | R@5 | top-1 = torch's |", q,
           lambda r: [f"{r['t2i']['R@1']:.3f}", f"{r['t2i']['R@5']:.3f}", f"{r['t2i']['R@10']:.3f}",
                      f"{r['i2t']['R@1']:.3f}", f"{r['i2t']['R@5']:.3f}", f"{r['text_top1_same_as_torch']:.3f}"])
    if real is not None:
        print(f"\nreal photos: {real['data']}, mmsearch-tiny trained here on {real['train']} of them "
              f"({real['steps']} steps), judged on {real['images']} test photos, 10 classes")
        _table("| image tower | min / mean cos to torch | zero-shot acc | I→I same-class P@10 | T→I P@100 | "
               "zero-shot = torch's |", real,
               lambda r: [f"{r['zero_shot_accuracy']:.3f}", f"{r['i2i_same_class_p_at_10']:.3f}",
                          f"{r['t2i_p_at_100']:.3f}", f"{r['zero_shot_same_as_torch']:.3f}"])
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
