"""Indexing throughput on large (12 MP) JPEGs: the full pipeline vs the model alone, in one run.

    python benchmarks/index_throughput.py [--n 128] [--repeat 3] [--threads N] [--model ViT-B-32]

Model-only and pipeline runs alternate `--repeat` times and the medians are reported, so a noisy
neighbour hits both alike. The decode cost (one thread, per image) gives the ceiling a pipeline can
reach when the model already keeps every core busy: cores / (model core-s per image + decode s per
image). Prints a Markdown table and writes benchmarks/results/index_throughput.json. The model runs
with random weights (`--pretrained none`): speed does not depend on the weights.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import machine, machine_line, make_photos, write_results

HERE = Path(__file__).parent
# as `mmsearch index` does (cli._yielding_openmp); both measurements below run under the same policy
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def model_only(spec, n: int, batch_size: int) -> float:
    """Images/s of the image tower alone on pre-made input tensors."""
    import torch

    from mmsearch.towers.encoder import load_encoder

    enc = load_encoder(spec)
    x = torch.randn(batch_size, 3, enc.image_size, enc.image_size)
    enc.encode_image_tensor(x[:2])  # warm-up
    done, t = 0, time.perf_counter()
    while done < n:
        enc.encode_image_tensor(x)
        done += batch_size
    return done / (time.perf_counter() - t)


def decode_seconds(spec, files) -> float:
    """CPU seconds per image of what a decode worker does (open, draft decode, EXIF, resize, hash)."""
    from mmsearch.indexing import scan
    from mmsearch.towers.encoder import load_encoder
    from mmsearch.indexing.stage import decode_file, worker_transform

    enc = load_encoder(spec)
    prep = worker_transform(enc)
    infos = [scan.FileInfo(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    t = time.perf_counter()
    for info in infos:
        decode_file(info, enc.image_size, prep)
    return (time.perf_counter() - t) / len(infos)


def pipeline(spec, folder: Path, batch_size: int, workers) -> dict:
    from mmsearch.indexing.pipeline import index_folders

    marks = {}

    def progress(done, total, **kw):
        marks.setdefault("start", time.perf_counter())
        marks["end"] = time.perf_counter()

    idx = Path(tempfile.mkdtemp(prefix="mmsearch-bench-"))
    try:
        t = time.perf_counter()
        s = index_folders(idx, [folder], spec=spec, batch_size=batch_size, workers=workers, progress=progress)
        total = time.perf_counter() - t
    finally:
        shutil.rmtree(idx, ignore_errors=True)
    return {"embedded": s.embedded, "failed": s.failed, "embed_phase_s": marks["end"] - marks["start"],
            "end_to_end_s": total, "images_per_s": s.embedded / (marks["end"] - marks["start"]),
            "end_to_end_images_per_s": s.embedded / total}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=128, help="number of photos")
    ap.add_argument("--repeat", type=int, default=3, help="alternating model-only / pipeline runs")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    ap.add_argument("--width", type=int, default=4000)
    ap.add_argument("--height", type=int, default=3000)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--cache", type=Path, default=HERE / ".cache" / "photos_12mp")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "index_throughput.json")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE.parent))
    from mmsearch.config import ModelSpec

    spec = ModelSpec(model=args.model, pretrained=None)
    folder = args.cache / f"{args.width}x{args.height}"
    t = time.perf_counter()
    make_photos(folder, args.n, (args.width, args.height))
    files = sorted(folder.glob("*.jpg"))[: args.n]
    if len(files) < len(list(folder.glob("*.jpg"))):
        folder = folder.parent / f"{args.width}x{args.height}-n{args.n}"
        folder.mkdir(parents=True, exist_ok=True)
        for f in files:
            if not (folder / f.name).exists():
                os.link(f, folder / f.name)
    gen_s = time.perf_counter() - t
    mb = sum(f.stat().st_size for f in files) / len(files) / 1e6

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    decode_s = decode_seconds(spec, files)
    runs = []
    for _ in range(args.repeat):
        runs.append((model_only(spec, args.n, args.batch_size), pipeline(spec, folder, args.batch_size, args.workers)))
    model_ips = statistics.median(m for m, _ in runs)
    pipe = sorted((p for _, p in runs), key=lambda p: p["images_per_s"])[len(runs) // 2]
    ratio = pipe["images_per_s"] / model_ips
    cores = os.cpu_count() or 1
    # the model keeps `threads` cores busy; decoding needs decode_s of CPU per image on top
    ceiling = min(model_ips, cores / (threads / model_ips + decode_s))
    result = {"model": args.model, "photos": args.n, "size": f"{args.width}x{args.height}",
              "mean_file_mb": round(mb, 2), "batch_size": args.batch_size, "workers": args.workers,
              "torch_threads": threads, "repeat": args.repeat, "decode_ms_per_image": round(decode_s * 1000, 1),
              "model_only_runs": [round(m, 2) for m, _ in runs],
              "pipeline_runs": [round(p["images_per_s"], 2) for _, p in runs],
              "ceiling_images_per_s": round(ceiling, 2), "ceiling_vs_model": round(ceiling / model_ips, 3),
              "model_only_images_per_s": round(model_ips, 2), **{k: round(v, 3) if isinstance(v, float) else v
                                                                 for k, v in pipe.items()},
              "pipeline_vs_model": round(ratio, 3), "target_ratio": 0.9, "rclip_images_per_s": 5.5,
              "cpu_count": os.cpu_count(), "python": platform.python_version(), "generate_s": round(gen_s, 1),
              "machine": machine()}
    print(machine_line(result["machine"]))
    print(f"| {args.n} × {args.width}×{args.height} JPEG ({mb:.1f} MB) | images/s |")
    print("|---|---|")
    print(f"| model only ({args.model}, batch {args.batch_size}, {threads} torch threads) | {model_ips:.2f} |")
    print(f"| mmsearch index pipeline (embed phase) | {pipe['images_per_s']:.2f} |")
    print(f"| mmsearch index end to end (incl. model load) | {pipe['end_to_end_images_per_s']:.2f} |")
    print(f"| pipeline / model only | {ratio:.1%} (target ≥ 90%) |")
    print(f"| decode per image (1 thread) | {decode_s * 1000:.1f} ms |")
    print(f"| ceiling on {cores} cores: cores / (model + decode CPU per image) | {ceiling:.2f} ({ceiling / model_ips:.1%}) |")
    print(f"| pipeline / ceiling | {pipe['images_per_s'] / ceiling:.1%} |")
    print(f"(medians of {args.repeat} alternating runs; model only {[round(m, 2) for m, _ in runs]}, "
          f"pipeline {[round(p['images_per_s'], 2) for _, p in runs]})")
    print(f"| rclip on the same kind of files (measured separately) | 5.5 |")
    write_results(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
