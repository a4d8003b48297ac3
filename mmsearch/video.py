"""Open any video safely: its shots (mmsearch.shots) from frames sampled cheaply, or one frame at a time.

Through PyAV (the `video` extra: `pip install 'mmsearch[video]'`, whose wheels bundle FFmpeg); without it
`available()` is False and the indexer skips videos with one notice.

Sampling decodes keyframes only, at most one per `step` seconds (a keyframe needs no other frame, so the
frames between are never decoded: phones put one every 1-2 s, x264 one at every cut), and a GOP longer
than `MAX_KEY_GAP_S` in full at the same rate. Frames are scaled by FFmpeg's own scaler to the model's
size as they come out of the decoder, rotated by the stream's display matrix (phone videos), and cut into
shots as they come, so memory does not grow with the video's length. A per-video frame budget bounds a
long film: the step widens to duration / budget, and sampling stops at the budget whatever happens.
Errors are MediaError with a short reason, as for photos; timestamps are seconds from the video's start.
"""
from __future__ import annotations

import calendar
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Optional

from mmsearch.config import VIDEO_EXTENSIONS  # noqa: F401 (re-exported)
from mmsearch.errors import MediaError

if TYPE_CHECKING:  # numpy, PIL and the shot cutter load with the first video read, not with every index run
    from mmsearch.shots import Shot

DEFAULT_FRAMES = 300  # frames sampled per video at most (`mmsearch index --video-frames`)
SAMPLE_STEP_S = 1.0  # at most one sampled frame per this many seconds
MAX_KEY_GAP_S = 10.0  # keyframes further apart than this: the GOP is decoded in full
MAX_PIXELS = 80_000_000  # per frame (8K is 33 MP)
DECODE_THREADS = max(1, min(4, os.cpu_count() or 1))
_av_state: Optional[bool] = None


def available() -> bool:
    """Whether PyAV (the `video` extra) can be imported."""
    global _av_state
    if _av_state is None:
        try:
            import av  # noqa: F401

            _av_state = True
        except ImportError:
            _av_state = False
    return _av_state


def is_video(path) -> bool:
    return os.path.splitext(os.fspath(path))[1].lower() in VIDEO_EXTENSIONS


@dataclass
class VideoShots:
    """What reading a video gives: its shots (pictures already `prepare`d) and the file's facts."""

    shots: list[Shot]
    width: int  # as displayed (after rotation)
    height: int
    duration_s: float
    taken_at: Optional[float] = None  # the container's creation_time, when it has one
    rotation: int = 0
    sampled: int = 0  # frames sampled (at most the budget)
    extra: dict = field(default_factory=dict)


def _av():
    if not available():
        raise MediaError("video", "video support not installed (pip install 'mmsearch[video]')")
    import av

    return av


class _Opened:
    """An open container and its (first real) video stream; a context manager that always closes."""

    def __init__(self, path: str):
        av = _av()
        self.path = path
        try:
            if os.path.getsize(path) == 0:
                raise MediaError(path, "empty file")
            self.container = av.open(path, metadata_errors="ignore")
        except MediaError:
            raise
        except OSError as exc:  # PyAV's FileNotFoundError, PermissionError, ... are OSErrors too
            if exc.errno is not None:
                from mmsearch.media import os_reason

                raise MediaError(path, os_reason(path, exc)) from exc
            raise MediaError(path, f"not a video, or a truncated one ({_short(exc)})") from exc
        except (av.error.FFmpegError, ValueError, EOFError) as exc:
            raise MediaError(path, f"not a video, or a truncated one ({_short(exc)})") from exc
        streams = [s for s in self.container.streams.video
                   if not (s.disposition & av.stream.Disposition.attached_pic)]  # cover art is no video
        if not streams:
            self.container.close()
            raise MediaError(path, "no video stream (audio only?)")
        self.stream = s = streams[0]
        w, h = s.codec_context.width, s.codec_context.height
        if w * h > MAX_PIXELS:
            self.container.close()
            raise MediaError(path, f"too large ({w}×{h} pixels a frame, cap {MAX_PIXELS:,})")
        s.codec_context.thread_type = "AUTO"
        s.codec_context.thread_count = DECODE_THREADS
        tb = s.time_base
        self.start = float(s.start_time * tb) if s.start_time is not None and tb else 0.0
        if s.duration is not None and tb:
            self.duration = float(s.duration * tb)
        elif self.container.duration:
            self.duration = self.container.duration / 1e6
        else:
            self.duration = 0.0

    def __enter__(self) -> "_Opened":
        return self

    def __exit__(self, *exc) -> None:
        self.container.close()


def _short(exc: BaseException) -> str:
    """FFmpeg's own words without the path (an FFmpegError's strerror), else the exception's last line."""
    if getattr(exc, "strerror", None):
        return f"FFmpeg: {exc.strerror}"
    text = str(exc).strip().splitlines()
    return (text[-1] if text else exc.__class__.__name__)[:160]


def creation_time(container) -> Optional[float]:
    """The container's creation_time tag (ISO 8601, UTC) as a unix timestamp, or None."""
    for meta in (container.metadata, *(s.metadata for s in container.streams)):
        value = (meta or {}).get("creation_time")
        if value:
            try:
                when = calendar.timegm(time.strptime(str(value)[:19], "%Y-%m-%dT%H:%M:%S"))
            except ValueError:
                continue
            if when > 86400 * 366:  # 1970-01-01 means "not set" to many muxers
                return float(when)
    return None


def _packet_time(pkt) -> Optional[float]:
    ts = pkt.pts if pkt.pts is not None else pkt.dts
    return None if ts is None or pkt.time_base is None else float(ts * pkt.time_base)


