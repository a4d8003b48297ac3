"""Synthetic videos with known shots, written with PyAV (the `video` extra): for tests and benchmarks.

A video is a list of `Segment`s, each a still picture (a scene drawn like mmsearch.datasets.synth draws
them, a photo, black) held for a duration, optionally fading in from or out to black and with a moving
dot (so frames differ as in real footage). `write_video` encodes them at a fixed or a variable frame
rate, with an optional display rotation (what phones write), a GOP length and an audio track;
`write_audio_only` writes a file with no video stream. `scene_set` writes a folder of such videos and
returns the truth: each scene's caption and its start and end time.
"""
from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from mmsearch.errors import DatasetError

BLACK = (0, 0, 0)


@dataclass
class Segment:
    duration: float
    picture: object  # a PIL image, an RGB uint8 array, or a colour (r, g, b)
    fade_in: float = 0.0  # seconds of fading in from black at the start
    fade_out: float = 0.0  # ... and out to black at the end
    caption: Optional[str] = None
    moving_dot: bool = False  # a small dot crossing the picture (motion inside the shot)


def _array(picture, size) -> np.ndarray:
    from PIL import Image

    w, h = size
    if isinstance(picture, tuple):
        return np.full((h, w, 3), picture, np.uint8)
    img = picture if isinstance(picture, Image.Image) else Image.fromarray(np.asarray(picture, np.uint8))
    return np.asarray(img.convert("RGB").resize((w, h), Image.Resampling.BILINEAR), np.uint8)


def default_codec(path) -> str:
    import av

    ext = Path(path).suffix.lower()
    if ext == ".webm":
        return "libvpx"
    if ext == ".avi":
        return "mpeg4"
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def frame_times(total: float, fps: float, vfr: bool) -> list[float]:
    """Presentation times: every 1/fps, or (vfr) alternating short and long frame durations."""
    out, t, i = [], 0.0, 0
    while t < total - 1e-9:
        out.append(round(t, 4))
        t += (0.5 if i % 2 == 0 else 1.5) / fps if vfr else 1.0 / fps
        i += 1
    return out


def write_video(path, segments: Sequence[Segment], size=(128, 72), fps: float = 10, codec: Optional[str] = None,
                gop: Optional[int] = None, rotation: Optional[int] = None, vfr: bool = False, audio: bool = False,
                options: Optional[dict] = None, creation_time: Optional[str] = None) -> dict:
    """Encode `segments` into `path`. `rotation`: the display matrix's counter-clockwise turn (90: a phone
    held upright whose frames are stored sideways). `gop`: frames between keyframes [fps / 2].
    Returns {"path", "duration", "scenes": [(start, end, caption)]}."""
    import av

    path = Path(path)
    codec = codec or default_codec(path)
    w, h = size
    pics = [_array(s.picture, size) for s in segments]
    starts = np.cumsum([0.0] + [s.duration for s in segments])
    total = float(starts[-1])
    container = av.open(str(path), "w")
    if creation_time:
        container.metadata["creation_time"] = creation_time
    tb = Fraction(1, 1000)
    stream = container.add_stream(codec, rate=int(round(fps)))
    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
    stream.time_base = tb
    stream.codec_context.time_base = tb
    stream.codec_context.gop_size = gop or max(1, int(round(fps / 2)))
    fast = {"deadline": "realtime", "cpu-used": "8"} if codec.startswith("libvpx") else \
        {"preset": "ultrafast"} if codec == "libx264" else {}
    stream.options = dict(fast, **(options or {}))
    if rotation:
        stream.set_display_rotation(rotation)
    astream = container.add_stream("aac", rate=16000) if audio else None
    rng = np.random.default_rng(0)
    for t in frame_times(total, fps, vfr):
        k = int(np.searchsorted(starts, t, side="right") - 1)
        seg, local = segments[k], t - starts[k]
        arr = pics[k]
        if seg.moving_dot:
            arr = arr.copy()
            x = int((local / max(seg.duration, 1e-6)) * (w - 6))
            arr[h // 2 - 3:h // 2 + 3, x:x + 6] = (255, 255, 255)
        gain = 1.0
        if seg.fade_in and local < seg.fade_in:
            gain = local / seg.fade_in
        if seg.fade_out and local > seg.duration - seg.fade_out:
            gain = min(gain, (seg.duration - local) / seg.fade_out)
        if gain < 1.0:
            arr = (arr.astype(np.float32) * max(0.0, gain)).astype(np.uint8)
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")
        frame.pts, frame.time_base = int(round(t * 1000)), tb
        for p in stream.encode(frame):
            container.mux(p)
    for p in stream.encode():
        container.mux(p)
    if astream is not None:
        _write_tone(container, astream, total, rng)
    container.close()
    scenes = [(float(starts[i]), float(starts[i + 1]), s.caption) for i, s in enumerate(segments)]
    return {"path": str(path), "duration": total, "scenes": scenes}


def _write_tone(container, astream, seconds: float, rng) -> None:
    import av

    rate, n = 16000, 1024
    layout = "mono"
    pts = 0
    while pts < seconds * rate:
        t = (np.arange(n) + pts) / rate
        samples = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout=layout)
        frame.sample_rate, frame.pts = rate, pts
        for p in astream.encode(frame):
            container.mux(p)
        pts += n
    for p in astream.encode():
        container.mux(p)


def write_audio_only(path, seconds: float = 2.0) -> None:
    """A file with an audio stream and no video stream (what a voice memo saved as .mp4 is)."""
    import av

    container = av.open(str(path), "w")
    astream = container.add_stream("aac", rate=16000)
    _write_tone(container, astream, seconds, np.random.default_rng(0))
    container.close()


def synth_scenes(data_dir) -> list[tuple[str, str]]:
    """(image path, first caption) of every picture of a synthetic data set (mmsearch.datasets.synth)."""
    data_dir = Path(data_dir)
    seen: dict = {}
    with open(data_dir / "captions.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            seen.setdefault(row["image"], row["caption"])
    if not seen:
        raise DatasetError(f"{data_dir}/captions.csv lists no images")
    return [(str(data_dir / p), c) for p, c in seen.items()]


def scene_set(out, data_dir, n_videos: int = 8, scenes: int = 4, seconds: float = 3.0, size=(128, 128),
              fps: float = 10, seed: int = 0, ext: str = ".mp4") -> list[dict]:
    """Videos of `scenes` synthetic pictures each (distinct pictures across the set, shown `seconds`
    each, a moving dot in each), written to OUT/video_NNN.ext. Returns write_video's truth per video."""
    from PIL import Image

    pool = synth_scenes(data_dir)
    if len(pool) < n_videos * scenes:
        raise DatasetError(f"{n_videos} videos of {scenes} scenes need {n_videos * scenes} pictures; "
                           f"{data_dir} has {len(pool)}")
    random.Random(seed).shuffle(pool)
    Path(out).mkdir(parents=True, exist_ok=True)
    truth = []
    for v in range(n_videos):
        segs = [Segment(seconds, Image.open(p).convert("RGB"), caption=c, moving_dot=True)
                for p, c in pool[v * scenes:(v + 1) * scenes]]
        truth.append(write_video(Path(out) / f"video_{v:03d}{ext}", segs, size=size, fps=fps))
    return truth
