"""Cut a stream of sampled video frames into shots, cheaply and in bounded memory.

Each sample brings a small RGB thumbnail (for comparing) and its picture at the model's size (for the
shot's vector). A new shot starts where the picture changes: the mean absolute difference of two
consecutive thumbnails, after the best brightness scaling of one onto the other (so a fade, which only
scales brightness, is no cut), and the distance of the colour histograms of their quarters (so motion,
which moves pixels but keeps colours where they were, is no cut). Black frames (an intro, the bottom of a fade) and blank white frames end
the shot before them and start none. A shot longer than `max_shot_s` is stored as several segments, so
an open shot holds a bounded number of pictures and memory never grows with the video's length.

The shot's picture is its most typical sample: among the samples at full brightness (not the dim ends of
a fade), the one closest to the shot's mean thumbnail.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

THUMB = 24  # side of the comparison thumbnails (pixels)
DARK_P95 = 32  # a sample whose 95th percentile of max(R, G, B) is below this is black (luma would call blue dark)
WHITE_MEAN, FLAT_STD = 235.0, 4.0  # ... and one this bright and this flat is blank
CUT_RESIDUAL = 14.0  # mean |a - s*b| (0-255) above which two samples may be different shots
CUT_HIST = 0.15  # mean colour-histogram distance (0-1) of their quarters above which they are
CUT_STRONG = 48.0  # a residual this large is a cut whatever the histograms say
FADE_RATIO = 0.7  # a sample dimmer than this share of its shot's brightest is a fade frame
MAX_SHOT_S = 30.0  # a longer shot becomes segments of at most this length
HIST_BINS = 4  # per channel: 64 joint colour bins


@dataclass
class Shot:
    start_s: float
    end_s: float
    frame_s: float  # the time of the picture that represents it
    image: Any  # that picture (a PIL image at the model's size, or what the caller made of it)


@dataclass
class _Sample:
    t: float
    thumb: np.ndarray  # float32 [THUMB, THUMB, 3]
    luma: float
    image: Any


def luma(thumb: np.ndarray) -> np.ndarray:
    return thumb[..., 0] * 0.299 + thumb[..., 1] * 0.587 + thumb[..., 2] * 0.114


def is_blank(thumb: np.ndarray) -> bool:
    """Black (nothing but near-black pixels) or a flat, near-white frame: no picture worth a vector."""
    thumb = np.asarray(thumb, np.float32)
    if float(np.percentile(thumb.max(axis=-1), 95)) < DARK_P95:
        return True
    y = luma(thumb)
    return float(y.mean()) > WHITE_MEAN and float(y.std()) < FLAT_STD


def residual(a: np.ndarray, b: np.ndarray) -> float:
    """Mean |a - s*b| for the brightness scale s that fits b to a best (least squares): 0 for a fade."""
    a = a.reshape(-1).astype(np.float32)
    b = b.reshape(-1).astype(np.float32)
    s = float(a @ b) / max(float(b @ b), 1e-6)
    return float(np.abs(a - s * b).mean())


def histogram(thumb: np.ndarray) -> np.ndarray:
    """Colour histograms of the thumbnail's four quarters [4, HIST_BINS**3], each summing to 1: colours
    move little in a second of motion, while the same colours in other places (a swapped scene) differ."""
    q = np.clip(np.asarray(thumb, np.float32) * (HIST_BINS / 256.0), 0, HIST_BINS - 1).astype(np.int64)
    idx = (q[..., 0] * HIST_BINS + q[..., 1]) * HIST_BINS + q[..., 2]
    h, w = idx.shape
    cells = [idx[:h // 2, :w // 2], idx[:h // 2, w // 2:], idx[h // 2:, :w // 2], idx[h // 2:, w // 2:]]
    out = np.stack([np.bincount(c.reshape(-1), minlength=HIST_BINS ** 3) for c in cells]).astype(np.float32)
    return out / np.maximum(out.sum(axis=1, keepdims=True), 1.0)


def is_cut(a: np.ndarray, b: np.ndarray) -> bool:
    r = residual(a, b)
    if r >= CUT_STRONG:
        return True
    return r >= CUT_RESIDUAL and 0.5 * float(np.abs(histogram(a) - histogram(b)).sum(axis=1).mean()) >= CUT_HIST


class ShotCutter:
    """Feed samples in time order with `add`; each call returns the shots it closed; `finish` closes the last."""

    def __init__(self, max_shot_s: float = MAX_SHOT_S):
        self.max_shot_s = max_shot_s
        self._open: list[_Sample] = []
        self._fallback: Optional[_Sample] = None  # the brightest sample while no shot was kept (all black?)
        self._emitted = 0

    def add(self, t: float, thumb: np.ndarray, image) -> list[Shot]:
        thumb = np.asarray(thumb, np.float32)
        s = _Sample(float(t), thumb, float(luma(thumb).mean()), image)
        if not self._emitted and (self._fallback is None or s.luma > self._fallback.luma):
            self._fallback = s
        if is_blank(thumb):
            return self._close(s.t)  # a black gap ends the shot before it
        out: list[Shot] = []
        if self._open and (is_cut(self._open[-1].thumb, thumb) or s.t - self._open[0].t >= self.max_shot_s):
            out = self._close(s.t)
        self._open.append(s)
        return out

    def finish(self, end_s: float) -> list[Shot]:
        out = self._close(end_s)
        f = self._fallback
        if not self._emitted and f is not None:  # black frames only: one shot for all of it, its brightest frame
            out = [Shot(0.0, max(float(end_s), f.t), f.t, f.image)]
            self._emitted += 1
        self._fallback = None
        return out

    def _close(self, end_s: float) -> list[Shot]:
        samples, self._open = self._open, []
        if not samples:
            return []
        bright = max(x.luma for x in samples)
        full = [x for x in samples if x.luma >= FADE_RATIO * bright] or samples
        mean = np.mean([x.thumb / max(x.luma, 1.0) for x in full], axis=0)
        best = min(full, key=lambda x: float(np.abs(x.thumb / max(x.luma, 1.0) - mean).mean()))
        self._emitted += 1
        self._fallback = None  # a shot was kept: the fallback picture is not needed
        return [Shot(samples[0].t, max(float(end_s), samples[-1].t), best.t, best.image)]


def thumbnail(rgb: np.ndarray) -> np.ndarray:
    """A THUMB x THUMB float32 thumbnail of an RGB uint8 array (block means; no PIL needed)."""
    a = np.asarray(rgb, np.float32)
    h, w = a.shape[:2]
    ys = np.linspace(0, h, THUMB + 1).astype(int)
    xs = np.linspace(0, w, THUMB + 1).astype(int)
    rows = np.add.reduceat(a, ys[:-1], axis=0) / np.maximum(np.diff(ys), 1)[:, None, None]
    return np.add.reduceat(rows, xs[:-1], axis=1) / np.maximum(np.diff(xs), 1)[None, :, None]