def sampled_frames(v: _Opened, step: float, max_gap: float = MAX_KEY_GAP_S) -> Iterator:
    """Decoded frames: keyframes at most one per `step`, or every frame of a GOP longer than `max_gap`
    (the caller thins those out). Also records in v.last_packet_s where the stream's packets end."""
    cc = v.stream.codec_context
    last_key = -float("inf")
    gop: list = []  # the packets of a GOP not (yet) known to be long, held until it is
    gop_t: Optional[float] = None
    full = key_fed = False
    v.last_packet_s = 0.0
    for pkt in v.container.demux(v.stream):
        t = _packet_time(pkt)
        if t is None or pkt.size == 0:
            continue
        v.last_packet_s = max(v.last_packet_s, t + float((pkt.duration or 0) * pkt.time_base))
        if pkt.is_keyframe:
            gop, gop_t, full = [pkt], t, False
            key_fed = t - last_key >= 0.75 * step
            if key_fed:
                last_key = t
                yield from cc.decode(pkt)
            continue
        if gop_t is None:
            continue  # before the first keyframe: nothing to decode from
        if full:
            yield from cc.decode(pkt)
            continue
        gop.append(pkt)
        if t - gop_t > max_gap:  # a long GOP: decode it whole from its keyframe
            full = True
            for p in gop[1 if key_fed else 0:]:
                yield from cc.decode(p)
            gop = []
    yield from cc.decode(None)  # the frames still inside the decoder's threads


def _picture(frame, short_side: int, rotation: int):
    """The frame as an RGB PIL image whose short side is `short_side`, turned as it is displayed."""
    import numpy as np
    from PIL import Image

    w, h = frame.width, frame.height
    scale = short_side / float(max(1, min(w, h)))
    if scale < 1:
        w, h = max(1, round(w * scale)), max(1, round(h * scale))
    arr = frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray()
    k = (rotation // 90) % 4  # the display matrix turns the picture counter-clockwise by `rotation`
    if k:
        arr = np.ascontiguousarray(np.rot90(arr, k))
    return Image.fromarray(arr)


def _frame_time(frame, v: _Opened) -> Optional[float]:
    """Seconds from the start, from the frame's pts in the stream's time base (a frame flushed out of the
    decoder's threads may carry no time base of its own, and its `time` is then NaN)."""
    ts = frame.pts if frame.pts is not None else frame.dts
    tb = v.stream.time_base
    if ts is None or not tb:
        return None
    return max(0.0, float(ts * tb) - v.start)


def _rotation(frame) -> int:
    try:
        return int(round(frame.rotation or 0))
    except (AttributeError, TypeError, ValueError):
        return 0


def read_shots(path, image_size: int, frames: int = DEFAULT_FRAMES, step: float = SAMPLE_STEP_S,
               prepare: Optional[Callable] = None) -> VideoShots:
    """Sample `path`, cut it into shots, and `prepare` (the model's PIL transform) each shot's picture."""
    import numpy as np

    from mmsearch.shots import Shot, ShotCutter, thumbnail

    av = _av()
    path = os.fspath(path)
    if frames < 1:
        raise ValueError("frames must be at least 1")
    prepare = prepare or (lambda img: img)
    out: list[Shot] = []
    cutter = ShotCutter()

    def keep(shots):
        for s in shots:
            out.append(Shot(s.start_s, s.end_s, s.frame_s, prepare(s.image)))

    with _Opened(path) as v:
        step = max(step, v.duration / frames) if v.duration else step
        n, last_t, rotation, size = 0, -float("inf"), 0, None
        try:
            for frame in sampled_frames(v, step):
                t = _frame_time(frame, v)
                if t is None or t < last_t + 0.75 * step:
                    continue
                last_t = t
                rotation = _rotation(frame)
                img = _picture(frame, image_size, rotation)
                if size is None:
                    size = (frame.width, frame.height) if rotation % 180 == 0 else (frame.height, frame.width)
                keep(cutter.add(t, thumbnail(np.asarray(img)), img))
                n += 1
                if n >= frames:
                    break
        except (av.error.FFmpegError, ValueError, EOFError, MemoryError) as exc:
            raise MediaError(path, f"truncated or corrupt video ({_short(exc)})") from exc
        if n == 0:
            raise MediaError(path, "no decodable frames (truncated or corrupt video?)")
        end = max(v.duration, last_t)
        if n < frames and v.duration and v.last_packet_s < 0.9 * v.duration - 1.0:
            raise MediaError(path, f"truncated video (its data ends at {v.last_packet_s:.1f} s of "
                                   f"{v.duration:.1f} s)")
        keep(cutter.finish(end))
        return VideoShots(out, size[0], size[1], round(end, 3), creation_time(v.container), rotation, n)


def frame_at(path, t: float, short_side: int):
    """The picture at `t` seconds (the first frame at or after it, else the last before), RGB, as displayed,
    short side at most `short_side`. For thumbnails and for embedding one shot again."""
    av = _av()
    path = os.fspath(path)
    with _Opened(path) as v:
        s = v.stream
        try:
            if t > 0.5 and s.time_base:
                v.container.seek(int((t + v.start) / s.time_base), stream=s, backward=True, any_frame=False)
            best = None
            for frame in v.container.decode(s):
                ft = _frame_time(frame, v)
                best = frame
                if ft is None or ft >= t - 1e-3:
                    break
        except (av.error.FFmpegError, ValueError, EOFError, MemoryError) as exc:
            raise MediaError(path, f"truncated or corrupt video ({_short(exc)})") from exc
        if best is None:
            raise MediaError(path, f"no frame at {t:.2f} s")
        return _picture(best, short_side, _rotation(best))
