"""Video indexing: decode + embed speed as a multiple of real time, peak memory against length, shots per
minute, and moment recall on the synthetic set.

    python benchmarks/video.py [--sizes 480p,1080p,2160p] [--seconds 60] [--rss-minutes 1,5,20,60,120]
                               [--rss-size 1080p] [--model ViT-B-32] [--recall-videos 40]
    python benchmarks/video.py --sizes 144p --seconds 6 --rss-minutes 0.1,0.2 --rss-size 144p \\
                               --recall-videos 3 --checkpoint tiny.pt --data SYNTH_DIR   # a quick check

- speed: one H.264 video per size (photo-like scenes of 5 s, a moving block, 30 fps, a keyframe a second as
  phones write them), indexed by `index_folders` into a new index with the CPU default tower (the index's
  exported image tower; random weights: speed does not depend on them). `x realtime` is the video's duration
  over the indexer's decode + embed seconds (model loading excluded); `decode x` is the reader alone.
- memory: the same indexing of 1080p videos of each length in a fresh process, its peak RSS (ru_maxrss):
  flat in the length means a one-hour film needs what a one-minute clip needs. Videos past 2 minutes are a
  2-minute clip joined to itself by stream copy (`long_video`), so the hour is cheap to make.
- recall: videos of synthetic scenes (mmsearch.datasets.synthvideo.scene_set) indexed with a model trained on
  that data set (the demo configuration, trained and cached here, or --checkpoint with its --data); every
  scene's caption is a query; a hit is right when it is a shot of the right video whose frame lies inside
  the scene. recall@k over the ungrouped moments, and @1 of the grouped hits.

Videos are cached under benchmarks/.cache/video/ (ultrafast x264 presets: cheap to make, not to decode).
Prints Markdown tables with the machine line and writes benchmarks/results/video.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import CACHE, data_dir, demo_checkpoint, demo_config, machine, machine_line, markdown_table, write_results

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `mmsearch index` runs
SIZES = {"144p": (256, 144), "240p": (426, 240), "480p": (854, 480), "720p": (1280, 720), "1080p": (1920, 1080),
         "2160p": (3840, 2160), "4k": (3840, 2160)}
FPS = 30
SCENE_S = 5.0


def make_video(size_name: str, seconds: float) -> Path:
    """A cached H.264 mp4 of photo-like scenes (5 s each) with a moving block, at 30 fps, a keyframe a second."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    import av

    w, h = SIZES[size_name]
    out = CACHE / "video" / f"scenes-{size_name}-{seconds:g}s.mp4"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    scenes = []
    for i in range(8):  # photo-like: smooth colour fields, shapes, a blur, mild noise
        small = (max(8, w // 8), max(8, h // 8))
        yy, xx = np.mgrid[0:small[1], 0:small[0]].astype(np.float32)
        base = np.stack([np.sin(xx / rng.uniform(3, 12) + c) * 60 + rng.uniform(60, 190)
                         + np.cos(yy / rng.uniform(3, 12) + c) * 40 for c in range(3)], -1)
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
        draw = ImageDraw.Draw(img)
        for _ in range(10):
            x0, y0, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(h // 20, h // 4))
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        img = img.filter(ImageFilter.GaussianBlur(2))
        noise = rng.normal(0, 5, (h, w, 3))
        scenes.append(np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8))
    tmp = out.with_name(out.name + f".{os.getpid()}.tmp.mp4")
    container = av.open(str(tmp), "w")
    stream = container.add_stream("libx264", rate=FPS)
    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
    stream.codec_context.gop_size = FPS
    stream.options = {"preset": "ultrafast", "crf": "30", "x264-params": f"keyint={FPS}:min-keyint={FPS}"}
    block = max(8, h // 10)
    for n in range(int(seconds * FPS)):
        t = n / FPS
        arr = scenes[int(t // SCENE_S) % len(scenes)].copy()
        x = int((t % SCENE_S) / SCENE_S * (w - block))
        arr[h // 2 - block // 2:h // 2 + block // 2, x:x + block] = (240, 240, 240)
        for p in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
            container.mux(p)
    for p in stream.encode():
        container.mux(p)
    container.close()
    os.replace(tmp, out)
    return out


def long_video(size_name: str, seconds: float, base_s: float = 120.0) -> Path:
    """A cached long video made by stream-copying the `base_s` clip end to end (no re-encoding: an hour
    of 1080p costs seconds to make, not the half hour x264 would take). base_s is a multiple of the
    scenes' 40 s cycle and every clip starts on a keyframe, so the joins look like any other cut."""
    import av

    if seconds <= base_s:
        return make_video(size_name, seconds)
    base = make_video(size_name, base_s)
    out = CACHE / "video" / f"scenes-{size_name}-{seconds:g}s-joined.mp4"
    if out.exists():
        return out
    tmp = out.with_name(out.name + f".{os.getpid()}.tmp.mp4")
    with av.open(str(base)) as src:
        ist = src.streams.video[0]
        span = max(p.pts + (p.duration or 0) for p in src.demux(ist) if p.pts is not None)  # in ist.time_base
        end = int(seconds / ist.time_base)  # cut on the first keyframe at or past the length asked for

        def packets():
            """The base clip's packets again and again, shifted by one span a copy, until `end`."""
            for shift in itertools.count(0, span):
                src.seek(0)
                for p in src.demux(ist):
                    if p.dts is None:  # the demuxer's flush packet
                        continue
                    if p.is_keyframe and p.pts + shift >= end:
                        return
                    p.pts, p.dts = p.pts + shift, p.dts + shift
                    yield p

        with av.open(str(tmp), "w") as dst:
            ost = dst.add_stream_from_template(ist)
            for p in packets():
                p.stream = ost
                dst.mux(p)
    os.replace(tmp, out)
    return out


def index_one(path: Path, spec, frames: int) -> dict:
    """Index one video into a new index: decode + embed seconds, shots, and the reader alone."""
    from mmsearch.indexing.pipeline import index_folders
    from mmsearch.video import read_shots

    folder = Path(tempfile.mkdtemp(prefix="mmsearch-video-bench-"))
    try:
        t = time.perf_counter()
        shots = read_shots(path, 224, frames=frames)
        decode_s = time.perf_counter() - t
        s = index_folders(folder / "idx", [path], spec=spec, video_frames=frames)
        if s.failures:
            raise SystemExit(f"{path}: {s.failures}")
        return {"duration_s": shots.duration_s, "decode_s": round(decode_s, 3), "index_s": round(s.embed_seconds, 3),
                "encode_s": round(s.encode_seconds, 3), "shots": s.shots, "sampled": shots.sampled,
                "x_realtime": round(shots.duration_s / s.embed_seconds, 1),
                "decode_x_realtime": round(shots.duration_s / decode_s, 1),
                "shots_per_min": round(s.shots / (shots.duration_s / 60), 1)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def rss_child(path: str, model: str, frames: int) -> None:
    """In a fresh process: index one video, print its peak RSS (MB) as JSON."""
    from mmsearch.config import ModelSpec

    res = index_one(Path(path), ModelSpec(model=model, pretrained=None), frames)
    res["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(res))


def recall(args) -> dict:
    """Moment recall@1 / @5 on synthetic scene videos, with a model trained on their data set."""
    from mmsearch.config import TINY_MODEL, ModelSpec
    from mmsearch.datasets.synthvideo import scene_set
    from mmsearch.indexing.pipeline import index_folders
    from mmsearch.search.query import Searcher
    from mmsearch.storage.store import IndexStore

    if args.checkpoint:
        ckpt, data = Path(args.checkpoint), Path(args.data)
    else:
        cfg = demo_config()
        ckpt, data = demo_checkpoint(), data_dir(CACHE, cfg["n"], cfg["seed"], cfg["size"])
    folder = Path(tempfile.mkdtemp(prefix="mmsearch-video-recall-"))
    try:
        truth = scene_set(folder / "videos", data, n_videos=args.recall_videos, scenes=4)
        index_folders(folder / "idx", [folder / "videos"], spec=ModelSpec(model=TINY_MODEL, pretrained=None,
                                                                          checkpoint=str(ckpt)))
        searcher = Searcher(IndexStore.open(folder / "idx"))
        at1 = at5 = grouped1 = n = 0
        for v in truth:
            for start, end, caption in v["scenes"]:
                right = lambda h: h.path == v["path"] and start <= h.frame_s < end  # noqa: E731
                moments = searcher.search(caption, k=5, group=False)
                at1 += bool(moments and right(moments[0]))
                at5 += any(right(h) for h in moments)
                top = searcher.search(caption, k=1)
                grouped1 += bool(top and right(top[0]))
                n += 1
        return {"videos": len(truth), "queries": n, "recall@1": round(at1 / n, 3), "recall@5": round(at5 / n, 3),
                "grouped_recall@1": round(grouped1 / n, 3), "checkpoint": str(ckpt)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="480p,1080p,2160p")
    ap.add_argument("--seconds", type=float, default=60.0, help="Length of each speed video.")
    ap.add_argument("--rss-minutes", default="1,5,20,60,120", help="Lengths of the memory videos, in minutes.")
    ap.add_argument("--rss-size", default="1080p")
    ap.add_argument("--model", default="ViT-B-32", help="Tower for speed and memory (random weights).")
    ap.add_argument("--frames", type=int, default=300, help="--video-frames of the indexer.")
    ap.add_argument("--recall-videos", type=int, default=40, help="0: skip the recall measurement.")
    ap.add_argument("--checkpoint", default=None, help="Model for recall (with --data); default: the demo one.")
    ap.add_argument("--data", default=None, help="The synthetic data set that --checkpoint was trained on.")
    ap.add_argument("--out", default="video")
    ap.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        return rss_child(args.rss_child, args.model, args.frames)

    from mmsearch.config import ModelSpec

    spec = ModelSpec(model=args.model, pretrained=None)
    speed = []
    for size in [s for s in args.sizes.split(",") if s]:
        path = make_video(size, args.seconds)
        r = index_one(path, spec, args.frames)
        speed.append(dict(r, size=size, resolution="x".join(map(str, SIZES[size]))))
        print(f"{size}: {r}", file=sys.stderr)
    memory = []
    for minutes in [float(m) for m in args.rss_minutes.split(",") if m]:
        path = long_video(args.rss_size, minutes * 60)
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        out = subprocess.run([sys.executable, __file__, "--rss-child", str(path), "--model", args.model,
                              "--frames", str(args.frames)], capture_output=True, text=True, env=env, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        memory.append(dict(r, minutes=minutes, size=args.rss_size))
        print(f"{minutes} min: {r}", file=sys.stderr)
    rec = recall(args) if args.recall_videos else None

    m = machine()
    print(markdown_table(["video", "length", "shots", "shots/min", "decode x realtime", "decode + embed x realtime"],
                         [(f"{r['size']} ({r['resolution']}) H.264", f"{r['duration_s']:.0f} s", r["shots"],
                           r["shots_per_min"], r["decode_x_realtime"], r["x_realtime"]) for r in speed], "lrrrrr"))
    print()
    if memory:
        print(markdown_table(["length", "video", "frames sampled", "shots", "peak RSS (MB)", "x realtime"],
                             [(f"{r['minutes']:g} min", r["size"], r["sampled"], r["shots"], r["peak_rss_mb"],
                               r["x_realtime"]) for r in memory], "llrrrr"))
        print()
    if rec:
        print(markdown_table(["videos", "queries", "moment recall@1", "moment recall@5", "grouped recall@1"],
                             [(rec["videos"], rec["queries"], rec["recall@1"], rec["recall@5"],
                               rec["grouped_recall@1"])], "rrrrr"))
        print()
    print(f"model {args.model} (random weights) for speed and memory; frames budget {args.frames}")
    print(machine_line(m))
    path = write_results(args.out, {"speed": speed, "memory": memory, "recall": rec, "model": args.model,
                                    "frames": args.frames, "machine": m})
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
